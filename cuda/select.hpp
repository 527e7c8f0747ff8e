// Launchers of the per-step CUDA kernels besides attention and k-means: q preparation, token
// append, centroid scoring, the per-head selection (exact head, centroid-prior tail estimate,
// stop point) and the per-KV-head union turned into a row list. Plain C++ (no CUDA types).
//
// Device-side state: `state` is [L * max_batch] SlotCounts, read by every kernel, so a step
// depends only on device memory and can be captured in a CUDA graph and replayed.
#pragma once
#include <cstddef>
#include <cstdint>

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
};

// qf[b, hq, :] = scale * q[b, hq, :] in fp32 (q: any float dtype, strides in elements).
void prepare_q(const StepGeometry& s, const void* q, DType dt, int64_t stride_b, int64_t stride_h,
               float scale, float* qf);

// Append one token per (sequence, KV head) at row total() and count it in n_recent (or as a
// sink while fewer than num_sink tokens exist and nothing is clustered).
void append_token(const StepGeometry& s, const void* k_new, const void* v_new, DType src,
                  int64_t stride_b, int64_t stride_h, void* k, void* v, int32_t* pos, DType dst,
                  int num_sink);

struct SelectArgs {
  const void* k;                 // store keys (storage dtype)
  DType dtype;
  const float* centroids;        // [L, B, Hkv, cmax, d]
  const int32_t* offsets;        // [L, B, Hkv, cmax + 1]
  const float* qf;               // [batch, Hq, d], scaled
  float* scores;                 // [batch * Hq, cmax] scratch
  float* scores_sorted;          // [batch * Hq, cmax] scratch
  int32_t* ids;                  // [batch * Hq, cmax] scratch
  int32_t* ids_sorted;           // [batch * Hq, cmax] scratch
  int32_t* seg_begin;            // [batch * Hq] scratch
  int32_t* seg_end;              // [batch * Hq] scratch
  void* sort_temp;               // CUB temp storage of select_sort_temp_bytes()
  size_t sort_temp_bytes;
  uint8_t* kv_mark;              // [batch * Hkv, cmax] union marks (zeroed by the launcher)
  uint8_t* head_mark;            // [batch * Hq, cmax] or null: each head's own clusters
  int64_t* head_tokens;          // [batch * Hq]
  double* est_mass;              // [batch * Hq]
  int32_t* rows;                 // [batch * Hkv, cap] row list for attention
  int32_t* counts;               // [batch * Hkv]
  int32_t* chunk_sums;           // [batch * Hkv, row_chunks(cmax)] scratch
  double target, margin, head_fraction;
  int64_t min_clusters;
  bool dense;                    // policy dense: every row, no selection
};

size_t select_sort_temp_bytes(int64_t segments, int64_t cmax);
int64_t row_chunks(int64_t cmax);  // size of SelectArgs::chunk_sums per (sequence, KV head)

// The whole selection of one step: scores, segmented sort, per-head stop point, union rows.
void select_step(const StepGeometry& s, const SelectArgs& a);

}  // namespace cuda
}  // namespace tactic
