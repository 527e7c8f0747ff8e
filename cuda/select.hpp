// Launchers of the per-step CUDA kernels besides attention and k-means: q preparation, token
// append, centroid scoring, the per-head selection (exact head, centroid-prior tail estimate,
// stop point) and the per-KV-head union turned into a row list. Plain C++ (no CUDA types).
//
// Device-side state: `state` is [L * max_batch] SlotCounts, read by every kernel, so a step
// depends only on device memory and can be captured in a CUDA graph and replayed.
#pragma once
#include <cstddef>
#include <cstdint>

#include "attention.hpp"
#include "tactic/tensor.hpp"

namespace tactic {
namespace cuda {

struct SlotCounts {
  int32_t n_sink, n_clustered, n_recent, n_clusters;
};

// Geometry shared by the step kernels. Store head index of (layer, slot, h):
// (layer * max_batch + slot) * hkv + h; its row r of K is at k + (index * cap + r) * d.
struct StepGeometry {
  int64_t layer, max_batch, hkv, g, d, cap, cmax;
  int64_t batch;          // sequences in this step
  const int32_t* slots;   // device [batch]
  SlotCounts* state;      // device [L * max_batch]
  void* stream;
  bool pdl = false;       // launch with programmatic dependent launch (StepPlan::pdl)
};

// qf[b, hq, :] = scale * q[b, hq, :] in fp32 (q: any float dtype, strides in elements), and,
// where head_index is not null, head_index[b * Hkv + h] = the store head of sequence b's slot
// and KV head h in this layer (what the attention reads K/V by; one launch for both).
void prepare_q(const StepGeometry& s, const void* q, DType dt, int64_t stride_b, int64_t stride_h,
               float scale, float* qf, int32_t* head_index);

// Append one token per (sequence, KV head) at row total() and count it in n_recent (or as a
// sink while fewer than num_sink tokens exist and nothing is clustered). A sequence already
// holding cap tokens stores nothing and counts the token in lost[layer * max_batch + slot]
// (lost may be null): replays of a captured step cannot be checked on the host.
void append_token(const StepGeometry& s, const void* k_new, const void* v_new, DType src,
                  int64_t stride_b, int64_t stride_h, void* k, void* v, int32_t* pos, DType dst,
                  int num_sink, int32_t* lost);

struct SelInfo;    // per-head hand-over between the selection kernels (select_common.cuh)
struct ExactPart;  // one block's exact (max, sum) partial (select_common.cuh)

struct SelectArgs {
  const void* k;                 // store keys (storage dtype)
  DType dtype;
  const void* centroids;         // [L, B, Hkv, cmax, d] in the storage dtype `dtype`
  const int32_t* offsets;        // [L, B, Hkv, cmax + 1]
  const float* spreads;          // [L, B, Hkv, cmax]: see SelectOptions::spread
  double spread;                 // its weight (0: rank by q . centroid alone)
  const float* qf;               // [batch, Hq, d], scaled
  float* scores;                 // [batch * Hq, cmax] scratch: q . centroid
  int32_t* seg_max;              // [batch * Hq] best score as an ordered int; every entry must
                                 // be below any score before a step (select_step leaves it so)
  int32_t* seg_min;              // [batch * Hq] worst score, likewise: above any score before a step
  int32_t* ids;                  // [batch * Hq, cmax] scratch: each head's exact-head clusters
  int32_t* tasks;                // [batch * Hq, tasks_stride] int2 scratch: exact-head row ranges
  int64_t tasks_stride;          // head_tasks_stride(cmax, cap) int2 entries per head
  void* scratch;                 // select_scratch_bytes(batch * Hq) bytes; carved by select_step
  SelInfo* info;                 // (set by select_step from scratch)
  ExactPart* parts;
  float* hist_pri;
  int32_t* cand;
  uint8_t* kv_mark;              // [batch * Hkv, cmax] union marks: zero before a step
                                 // (zero them at allocation; each step leaves them zero)
  uint8_t* head_mark;            // [batch * Hq, cmax] or null: each head's own clusters
  int64_t* head_tokens;          // [batch * Hq]
  double* est_mass;              // [batch * Hq]
  int32_t* rows;                 // [batch * Hkv, cap] row list for attention
  int32_t* counts;               // [batch * Hkv]
  int32_t* chunk_sums;           // [batch * Hkv, row_chunks(cmax)] scratch
  double target, margin, head_fraction;
  int64_t min_clusters;
  bool dense;                    // policy dense: every row, no selection
  int head_split = 1;            // blocks per query head (StepPlan::head_split for this batch)
  int sm_count = 0;              // the device's multiprocessors (StepPlan::sm_count)
  bool score_tensor_cores = false;  // centroid scores on tensor cores (StepPlan::score)
  // The certified stop rule (select_certify.cu) where `certified`; otherwise the prior rule.
  bool certified = false;
  double z_conf = 0.0;           // normal quantile of SelectOptions::confidence
  int tail_samples = 64, max_rounds = 4;
  uint8_t* cert_mark = nullptr;  // [batch * Hq, cmax] zero before a step; each step leaves it zero
  double* cert_r = nullptr;      // (set by select_step from scratch) exact-mass partials
  // group_head (SelectOptions::group_head; prior rule): every query head's exact read is the
  // union of its group's exact heads, and the attention over that union gives its exact mass.
  // select_head marks the union 1, an attention pass over it leaves each query head's record
  // in `carry`, select_stop marks the rest 2, and the caller's attention over the rest
  // (rows from union_counts on, rest_counts of them) merges the carried records.
  bool group_head = false;
  float* carry = nullptr;            // [batch * Hq, carry_record_floats(d)]
  int32_t* union_counts = nullptr;   // [batch * Hkv] rows of the union, first in each row list
  int32_t* rest_counts = nullptr;    // [batch * Hkv] rows after them (sinks, the rest, recent)
  AttentionArgs union_attention{};   // the first pass as the caller's (K/V, q, head_index, rows,
                                     // workspace, stream, kernel, pdl): select_step sets its
                                     // counts and carry_out
};

// The tensor-core centroid scores (select_rank.cu): whether this build's kernels have them on
// the current device, and whether a decoder's shape fits them.
bool score_tensor_cores_available();
bool score_tensor_cores_fit(DType dtype, int64_t head_dim, int64_t g);

size_t select_scratch_bytes(int64_t heads);
// Blocks per query head in select_head / select_stop for a step over `heads` query heads with
// room for `cmax` clusters each: 1, or 2 / 4 (thread-block clusters) where heads have many
// clusters and the device holds them all in one wave. The plan's automatic choice.
int auto_head_split(int64_t heads, int64_t cmax);
// Row-range tasks a head's exact clusters can need: one per 16 rows plus one per cluster.
inline int64_t head_tasks_stride(int64_t cmax, int64_t cap) { return cmax + (cap + 15) / 16 + 1; }  // per step, heads = batch * Hq (at most)
int64_t row_chunks(int64_t cmax);  // size of SelectArgs::chunk_sums per (sequence, KV head)

// The most tail samples the CUDA certified stop rule draws per query head.
int certify_max_samples();

// The whole selection of one step: scores, per-head exact head and stop point (no sort: a
// score histogram plus exact ranking of the one crossing bucket), the certified rule's sample
// and top-ups where a.certified, union rows.
void select_step(const StepGeometry& s, const SelectArgs& a);

}  // namespace cuda
}  // namespace tactic
