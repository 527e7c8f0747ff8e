// Per-step selection on the GPU. Mirrors select_tactic() of cpp/src/select.cpp with the
// centroid-prior estimator and share_group = false (each query head selects on its own, so
// heads run in parallel; the union is taken afterwards): rank clusters by q.centroid, score
// the head (~2% of clustered tokens) plus sinks and recent tokens exactly, calibrate
// alpha = exact / prior on the head, estimate every other cluster as alpha * size *
// exp(q.c - m), and take ranked clusters until the estimate reaches P_eff of the total.
// Masses are summed in double like the CPU reference, so both pick the same clusters except
// where two candidates are within rounding of the stop threshold.
//
// The stages, one file each, in the order select_step runs them:
//   select_rank.cu      q in fp32, the new token appended, centroid scores (score_kernel)
//   select_estimate.cu  histogram and exact head (select_hist: head_split blocks per head)
//   select_exact.cu     exact masses of sinks, recent and exact-head rows, then alpha, z and the
//                       stop point (select_exact: head_split blocks per head)
//   select_union.cu     per-KV-head union marks and row list (chunk_sums, build_rows)
// with their shared device primitives in select_common.cuh. Each per-head decision is taken by
// the last of the head's blocks to finish (last_block), so the whole GPU works on every pass
// over the clusters and a decision costs no launch of its own; the decisions travel as ranked
// prefixes (SelInfo), which the union tests cluster by cluster instead of reading marks.
// This file holds the orchestration: the automatic head split, the scratch layout and
// select_step.
#include <algorithm>
#include <string>

#include "select_common.cuh"
#include "select_stages.hpp"

namespace tactic {
namespace cuda {

int auto_head_split(int64_t heads, int64_t cmax, int sm_count) {
  const int64_t sms = sm_count > 0 ? sm_count : 1;
  const int64_t want = 2 * sms / std::max<int64_t>(heads, 1);  // one wave of two 512-thread blocks per SM
  return (int)std::max<int64_t>(1, std::min<int64_t>({want, (cmax + 255) / 256, (int64_t)kMaxTiles}));
}

size_t select_scratch_bytes(int64_t heads) {
  return (size_t)heads * (sizeof(SelInfo) + kMaxTiles * sizeof(ExactPart) + 4 * kBuckets * sizeof(int32_t) +
                          sizeof(int32_t)) + 8 * 16;
}

void select_step(const StepGeometry& s, const SelectArgs& args) {
  SelectArgs a = args;
  {  // carve the scratch: info, parts, histograms, candidates, counters (each 16-byte aligned)
    const int64_t heads = s.batch * s.hkv * s.g;
    char* p = static_cast<char*>(a.scratch);
    auto take = [&](size_t bytes) {
      char* r = p;
      p += (bytes + 15) / 16 * 16;
      return r;
    };
    a.info = reinterpret_cast<SelInfo*>(take(heads * sizeof(SelInfo)));
    a.parts = reinterpret_cast<ExactPart*>(take(heads * kMaxTiles * sizeof(ExactPart)));
    a.acc_tok = reinterpret_cast<int32_t*>(take(heads * kBuckets * sizeof(int32_t)));
    a.acc_cnt = reinterpret_cast<int32_t*>(take(heads * kBuckets * sizeof(int32_t)));
    a.acc_pri = reinterpret_cast<float*>(take(heads * kBuckets * sizeof(float)));
    a.cursor = reinterpret_cast<int32_t*>(take(heads * kBuckets * sizeof(int32_t)));
    a.counters = reinterpret_cast<int32_t*>(take(heads * sizeof(int32_t)));
  }
  cudaStream_t st = as_stream(s.stream);
  const int64_t items = s.batch * s.hkv, heads = items * s.g;
  if (a.dense) {
    launch_dense_counts(s, a);
    return;
  }
  if (s.d > 256) throw UnsupportedError("CUDA selection supports head_dim <= 256");
  if (s.g > 16) throw UnsupportedError("CUDA selection supports at most 16 query heads per KV head");
  if (a.head_mark) TACTIC_CUDA_CHECK(cudaMemsetAsync(a.head_mark, 0, (size_t)(heads * s.cmax), st));
  const int tiles = a.head_split;
  if (tiles < 1 || tiles > kMaxTiles)
    throw UnsupportedError("select_step: head_split " + std::to_string(tiles) + " is not in 1.." + std::to_string(kMaxTiles));
  launch_score(s, a);
  launch_select_hist(s, a, tiles);
  launch_select_exact(s, a, tiles);
  launch_build_rows(s, a);
}

}  // namespace cuda
}  // namespace tactic
