// Launcher of the CUDA decode attention: split-KV ("flash-decoding") over a per-(sequence,
// KV head) list of selected rows, log-sum-exp merge of the chunks, fp32 accumulation. Plain
// C++ header (no CUDA types) so host code without nvcc can fill the arguments.
//
// Host-sync free and graph-capturable: the row counts stay on the device, the grid is sized
// from the host bound `max_count`, and the only buffer is the caller's workspace.
#pragma once
#include <cstddef>
#include <cstdint>

#include "tactic/tensor.hpp"
#include "tactic/options.hpp"

namespace tactic {
namespace cuda {

// Split-KV chunks per (sequence, KV head) at most: each writes one partial (m, l, acc[g][d]) to
// the workspace, and the chunk length adapts to the item's row count (a multiple of 64 rows, at
// least 64), so a short sparse selection still spreads over many blocks and a long one keeps
// the partials small next to the K/V it reads.
constexpr int64_t kAttentionSplits = 64;

struct AttentionArgs {
  const void* k = nullptr;          // device KV store, row length d, 16-byte aligned
  const void* v = nullptr;
  DType kv_dtype = DType::f16;      // f32, f16 or bf16
  int64_t cap = 0;                  // rows per store head: head hi's row r is at k + (hi * cap + r) * d
  int64_t d = 0;                    // head dim: 64, 80, 96, 128 or 256
  int64_t batch = 0, hkv = 0, g = 0;  // work items i = b * hkv + h; query heads Hq = hkv * g
  const int32_t* head_index = nullptr;  // device [batch * hkv]: store head index of item i
  const float* q = nullptr;         // device [batch, hkv * g, d] fp32, already scaled by the
                                    // softmax scale; query head of item i's group j is h * g + j
  const int32_t* rows = nullptr;    // device [batch * hkv, rows_stride] row indices of item i;
                                    // nullptr = dense (rows 0 .. count-1)
  int64_t rows_stride = 0;
  const int32_t* row_start = nullptr;  // device [batch * hkv] or nullptr: item i's list begins at
                                    // rows[i * rows_stride + row_start[i]] (start + count <= rows_stride)
  const int32_t* counts = nullptr;  // device [batch * hkv]: rows of item i (0 writes zeros)
  int64_t max_count = 0;            // host bound of every count (clamped to it on the device)
  float* workspace = nullptr;       // device, attention_workspace_bytes(...) bytes, 16-byte aligned
  void* out = nullptr;              // device [batch, hkv * g, d], last dim contiguous
  DType out_dtype = DType::f32;     // f32, f16 or bf16
  int64_t out_stride_b = 0, out_stride_h = 0;  // elements
  // Attention in two passes over disjoint row sets (group_head: the group's exact heads, then
  // the rest). carry_out: write each query head's unnormalised partial record instead of out;
  // carry_in: merge that record into this pass's result. Records: [batch * hkv * g,
  // carry_record_floats(d)] (m in log2 units, l, two unused, acc[d] relative to 2^m).
  float* carry_out = nullptr;
  const float* carry_in = nullptr;
  void* stream = nullptr;           // cudaStream_t
  AttentionKernel kernel = AttentionKernel::automatic;  // StepPlan::attention (resolved) or automatic
  bool pdl = true;                  // programmatic dependent launch where the kernels have it
};

// Workspace bytes for the given geometry (at least 16, so an allocation is never empty).
std::size_t attention_workspace_bytes(int64_t batch, int64_t hkv, int64_t g, int64_t d,
                                      int64_t max_count);

// A record: m (log2 units) at 0, l at 1, two unused floats (acc stays 16-byte aligned), acc[d]
// from kCarryAcc.
constexpr int64_t kCarryAcc = 4;
constexpr int64_t carry_record_floats(int64_t d) { return kCarryAcc + d; }  // floats per record

// Enqueues the chunk kernel and the merge kernel on a.stream. Throws UnsupportedError for a
// head dim other than 64/80/96/128/256, TypeError for a non-float dtype, ValueError for
// inconsistent sizes or misaligned pointers. Never synchronises.
void decode_attention(const AttentionArgs& a);

// The chunk kernel decode_attention runs for `requested` (automatic: tensor cores for groups of
// 3-8 query heads with 16-bit K/V and head dim <= 128 where the kernels have sm_80 code, CUDA
// cores elsewhere). UnsupportedError for tensor cores where they cannot run.
AttentionKernel resolve_attention_kernel(AttentionKernel requested, DType kv, int64_t d, int64_t g);

}  // namespace cuda
}  // namespace tactic
