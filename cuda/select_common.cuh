// Device primitives shared by the selection stages (select_rank.cu, select_estimate.cu,
// select_exact.cu, select_stop.cu, select_union.cu): the hand-over structs, the constants, the
// score histogram and its crossing-bucket search, candidate ranking, the passes over a head's
// clusters and the thread-block-cluster helpers of the split kernels. The algorithms that use
// them live in the stage files; select.cu orders the stages (select_step).
//
// Everything device-side is in an anonymous namespace: each stage file is its own translation
// unit (no relocatable device code) and gets its own copy of what it uses. The stage launchers
// (plain host functions, select_stages.hpp) are what crosses files.
#pragma once
#include <cub/block/block_scan.cuh>
#include <cooperative_groups.h>
#include <cuda/functional>

#include <cfloat>
#include <climits>
#include <type_traits>

#include "common.cuh"
#include "select.hpp"
#include "select_buckets.cuh"
#include "select_stages.hpp"

namespace tactic {
namespace cuda {

// Per-head state handed from select_head_kernel to select_stop_kernel.
struct SelInfo {
  int32_t all;       // 1: every cluster selected already (degenerate or P = 1)
  int32_t bh, bh_whole, nh_cand, cut_h, n_head, n_tasks;
  float mx;          // best centroid score
  float bpl;         // histogram buckets per unit of logit (bucket_of)
  int32_t unused;    // fills the hole before the doubles, so a whole-struct copy reads no padding
  double prior_head; // sum over head clusters of size * exp(score - mx)
  double prior_union;  // group_head: the prior over the group's union (chunk_sums, union pass)
};
struct ExactPart {   // one block's online (max, sum) of sinks + recent (a) and head rows (h)
  double am, as, hm, hs;
};

namespace {

constexpr int kThreads = 256;
constexpr int kMaxExactSplits = 16;  // <= 32: select_stop combines them in one warp
constexpr int kMaxCertSplits = 64;   // blocks per KV head of certify_mass (select_certify.cu)

__device__ __forceinline__ int64_t head_index(const StepGeometry& s, int32_t slot, int64_t h) {
  return (s.layer * s.max_batch + slot) * s.hkv + h;
}


// The selection without a sort. Both decisions of the CPU reference walk the clusters in rank
// order and take every cluster whose running sum *before* it is below a goal: the exact head
// (sum of sizes, goal head_fraction * n) and the stop point (sum of estimated masses, goal
// P_eff * z). A histogram of the scores relative to the head's best score gives both sums per
// bucket in one pass. Its resolution adapts to the head's score range (bucket_width): the
// buckets span [worst, best], at least kMinBucketsPerLogit per logit, so a flat head whose
// thousands of clusters lie within a fraction of a logit spreads over the buckets instead of
// filling a few (which overflowed the candidate list, took whole buckets into the exact head
// and serialised the shared-memory atomics); buckets before the
// crossing one are taken whole, and only the crossing bucket's few clusters are ranked exactly
// (score descending, cluster id ascending: the CPU's order), so the chosen set equals the
// sorted walk's. A crossing bucket with more than kCand clusters is taken whole (more tokens,
// never fewer).
constexpr int kSelThreads = 512;
constexpr int kSelWarps = kSelThreads / 32;
constexpr int kCand = 512;


typedef cub::BlockScan<int, kSelThreads> HeadScan;

struct SelShared {
  int32_t tok[kBuckets];    // tokens per bucket
  float pri[kBuckets];      // sum of size * exp(score - best) per bucket
  float cs[kCand];          // crossing-bucket candidates: score, id, then in rank order
  int32_t cid[kCand];
  int32_t sorted[kCand];
  double cval[kCand];       // their values in rank order (size, or estimated mass)
  double red_d[kSelWarps];
  int64_t red_i[kSelWarps];
  typename HeadScan::TempStorage scan;
  int n_cand, n_head, cut, bucket;
  double dsh[4];
};

// Block-wide sums over kSelThreads through shared memory (every thread gets the result).
__device__ __forceinline__ double block_sum(double v, SelShared& S) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  __syncthreads();
  if ((threadIdx.x & 31) == 0) S.red_d[threadIdx.x >> 5] = v;
  __syncthreads();
  double t = 0.0;
  for (int w = 0; w < kSelWarps; ++w) t += S.red_d[w];
  return t;
}

// First bucket whose inclusive running sum (start + vals[0..b]) reaches `goal`, with the sum
// before it in *before; kBuckets if none. vals: per-bucket values (float or int) in shared
// memory. Each thread owns kBuckets / kSelThreads consecutive buckets.
template <class V>
__device__ int crossing_bucket(const V* vals, double scale, double start, double goal, SelShared& S,
                               double* before) {
  constexpr int PER = kBuckets / kSelThreads;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  double local = 0.0;
#pragma unroll
  for (int k = 0; k < PER; ++k) local += scale * (double)vals[tid * PER + k];
  // Exclusive prefix over threads: warp scan, then the warps' totals.
  double incl = local;
  for (int o = 1; o < 32; o <<= 1) {
    const double y = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += y;
  }
  __syncthreads();
  if (lane == 31) S.red_d[warp] = incl;
  if (tid == 0) S.bucket = kBuckets;
  __syncthreads();
  double ex = start + incl - local;
  for (int w = 0; w < warp; ++w) ex += S.red_d[w];
  // The crossing bucket is unique: the first with ex + its value >= goal.
  double run = ex;
#pragma unroll
  for (int k = 0; k < PER; ++k) {
    const double nxt = run + scale * (double)vals[tid * PER + k];
    if (run < goal && nxt >= goal) {
      S.bucket = tid * PER + k;
      S.dsh[3] = run;
    }
    run = nxt;
  }
  __syncthreads();
  *before = S.dsh[3];
  return S.bucket;
}

// Calls f(j, score_j, size_j) for each cluster j < C of this thread (j = tid, tid + kSelThreads,
// ...), loading 8 clusters' score and offsets before using any: one block serves a whole head,
// and with one load in flight per thread these passes were latency-bound (~1 us per step).
// With marks (group_head), f(j, score_j, size_j, marks[j]), the mark loaded with the rest.
template <class F>
__device__ __forceinline__ void for_clusters_in(const float* sc, const int32_t* off, int64_t lo, int64_t C, F&& f,
                                                const uint8_t* marks = nullptr) {
  constexpr int U = 8;
  for (int64_t base = lo + threadIdx.x; base < C; base += (int64_t)U * kSelThreads) {
    float v[U];
    int32_t o0[U], o1[U];
    uint8_t mk[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t j = base + (int64_t)u * kSelThreads;
      if (j < C) {
        v[u] = __ldg(sc + j);
        o0[u] = __ldg(off + j);
        o1[u] = __ldg(off + j + 1);
        mk[u] = marks ? marks[j] : 0;  // not __ldg: select_stop writes marks it may read again
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t j = base + (int64_t)u * kSelThreads;
      if (j < C) {
        if constexpr (std::is_invocable_v<F, int64_t, float, int32_t, uint8_t>) f(j, v[u], o1[u] - o0[u], mk[u]);
        else f(j, v[u], o1[u] - o0[u]);
      }
    }
  }
}
// The same over every cluster [0, C).
template <class F>
__device__ __forceinline__ void for_clusters(const float* sc, const int32_t* off, int64_t C, F&& f) {
  for_clusters_in(sc, off, 0, C, f);
}

// Ranks n candidates (score descending, id ascending: the CPU's order) into sorted[0..n).
__device__ __forceinline__ void rank_candidates(const float* cs, const int32_t* cid, int n, int32_t* sorted) {
  for (int i = threadIdx.x; i < n; i += kSelThreads) {
    const float v = cs[i];
    const int32_t id = cid[i];
    int r = 0;
    for (int k = 0; k < n; ++k) r += (cs[k] > v) || (cs[k] == v && cid[k] < id);
    sorted[r] = id;
  }
  __syncthreads();
}

// Over ranked candidates S.cval[from..n): the first k with start + sum(cval[from..k)) >= goal
// (n if none), computed by warp 0 with a running scan; the sum through the last taken
// candidate goes to *taken_sum.
__device__ int cut_candidates(int from, int n, double start, double goal, SelShared& S, double* taken_sum) {
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    double run = start;
    int cut = n;
    for (int base = from; base < n; base += 32) {
      const int k = base + lane;
      const double v = k < n ? S.cval[k] : 0.0;
      double incl = v;
      for (int o = 1; o < 32; o <<= 1) {
        const double y = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += y;
      }
      const double before = run + incl - v;
      const unsigned hit = __ballot_sync(0xffffffffu, k < n && before >= goal);
      if (hit) {
        const int first = __ffs(hit) - 1;
        cut = base + first;
        run = __shfl_sync(0xffffffffu, before, first);
        break;
      }
      run += __shfl_sync(0xffffffffu, incl, 31);
    }
    if (lane == 0) {
      S.cut = cut;
      S.dsh[2] = run;
    }
  }
  __syncthreads();
  *taken_sum = S.dsh[2];
  return S.cut;
}

struct MaxSum {  // online softmax state: sum of exp(x - m)
  double m, s;
};
// Adds exp(x - m) to an online (max, sum) pair: one exp per element.
__device__ __forceinline__ MaxSum add(MaxSum a, double x) {
  if (x > a.m) return {x, a.s * exp(a.m - x) + 1.0};
  return {a.m, a.s + exp(x - a.m)};
}

// q_g . row for KG queries q_g = q + g * D, one thread: D known at compile time, so the row's
// 16-byte loads are issued in batches of 8 without waiting for each other (a runtime loop left
// one load in flight), and the row is read once for all KG queries.
template <class T, int D, int KG>
__device__ __forceinline__ void thread_dots(const T* row, const float* q, float* l) {
  constexpr int kPer = 16 / sizeof(T), N = D / kPer, kBatch = 8;
  const uint4* p = reinterpret_cast<const uint4*>(row);
#pragma unroll
  for (int g = 0; g < KG; ++g) l[g] = 0.f;
#pragma unroll
  for (int c0 = 0; c0 < N; c0 += kBatch) {
    uint4 r[kBatch];
#pragma unroll
    for (int j = 0; j < kBatch; ++j)
      if (c0 + j < N) r[j] = __ldg(p + c0 + j);
#pragma unroll
    for (int j = 0; j < kBatch; ++j)
      if (c0 + j < N) {
        float e[kPer];
        unpack16<T>(r[j], e);
#pragma unroll
        for (int g = 0; g < KG; ++g)
#pragma unroll
          for (int k = 0; k < kPer; ++k) l[g] = fmaf(q[g * D + (c0 + j) * kPer + k], e[k], l[g]);
      }
  }
}
template <class T, int D>
__device__ __forceinline__ float thread_dot(const T* row, const float* q) {
  float l[1];
  thread_dots<T, D, 1>(row, q, l);
  return l[0];
}

// Thread-block cluster operations for the split kernels (sm_90). The host launches those only
// where the loaded binary is sm_90 or newer (head_split_available); elsewhere these trap.
__device__ __forceinline__ void cluster_barrier() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cooperative_groups::this_cluster().sync();
#else
  __trap();
#endif
}
__device__ __forceinline__ int cluster_rank() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  return (int)cooperative_groups::this_cluster().block_rank();
#else
  return 0;
#endif
}
__device__ __forceinline__ int cluster_blocks() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  return (int)cooperative_groups::this_cluster().num_blocks();
#else
  return 1;
