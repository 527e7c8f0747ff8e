// Selection stage 2, estimate (select_head): per query head, the score histogram (tokens and
// centroid-prior mass per bucket), the exact head (the best-ranked clusters holding
// head_fraction of the tokens: a list and their row-range tasks for select_exact) and its
// prior, handed to the next stages in SelInfo. One block per head, or a thread-block cluster of
// 2 / 4 blocks per head (select_head_split_kernel, sm_90).
#include <algorithm>

#include "select_common.cuh"

namespace tactic {
namespace cuda {

namespace {

// Whether a head selects everything without ranking (no clusters, too few, or P = 1).
__device__ __forceinline__ bool selects_all(const HeadView& v, const SelectArgs& a) {
  return v.C == 0 || v.C < a.min_clusters || a.target >= 1.0;
}

// That case: marks clusters [lo, hi) (a block's share) and, when `writer`, the statistics and
// the hand-over struct.
__device__ void select_all(const HeadView& v, const SelectArgs& a, int64_t lo, int64_t hi, bool writer) {
  for (int64_t j = lo + threadIdx.x; j < hi; j += kSelThreads) {
    v.kmark[j] = 1;
    if (v.hmark) v.hmark[j] = 1;
  }
  if (writer && threadIdx.x == 0) {
    SelInfo* info = a.info + v.i;
    *info = SelInfo{};  // every field: select_exact_kernel copies the whole struct (initcheck)
    info->all = 1;
    a.head_tokens[v.i] = v.C == 0 ? v.always : v.total;
    a.est_mass[v.i] = 1.0;
  }
}

// The exact head's cut in its crossing bucket, whose nh_cand >= 0 clusters are ranked in
// S.sorted: keeps them for select_stop (a.cand, when `keep`) and returns how many of them the
// head takes.
__device__ int head_cut(const SelectArgs& a, int64_t i, const int32_t* off, int nh_cand, double before, double thr,
                        bool keep, SelShared& S) {
  for (int k = threadIdx.x; k < nh_cand; k += kSelThreads) {
    S.cval[k] = (double)(off[S.sorted[k] + 1] - off[S.sorted[k]]);
    if (keep) a.cand[i * kCand + k] = S.sorted[k];
  }
  __syncthreads();
  double dummy;
  return cut_candidates(0, nh_cand, before, thr, S, &dummy);
}

struct HeadDecision {  // what select_head decided, identically in every block serving the head
  int bh, bh_whole, nh_cand, cut_h;
  float mx, bpl;
};

// After the whole buckets' clusters are in head_list[0..n_whole): appends the ranked prefix
// sorted[0..cut_h) of a partly taken crossing bucket, sums the head's prior (each thread's
// share `prior` plus those clusters'), splits the head's clusters into tasks of at most 16 rows
// (row ranges, so select_exact spreads rows evenly over threads however uneven the cluster
// sizes are) and writes the hand-over SelInfo. head_list is read back through L2: other blocks
// of a cluster may have written it.
__device__ void finish_head(const SelectArgs& a, int64_t i, int32_t* list, const float* sc, const int32_t* off,
                            int64_t nsink, int n_whole, double prior, HeadDecision d, SelShared& S,
                            uint8_t* kmark) {
  const int tid = threadIdx.x;
  const bool partial = d.nh_cand > 0 && d.bh_whole == d.bh;
  if (partial)
    for (int k = tid; k < d.cut_h; k += kSelThreads) {
      const int32_t j = S.sorted[k];
      list[n_whole + k] = j;
      prior += (double)(off[j + 1] - off[j]) * exp((double)sc[j] - (double)d.mx);
    }
  prior = block_sum(prior, S);
  const int n_head = n_whole + (partial ? d.cut_h : 0);
  int2* tasks = reinterpret_cast<int2*>(a.tasks) + i * a.tasks_stride;
  int carry = 0;
  if (a.group_head) {  // no exact-head rows for select_exact: the head joins its group's union
    __syncthreads();  // the partial bucket's entries are in the list
    for (int k = tid; k < n_head; k += kSelThreads) kmark[__ldcg(list + k)] = 1;
  } else {
    for (int base = 0; base < n_head; base += kSelThreads) {
      const int k = base + tid;
      const int32_t j = k < n_head ? __ldcg(list + k) : 0;
      const int sz = k < n_head ? off[j + 1] - off[j] : 0;
      const int nt = (sz + 15) / 16;
      int ex, agg;
      HeadScan(S.scan).ExclusiveSum(nt, ex, agg);
      const int start = (int)nsink + off[j];
      for (int t = 0; t < nt; ++t) tasks[carry + ex + t] = make_int2(start + 16 * t, start + min(sz, 16 * t + 16));
      carry += agg;
      __syncthreads();
    }
  }
  if (tid == 0) {  // the whole struct at once: later stages copy it whole (initcheck)
    SelInfo info{};
    info.n_tasks = carry;
    info.bh = d.bh;
    info.bh_whole = d.bh_whole;
    info.nh_cand = d.nh_cand;
    info.cut_h = d.cut_h;
    info.n_head = n_head;
    info.mx = d.mx;
    info.bpl = d.bpl;
    info.prior_head = prior;
    info.prior_union = 0.0;  // group_head: summed by the union's chunk_sums pass
    a.info[i] = info;
  }
}

// Adds clusters [lo, C) to the histogram: tokens and prior mass per score bucket.
__device__ __forceinline__ void histogram_add(const float* sc, const int32_t* off, int64_t lo, int64_t C, float mx,
                                              float bpl, SelShared& S) {
  for_clusters_in(sc, off, lo, C, [&](int64_t, float x, int32_t n) {
    const int bk = bucket_of(x, mx, bpl);
    atomicAdd(&S.tok[bk], n);
    atomicAdd(&S.pri[bk], (float)n * __expf(x - mx));
  });
}

// The exact head's clusters of [lo, hi), in one pass: buckets before bh into the head list (at
// places from `counter`, rank 0's in a split) with their prior added to `prior`, bucket bh's
// gathered and ranked (rank_gathered). Where bh overflowed the candidates (-1, returned), a
// second pass takes it whole. Returns the ranked candidates' number (0 without a crossing bucket).
__device__ int head_pass(const HeadView& v, int64_t lo, int64_t hi, float mx, float bpl, int bh, int& counter,
                         double& prior, SelShared& S, int nsplit, float* mcs, int32_t* mcid) {
  auto take = [&](int64_t j, float x, int32_t n) {
    v.head_list[atomicAdd(&counter, 1)] = (int32_t)j;
    prior += (double)n * exp((double)x - (double)mx);
  };
  for_clusters_in(v.sc, v.off, lo, hi, [&](int64_t j, float x, int32_t n) {
    const int bk = bucket_of(x, mx, bpl);
    if (bk < bh) take(j, x, n);
    else if (bk == bh) add_candidate(S, j, x);
  });
  if (bh >= kBuckets) return 0;
  const int ranked = rank_gathered(S, nsplit, mcs, mcid);
  if (ranked < 0)
    for_clusters_in(v.sc, v.off, lo, hi, [&](int64_t j, float x, int32_t n) {
      if (bucket_of(x, mx, bpl) == bh) take(j, x, n);
    });
  return ranked;
}

// Kernel 1 (one block per query head): histogram, exact-head clusters (list + ranked crossing
// bucket), their prior. Leaves the histogram and the ranked candidates in global scratch.
// Two blocks per SM (64 registers, a few bytes of spills), as select_stop: the group_head marks
// took it to 79 and one block per SM (B 32 x 32K: 45 -> 90 us).
__global__ void __launch_bounds__(kSelThreads, 2) select_head_kernel(StepGeometry s, SelectArgs a) {
  pdl_begin();  // first: wait for the previous kernel (programmatic dependent launch)
  __shared__ SelShared S;
  const int64_t i = blockIdx.x;
  const HeadView v = head_view(s, a, i);
  const int32_t* off = v.off;
  const int64_t C = v.C;
  const float* sc = v.sc;
  const int tid = threadIdx.x;
  const float mx = unorder_float(a.seg_max[i]);
  const float bpl = bucket_width(mx, unorder_float(a.seg_min[i]));
  __syncthreads();
  if (tid == 0) {  // ready for the next step's atomicMax / atomicMin
    a.seg_max[i] = INT_MIN;
    a.seg_min[i] = INT_MAX;
  }
  if (selects_all(v, a)) {
    select_all(v, a, 0, C, true);
    return;
  }

  // Histogram: tokens and prior mass per score bucket.
  for (int k = tid; k < kBuckets; k += kSelThreads) {
    S.tok[k] = 0;
    S.pri[k] = 0.f;
  }
  __syncthreads();
  histogram_add(sc, off, 0, C, mx, bpl, S);
  __syncthreads();
  for (int k = tid; k < kBuckets; k += kSelThreads) a.hist_pri[i * kBuckets + k] = S.pri[k];

  // The exact head: take clusters while fewer than thr tokens precede them.
  const double thr = fmax(1.0, a.head_fraction * (double)v.nclu);
  double before = 0.0;
  const int bh = crossing_bucket(S.tok, 1.0, 0.0, thr, S, &before);
  if (tid == 0) {
    S.n_head = 0;
    S.n_cand = 0;
  }
  __syncthreads();
  double prior_head = 0.0;
  const int nh_cand = head_pass(v, 0, C, mx, bpl, bh, S.n_head, prior_head, S, 1, nullptr, nullptr);
  const int cut_h = nh_cand > 0 ? head_cut(a, i, off, nh_cand, before, thr, true, S) : 0;
  const int bh_whole = (bh < kBuckets && nh_cand < 0) ? bh + 1 : bh;
  __syncthreads();
  finish_head(a, i, v.head_list, sc, off, v.nsink, S.n_head, prior_head,
              HeadDecision{bh, bh_whole, nh_cand, cut_h, mx, bpl}, S, v.kmark);
}

// Kernel 1, split (sm_90): the same decisions with each query head served by a thread-block
// cluster of nsplit (2 or 4, head_split) blocks, each taking 1/nsplit of the head's clusters in every pass
// over them. One block per head left 100 of 132 SMs idle at B = 1 and made the passes' latency
// the kernel's time (select_head was ~54 us at 512K on workload (b); ncu: 0.2 instructions
// issued per scheduler and cycle). The blocks combine their histograms, crossing-bucket
// candidates and head priors through distributed shared memory, each summing the blocks' parts
// in rank order, so every block derives the same decisions from the same values; rank 0 then
// finishes the head as the one-block kernel does.

struct SplitShared {     // the whole head's values, combined from every block of the cluster
  int32_t tok[kBuckets];  // (its prior histogram goes straight to a.hist_pri: only select_stop reads it)
  float cs[kCand];       // the crossing bucket's candidates, block 0's first
  int32_t cid[kCand];
};

__global__ void __launch_bounds__(kSelThreads, 1) select_head_split_kernel(StepGeometry s, SelectArgs a) {
  pdl_begin();  // first: wait for the previous kernel (programmatic dependent launch)
  __shared__ SelShared S;   // this block's part: histogram, candidates, head-list counter (rank 0's)
  __shared__ SplitShared W;
  const int rank = cluster_rank(), nsplit = cluster_blocks();
  const int64_t i = blockIdx.x / nsplit;
  const HeadView v = head_view(s, a, i);
  const int32_t* off = v.off;
  const float* sc = v.sc;
  const int tid = threadIdx.x;
  const int64_t lo = v.C * rank / nsplit, hi = v.C * (rank + 1) / nsplit;
  const float mx = unorder_float(a.seg_max[i]);
  const float bpl = bucket_width(mx, unorder_float(a.seg_min[i]));
  for (int k = tid; k < kBuckets; k += kSelThreads) {
    S.tok[k] = 0;
    S.pri[k] = 0.f;
  }
  if (tid == 0) {
    S.n_cand = 0;
    S.n_head = 0;
  }
  cluster_barrier();  // every block has read seg_max / seg_min, and its counters are zero
  if (rank == 0 && tid == 0) {
    a.seg_max[i] = INT_MIN;
    a.seg_min[i] = INT_MAX;
  }
  if (selects_all(v, a)) {  // the same in every block of the cluster
    select_all(v, a, lo, hi, rank == 0);
    return;
  }

  histogram_add(sc, off, lo, hi, mx, bpl, S);
  cluster_barrier();
  for (int k = tid; k < kBuckets; k += kSelThreads) {
    int32_t t = 0;
    float p = 0.f;
    for (int q = 0; q < nsplit; ++q) {
      const SelShared* R = cluster_peer(&S, q);
      t += R->tok[k];
      p += R->pri[k];
    }
    W.tok[k] = t;
    if (rank == 0) a.hist_pri[i * kBuckets + k] = p;
  }
  __syncthreads();

  const double thr = fmax(1.0, a.head_fraction * (double)v.nclu);
  double before = 0.0;
  const int bh = crossing_bucket(W.tok, 1.0, 0.0, thr, S, &before);
  // This block's whole-bucket head clusters, at places taken from rank 0's counter; bh's
  // candidates merged and ranked alike in every block, so every block makes the same cut.
  int* counter = cluster_peer(&S.n_head, 0);
  double prior = 0.0;
  const int nh_cand = head_pass(v, lo, hi, mx, bpl, bh, *counter, prior, S, nsplit, W.cs, W.cid);
  const int cut_h = nh_cand > 0 ? head_cut(a, i, off, nh_cand, before, thr, rank == 0, S) : 0;
  const int bh_whole = (bh < kBuckets && nh_cand < 0) ? bh + 1 : bh;
  prior = block_sum(prior, S);
  if (tid == 0) S.dsh[0] = prior;
  cluster_barrier();  // head-list entries, the counter and every block's prior are final
  double whole = 0.0;
  for (int q = 0; q < nsplit; ++q) whole += cluster_peer(&S, q)->dsh[0];
  const int n_whole = *counter;
  cluster_barrier();  // no block reads another's shared memory after this one
  if (rank != 0) return;
  finish_head(a, i, v.head_list, sc, off, v.nsink, n_whole, tid == 0 ? whole : 0.0,
              HeadDecision{bh, bh_whole, nh_cand, cut_h, mx, bpl}, S, v.kmark);
}

}  // namespace

void launch_select_head(const StepGeometry& s, const SelectArgs& a, int nsplit) {
  cudaStream_t st = as_stream(s.stream);
  const int64_t heads = s.batch * s.hkv * s.g;
  if (nsplit > 1) launch_split<select_head_split_kernel>(s.pdl, (unsigned)(heads * nsplit), nsplit, st, s, a);
  else launch<select_head_kernel>(s.pdl, (unsigned)heads, kSelThreads, 0, st, s, a);
  TACTIC_CUDA_LAUNCH_CHECK("select_head");
}

int select_head_split_arch() { return compiled_arch<select_head_split_kernel>(); }
int select_head_split_clusters(int n) { return active_clusters<select_head_split_kernel>(n); }

}  // namespace cuda
}  // namespace tactic
