#include "capabilities.hpp"

#include <cstdio>
#include <mutex>
#include <set>
#include <string>

#include "common.cuh"

namespace tactic {
namespace cuda {

namespace {
// Compiled like every other kernel of the build: its architecture is theirs.
__global__ void arch_probe_kernel() {}

std::string sm(int v) { return "sm_" + std::to_string(v); }
}  // namespace

int kernel_arch() { return compiled_arch<arch_probe_kernel>(); }

std::vector<DeviceFeatures> device_features() {
  std::vector<DeviceFeatures> out;
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();
    return out;
  }
  int prev = 0;
  TACTIC_CUDA_CHECK(cudaGetDevice(&prev));
  for (int dev = 0; dev < n; ++dev) {
    TACTIC_CUDA_CHECK(cudaSetDevice(dev));
    cudaDeviceProp prop{};
    TACTIC_CUDA_CHECK(cudaGetDeviceProperties(&prop, dev));
    DeviceFeatures f;
    f.device = dev;
    f.name = prop.name;
    f.compute_capability = prop.major * 10 + prop.minor;
    f.sm_count = prop.multiProcessorCount;
    f.kernel_arch = kernel_arch();
    f.programmatic_dependent_launch = f.kernel_arch >= 90;
    f.thread_block_clusters = head_split_available();
    f.tensor_core_attention = tensor_core_available();
    const int want = std::min(f.compute_capability, 90);  // the newest code path any kernel has
    if (f.kernel_arch < want) {
      std::string lost;
      if (f.compute_capability >= 90) lost += "programmatic dependent launch, thread-block-cluster selection";
      if (f.compute_capability >= 80 && f.kernel_arch < 80) lost += std::string(lost.empty() ? "" : ", ") + "tensor-core attention";
      f.warning = "Tactic: this build's CUDA kernels run as " + sm(f.kernel_arch) + " on " + f.name + " (" +
                  sm(f.compute_capability) + "): " + lost +
                  " are off and the decode step is slower. Rebuild on this machine (the default targets its "
                  "GPU) or with -Ccmake.define.CMAKE_CUDA_ARCHITECTURES=" + std::to_string(f.compute_capability) + ".";
    }
    out.push_back(f);
  }
  TACTIC_CUDA_CHECK(cudaSetDevice(prev));
  return out;
}

void warn_missing_features() {
  static std::mutex mu;
  static std::set<int> warned;
  int dev = 0;
  TACTIC_CUDA_CHECK(cudaGetDevice(&dev));
  std::lock_guard<std::mutex> lock(mu);
  if (!warned.insert(dev).second) return;
  const auto all = device_features();
  if (dev < (int)all.size() && !all[dev].warning.empty()) std::fprintf(stderr, "%s\n", all[dev].warning.c_str());
}

}  // namespace cuda
}  // namespace tactic
