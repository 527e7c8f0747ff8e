// Per-step selection on the GPU. Mirrors select_tactic() of cpp/src/select.cpp with the
// centroid-prior estimator and share_group = false (each query head selects on its own, so
// heads run in parallel; the union is taken afterwards): rank clusters by q.centroid, score
// the head (~2% of clustered tokens) plus sinks and recent tokens exactly, calibrate
// alpha = exact / prior on the head, estimate every other cluster as alpha * size *
// exp(q.c - m), and take ranked clusters until the estimate reaches P_eff of the total.
// Masses are summed in double like the CPU reference, so both pick the same clusters except
// where two candidates are within rounding of the stop threshold.
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cooperative_groups.h>
#include <cuda/functional>

#include <cfloat>
#include <algorithm>
#include <climits>
#include <cstdlib>
#include <string>

#include "capabilities.hpp"
#include "common.cuh"
#include "select.hpp"

namespace tactic {
namespace cuda {

// Per-head state handed from select_head_kernel to select_stop_kernel.
struct SelInfo {
  int32_t all;       // 1: every cluster selected already (degenerate or P = 1)
  int32_t bh, bh_whole, nh_cand, cut_h, n_head, n_tasks;
  float mx;          // best centroid score
  float bpl;         // histogram buckets per unit of logit (bucket_of)
  double prior_head; // sum over head clusters of size * exp(score - mx)
};
struct ExactPart {   // one block's online (max, sum) of sinks + recent (a) and head rows (h)
  double am, as, hm, hs;
};

namespace {

constexpr int kThreads = 256;
constexpr int kMaxExactSplits = 16;  // <= 32: select_stop combines them in one warp

__device__ __forceinline__ int64_t head_index(const StepGeometry& s, int32_t slot, int64_t h) {
  return (s.layer * s.max_batch + slot) * s.hkv + h;
}

template <class T>
__global__ void prepare_q_kernel(StepGeometry s, const T* q, int64_t sb, int64_t sh, float scale,
                                 float* qf, int32_t* hidx) {
  pdl_begin();  // first: wait for the previous kernel (programmatic dependent launch)
  const int64_t hq = s.hkv * s.g, i = blockIdx.x, b = i / hq, h = i % hq;
  for (int64_t k = threadIdx.x; k < s.d; k += blockDim.x)
    qf[i * s.d + k] = scale * to_float(q[b * sb + h * sh + k]);
  // The first query head of each KV group also writes the group's store head for the attention
  // (was a kernel of its own: one launch less per step).
  if (hidx && threadIdx.x == 0 && h % s.g == 0) hidx[b * s.hkv + h / s.g] = (int32_t)head_index(s, s.slots[b], h / s.g);
}

template <class S, class T>
__global__ void append_kernel(StepGeometry s, const S* kn, const S* vn, int64_t sb, int64_t sh,
                              T* k, T* v, int32_t* pos) {
  pdl_begin();  // first: wait for the previous kernel (programmatic dependent launch)
  const int64_t b = blockIdx.x, h = blockIdx.y;
  const int32_t slot = s.slots[b];
  const SlotCounts st = s.state[s.layer * s.max_batch + slot];
  const int64_t row = (int64_t)st.n_sink + st.n_clustered + st.n_recent;
  if (row >= s.cap) return;  // full (a replayed graph; eager steps are checked on the host)
  const int64_t hi = head_index(s, slot, h);
  T* kd = k + (hi * s.cap + row) * s.d;
  T* vd = v + (hi * s.cap + row) * s.d;
  for (int64_t e = threadIdx.x; e < s.d; e += blockDim.x) {
    kd[e] = from_float<T>(to_float(kn[b * sb + h * sh + e]));
    vd[e] = from_float<T>(to_float(vn[b * sb + h * sh + e]));
  }
  if (threadIdx.x == 0 && pos) pos[hi * s.cap + row] = (int32_t)row;
}

// Separate from append_kernel: every head's block must read the counts before they change.
// A full slot (only a replayed CUDA graph gets here with one) keeps its counts and adds the
// token to `lost` instead, which the host reports (device_decoder.cu).
__global__ void count_token_kernel(StepGeometry s, int num_sink, int32_t* lost) {
  pdl_begin();  // first: wait for the previous kernel (programmatic dependent launch)
  const int64_t b = blockIdx.x * blockDim.x + threadIdx.x;
  if (b >= s.batch) return;
  const int64_t at = s.layer * s.max_batch + s.slots[b];
  SlotCounts& st = s.state[at];
  if ((int64_t)st.n_sink + st.n_clustered + st.n_recent >= s.cap) {
    if (lost) ++lost[at];
    return;
  }
  if (st.n_clustered == 0 && st.n_recent == 0 && st.n_sink < num_sink) ++st.n_sink;
  else ++st.n_recent;
}

// Scores as ordered ints, so one atomicMax keeps a float maximum (larger float, larger int).
__device__ __forceinline__ int32_t order_float(float f) {
  const int32_t i = __float_as_int(f);
  return i >= 0 ? i : i ^ 0x7fffffff;
}
__device__ __forceinline__ float unorder_float(int32_t i) { return __int_as_float(i >= 0 ? i : i ^ 0x7fffffff); }

// scores[b*Hq + h*g + j, c] = qf . centroid_c + spread * |qf|^2 * spreads_c / 2 for the g query
// heads of KV head h (the spread term: SelectOptions::spread), and
// seg_max / seg_min[b*Hq + h*g + j] = the largest / smallest of them (atomicMax / atomicMin;
// select_head resets them). A quad of
// lanes takes one centroid (each lane D/16 float4 slots, so a warp load covers 8 centroids'
// 64-byte pieces) and all g heads use the centroid while it is in registers: the centroids,
// the largest read of the selection, are read once per KV head, not once per query head.
// Centroids per quad of lanes in score_kernel: as many as keep the raw 16-byte slots within
// 32 registers per thread (more spilled once the compiler hoisted their unpacking).
template <class T, int D>
__host__ __device__ constexpr int kScoreUnroll() {
  constexpr int nv = (D / (16 / (int)sizeof(T)) + 3) / 4;
  return nv <= 2 ? 4 : (nv <= 4 ? 2 : 1);
}

template <class T, int D>
__global__ void __launch_bounds__(kThreads, 2) score_kernel(StepGeometry s, SelectArgs a) {
  pdl_begin();  // first: wait for the previous kernel (programmatic dependent launch)
  constexpr int VEC = 16 / (int)sizeof(T), SL = D / VEC, NV = (SL + 3) / 4;  // 16-byte slots (per lane)
  extern __shared__ float qs[];  // [g, D]
  __shared__ int32_t s_max[16], s_min[16];
  __shared__ float s_w[16];  // spread * |q_j|^2 / 2 per head
  const int64_t item = blockIdx.x, b = item / s.hkv, h = item % s.hkv, hq = s.hkv * s.g;
  const int32_t slot = s.slots[b];
  const SlotCounts st = s.state[s.layer * s.max_batch + slot];
  const int64_t hi = head_index(s, slot, h), c_count = st.n_clusters;
  const int64_t seg0 = b * hq + h * s.g;
  const float* q = a.qf + seg0 * D;
  for (int64_t e = threadIdx.x; e < s.g * D; e += blockDim.x) qs[e] = q[e];
  if (threadIdx.x < s.g) {
    s_max[threadIdx.x] = INT_MIN;
    s_min[threadIdx.x] = INT_MAX;
    // |q|^2 summed in the CPU backend's order (select.cpp), from q itself, not from qs
    float qq = 0.f;
    for (int e = 0; e < D; ++e) qq = fmaf(q[threadIdx.x * D + e], q[threadIdx.x * D + e], qq);
    s_w[threadIdx.x] = 0.5f * (float)a.spread * qq;
  }
  __syncthreads();
  const int quad = threadIdx.x >> 2, t = threadIdx.x & 3;
  // U centroids per quad, all loads issued before any use (one centroid per thread and launch
  // left the kernel latency-bound at ~40% of the bandwidth).
  constexpr int U = kScoreUnroll<T, D>();
  const int64_t c0 = (int64_t)blockIdx.y * (kThreads / 4) * U + quad;
  uint4 raw[U][NV];
  float spr[U];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int64_t c = c0 + (int64_t)u * (kThreads / 4);
    spr[u] = a.spread > 0 && c < c_count ? __ldg(a.spreads + hi * s.cmax + c) : 0.f;
    const uint4* src = reinterpret_cast<const uint4*>(static_cast<const T*>(a.centroids) +
                                                      (hi * s.cmax + (c < c_count ? c : 0)) * D);
#pragma unroll
    for (int k = 0; k < NV; ++k)
      raw[u][k] = c < c_count && t + 4 * k < SL ? __ldg(src + t + 4 * k) : make_uint4(0u, 0u, 0u, 0u);
  }
  for (int64_t j = 0; j < s.g; ++j) {
    const float* qv = qs + j * D;
    float best = -INFINITY, worst = INFINITY;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t c = c0 + (int64_t)u * (kThreads / 4);
      float acc = 0.f;
#pragma unroll
      for (int k = 0; k < NV; ++k)
        if (t + 4 * k < SL) {
          float cf[VEC];
          unpack16<T>(raw[u][k], cf);
#pragma unroll
          for (int e = 0; e < VEC; ++e) acc = fmaf(qv[(t + 4 * k) * VEC + e], cf[e], acc);
        }
      acc += __shfl_xor_sync(0xffffffffu, acc, 1);
      acc += __shfl_xor_sync(0xffffffffu, acc, 2);
      acc = fmaf(s_w[j], spr[u], acc);
      if (c < c_count) {
        if (t == 0) a.scores[(seg0 + j) * s.cmax + c] = acc;
        best = fmaxf(best, acc);
        worst = fminf(worst, acc);
      }
    }
    // The warp's extremes first, then one shared atomic per warp and head.
#pragma unroll
    for (int o = 4; o < 32; o <<= 1) {
      best = fmaxf(best, __shfl_xor_sync(0xffffffffu, best, o));
      worst = fminf(worst, __shfl_xor_sync(0xffffffffu, worst, o));
    }
    if ((threadIdx.x & 31) == 0 && best >= worst) {
      atomicMax(&s_max[j], order_float(best));
      atomicMin(&s_min[j], order_float(worst));
    }
  }
  __syncthreads();
  if (threadIdx.x < s.g && s_max[threadIdx.x] != INT_MIN) {
    atomicMax(a.seg_max + seg0 + threadIdx.x, s_max[threadIdx.x]);
    atomicMin(a.seg_min + seg0 + threadIdx.x, s_min[threadIdx.x]);
  }
}

struct MaxSum {  // online softmax state: sum of exp(x - m)
  double m, s;
};
// Adds exp(x - m) to an online (max, sum) pair: one exp per element.
__device__ __forceinline__ MaxSum add(MaxSum a, double x) {
  if (x > a.m) return {x, a.s * exp(a.m - x) + 1.0};
  return {a.m, a.s + exp(x - a.m)};
}

// q . row for one thread: D known at compile time, so the row's 16-byte loads are issued in
// batches of 8 without waiting for each other (a runtime loop left one load in flight).
template <class T, int D>
__device__ __forceinline__ float thread_dot(const T* row, const float* q) {
  constexpr int kPer = 16 / sizeof(T), N = D / kPer, kBatch = 8;
  const uint4* p = reinterpret_cast<const uint4*>(row);
  float acc = 0.f;
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
        for (int k = 0; k < kPer; ++k) acc = fmaf(q[(c0 + j) * kPer + k], e[k], acc);
      }
  }
  return acc;
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
constexpr int kBuckets = 2048;
constexpr float kMinBucketsPerLogit = 64.f;  // a range over 32 logits: the rest in the last bucket
constexpr float kMaxBucketsPerLogit = 1e6f;  // finer than float scores resolve: no use
constexpr int kCand = 512;

