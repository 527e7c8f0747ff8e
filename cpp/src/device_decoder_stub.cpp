// Without CUDA the device backend exists only as this stub: DecoderConfig::validate() already
// refuses CUDA devices, so these are never reached; they keep the Decoder's layout the same
// in both builds.
#ifndef TACTIC_WITH_CUDA
#include "device_decoder.hpp"

#include "tactic/decoder.hpp"

namespace tactic {
namespace cuda {

struct DeviceDecoder::Impl {};

DeviceDecoder::DeviceDecoder(const DecoderConfig&) {
  throw UnsupportedError("this build of Tactic has no CUDA backend");
}
DeviceDecoder::~DeviceDecoder() = default;
void DeviceDecoder::prefill(int64_t, int64_t, const TensorView&, const TensorView&, void*) {}
void DeviceDecoder::decode(int64_t, const TensorView&, const TensorView*, const TensorView*,
                           const TensorView*, const std::vector<int64_t>&, bool, void*) {}
void DeviceDecoder::stats(int64_t, LayerStats&) {}
const SlotState& DeviceDecoder::state(int64_t, int64_t, void*) const {
  static const SlotState empty{};
  return empty;
}
void DeviceDecoder::reset(int64_t) {}
void DeviceDecoder::recluster(int64_t, int64_t, void*) {}
std::size_t DeviceDecoder::bytes() const { return 0; }
void DeviceDecoder::attend(int64_t, const TensorView&, const TensorView&, const std::vector<int64_t>&, void*) {}
const std::vector<int64_t>& DeviceDecoder::last_slots(int64_t) const {
  static const std::vector<int64_t> none;
  return none;
}
void DeviceDecoder::set_target(double) {}
const StepPlan& DeviceDecoder::plan() const {
  static const StepPlan none{};
  return none;
}
void DeviceDecoder::set_kernels(const KernelOptions&) {}

}  // namespace cuda
}  // namespace tactic
#endif
