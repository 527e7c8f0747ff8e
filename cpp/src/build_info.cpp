#include "tactic/build_info.hpp"

#ifdef TACTIC_WITH_CUDA
#include "capabilities.hpp"
#endif

namespace tactic {

BuildInfo build_info() {
  BuildInfo b;
  b.version = TACTIC_VERSION;
#ifdef _OPENMP
  b.with_openmp = true;
#endif
#ifdef TACTIC_WITH_CUDA
  b.with_cuda = true;
  b.cuda_archs = TACTIC_CUDA_ARCHS;
  b.cuda_compiler = TACTIC_NVCC_VERSION;
#endif
  return b;
}

std::vector<DeviceFeatures> device_features() {
#ifdef TACTIC_WITH_CUDA
  return cuda::device_features();
#else
  return {};
#endif
}

}  // namespace tactic