#endif
}
template <class T>
__device__ __forceinline__ T* cluster_peer(T* p, int rank) {  // block `rank`'s copy of shared p
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  return cooperative_groups::this_cluster().map_shared_rank(p, rank);
#else
  __trap();
  return p;
#endif
}

// After each of the cluster's blocks gathered its share of a bucket (add_candidate): a cluster
// barrier, then every block copies all blocks' candidates, block 0's first, into cs / cid.
// Returns their number, or -1 if more than kCand.
__device__ int merge_candidates(SelShared& S, float* cs, int32_t* cid, int nsplit) {
  cluster_barrier();
  int n = 0;
  for (int q = 0; q < nsplit && n >= 0; ++q) {
    const SelShared* R = cluster_peer(&S, q);
    const int nq = R->n_cand;
    if (nq > kCand - n) {
      n = -1;
    } else {
      for (int k = threadIdx.x; k < nq; k += kSelThreads) {
        cs[n + k] = R->cs[k];
        cid[n + k] = R->cid[k];
      }
      n += nq;
    }
  }
  __syncthreads();
  return n;
}

// Cluster j (score x) as a candidate of the crossing bucket being gathered into S.cs / S.cid
// (S.n_cand counts them, even past kCand; it must be zero before the pass).
__device__ __forceinline__ void add_candidate(SelShared& S, int64_t j, float x) {
  const int at = atomicAdd(&S.n_cand, 1);
  if (at < kCand) {
    S.cs[at] = x;
    S.cid[at] = (int32_t)j;
  }
}