// Buckets per logit for a head whose scores span [mn, mx]: the range over kBuckets - 1 buckets.
__device__ __forceinline__ float bucket_width(float mx, float mn) {
  const float r = mx - mn;
  if (!(r > 0.f) || !isfinite(r)) return kMinBucketsPerLogit;  // one score, or -inf / NaN ones
  return fminf(kMaxBucketsPerLogit, fmaxf(kMinBucketsPerLogit, (float)(kBuckets - 1) / r));
}

__device__ __forceinline__ int bucket_of(float sc, float mx, float bpl) {
  const float x = (mx - sc) * bpl;
  return x < (float)(kBuckets - 1) ? max(0, (int)x) : kBuckets - 1;  // NaN: last bucket
}

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
template <class F>
__device__ __forceinline__ void for_clusters_in(const float* sc, const int32_t* off, int64_t lo, int64_t C, F&& f) {
  constexpr int U = 8;
  for (int64_t base = lo + threadIdx.x; base < C; base += (int64_t)U * kSelThreads) {
    float v[U];
    int32_t o0[U], o1[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t j = base + (int64_t)u * kSelThreads;
      if (j < C) {
        v[u] = __ldg(sc + j);
        o0[u] = __ldg(off + j);
        o1[u] = __ldg(off + j + 1);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t j = base + (int64_t)u * kSelThreads;
      if (j < C) f(j, v[u], o1[u] - o0[u]);
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

// Gathers the clusters of bucket `bk` (excluding those with head[j] set, when given) into
// S.cs/S.cid, ranks them (score descending, id ascending) into S.sorted; returns their
// number, or -1 if more than kCand.
// The clusters of bucket bk among [lo, C) into S.cs / S.cid (S.n_cand counts them, even past
// kCand; it must be zero before).
__device__ __forceinline__ void gather_bucket(const float* sc, const int32_t* off, int64_t lo, int64_t C, float mx,
                                              float bpl, int bk, SelShared& S) {
  for_clusters_in(sc, off, lo, C, [&](int64_t j, float x, int32_t) {
    if (bucket_of(x, mx, bpl) == bk) {
      const int at = atomicAdd(&S.n_cand, 1);
      if (at < kCand) {
        S.cs[at] = x;
        S.cid[at] = (int32_t)j;
      }
    }
  });
}

__device__ int rank_bucket(const float* sc, const int32_t* off, int64_t C, float mx, float bpl, int bk,
                           SelShared& S) {
  if (threadIdx.x == 0) S.n_cand = 0;
  __syncthreads();
  gather_bucket(sc, off, 0, C, mx, bpl, bk, S);
  __syncthreads();
  const int n = S.n_cand;
  if (n > kCand) return -1;
  rank_candidates(S.cs, S.cid, n, S.sorted);
  return n;
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

// After each of the cluster's blocks gathered its share of a bucket (gather_bucket): a cluster
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
                            int64_t nsink, int n_whole, double prior, HeadDecision d, SelShared& S) {
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
  if (tid == 0) {
    SelInfo* info = a.info + i;
    info->n_tasks = carry;
    info->all = 0;
    info->bh = d.bh;
    info->bh_whole = d.bh_whole;
    info->nh_cand = d.nh_cand;
    info->cut_h = d.cut_h;
    info->n_head = n_head;
    info->mx = d.mx;
    info->bpl = d.bpl;
    info->prior_head = prior;
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

// Kernel 1 (one block per query head): histogram, exact-head clusters (list + ranked crossing
// bucket), their prior. Leaves the histogram and the ranked candidates in global scratch.
__global__ void __launch_bounds__(kSelThreads) select_head_kernel(StepGeometry s, SelectArgs a) {
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
  int nh_cand = 0, cut_h = 0;
  if (bh < kBuckets) {
    nh_cand = rank_bucket(sc, off, C, mx, bpl, bh, S);
    if (nh_cand >= 0) cut_h = head_cut(a, i, off, nh_cand, before, thr, true, S);
  }
  // Head = buckets < bh, plus sorted[0..cut_h) of bh (all of bh when it overflowed).
  const int bh_whole = (bh < kBuckets && nh_cand < 0) ? bh + 1 : bh;
  if (tid == 0) S.n_head = 0;
  __syncthreads();
  double prior_head = 0.0;
  for_clusters(sc, off, C, [&](int64_t j, float x, int32_t n) {
    if (bucket_of(x, mx, bpl) < bh_whole) {
      v.head_list[atomicAdd(&S.n_head, 1)] = (int32_t)j;
      prior_head += (double)n * exp((double)x - (double)mx);
    }
  });
  __syncthreads();
  finish_head(a, i, v.head_list, sc, off, v.nsink, S.n_head, prior_head,
              HeadDecision{bh, bh_whole, nh_cand, cut_h, mx, bpl}, S);
}

// Kernel 1, split (sm_90): the same decisions with each query head served by a thread-block
// cluster of nsplit (2 or 4, head_split) blocks, each taking 1/nsplit of the head's clusters in every pass
// over them. One block per head left 100 of 132 SMs idle at B = 1 and made the passes' latency
// the kernel's time (select_head was ~54 us at 512K on workload (b); ncu: 0.2 instructions
// issued per scheduler and cycle). The blocks combine their histograms, crossing-bucket
// candidates and head priors through distributed shared memory, each summing the blocks' parts
// in rank order, so every block derives the same decisions from the same values; rank 0 then
// finishes the head as the one-block kernel does.
// Below kHeadSplitMinClusters (room for 256K tokens at 16 per cluster): the one-block kernels.
// Measured on the H100 at B = 1, 32/8, workload (b) (select_head + select_stop, us): 128K
// one-block 17.2 + 11.5, 2-block clusters 18.4 + 12.6, 4-block 31.4 + 23.3 (fewer 4-block
// clusters fit at once than there are heads); 512K: 52.1 + 28.3, 37.7 + 22.7, 48.7 + 25.0.
constexpr int64_t kHeadSplitMinClusters = 16384;

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
  int nh_cand = 0, cut_h = 0;
  if (bh < kBuckets) {  // the same in every block
    gather_bucket(sc, off, lo, hi, mx, bpl, bh, S);
    nh_cand = merge_candidates(S, W.cs, W.cid, nsplit);
    if (nh_cand >= 0) {
      rank_candidates(W.cs, W.cid, nh_cand, S.sorted);
      cut_h = head_cut(a, i, off, nh_cand, before, thr, rank == 0, S);  // the same cut in every block
    }
  }
  const int bh_whole = (bh < kBuckets && nh_cand < 0) ? bh + 1 : bh;
  // This block's whole-bucket head clusters, at places taken from rank 0's counter.
  int* counter = cluster_peer(&S.n_head, 0);
  double prior = 0.0;
  for_clusters_in(sc, off, lo, hi, [&](int64_t j, float x, int32_t n) {
    if (bucket_of(x, mx, bpl) < bh_whole) {
      v.head_list[atomicAdd(counter, 1)] = (int32_t)j;
      prior += (double)n * exp((double)x - (double)mx);
    }
  });
  prior = block_sum(prior, S);
  if (tid == 0) S.dsh[0] = prior;
  cluster_barrier();  // head-list entries, the counter and every block's prior are final
  double whole = 0.0;
  for (int q = 0; q < nsplit; ++q) whole += cluster_peer(&S, q)->dsh[0];
  const int n_whole = *counter;
  cluster_barrier();  // no block reads another's shared memory after this one
  if (rank != 0) return;
  finish_head(a, i, v.head_list, sc, off, v.nsink, n_whole, tid == 0 ? whole : 0.0,
              HeadDecision{bh, bh_whole, nh_cand, cut_h, mx, bpl}, S);
}

// Kernel 2 (query head x split): exact logits of sinks + recent rows and of the head clusters'
// rows, one thread per row; slot u is head cluster u / 16, rows u % 16, u % 16 + 16, ... of it.
// Spread over many blocks because this is the selection's largest read (~2% of the context
// per query head) and one block per head left most SMs idle.
constexpr int kExactThreads = 256;

template <class T, int D>
__global__ void __launch_bounds__(kExactThreads) select_exact_kernel(StepGeometry s, SelectArgs a) {
  pdl_begin();  // first: wait for the previous kernel (programmatic dependent launch)
  __shared__ float qs[D];
  __shared__ MaxSum wa[kExactThreads / 32], wh[kExactThreads / 32];
  const int64_t hq = s.hkv * s.g, i = blockIdx.x, b = i / hq, qh = i % hq, h = qh / s.g;
  const int splits = gridDim.y, split = blockIdx.y;
  const int32_t slot = s.slots[b];
  const SlotCounts st = s.state[s.layer * s.max_batch + slot];
  const int64_t hi = head_index(s, slot, h);
  const int64_t nclu = st.n_clustered, nsink = st.n_sink, nrec = st.n_recent, always = nsink + nrec;
  const SelInfo info = a.info[i];
  const T* K = static_cast<const T*>(a.k) + hi * s.cap * D;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  for (int e = tid; e < D; e += kExactThreads) qs[e] = a.qf[i * D + e];
  __syncthreads();
  MaxSum ma{-INFINITY, 0.0}, mh{-INFINITY, 0.0};
  if (!info.all) {
    const int64_t stride = (int64_t)splits * kExactThreads, first = (int64_t)split * kExactThreads + tid;
    for (int64_t t = first; t < always; t += stride) {
      const int64_t row = t < nsink ? t : nsink + nclu + (t - nsink);
      ma = add(ma, thread_dot<T, D>(K + row * D, qs));
    }
    const int2* tasks = reinterpret_cast<const int2*>(a.tasks) + i * a.tasks_stride;
    for (int64_t u = first; u < (int64_t)info.n_tasks * 16; u += stride) {
      const int2 tk = tasks[u >> 4];
      const int64_t row = tk.x + (u & 15);
      if (row < tk.y) mh = add(mh, thread_dot<T, D>(K + row * D, qs));
    }
  }
  // Block totals without a chain of rescalings: the largest logit first (max is exact in any
  // order), then every thread rescales its own sum once to it and the sums are added. One exp
  // per thread, all in parallel (a serial combine over lanes and warps cost ~20 dependent
  // double exps, several microseconds of the kernel).
  double m2[2] = {ma.m, mh.m};
  for (int o = 16; o > 0; o >>= 1)
    for (int k = 0; k < 2; ++k) m2[k] = fmax(m2[k], __shfl_xor_sync(0xffffffffu, m2[k], o));
  if (lane == 0) {
    wa[warp].m = m2[0];
    wh[warp].m = m2[1];
  }
  __syncthreads();
  double M[2] = {-INFINITY, -INFINITY};
  for (int w = 0; w < kExactThreads / 32; ++w) {
    M[0] = fmax(M[0], wa[w].m);
    M[1] = fmax(M[1], wh[w].m);
  }
  double s2[2] = {ma.m == -INFINITY ? 0.0 : ma.s * exp(ma.m - M[0]), mh.m == -INFINITY ? 0.0 : mh.s * exp(mh.m - M[1])};
  for (int o = 16; o > 0; o >>= 1)
    for (int k = 0; k < 2; ++k) s2[k] += __shfl_xor_sync(0xffffffffu, s2[k], o);
  if (lane == 0) {
    wa[warp].s = s2[0];
    wh[warp].s = s2[1];
  }
  __syncthreads();
  if (tid == 0) {
    double A = 0.0, H = 0.0;
    for (int w = 0; w < kExactThreads / 32; ++w) {
      A += wa[w].s;
      H += wh[w].s;
    }
    a.parts[i * kMaxExactSplits + split] = ExactPart{M[0], A, M[1], H};
  }
}

// Kernel 3 (one block per query head): alpha, z, the stop point, marks and statistics.
// Kernel 3 for query head i, by one block (nsplit 1) or by block `rank` of a thread-block
// cluster of nsplit blocks (select_stop_split_kernel; mcs / mcid: room for the
// merged candidates). Every block computes the same decisions from the same values; the passes
// over the clusters (ranking a crossing bucket, marking) take the block's share [lo, hi) only.
__device__ void stop_head(const StepGeometry& s, const SelectArgs& a, int splits, int64_t i, int rank, int nsplit,
                          SelShared& S, float* mcs, int32_t* mcid) {
  const SelInfo info = a.info[i];
  if (info.all) return;  // uniform: kernel 1 finished this head
  const HeadView v = head_view(s, a, i);
  const int32_t* off = v.off;
  const int64_t C = v.C, always = v.always, total = v.total;
  const int64_t lo = C * rank / nsplit, hi = C * (rank + 1) / nsplit;
  uint8_t* kmark = v.kmark;
  uint8_t* hmark = v.hmark;
  const float* sc = v.sc;
  const int tid = threadIdx.x;
  auto csize = [&](int64_t j) { return (int64_t)off[j + 1] - off[j]; };
  auto mark = [&](int64_t j) {
    kmark[j] = 1;
    if (hmark) hmark[j] = 1;
  };
  const float mx = info.mx, bpl = info.bpl;
  const int bh = info.bh, bh_whole = info.bh_whole, nh_cand = info.nh_cand, cut_h = info.cut_h;
  for (int k = tid; k < kBuckets; k += kSelThreads) S.pri[k] = a.hist_pri[i * kBuckets + k];
  for (int k = tid; k < max(nh_cand, 0); k += kSelThreads) S.sorted[k] = a.cand[i * kCand + k];
  if (tid < 32) {  // the splits' parts, one per lane (splits <= kMaxExactSplits <= 32)
    const ExactPart e = tid < splits ? a.parts[i * kMaxExactSplits + tid] : ExactPart{-INFINITY, 0.0, -INFINITY, 0.0};
    double m = fmax(e.am, e.hm);
    for (int o = 16; o > 0; o >>= 1) m = fmax(m, __shfl_xor_sync(0xffffffffu, m, o));
    double sa = e.am == -INFINITY ? 0.0 : e.as * exp(e.am - m);
    double sh = e.hm == -INFINITY ? 0.0 : e.hs * exp(e.hm - m);
    for (int o = 16; o > 0; o >>= 1) {
      sa += __shfl_xor_sync(0xffffffffu, sa, o);
      sh += __shfl_xor_sync(0xffffffffu, sh, o);
    }
    if (tid == 0) {
      S.dsh[0] = m;
      S.dsh[1] = sa;
      S.dsh[2] = sh;
    }
  }
  __syncthreads();
  const double a_mass = S.dsh[1], read_exact = S.dsh[2];
  double prior_all = 0.0;
  for (int k = tid; k < kBuckets; k += kSelThreads) prior_all += (double)S.pri[k];
  prior_all = block_sum(prior_all, S);
  // Priors are relative to the best centroid score mx; exact masses to their own max. alpha
  // maps the first onto the second, so the estimate needs no common reference.
  const double prior_head = info.prior_head;
  const double prior_rest = fmax(0.0, prior_all - prior_head);
  const double alpha = read_exact / prior_head;
  const double z = a_mass + read_exact + alpha * prior_rest;
  if (!(isfinite(alpha) && alpha > 0) || !(z > 0) || !isfinite(z)) {  // read everything
    for (int64_t j = lo + tid; j < hi; j += kSelThreads) mark(j);
    if (rank == 0 && tid == 0) {
      a.head_tokens[i] = total;
      a.est_mass[i] = 1.0;
    }
    return;
  }

  // Stop point: ranked clusters after the head until the estimate reaches P_eff * z.
  const double p_eff = fmin(1.0, a.target + a.margin * (1.0 - a.target));
  const double goal = p_eff * z;
  const double acc0 = a_mass + read_exact;
  int bs = bh_whole, cut_s = 0;  // selected: buckets < bs, plus sorted[0..cut_s) of bs
  bool bs_ranked = false;
  double acc = acc0;
  if (nh_cand > 0 && bh_whole == bh) {  // the head's crossing bucket is partly taken
    bs = bh;
    cut_s = cut_h;
    bs_ranked = true;
  }
  if (acc0 < goal) {
    bool done = false;
    if (bs_ranked) {  // the rest of bucket bh first: its ranked candidates after the head's cut
      for (int k = tid; k < nh_cand; k += kSelThreads)
        S.cval[k] = alpha * (double)csize(S.sorted[k]) * exp((double)sc[S.sorted[k]] - (double)mx);
      __syncthreads();
      double taken;
      const int c2 = cut_candidates(cut_h, nh_cand, acc0, goal, S, &taken);
      acc = taken;
      if (c2 < nh_cand || acc >= goal) {
        cut_s = c2;
        done = true;
      } else {
        bs = bh + 1;  // bh taken whole; continue after it
        cut_s = 0;
        bs_ranked = false;
      }
    }
    if (!done) {
      // Buckets from bs on, whole, until one crosses the goal.
      for (int k = tid; k < kBuckets; k += kSelThreads)
        if (k < bs) S.pri[k] = 0.f;
      __syncthreads();
      double bbefore = 0.0;
      const int bx = crossing_bucket(S.pri, alpha, acc, goal, S, &bbefore);
      if (bx >= kBuckets) {  // rounding left the goal unreached: take everything
        bs = kBuckets;
        cut_s = 0;
        bs_ranked = false;
        acc = z;
      } else {
        int n;
        if (nsplit == 1) {
          n = rank_bucket(sc, off, C, mx, bpl, bx, S);
        } else {  // every block gathers its share; all rank the merged list alike
          if (tid == 0) S.n_cand = 0;
          __syncthreads();
          gather_bucket(sc, off, lo, hi, mx, bpl, bx, S);
          n = merge_candidates(S, mcs, mcid, nsplit);
          if (n >= 0) rank_candidates(mcs, mcid, n, S.sorted);
        }
        if (n < 0) {
          bs = bx + 1;
          cut_s = 0;
          bs_ranked = false;
          acc = bbefore + alpha * (double)S.pri[bx];
        } else {
          for (int k = tid; k < n; k += kSelThreads)
            S.cval[k] = alpha * (double)csize(S.sorted[k]) * exp((double)sc[S.sorted[k]] - (double)mx);
          __syncthreads();
          double taken;
          cut_s = cut_candidates(0, n, bbefore, goal, S, &taken);
          acc = taken;
          bs = bx;
          bs_ranked = true;
        }
      }
    }
  }

  // Marks and counts: buckets < bs whole (this block's share), plus the ranked prefix of bs
  // (rank 0).
  int64_t tokens = 0;
  for_clusters_in(sc, off, lo, hi, [&](int64_t j, float x, int32_t n) {
    if (bucket_of(x, mx, bpl) < bs) {
      mark(j);
      tokens += n;
    }
  });
  if (bs_ranked && rank == 0)
    for (int k = tid; k < cut_s; k += kSelThreads) {
      mark(S.sorted[k]);
      tokens += csize(S.sorted[k]);
    }
  tokens = (int64_t)block_sum((double)tokens, S);
  if (nsplit > 1) {  // the cluster's total, summed in rank order
    if (tid == 0) S.dsh[0] = (double)tokens;
    cluster_barrier();
    double t = 0.0;
    for (int q = 0; q < nsplit; ++q) t += cluster_peer(&S, q)->dsh[0];
    tokens = (int64_t)t;
    cluster_barrier();  // no block reads another's shared memory after this one
  }
  if (rank == 0 && tid == 0) {
    a.head_tokens[i] = always + tokens;
    a.est_mass[i] = fmin(1.0, acc / z);
  }
}

__global__ void __launch_bounds__(kSelThreads) select_stop_kernel(StepGeometry s, SelectArgs a, int splits) {
  pdl_begin();  // first: wait for the previous kernel (programmatic dependent launch)
  __shared__ SelShared S;
  stop_head(s, a, splits, blockIdx.x, 0, 1, S, nullptr, nullptr);
}

// Kernel 3, split (sm_90): as select_head_split_kernel, nsplit blocks per query head.
__global__ void __launch_bounds__(kSelThreads, 1) select_stop_split_kernel(StepGeometry s, SelectArgs a, int splits) {
  pdl_begin();  // first: wait for the previous kernel (programmatic dependent launch)
  __shared__ SelShared S;
  __shared__ float mcs[kCand];
  __shared__ int32_t mcid[kCand];
  const int nsplit = cluster_blocks();
  stop_head(s, a, splits, blockIdx.x / nsplit, cluster_rank(), nsplit, S, mcs, mcid);
}

// Row list of each (sequence, KV head): sinks, the marked clusters in physical order, recent.
// Two passes over chunks of kRowChunk clusters, so every (item, chunk) is its own block: the
// sizes of each chunk's marked clusters, then each chunk's rows at the sum of earlier chunks.
constexpr int64_t kRowChunk = 256;  // one scan batch per block: more blocks, shorter serial work

__global__ void __launch_bounds__(kThreads) chunk_sums_kernel(StepGeometry s, SelectArgs a) {
  pdl_begin();  // first: wait for the previous kernel (programmatic dependent launch)
  typedef cub::BlockReduce<int64_t, kThreads> ReduceI;
  __shared__ typename ReduceI::TempStorage tmp;
  const int64_t item = blockIdx.x, b = item / s.hkv, h = item % s.hkv, chunk = blockIdx.y;
  const int32_t slot = s.slots[b];
  const SlotCounts st = s.state[s.layer * s.max_batch + slot];
  const int32_t* off = a.offsets + head_index(s, slot, h) * (s.cmax + 1);
  const uint8_t* kmark = a.kv_mark + item * s.cmax;
  int64_t v = 0;
  for (int64_t j = chunk * kRowChunk + threadIdx.x; j < min((chunk + 1) * kRowChunk, (int64_t)st.n_clusters);
       j += kThreads)
    if (kmark[j]) v += (int64_t)off[j + 1] - off[j];
  v = ReduceI(tmp).Sum(v);
  if (threadIdx.x == 0) a.chunk_sums[item * gridDim.y + chunk] = (int32_t)v;
}

__global__ void __launch_bounds__(kThreads) build_rows_kernel(StepGeometry s, SelectArgs a) {
  pdl_begin();  // first: wait for the previous kernel (programmatic dependent launch)
  typedef cub::BlockScan<int64_t, kThreads> ScanI;
  __shared__ typename ScanI::TempStorage tmp;
  const int64_t item = blockIdx.x, b = item / s.hkv, h = item % s.hkv, chunk = blockIdx.y;
  const int32_t slot = s.slots[b];
  const SlotCounts st = s.state[s.layer * s.max_batch + slot];
  const int32_t* off = a.offsets + head_index(s, slot, h) * (s.cmax + 1);
  uint8_t* kmark = a.kv_mark + item * s.cmax;
  int32_t* out = a.rows + item * s.cap;
  const int64_t nsink = st.n_sink, nclu = st.n_clustered, nrec = st.n_recent, C = st.n_clusters;
  const int32_t* sums = a.chunk_sums + item * gridDim.y;
  // Rows before this chunk and rows of all chunks, summed by the whole block (a serial loop
  // over up to 128 earlier chunks' sums was a chain of dependent loads in the last blocks).
  __shared__ int64_t s_red[2][kThreads / 32];
  int64_t before = 0, every = 0;
  for (int64_t c = threadIdx.x; c < gridDim.y; c += kThreads) {
    const int64_t v = sums[c];
    every += v;
    if (c < chunk) before += v;
  }
  for (int o = 16; o > 0; o >>= 1) {
    before += __shfl_xor_sync(0xffffffffu, before, o);
    every += __shfl_xor_sync(0xffffffffu, every, o);
  }
  if ((threadIdx.x & 31) == 0) {
    s_red[0][threadIdx.x >> 5] = before;
    s_red[1][threadIdx.x >> 5] = every;
  }
  __syncthreads();
  int64_t carry = nsink, all = nsink;
  for (int w = 0; w < kThreads / 32; ++w) {
    carry += s_red[0][w];
    all += s_red[1][w];
  }
  if (chunk == 0) {
    for (int64_t t = threadIdx.x; t < nsink; t += kThreads) out[t] = (int32_t)t;
    for (int64_t t = threadIdx.x; t < nrec; t += kThreads) out[all + t] = (int32_t)(nsink + nclu + t);
    if (threadIdx.x == 0) a.counts[item] = (int32_t)(all + nrec);
  }
  // Each batch of kThreads clusters: a scan gives each marked cluster its offset, then the
  // threads write the batch's rows together (consecutive threads, consecutive rows: coalesced;
  // a thread per cluster writing its own rows left each store instruction scattered).
  __shared__ int32_t s_ex[kThreads], s_start[kThreads];
  const int64_t end = min((chunk + 1) * kRowChunk, C);
  for (int64_t base = chunk * kRowChunk; base < end; base += kThreads) {
    const int64_t j = base + threadIdx.x;
    const bool marked = j < end && kmark[j];
    if (marked) kmark[j] = 0;  // read for the last time: ready for the next step
    const int64_t v = marked ? (int64_t)off[j + 1] - off[j] : 0;
    int64_t ex, agg;
    ScanI(tmp).ExclusiveSum(v, ex, agg);
    s_ex[threadIdx.x] = (int32_t)ex;
    s_start[threadIdx.x] = marked ? (int32_t)(nsink + off[j]) : 0;
    __syncthreads();
    for (int64_t r = threadIdx.x; r < agg; r += kThreads) {
      int lo = 0, hi = kThreads;  // last entry with s_ex <= r: the cluster holding row r
      while (hi - lo > 1) {
        const int mid = (lo + hi) >> 1;
        if (s_ex[mid] <= r) lo = mid;
        else hi = mid;
      }
      out[carry + r] = s_start[lo] + (int32_t)(r - s_ex[lo]);
    }
    carry += agg;
    __syncthreads();  // s_ex / s_start / tmp are reused by the next batch
  }
}

// Dense: every row of every item, and trivial statistics.
__global__ void dense_counts_kernel(StepGeometry s, SelectArgs a) {
  pdl_begin();  // first: wait for the previous kernel (programmatic dependent launch)
  const int64_t item = blockIdx.x * blockDim.x + threadIdx.x, hq = s.hkv * s.g;
  if (item >= s.batch * s.hkv) return;
  const int64_t b = item / s.hkv, h = item % s.hkv;
  const SlotCounts st = s.state[s.layer * s.max_batch + s.slots[b]];
  const int64_t total = (int64_t)st.n_sink + st.n_clustered + st.n_recent;
  a.counts[item] = (int32_t)total;
  for (int64_t j = 0; j < s.g; ++j) {
    a.head_tokens[b * hq + h * s.g + j] = total;
    a.est_mass[b * hq + h * s.g + j] = 1.0;
  }
}

}  // namespace

void prepare_q(const StepGeometry& s, const void* q, DType dt, int64_t sb, int64_t sh, float scale,
               float* qf, int32_t* head_index) {
  dispatch_float(dt, [&](auto tag) {
    using T = decltype(tag);
    launch<prepare_q_kernel<T>>(s.pdl, (unsigned)(s.batch * s.hkv * s.g), 128, 0, as_stream(s.stream),
        s, static_cast<const T*>(q), sb, sh, scale, qf, head_index);
  });
  TACTIC_CUDA_LAUNCH_CHECK("prepare_q");
}

void append_token(const StepGeometry& s, const void* kn, const void* vn, DType src, int64_t sb,
                  int64_t sh, void* k, void* v, int32_t* pos, DType dst, int num_sink, int32_t* lost) {
  dispatch_float(src, [&](auto stag) {
    using S = decltype(stag);
    dispatch_float(dst, [&](auto ttag) {
      using T = decltype(ttag);
      launch<append_kernel<S, T>>(s.pdl, dim3((unsigned)s.batch, (unsigned)s.hkv), 128, 0, as_stream(s.stream),
          s, static_cast<const S*>(kn), static_cast<const S*>(vn), sb, sh, static_cast<T*>(k),
          static_cast<T*>(v), pos);
    });
  });
  TACTIC_CUDA_LAUNCH_CHECK("append_token");
  launch<count_token_kernel>(s.pdl, (unsigned)((s.batch + 127) / 128), 128, 0, as_stream(s.stream), s, num_sink, lost);
  TACTIC_CUDA_LAUNCH_CHECK("append_token (counts)");
}

// Whether the split kernels can run here: the binary loaded for this device must be sm_90 or
// newer (thread-block clusters); an older binary's kernel body is a trap.
bool head_split_available() {
  return compiled_arch<select_head_split_kernel>() >= 90 && compiled_arch<select_stop_split_kernel>() >= 90;
}

// How many clusters of n blocks of the split kernels the device holds at once (the smaller of
// the two kernels' figures; cached per device).
int max_active_clusters(int n) {
  int dev = 0;
  TACTIC_CUDA_CHECK(cudaGetDevice(&dev));
  static int cached[64][5];  // [device][n]: 1 + the answer, 0 unknown
  if (dev < 64 && cached[dev][n]) return cached[dev][n] - 1;
  cudaLaunchConfig_t cfg = {};
  cudaLaunchAttribute attr[1];
  cfg.gridDim = dim3((unsigned)n);
  cfg.blockDim = dim3(kSelThreads);
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim = {(unsigned)n, 1, 1};
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  int h = 0, t = 0;
  // A device or driver that cannot answer gets the one-block kernels (0 clusters), not an
  // error: the query's failure is cleared so no later launch check reports it.
  if (cudaOccupancyMaxActiveClusters(&h, select_head_split_kernel, &cfg) != cudaSuccess ||
      cudaOccupancyMaxActiveClusters(&t, select_stop_split_kernel, &cfg) != cudaSuccess) {
    (void)cudaGetLastError();
    h = t = 0;
  }
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
                          kCand * sizeof(int32_t)) + 4 * 16;
}

int64_t row_chunks(int64_t cmax) { return (cmax + kRowChunk - 1) / kRowChunk; }

void select_step(const StepGeometry& s, const SelectArgs& args) {
  SelectArgs a = args;
  {  // carve the scratch: info, parts, histograms, candidates (each 16-byte aligned)
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
  }
  cudaStream_t st = as_stream(s.stream);
  const int64_t items = s.batch * s.hkv, heads = items * s.g;
  if (a.dense) {
    launch<dense_counts_kernel>(s.pdl, (unsigned)((items + 127) / 128), 128, 0, st, s, a);
    TACTIC_CUDA_LAUNCH_CHECK("dense_counts");
    return;
  }
  if (s.d > 256) throw UnsupportedError("CUDA selection supports head_dim <= 256");
  // kv_mark is all zero here: build_rows clears each mark after its last read.
  if (a.head_mark) TACTIC_CUDA_CHECK(cudaMemsetAsync(a.head_mark, 0, (size_t)(heads * s.cmax), st));
  const size_t qbytes = (size_t)(s.g * s.d * sizeof(float));
  dispatch_float(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    auto grid = [&](int u) {
      const int64_t per = (int64_t)(kThreads / 4) * u;
      return dim3((unsigned)items, (unsigned)((s.cmax + per - 1) / per));
    };
    switch (s.d) {
      case 64: launch<score_kernel<T, 64>>(s.pdl, grid(kScoreUnroll<T, 64>()), kThreads, qbytes, st, s, a); break;
      case 80: launch<score_kernel<T, 80>>(s.pdl, grid(kScoreUnroll<T, 80>()), kThreads, qbytes, st, s, a); break;
      case 96: launch<score_kernel<T, 96>>(s.pdl, grid(kScoreUnroll<T, 96>()), kThreads, qbytes, st, s, a); break;
      case 128: launch<score_kernel<T, 128>>(s.pdl, grid(kScoreUnroll<T, 128>()), kThreads, qbytes, st, s, a); break;
      case 256: launch<score_kernel<T, 256>>(s.pdl, grid(kScoreUnroll<T, 256>()), kThreads, qbytes, st, s, a); break;
      default: throw UnsupportedError("CUDA selection supports head_dim 64, 80, 96, 128 or 256");
    }
  });
  TACTIC_CUDA_LAUNCH_CHECK("score_centroids");
  // Thread-block clusters of nsplit blocks per query head where a head has many clusters.
  const int nsplit = a.head_split;
  if (!(nsplit == 1 || ((nsplit == 2 || nsplit == 4) && head_split_available())))
    throw UnsupportedError("select_step: head_split " + std::to_string(nsplit) + " is not available here");
  const bool split = nsplit > 1;
  cudaLaunchConfig_t cfg = {};
  cudaLaunchAttribute attr[2];
  cfg.gridDim = dim3((unsigned)(heads * nsplit));
  cfg.blockDim = dim3(kSelThreads);
  cfg.stream = st;
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = (unsigned)nsplit;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  if (split) {
    add_pdl<select_head_split_kernel>(cfg, attr, s.pdl);  // both split kernels: same binary, same answer
    TACTIC_CUDA_CHECK(cudaLaunchKernelEx(&cfg, select_head_split_kernel, s, a));
  } else {
    launch<select_head_kernel>(s.pdl, (unsigned)heads, kSelThreads, 0, st, s, a);
  }
  TACTIC_CUDA_LAUNCH_CHECK("select_head");
  // Enough blocks for about two per SM, at most kMaxExactSplits per head.
  const int64_t sms = a.sm_count > 0 ? a.sm_count : 132;
  const int splits = (int)std::max<int64_t>(1, std::min<int64_t>(kMaxExactSplits, (2 * sms + heads - 1) / heads));
  dispatch_float(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    const dim3 eg((unsigned)heads, (unsigned)splits);
    switch (s.d) {
      case 64: launch<select_exact_kernel<T, 64>>(s.pdl, eg, kExactThreads, 0, st, s, a); break;
      case 80: launch<select_exact_kernel<T, 80>>(s.pdl, eg, kExactThreads, 0, st, s, a); break;
      case 96: launch<select_exact_kernel<T, 96>>(s.pdl, eg, kExactThreads, 0, st, s, a); break;
      case 128: launch<select_exact_kernel<T, 128>>(s.pdl, eg, kExactThreads, 0, st, s, a); break;
      default: launch<select_exact_kernel<T, 256>>(s.pdl, eg, kExactThreads, 0, st, s, a); break;
    }
  });
  TACTIC_CUDA_LAUNCH_CHECK("select_exact");
  if (split) TACTIC_CUDA_CHECK(cudaLaunchKernelEx(&cfg, select_stop_split_kernel, s, a, splits));
  else launch<select_stop_kernel>(s.pdl, (unsigned)heads, kSelThreads, 0, st, s, a, splits);
  TACTIC_CUDA_LAUNCH_CHECK("select_stop");
  const dim3 rows_grid((unsigned)items, (unsigned)row_chunks(s.cmax));
  launch<chunk_sums_kernel>(s.pdl, rows_grid, kThreads, 0, st, s, a);
  TACTIC_CUDA_LAUNCH_CHECK("chunk_sums");
  launch<build_rows_kernel>(s.pdl, rows_grid, kThreads, 0, st, s, a);
  TACTIC_CUDA_LAUNCH_CHECK("build_rows");
}

}  // namespace cuda
}  // namespace tactic
