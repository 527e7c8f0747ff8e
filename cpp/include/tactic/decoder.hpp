// SparseDecoder: the KV store plus the per-step selection and attention of every layer.
//
//   Decoder dec(cfg);
//   dec.prefill(layer, slot, keys [N, Hkv, D], values [N, Hkv, D]);
//   dec.decode(layer, q [B, Hq, D], k_new [B, Hkv, D], v_new [B, Hkv, D], out [B, Hq, D], slots);
//
// Every call validates all of its arguments before it changes any state: a call that
// throws leaves the decoder exactly as it was. Not safe for concurrent calls on one
// object; separate decoders may be used from separate threads.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "tactic/options.hpp"
#include "tactic/select.hpp"
#include "tactic/store.hpp"
#include "tactic/tensor.hpp"

namespace tactic {

namespace cuda {
class DeviceDecoder;
}

// What the last decode()/select() of a layer did, per sequence in that call.
struct LayerStats {
  int64_t batch = 0;
  std::vector<int64_t> slots;          // [B]
  std::vector<int64_t> context;        // [B] tokens in the sequence at that step
  std::vector<int64_t> kv_tokens;      // [B, Hkv] union tokens read per KV head
  std::vector<int64_t> head_tokens;    // [B, Hq] tokens each query head selected
  std::vector<double> est_mass;        // [B, Hq] the selector's mass estimate
  // With record_selection: masks over token positions, [B, Hkv, cap] and [B, Hq, cap].
  std::vector<uint8_t> kv_mask, head_mask;
  int64_t mask_len = 0;
};

class Decoder {
 public:
  explicit Decoder(const DecoderConfig& cfg);
  ~Decoder();
  const DecoderConfig& config() const { return cfg_; }
  bool on_cuda() const { return cfg_.device.kind == DeviceKind::cuda; }
  // The host KV store (CPU decoders only; UnsupportedError on CUDA).
  const KVStore& store() const;
  std::size_t store_bytes() const;
  // CUDA work of prefill/decode/recluster is queued on `stream` (a cudaStream_t; null: the
  // default stream). Ignored on the CPU.
  void set_stream(void* stream) { stream_ = stream; }

  // Replace `slot`'s tokens in `layer` with keys/values [N, Hkv, D] (N may be 0).
  void prefill(int64_t layer, int64_t slot, const TensorView& keys, const TensorView& values);
  // The checks of prefill() alone (to validate a whole batch before changing anything).
  void check_prefill(int64_t layer, int64_t slot, const TensorView& keys,
                     const TensorView& values) const;

  // One decode step of `layer` for the sequences `slots` (B of them, distinct):
  // append k_new/v_new [B, Hkv, D] (when `append`), select, and write attention of
  // q [B, Hq, D] into out [B, Hq, D] (when `attend`). budgets: null, or [B * Hkv] tokens for
  // quest/topk.
  void decode(int64_t layer, const TensorView& q, const TensorView* k_new,
              const TensorView* v_new, const TensorView* out, const std::vector<int64_t>& slots,
              const int64_t* budgets = nullptr, bool append = true);

  const LayerStats& stats(int64_t layer) const;
  int64_t length(int64_t layer, int64_t slot) const;
  void reset(int64_t slot);   // forget one sequence in every layer
  void reset_all();
  void recluster(int64_t layer, int64_t slot);

 private:
  void check_layer(int64_t layer) const;
  void check_slot(int64_t slot, const char* name) const;

  DecoderConfig cfg_;
  std::unique_ptr<KVStore> store_;               // CPU
  std::unique_ptr<cuda::DeviceDecoder> device_;  // CUDA
  void* stream_ = nullptr;
  mutable std::vector<LayerStats> stats_;
  std::vector<SelectScratch> scratch_;  // one per thread
};

}  // namespace tactic
