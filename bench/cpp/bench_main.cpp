// tactic_bench: google-benchmark microbenchmarks of Tactic's kernels (bench/cpp/README.md).
//
//   tactic_bench [--tactic_sizes=default|large] [google-benchmark flags]
//
// --tactic_sizes picks the argument sets (grid.cpp); every other flag is google-benchmark's
// (--benchmark_filter=/cpu/, --benchmark_min_time=..., --benchmark_format=json, ...).
// Benchmarks are registered here, after the flags are read, because the size set decides
// which shapes exist.
#include <cstring>
#include <iostream>
#include <string>
#include <vector>

#include "grid.hpp"

namespace tactic_bench {
void register_copy_cpu();
void register_kmeans_cpu(const Axes& axes);
void register_attention_cpu(const Axes& axes);
void register_decoder_cpu(const Axes& axes);
#ifdef TACTIC_BENCH_CUDA
bool cuda_usable(std::string& why);
void release_cuda_decoder();
void register_cuda_kernels(const Axes& axes);
void register_cuda_decoder(const Axes& axes);
#endif
}  // namespace tactic_bench

int main(int argc, char** argv) {
  std::string set = "default";
  std::vector<char*> args;
  for (int i = 0; i < argc; ++i) {
    const char* flag = "--tactic_sizes=";
    if (i > 0 && std::strncmp(argv[i], flag, std::strlen(flag)) == 0) set = argv[i] + std::strlen(flag);
    else args.push_back(argv[i]);
  }
  tactic_bench::Sizes sizes;
  try {
    sizes = tactic_bench::sizes_for(set);
  } catch (const std::exception& e) {
    std::cerr << "tactic_bench: " << e.what() << "\n";
    return 2;
  }
  using namespace tactic_bench;
  register_copy_cpu();
  register_kmeans_cpu(sizes.cpu);
  register_attention_cpu(sizes.cpu);
  register_decoder_cpu(sizes.cpu);
  std::string cuda = "off (built without CUDA)";
#ifdef TACTIC_BENCH_CUDA
  std::string why;
  if (cuda_usable(why)) {
    register_cuda_kernels(sizes.cuda);
    register_cuda_decoder(sizes.cuda);
    cuda = "on";
  } else {
    cuda = "off (" + why + ")";
    std::cerr << "tactic_bench: CUDA benchmarks not registered: " << why << "\n";
  }
#endif
  int n = (int)args.size();
  benchmark::Initialize(&n, args.data());
  if (benchmark::ReportUnrecognizedArguments(n, args.data())) return 1;
  benchmark::AddCustomContext("tactic_sizes", set);
  benchmark::AddCustomContext("tactic_cuda", cuda);
  benchmark::RunSpecifiedBenchmarks();
#ifdef TACTIC_BENCH_CUDA
  if (cuda == "on") release_cuda_decoder();
#endif
  benchmark::Shutdown();
  return 0;
}
