// Decoder (Python: tactic.SparseDecoder): the KV store plus the per-step selection and
// attention of every layer.
//
//   Decoder dec(cfg);
//   dec.prefill(layer, slot, keys [N, Hkv, D], values [N, Hkv, D]);
//   dec.decode(layer, q [B, Hq, D], &k_new [B, Hkv, D], &v_new [B, Hkv, D], &out [B, Hq, D], slots);
//
// Ownership: the decoder owns its KV store, allocated in full at construction
// (num_layers * max_batch * num_kv_heads * max_tokens rows of K and V in cfg.dtype, plus
// cluster indexes). Inputs are borrowed views that are copied or read during the call and
// never kept; outputs are written into views the caller owns. K/V/q may be any float dtype
// (f32, f16, bf16; converted to cfg.dtype on store) on cfg.device, with unit stride in the
// last dimension and free strides elsewhere.
//
// Every call validates all of its arguments before it changes any state: a call that
// throws (a tactic::Error subclass, see error.hpp) leaves the decoder exactly as it was. Not
// safe for concurrent calls on one object; separate decoders may be used from separate
// threads. CPU work runs on cfg.num_threads OpenMP threads (0: all cores).
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "tactic/options.hpp"
#include "tactic/plan.hpp"
#include "tactic/select.hpp"
#include "tactic/store.hpp"
#include "tactic/tensor.hpp"

namespace tactic {

namespace cuda {
class DeviceDecoder;  // the CUDA backend (cuda/device_decoder.hpp), internal
}

// What the last decode() of a layer did, per sequence in that call (B = that call's batch;
// row b is sequence slots[b]). Owned by the decoder: see Decoder::stats().
struct LayerStats {
  int64_t batch = 0;
  std::vector<int64_t> slots;          // [B]
  std::vector<int64_t> context;        // [B] tokens in the sequence at that step
  std::vector<int64_t> kv_tokens;      // [B, Hkv] union tokens read per KV head
  std::vector<int64_t> head_tokens;    // [B, Hq] tokens each query head selected
  std::vector<double> est_mass;        // [B, Hq] the selector's mass estimate (NaN: none)
  // With record_selection: masks over token positions (1 = read), [B, Hkv, mask_len] (the
  // union each KV head read, which its query heads attended) and [B, Hq, mask_len] (each
  // query head's own selection); mask_len = max_tokens, positions >= context[b] are 0.
  std::vector<uint8_t> kv_mask, head_mask;
  int64_t mask_len = 0;
};

class Decoder {
 public:
  // Validates `cfg` (ValueError/TypeError/UnsupportedError) and allocates the whole store
  // (CapacityError if it cannot). Every slot starts empty.
  explicit Decoder(const DecoderConfig& cfg);
  ~Decoder();
  const DecoderConfig& config() const { return cfg_; }
  // True when cfg.device is a CUDA device: the store lives in GPU memory and every tensor
  // argument must be on that device.
  bool on_cuda() const { return cfg_.device.kind == DeviceKind::cuda; }
  // Read-only access to the host store's layout (tests, debugging); valid as long as the
  // decoder. CPU decoders only: UnsupportedError on CUDA.
  const KVStore& store() const;
  // Bytes held by the KV store (K, V, positions, clusters), host or device.
  std::size_t store_bytes() const;
  // CUDA work of prefill/decode/recluster is queued on `stream` (a cudaStream_t; null: the
  // legacy default stream); the decoder does not own it. Ignored on the CPU.
  void set_stream(void* stream) { stream_ = stream; }

  // Replace `slot`'s tokens in `layer` with keys/values [N, Hkv, D] (N may be 0; N <=
  // max_tokens, else CapacityError; NaN/Inf rejected), then cluster them (policy tactic).
  // Token i gets position i. Other layers and slots are untouched.
  void prefill(int64_t layer, int64_t slot, const TensorView& keys, const TensorView& values);
  // The checks of prefill() alone (to validate a whole batch before changing anything).
  void check_prefill(int64_t layer, int64_t slot, const TensorView& keys,
                     const TensorView& values) const;

  // One decode step of `layer` for the sequences `slots` (B of them, distinct):
  // append k_new/v_new [B, Hkv, D] (when `append`; same dtype; the new token attends to
  // itself), select, and write attention of q [B, Hq, D] into out [B, Hq, D] (when `out` is
  // not null; any float dtype). Row b of every tensor belongs to slots[b]. With append =
  // false and out = null this is selection alone (stats() then says what would be read).
  // budgets: null, or [B * Hkv] tokens per (sequence, KV head) for quest/topk (read during
  // the call only); else SelectOptions::budget applies. Appending to a full slot
  // (max_tokens) throws CapacityError before anything changes.
  void decode(int64_t layer, const TensorView& q, const TensorView* k_new,
              const TensorView* v_new, const TensorView* out, const std::vector<int64_t>& slots,
              const int64_t* budgets = nullptr, bool append = true);

  // Attention of q [B, Hq, D] into out [B, Hq, D] over the tokens the last decode() of
  // `layer` selected for the same `slots` (same order), without selecting again: e.g. to time
  // attention alone, or to attend a second query set over one selection. ValueError when that
  // selection does not exist (no decode yet, other slots, or the slots' rows changed since:
  // prefill, recluster, reset). CUDA decoders only (UnsupportedError on the CPU).
  void attend(int64_t layer, const TensorView& q, const TensorView& out, const std::vector<int64_t>& slots);
  // Changes P for later decode() calls (ValueError outside (0, 1]); nothing else changes.
  void set_target(double target);
  // The step's resolved kernel variants. On the CPU (device -1) only `selection` is planned:
  // 'threshold' runs the CUDA threshold selection's CPU twin, else the ranked selection.
  const StepPlan& plan() const;
  // Re-plans the CUDA step with other kernel variants (tests and A/B timings): ValueError for an
  // out-of-range option, UnsupportedError for one this build or device lacks; on failure the
  // plan stays as it was. On the CPU only selection_kernel has an effect.
  void set_kernels(const KernelOptions& kernels);

  // Statistics of the last decode() of `layer`; the reference stays valid for the decoder's
  // life but its contents are replaced by the next decode() of that layer.
  const LayerStats& stats(int64_t layer) const;
  int64_t length(int64_t layer, int64_t slot) const;  // tokens held (prefill + appended)
  void reset(int64_t slot);   // forget one sequence in every layer
  void reset_all();           // forget every sequence and every layer's stats
  // Fold the slot's recent (decoded, unclustered) tokens into the clusters now, instead of
  // waiting for recluster_interval.
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
  StepPlan cpu_plan_;                   // CPU: the selection, resolved (cpu_plan)
};

}  // namespace tactic
