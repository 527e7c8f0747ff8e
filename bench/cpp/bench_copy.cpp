// BM_Copy: the measured memory-copy bandwidth of this machine, the yardstick for every other
// benchmark's GB/s in the same run. Byte model: a copy of `size` bytes reads and writes it,
// 2 * size bytes. 512 MiB, well beyond the L3; split over the OpenMP threads like the kernels.
#include <cstring>
#include <vector>

#include "grid.hpp"
#include "traffic.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace tactic_bench {

static void copy_cpu(benchmark::State& st) {
  const std::size_t size = std::size_t(512) << 20;
  std::vector<char> src(size, 1), dst(size, 0);
  for (auto _ : st) {
#pragma omp parallel
    {
#ifdef _OPENMP
      const std::size_t nt = (std::size_t)omp_get_num_threads(), t = (std::size_t)omp_get_thread_num();
#else
      const std::size_t nt = 1, t = 0;
#endif
      const std::size_t b = size * t / nt, e = size * (t + 1) / nt;
      std::memcpy(dst.data() + b, src.data() + b, e - b);
    }
    benchmark::DoNotOptimize(dst.data());
    benchmark::ClobberMemory();
  }
  report_traffic(st, 2.0 * (double)size);
}

void register_copy_cpu() {
  benchmark::RegisterBenchmark("BM_Copy/cpu", copy_cpu)->UseRealTime()->Unit(benchmark::kMillisecond);
}

}  // namespace tactic_bench
