// The threshold selection (StepPlan::selection == threshold): the prior stop rule's selection
// and the attention over it in five launches after prepare_q, with no one-block-per-head
// kernel, no sort and no row list. Plain C++ header (no CUDA types).
//
//   score        q . centroid for every query head (select_rank.cu, as the ranked selection)
//   hist         many blocks per head add their clusters to the head's score histogram
//                (tokens, centroid prior); the last block of a head takes the exact head as
//                whole buckets (bucket <= bh) holding head_fraction of the tokens
//   head pass    attention over the union of the group's exact heads (plus sinks and recent
//                rows), blocks per (sequence, KV head) x chunk of clusters; each query head
//                also sums the exact mass of its own head's rows. The last block of a KV head
//                calibrates alpha = exact / prior for each query head and walks the histogram
//                to the stop bucket bx where the estimate reaches P_eff * z (whole buckets)
//   rest pass    attention over the clusters some head of the group took after its head
//                (bucket <= bx) that the head pass did not read: one wave of blocks (3 per
//                SM, at least one per KV head), shared out by the work finish_item left per
//                KV head, so a KV head whose group reads most of its context gets most of
//                them; it leaves each cluster's mark (1 head pass, 2 rest pass) per layer,
//                which `reuse` passes read instead (with the layer's work, for the same split)
//   merge        the passes' partial records, log-sum-exp (attention_merge.cu)
//
// Against the ranked selection it reads the stop rule's crossing buckets whole (a bucket is
// 1/64 logit or less), so it reads as many or more tokens for the same P_eff, never fewer.
// Fits 16-bit K/V, head_dim 64, 80, 96 or 128, at most 8 query heads per KV head,
// kernels built for sm_80+ (threshold_selection_fit says why not elsewhere).
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

#include "attention.hpp"
#include "select.hpp"

namespace tactic {
namespace cuda {

// Head-pass blocks per (sequence, KV head) for heads with room for cmax clusters, as the state
// is laid out: about 256 clusters a block, 32 to kMaxThreshUnits. A step over many items runs
// fewer (about three waves over all items, at least 4), within the same layout.
constexpr int kMaxThreshUnits = 128;
int threshold_units(int64_t cmax);

// Device state of the threshold selection for up to `heads` query heads and `items` (sequence,
// KV head) pairs of group g and head dim d (histograms, hand-over, the passes' partial records):
// zero it at allocation; every step leaves it as the next one needs it.
// sms: the device's multiprocessors (the rest pass runs a wave of blocks).
std::size_t threshold_state_bytes(int64_t heads, int64_t items, int64_t g, int64_t d, int64_t cmax, int64_t sms);

// Empty where the threshold selection can run for this shape on the current device, else the reason.
std::string threshold_selection_fit(DType dtype, int64_t head_dim, int64_t g);

struct ThresholdArgs {
  void* state = nullptr;        // threshold_state_bytes(max_heads, max_items, ...), zeroed once
  int64_t max_heads = 0, max_items = 0;  // its sizes (max_batch x Hq, x Hkv): one layout for every batch
  uint8_t* layer_mark = nullptr;  // [batch * Hkv, cmax] this layer's cluster marks (1, 2; 0 unread)
  int64_t* layer_work = nullptr;  // [batch * Hkv] this layer's rest-pass work per item (zeroed once)
  bool reuse = false;           // attention only, over the marks of the layer's last selection
  AttentionArgs attention;      // K/V, q, head_index, workspace, out (null: selection only)
};

// The selection and attention of one step (after prepare_q): a.scores etc. as the ranked
// selection's SelectArgs (prior rule; head_mark, head_tokens, est_mass, counts written; sm_count
// as the state was sized with).
void threshold_step(const StepGeometry& s, const SelectArgs& a, const ThresholdArgs& t);

}  // namespace cuda
}  // namespace tactic
