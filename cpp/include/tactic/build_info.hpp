// What this build of Tactic holds, and which of its CUDA kernel features a device can use.
// A feature needs both a GPU that has it and kernels compiled for an architecture that has
// it: a build for sm_80 run on an H200 works, without the sm_90 kernels (slower), and says so.
#pragma once
#include <string>
#include <vector>

namespace tactic {

struct BuildInfo {
  std::string version;
  bool with_cuda = false;
  bool with_openmp = false;
  std::string cuda_archs;      // the CUDA architectures compiled ("80 90"), empty without CUDA
  std::string cuda_compiler;   // nvcc's version, empty without CUDA
};

// The features of one device for this build's kernels.
struct DeviceFeatures {
  int device = 0;
  std::string name;
  int compute_capability = 0;  // 90 for sm_90
  int sm_count = 0;
  int kernel_arch = 0;         // the architecture this build's kernels run as here (PTX version)
  bool programmatic_dependent_launch = false;  // sm_90 kernels on an sm_90+ GPU
  bool thread_block_clusters = false;          // the split selection kernels (sm_90)
  bool tensor_core_attention = false;          // the mma.sync attention kernel (sm_80)
  std::string warning;  // non-empty where the device has a feature these kernels were not built for
};

BuildInfo build_info();
// Every visible CUDA device (none in a build without CUDA, or on a machine without a GPU).
std::vector<DeviceFeatures> device_features();

}  // namespace tactic