// After a pass that gathered one bucket's candidates (add_candidate) over the block's share:
// ranks them (score descending, id ascending) into S.sorted, all of the cluster's blocks' where
// nsplit > 1 (merged into mcs / mcid); returns their number, or -1 if more than kCand.
__device__ int rank_gathered(SelShared& S, int nsplit, float* mcs, int32_t* mcid) {
  if (nsplit > 1) {
    const int n = merge_candidates(S, mcs, mcid, nsplit);
    if (n >= 0) rank_candidates(mcs, mcid, n, S.sorted);
    return n;
  }
  __syncthreads();
  const int n = S.n_cand;
  if (n > kCand) return -1;
  rank_candidates(S.cs, S.cid, n, S.sorted);
  return n;
}

// One query head's slice of the step's state (select_head, its split form and select_stop).
struct HeadView {
  int64_t i, b, h;                 // query head (flat over the batch), sequence, KV head
  const int32_t* off;              // cluster offsets [C + 1]
  int64_t C, nclu, nsink, nrec, always, total;
  uint8_t* kmark;                  // the KV head's union marks
  uint8_t* hmark;                  // this head's own marks, or null
  const float* sc;                 // centroid scores
  int32_t* head_list;              // exact-head clusters
};

__device__ __forceinline__ HeadView head_view(const StepGeometry& s, const SelectArgs& a, int64_t i) {
  HeadView v;
  const int64_t hq = s.hkv * s.g;
  v.i = i;
  v.b = i / hq;
  v.h = (i % hq) / s.g;
  const int32_t slot = s.slots[v.b];
  const SlotCounts st = s.state[s.layer * s.max_batch + slot];
  v.off = a.offsets + head_index(s, slot, v.h) * (s.cmax + 1);
  v.C = st.n_clusters;
  v.nclu = st.n_clustered;
  v.nsink = st.n_sink;
  v.nrec = st.n_recent;
  v.always = v.nsink + v.nrec;
  v.total = v.always + v.nclu;
  v.kmark = a.kv_mark + (v.b * s.hkv + v.h) * s.cmax;
  v.hmark = a.head_mark ? a.head_mark + i * s.cmax : nullptr;
  v.sc = a.scores + i * s.cmax;
  v.head_list = a.ids + i * s.cmax;
  return v;
}

