// The CUDA backend of tactic::Decoder: a KV store in device memory and the decode step as a
// sequence of kernels on one stream. Plain C++ header (no CUDA types) so cpp/src/decoder.cpp
// can hold one; without CUDA, cpp/src/device_decoder_stub.cpp provides a constructor that
// raises UnsupportedError.
//
// The decode step never synchronises with the host: sequence lengths live in device memory
// (the host keeps a mirror for argument checks), selection sizes stay on the device and every
// buffer is allocated at construction, so a step can be captured in a CUDA graph and replayed,
// with or without its append. A replayed append advances the device counts only; the host
// re-reads them before it next needs them, re-clustering is left to recluster() between
// replays, and a token appended to a full slot is dropped and reported (CapacityError) at the
// next host call about that slot.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "tactic/options.hpp"
#include "tactic/plan.hpp"
#include "tactic/store.hpp"
#include "tactic/tensor.hpp"

namespace tactic {

struct LayerStats;

namespace cuda {

class DeviceDecoder {
 public:
  explicit DeviceDecoder(const DecoderConfig& cfg);
  ~DeviceDecoder();
  DeviceDecoder(const DeviceDecoder&) = delete;
  DeviceDecoder& operator=(const DeviceDecoder&) = delete;

  // Arguments are validated by the Decoder before these run.
  void prefill(int64_t layer, int64_t slot, const TensorView& keys, const TensorView& values,
               void* stream);
  void decode(int64_t layer, const TensorView& q, const TensorView* k_new,
              const TensorView* v_new, const TensorView* out, const std::vector<int64_t>& slots,
              bool append, void* stream);
  // Attention of q over the rows the last decode/select of `layer` chose for the same slots
  // (no selection work). The Decoder checks the arguments.
  void attend(int64_t layer, const TensorView& q, const TensorView& out, const std::vector<int64_t>& slots,
              void* stream);
  // Slots of the last decode/select of `layer` (empty before the first).
  const std::vector<int64_t>& last_slots(int64_t layer) const;
  void set_target(double target);
  const StepPlan& plan() const;
  void set_kernels(const KernelOptions& kernels);  // re-plans; the old plan stays on failure
  // Copies the statistics of the last decode of `layer` to the host (synchronises).
  void stats(int64_t layer, LayerStats& out);
  // The counts of (layer, slot); re-read from the device (a synchronisation) where replays of a
  // captured append may have moved them, unless `stream` is capturing. CapacityError, once,
  // for tokens such replays could not store.
  const SlotState& state(int64_t layer, int64_t slot, void* stream) const;
  void reset(int64_t slot);
  void recluster(int64_t layer, int64_t slot, void* stream);
  std::size_t bytes() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> p_;
};

}  // namespace cuda
}  // namespace tactic
