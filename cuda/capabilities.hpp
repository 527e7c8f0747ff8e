// Which kernel features a device can use with the kernels of this build (plain C++ header).
// Every launcher's gate and tactic::device_features() ask the same functions, so what is
// reported is what runs.
#pragma once
#include <vector>

#include "tactic/build_info.hpp"

namespace tactic {
namespace cuda {

// The architecture the kernels of this build run as on the current device (their PTX
// version: 75 for a build for sm_75 JIT-compiled on an H200).
int kernel_arch();
bool head_split_available();     // select.cu: thread-block-cluster selection kernels
bool tensor_core_available();    // attention_mma.cu: the mma.sync chunk kernel
std::vector<DeviceFeatures> device_features();
// Writes DeviceFeatures::warning of the current device to stderr, once per process and
// device, where there is one (DeviceDecoder's constructor calls it).
void warn_missing_features();

}  // namespace cuda
}  // namespace tactic
