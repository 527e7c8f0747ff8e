// Per-step selection on the GPU. Mirrors select_tactic() of cpp/src/select.cpp with the
// centroid-prior estimator and share_group = false (each query head selects on its own, so
// heads run in parallel; the union is taken afterwards): rank clusters by q.centroid, score
// the head (~2% of clustered tokens) plus sinks and recent tokens exactly, calibrate
// alpha = exact / prior on the head, estimate every other cluster as alpha * size *
// exp(q.c - m), and take ranked clusters until the estimate reaches P_eff of the total.
// With the certified stop rule that first read aims at P and select_certify then bounds the
// unread rest from a seeded sample and tops up the heads that fall short.
// Masses are summed in double like the CPU reference, so both pick the same clusters except
// where two candidates are within rounding of the stop threshold.
//
// The stages, one file each, in the order select_step runs them:
//   select_rank.cu      q in fp32, the new token appended, centroid scores (score_kernel)
//   select_estimate.cu  histogram, exact head and its prior (select_head)
//   select_exact.cu     exact masses of sinks, recent and exact-head rows (select_exact)
//   select_stop.cu      alpha, z, the stop point, marks (select_stop)
//   select_certify.cu   certified rule only: exact union mass, tail sample, bound, top-ups
//   select_union.cu     per-KV-head union as a row list (chunk_sums, build_rows)
// With group_head (prior rule) select_exact reads the sinks and recent rows only, and the
// exact-head rows are read by an attention pass over the union of each group's exact heads
// (select_head marks it, build_rows lists it first, its chunk_sums takes it out of each head's
// histogram): its log-sum-exp is the exact mass select_stop calibrates on, and its partial
// outputs are kept for the caller's attention over the rest (AttentionArgs::carry_in).
// with their shared device primitives in select_common.cuh. select_threshold.cu is the other
// selection (StepPlan::selection == threshold): it takes the prior rule's crossing buckets whole
// and runs with the attention, so the device decoder calls it instead of select_step.
// This file holds the orchestration: the head split choice, the scratch layout and select_step.
#include <algorithm>
#include <string>

#include "capabilities.hpp"
#include "select_common.cuh"
#include "select_stages.hpp"

