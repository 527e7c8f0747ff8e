// Decode attention over row ranges with fp32 accumulation, split into chunks whose partial
// results (running max m, denominator l, unnormalised accumulator) merge by log-sum-exp.
// All G query heads of one KV head share every K/V row load. These are the CPU building
// blocks under Decoder::decode and the ops; host memory only, arguments not checked.
#pragma once
#include <cstdint>
#include <vector>

#include "tactic/tensor.hpp"

namespace tactic {

// A half-open range of rows [begin, end) of one KV head's rows.
struct RowRange {
  int32_t begin = 0;
  int32_t end = 0;
  int64_t size() const { return (int64_t)end - begin; }
};

// Partial softmax state of G heads: m[g], l[g], acc[g * D + d].
struct AttentionPartial {
  std::vector<float> m, l, acc;
  void init(int64_t g, int64_t d);  // empty state for g heads of dim d: m = -inf, l = acc = 0
};

// Accumulate rows of the given ranges into `p` (which may already hold rows).
// k_base / v_base point at row 0; rows are `ld_k` / `ld_v` elements apart.
// q: [G, D] float32 (already scaled by the softmax scale).
void attention_accumulate(const void* k_base, int64_t ld_k, const void* v_base, int64_t ld_v,
                          DType dtype, int64_t d, const RowRange* ranges, int64_t nranges,
                          const float* q, int64_t g, AttentionPartial& p);

// Merge `src` into `dst` (log-sum-exp).
void attention_merge(AttentionPartial& dst, const AttentionPartial& src);

// Write acc / l per head into out ([G, D] with row stride ld_out elements, in dtype
// `out_dtype`, caller-owned). A head that saw no rows writes zeros.
void attention_finish(const AttentionPartial& p, int64_t d, void* out, int64_t ld_out,
                      DType out_dtype);

// Split ranges into chunks of at most `chunk_rows` rows each (a range may be split), so
// that heads with very different selections make balanced work items.
std::vector<std::vector<RowRange>> split_ranges(const std::vector<RowRange>& ranges,
                                                int64_t chunk_rows);

}  // namespace tactic