// A launch of Kernel over `blocks` blocks of kSelThreads in thread-block clusters of nsplit
// (the split kernels of select_head / select_stop), with PDL where the plan and the kernel
// allow it.
template <auto Kernel, class... A>
void launch_split(bool pdl, unsigned blocks, int nsplit, cudaStream_t st, A&&... args) {
  cudaLaunchConfig_t cfg = {};
  cudaLaunchAttribute attr[2];
  cfg.gridDim = dim3(blocks);
  cfg.blockDim = dim3(kSelThreads);
  cfg.stream = st;
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = (unsigned)nsplit;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  add_pdl<Kernel>(cfg, attr, pdl);
  TACTIC_CUDA_CHECK(cudaLaunchKernelEx(&cfg, Kernel, std::forward<A>(args)...));
}

// How many clusters of n blocks of Kernel (kSelThreads each) the device holds at once, or -1
// where the device or driver cannot answer (the query's error is cleared, so no later launch
// check reports it).
template <auto Kernel>
int active_clusters(int n) {
  cudaLaunchConfig_t cfg = {};
  cudaLaunchAttribute attr[1];
  cfg.gridDim = dim3((unsigned)n);
  cfg.blockDim = dim3(kSelThreads);
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim = {(unsigned)n, 1, 1};
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  int r = 0;
  if (cudaOccupancyMaxActiveClusters(&r, Kernel, &cfg) != cudaSuccess) {
    (void)cudaGetLastError();
    return -1;
  }
  return r;
}

}  // namespace

}  // namespace cuda
}  // namespace tactic