namespace tactic {
namespace cuda {

namespace {

// Below kHeadSplitMinClusters (room for 256K tokens at 16 per cluster): the one-block kernels.
// Measured on the H100 at B = 1, 32/8, workload (b) (select_head + select_stop, us): 128K
// one-block 17.2 + 11.5, 2-block clusters 18.4 + 12.6, 4-block 31.4 + 23.3 (fewer 4-block
// clusters fit at once than there are heads); 512K: 52.1 + 28.3, 37.7 + 22.7, 48.7 + 25.0.
constexpr int64_t kHeadSplitMinClusters = 16384;

}  // namespace

// Whether the split kernels can run here: the binary loaded for this device must be sm_90 or
// newer (thread-block clusters); an older binary's kernel body is a trap.
bool head_split_available() {
  return select_head_split_arch() >= 90 && select_stop_split_arch() >= 90;
}

// How many clusters of n blocks of the split kernels the device holds at once (the smaller of
// the two kernels' figures; cached per device).
int max_active_clusters(int n) {
  int dev = 0;
  TACTIC_CUDA_CHECK(cudaGetDevice(&dev));
  static int cached[64][5];  // [device][n]: 1 + the answer, 0 unknown
  if (dev < 64 && cached[dev][n]) return cached[dev][n] - 1;
  // A device or driver that cannot answer gets the one-block kernels (0 clusters), not an
  // error: the query's failure is cleared so no later launch check reports it.
  int h = select_head_split_clusters(n), t = h >= 0 ? select_stop_split_clusters(n) : -1;
  if (h < 0 || t < 0) h = t = 0;
  const int r = std::max(0, std::min(h, t));
  if (dev < 64) cached[dev][n] = r + 1;
  return r;
}

int auto_head_split(int64_t heads, int64_t cmax) {
  if (cmax < kHeadSplitMinClusters || !head_split_available()) return 1;
  // The largest cluster size whose clusters all run in one wave: a cluster needs n SMs of one
  // GPC at once, and these kernels fit one block per SM, so 4-block clusters can hold fewer
  // heads than SMs / 4 (the first H100 run of 4-block clusters at B = 1, 32 heads, always:
  // select_head 17 -> 30 us at 128K, as a second wave would make it).
  for (int n : {4, 2})
    if (max_active_clusters(n) >= heads) return n;
  return 1;
}

size_t select_scratch_bytes(int64_t heads) {
  return (size_t)heads * (sizeof(SelInfo) + kMaxExactSplits * sizeof(ExactPart) + kBuckets * sizeof(float) +
                          kCand * sizeof(int32_t) + kMaxCertSplits * sizeof(double)) + 5 * 16;
}

void select_step(const StepGeometry& s, const SelectArgs& args) {
  SelectArgs a = args;
  {  // carve the scratch: info, parts, histograms, candidates, certify partials (16-byte aligned)
    const int64_t heads = s.batch * s.hkv * s.g;
    char* p = static_cast<char*>(a.scratch);
    auto take = [&](size_t bytes) {
      char* r = p;
      p += (bytes + 15) / 16 * 16;
      return r;
    };
    a.info = reinterpret_cast<SelInfo*>(take(heads * sizeof(SelInfo)));
    a.parts = reinterpret_cast<ExactPart*>(take(heads * kMaxExactSplits * sizeof(ExactPart)));
    a.hist_pri = reinterpret_cast<float*>(take(heads * kBuckets * sizeof(float)));
    a.cand = reinterpret_cast<int32_t*>(take(heads * kCand * sizeof(int32_t)));
    a.cert_r = reinterpret_cast<double*>(take(heads * kMaxCertSplits * sizeof(double)));
  }
  cudaStream_t st = as_stream(s.stream);
  const int64_t items = s.batch * s.hkv, heads = items * s.g;
  if (a.dense) {
    launch_dense_counts(s, a);
    return;
  }
  if (s.d > 256) throw UnsupportedError("CUDA selection supports head_dim <= 256");
  // kv_mark is all zero here: build_rows clears each mark after its last read.
  if (a.head_mark) TACTIC_CUDA_CHECK(cudaMemsetAsync(a.head_mark, 0, (size_t)(heads * s.cmax), st));
  launch_score(s, a);
  // Thread-block clusters of nsplit blocks per query head where a head has many clusters.
  const int nsplit = a.head_split;
  if (!(nsplit == 1 || ((nsplit == 2 || nsplit == 4) && head_split_available())))
    throw UnsupportedError("select_step: head_split " + std::to_string(nsplit) + " is not available here");
  launch_select_head(s, a, nsplit);
  if (a.group_head) {
    // The exact read is the attention over the group's union: its records give select_stop
    // the union's mass, and the caller's attention over the rest merges them.
    if (a.certified) throw UnsupportedError("select_step: group_head runs with the prior stop rule only");
    launch_select_exact(s, a, 1);  // the sinks and recent rows alone (no exact-head rows listed)
    launch_build_rows(s, a, RowsPass::group_union);
    AttentionArgs u = a.union_attention;  // the caller's pass over this layer's row lists
    u.counts = a.union_counts;
    u.carry_out = a.carry;
    decode_attention(u);
    launch_select_stop(s, a, nsplit, 1);
    launch_build_rows(s, a, RowsPass::group_rest);
    return;
  }
  // Enough blocks for about two per SM, at most kMaxExactSplits per head.
  const int64_t sms = a.sm_count > 0 ? a.sm_count : 132;
  const int splits = (int)std::max<int64_t>(1, std::min<int64_t>(kMaxExactSplits, (2 * sms + heads - 1) / heads));
  launch_select_exact(s, a, splits);
  launch_select_stop(s, a, nsplit, splits);
  if (a.certified) launch_certify(s, a);
  launch_build_rows(s, a, RowsPass::all);
}

}  // namespace cuda
}  // namespace tactic
