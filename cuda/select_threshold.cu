// The threshold selection and its attention (select_threshold.hpp has the stages). Written from
// the selection's byte floor: the centroid scores are the one read every head needs; after
// them each head's decision is a few thousand histogram buckets, so it is taken by the last
// block to finish a head's (or KV head's) share of the work (an atomic count per head, as in
// CUB's single-pass reductions) rather than by a kernel of one block per head, and the
// attention reads the chosen clusters straight from the cluster-contiguous store by testing
// each cluster's score against its heads' buckets, with no sorted list or row list between.
#include <cub/block/block_scan.cuh>

#include <algorithm>
#include <cfloat>
#include <climits>
#include <string>

#include "attention_common.cuh"
#include "attention_tile.cuh"
#include "capabilities.hpp"
#include "mma.cuh"
#include "select_buckets.cuh"
#include "select_stages.hpp"
#include "select_threshold.hpp"

namespace tactic {
namespace cuda {

namespace {

struct ThreshInfo {  // per query head, from the hist kernel (bx: from the head pass)
  int32_t all;       // every cluster selected (too few clusters, P = 1, or a degenerate estimate)
  int32_t bh;        // exact head: buckets <= bh
  int32_t bx;        // selection: buckets <= bx
  float mx, bpl;     // bucket_of's reference and resolution
  int32_t unused;
  double prior_head, prior_all;  // sum of size * exp(score - mx) over the head / every cluster
};

constexpr int kHistThreads = 256;

// The state buffer's sections (threshold_state_bytes), all from one zeroed allocation.
struct ThreshState {
  int32_t* tok;    // [heads, kBuckets] tokens per bucket
  float* pri;      // [heads, kBuckets] centroid prior per bucket
  ThreshInfo* info;  // [heads]
  int32_t* head_done;  // [heads] hist blocks finished
  int32_t* item_done;  // [items] head-pass blocks finished
  int32_t* seg;        // [2 * items] each item's rest-pass records: count, then first unit
  double* cpri;    // [heads, kBuckets] prior through each bucket (the hist's last block)
  int32_t* ctok;   // [heads, kBuckets] tokens through each bucket
  float* hs;       // [items, units, g] each head's own exact-head mass per head-pass block (rel. to its m)
  int32_t* urows;  // [items, units] rows read per head-pass block
  int32_t* mplan;  // [items + 1] the merge's plan: 1, then units * item
  int32_t* mcounts;  // [items] head-pass records per item (units)
  // The passes' partial records: [items * units] of the head pass (unit item * units + u),
  // then [rest_blocks] of the rest pass (rest_plan), each [g] of (m in log2 units, l) and [g, d].
  float* ws_ml;
  float* ws_acc;
};

// The rest pass's blocks per step: one full wave of pass blocks (three per SM), or one per
// item where there are more items; each block one record.
__host__ __device__ inline int64_t rest_blocks(int64_t items, int64_t sms) { return 3 * sms > items ? 3 * sms : items; }
// The passes' partial records (each [g] of (m, l) and [g, d]) for up to `items` items.
__host__ __device__ inline std::size_t pass_records(int64_t items, int units, int64_t sms) {
  return (std::size_t)items * units + (std::size_t)rest_blocks(items, sms);
}

__host__ __device__ inline std::size_t align16(std::size_t x) { return (x + 15) / 16 * 16; }

__host__ __device__ inline ThreshState carve(void* base, int64_t heads, int64_t items, int64_t g, int64_t d,
                                             int units, int64_t sms) {
  ThreshState t;
  char* p = static_cast<char*>(base);
  auto take = [&](std::size_t bytes) {
    char* r = p;
    p += align16(bytes);
    return r;
  };
  t.tok = reinterpret_cast<int32_t*>(take((std::size_t)heads * kBuckets * 4));
  t.pri = reinterpret_cast<float*>(take((std::size_t)heads * kBuckets * 4));
  t.info = reinterpret_cast<ThreshInfo*>(take((std::size_t)heads * sizeof(ThreshInfo)));
  t.head_done = reinterpret_cast<int32_t*>(take((std::size_t)heads * 4));
  t.item_done = reinterpret_cast<int32_t*>(take((std::size_t)items * 4));
  t.seg = reinterpret_cast<int32_t*>(take((std::size_t)items * 2 * 4));
  t.cpri = reinterpret_cast<double*>(take((std::size_t)heads * kBuckets * 8));
  t.ctok = reinterpret_cast<int32_t*>(take((std::size_t)heads * kBuckets * 4));
  t.hs = reinterpret_cast<float*>(take((std::size_t)heads * units * 4));
  t.urows = reinterpret_cast<int32_t*>(take((std::size_t)items * units * 4));
  t.mplan = reinterpret_cast<int32_t*>(take((std::size_t)(items + 1) * 4));
  t.mcounts = reinterpret_cast<int32_t*>(take((std::size_t)items * 4));
  const std::size_t records = pass_records(items, units, sms) * g;
  t.ws_ml = reinterpret_cast<float*>(take(records * 2 * 4));
  t.ws_acc = reinterpret_cast<float*>(take(records * d * 4));
  return t;
}

struct HeadSlice {  // a (sequence, KV head)'s counts and store head
  int64_t b, h, hi, C, nsink, nclu, nrec;
};
__device__ __forceinline__ HeadSlice slice(const StepGeometry& s, int64_t item) {
  HeadSlice v;
  v.b = item / s.hkv;
  v.h = item - v.b * s.hkv;
  const int32_t slot = s.slots[v.b];
  const SlotCounts st = s.state[s.layer * s.max_batch + slot];
  v.hi = (s.layer * s.max_batch + slot) * s.hkv + v.h;
  v.C = st.n_clusters;
  v.nsink = st.n_sink;
  v.nclu = st.n_clustered;
  v.nrec = st.n_recent;
  return v;
}

// ---- hist: (query head, part) blocks; the last block of a head takes its exact head ----
__global__ void __launch_bounds__(kHistThreads) thresh_hist_kernel(StepGeometry s, SelectArgs a, ThreshState t,
                                                                   int parts) {
  pdl_begin();
  __shared__ int32_t s_tok[kBuckets];
  __shared__ float s_pri[kBuckets];
  __shared__ double s_cp[kBuckets];  // the last block's prior prefix
  __shared__ int s_last, s_bh;
  typedef cub::BlockScan<double, kHistThreads> Scan;
  __shared__ typename Scan::TempStorage s_scan;
  const int tid = threadIdx.x;
  const int64_t i = blockIdx.x / parts, part = blockIdx.x - i * parts;
  const int64_t hq = s.hkv * s.g, item = (i / hq) * s.hkv + (i % hq) / s.g;
  const HeadSlice v = slice(s, item);
  const int32_t* off = a.offsets + v.hi * (s.cmax + 1);
  const float* sc = a.scores + i * s.cmax;
  const float mx = unorder_float(a.seg_max[i]);
  const float bpl = bucket_width(mx, unorder_float(a.seg_min[i]));
  const bool all = v.C == 0 || v.C < a.min_clusters || a.target >= 1.0;
  if (!all) {
    for (int k = tid; k < kBuckets; k += kHistThreads) {
      s_tok[k] = 0;
      s_pri[k] = 0.f;
    }
    __syncthreads();
    const int64_t lo = v.C * part / parts, hi = v.C * (part + 1) / parts;
    for (int64_t j = lo + tid; j < hi; j += kHistThreads) {
      const float x = __ldg(sc + j);
      const int n = __ldg(off + j + 1) - __ldg(off + j);
      const int bk = bucket_of(x, mx, bpl);
      atomicAdd(&s_tok[bk], n);
      atomicAdd(&s_pri[bk], (float)n * __expf(x - mx));
    }
    __syncthreads();
    for (int k = tid; k < kBuckets; k += kHistThreads)
      if (s_tok[k]) {
        atomicAdd(t.tok + i * kBuckets + k, s_tok[k]);
        atomicAdd(t.pri + i * kBuckets + k, s_pri[k]);
      }
  }
  __threadfence();
  __syncthreads();
  if (tid == 0) s_last = atomicAdd(t.head_done + i, 1) == parts - 1;
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  if (tid == 0) {  // ready for the next step
    t.head_done[i] = 0;
    a.seg_max[i] = INT_MIN;
    a.seg_min[i] = INT_MAX;
  }
  ThreshInfo info{};
  info.mx = mx;
  info.bpl = bpl;
  info.all = all;
  info.bh = info.bx = kBuckets - 1;
  if (!all) {
    // Buckets per thread, consecutive: the exclusive token prefix finds the crossing bucket bh
    // (tokens before it < thr <= tokens through it), taken whole. Global reads and writes go
    // through shared memory, coalesced: a thread's 8 consecutive buckets straight from global
    // memory cost ~7 us a pass at 32K (measured on the H100: each warp access touches 32 lines).
    constexpr int PER = kBuckets / kHistThreads;
    int32_t* gt = t.tok + i * kBuckets;
    float* gp = t.pri + i * kBuckets;
    __syncthreads();  // the block's own histogram in s_tok / s_pri is done with
    for (int k = tid; k < kBuckets; k += kHistThreads) {
      s_tok[k] = __ldcg(gt + k);
      s_pri[k] = __ldcg(gp + k);
      gt[k] = 0;  // zero for the next step
      gp[k] = 0.f;
    }
    __syncthreads();
    double tk[PER], pr[PER], tsum = 0.0, psum = 0.0;
#pragma unroll
    for (int k = 0; k < PER; ++k) {
      tk[k] = (double)s_tok[tid * PER + k];
      pr[k] = (double)s_pri[tid * PER + k];
      tsum += tk[k];
      psum += pr[k];
    }
    if (tid == 0) s_bh = kBuckets - 1;
    double before, pbefore, ptotal;
    Scan(s_scan).ExclusiveSum(tsum, before);
    __syncthreads();
    Scan(s_scan).ExclusiveSum(psum, pbefore, ptotal);
    const double thr = fmax(1.0, a.head_fraction * (double)v.nclu);
    // Inclusive prefixes, which the head pass's last block searches for the stop bucket.
#pragma unroll
    for (int k = 0; k < PER; ++k) {
      if (before < thr && before + tk[k] >= thr) s_bh = tid * PER + k;
      before += tk[k];
      pbefore += pr[k];
      s_tok[tid * PER + k] = (int32_t)before;  // this thread's own buckets, read above
      s_cp[tid * PER + k] = pbefore;
    }
    __syncthreads();
    const int bh = s_bh;
    for (int k = tid; k < kBuckets; k += kHistThreads) {
      t.ctok[i * kBuckets + k] = s_tok[k];
      t.cpri[i * kBuckets + k] = s_cp[k];
    }
    info.bh = bh;
    info.bx = bh;
    info.prior_head = s_cp[bh];
    info.prior_all = ptotal;
  }
  if (tid == 0) t.info[i] = info;
}

// ---- the attention passes ----
constexpr int kRound = 512;                // clusters listed per round of a block (3 blocks per SM)
constexpr int kPerThread = kRound / kThreads;  // consecutive clusters per thread in a round
constexpr int kStages = 2;

template <int D>
struct PassTile {
  static constexpr int kStride = D + 8;  // elements per shared row (ldmatrix without conflicts)
  static constexpr int kTile = kTileRows * kStride;
  static constexpr int kWarp = kStages * 2 * kTile;
  static constexpr std::size_t kTileBytes = (std::size_t)kWarps * kWarp * 2;
  static constexpr std::size_t kMergeBytes = (std::size_t)kWarps * 8 * (D + 3) * 4;
  static constexpr std::size_t kBytes = kTileBytes > kMergeBytes ? kTileBytes : kMergeBytes;
};

struct PassParams {
  StepGeometry s;
  ThreshState t;
  const void* k;
  const void* v;
  const int32_t* offsets;
  const float* scores;
  const float* q;            // [batch, Hq, D] scaled
  uint8_t* layer_mark;       // [items, cmax]
  int64_t* layer_work;       // [items] the rest pass's work (finish_item; read by the rest pass, also under reuse)
  uint8_t* head_mark;        // [heads, cmax] or null
  int64_t* head_tokens;
  double* est_mass;
  int32_t* counts;           // [items] union rows read
  int units;                 // head-pass blocks per item this step (at most threshold_units)
  int64_t items, nb;         // (sequence, KV head) pairs of the step; rest-pass blocks launched
  int64_t rest_unit0;        // the rest pass's first record unit (max_items * threshold_units)
  int elem_bytes;            // of K and V
  double target, margin;
  bool reuse;
};

// After every head-pass block of `item` has written its records: per query head of the group,
// alpha = exact head mass / its prior, z, and the stop bucket bx where the estimate reaches
// P_eff * z (whole buckets: the first bucket after bh whose prior prefix reaches it, found by a
// 32-way search of the hist's prefixes, three L2 round trips); the head's statistics. One warp
// per query head.
__device__ void finish_item(const PassParams& p, int64_t item, const HeadSlice& v) {
  const StepGeometry& s = p.s;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int U = p.units;
  const int64_t always = v.nsink + v.nrec;
  for (int j = warp; j < s.g; j += kWarps) {
    const int64_t i = v.b * s.hkv * s.g + v.h * s.g + j;
    const ThreshInfo info = p.t.info[i];
    // Exact masses from the records, relative to their common max M (log2 units); the last
    // block of the pass read the sinks and recent rows.
    float M = -FLT_MAX;
    for (int u = lane; u < U; u += 32) M = fmaxf(M, __ldcg(p.t.ws_ml + ((item * U + u) * s.g + j) * 2));
    for (int o = 16; o > 0; o >>= 1) M = fmaxf(M, __shfl_xor_sync(kFull, M, o));
    double am = 0.0, ex = 0.0;
    for (int u = lane; u < U; u += 32) {
      const int64_t rec = (item * U + u) * s.g + j;
      const float m = __ldcg(p.t.ws_ml + rec * 2), l = __ldcg(p.t.ws_ml + rec * 2 + 1);
      const double w = exp2((double)m - (double)M);
      if (u == U - 1) am += (double)l * w;
      else ex += (double)__ldcg(p.t.hs + (item * U + u) * s.g + j) * w;
    }
    for (int o = 16; o > 0; o >>= 1) {
      am += __shfl_xor_sync(kFull, am, o);
      ex += __shfl_xor_sync(kFull, ex, o);
    }
    int bx = kBuckets - 1;
    double est = 1.0;
    int64_t tokens = v.nclu;
    if (!info.all) {
      const double* cp = p.t.cpri + i * kBuckets;
      const double alpha = ex / info.prior_head;
      const double z = am + ex + alpha * fmax(0.0, info.prior_all - info.prior_head);
      if (isfinite(alpha) && alpha > 0 && z > 0 && isfinite(z)) {
        const double p_eff = fmin(1.0, p.target + p.margin * (1.0 - p.target));
        const double goal = p_eff * z, acc0 = am + ex;
        int found = -1;
        if (acc0 >= goal) {
          found = info.bh;
        } else {
          // First k > bh with acc0 + alpha * (cp[k] - cp[bh]) >= goal, cp non-decreasing.
          const double cbh = cp[info.bh];
          auto reached = [&](int k) { return acc0 + alpha * (cp[k] - cbh) >= goal; };
          int lo = info.bh + 1, hi = kBuckets - 1;
          if (lo <= hi && __shfl_sync(kFull, lane == 0 ? (int)reached(hi) : 0, 0)) {
            while (hi - lo + 1 > 32) {  // the answer stays in [lo, hi]
              const int step = (hi - lo + 32) / 32;
              const int at = min(lo + (lane + 1) * step - 1, hi);
              const unsigned yes = __ballot_sync(kFull, reached(at));
              const int f = __ffs(yes) - 1;  // yes is never empty: lane 31 probes hi
              hi = min(lo + (f + 1) * step - 1, hi);
              lo = lo + f * step;
            }
            const unsigned yes = __ballot_sync(kFull, lo + lane <= hi && reached(lo + lane));
            found = lo + __ffs(yes) - 1;
          }
        }
        if (found >= 0) {  // else rounding left the goal unreached: everything
          bx = found;
          est = fmin(1.0, (acc0 + alpha * (cp[bx] - cp[info.bh])) / z);
          tokens = p.t.ctok[i * kBuckets + bx];
        }
      }
    }
    if (lane == 0) {
      p.t.info[i].bx = bx;
      p.head_tokens[i] = always + tokens;
      p.est_mass[i] = est;
    }
  }
  // The union's rows of the head pass; the rest pass adds its own.
  int r = 0;
  for (int u = lane; u < U; u += 32) r += __ldcg(p.t.urows + item * U + u);
  for (int o = 16; o > 0; o >>= 1) r += __shfl_xor_sync(kFull, r, o);
  __syncthreads();  // every head's tokens written
  if (threadIdx.x == 0) {
    p.counts[item] = r;
    p.t.item_done[item] = 0;
    // The rest pass's work here, in rows: an upper bound of the rows left (the union holds at
    // most the sum of its heads' tokens and at most the context, less the head pass's rows),
    // plus the bytes of listing the item's clusters.
    long long sum = 0;
    for (int j = 0; j < s.g; ++j)
      sum += __ldcg(reinterpret_cast<const long long*>(p.head_tokens) + v.b * s.hkv * s.g + v.h * s.g + j);
    sum = min(sum, (long long)(v.nsink + v.nclu + v.nrec));
    const long long row_bytes = 2LL * s.d * p.elem_bytes;
    p.layer_work[item] = 1 + max(0LL, sum - (long long)r) + (v.C * (s.g + 1) * 4 + row_bytes - 1) / row_bytes;
  }
}

// The shared memory of a pass block besides the tiles (one unit at a time).
struct PassShared {
  int32_t start[kRound];    // chosen clusters of the round: first store row
  int32_t pre[kRound + 1];  // and exclusive prefix of their rows
  uint8_t own[kRound];      // pass 1: bit j = head j's own exact head
  float mx[8], bpl[8];
  int bh[8], bx[8], all[8];
  int n, rows, last;
  long long r_item, r_k, r_n;  // the rest pass: this block's item, and its share k of n there
  typename cub::BlockScan<long long, kThreads>::TempStorage scan;
};

// One unit of pass kPass (1: the group's exact heads, or the sinks and recent rows where
// `always_unit`; 2: the rest of the selection): item's clusters [c_lo, c_hi) listed a round at a
// time, their chosen rows read in 16-row tiles (cp.async, two stages per warp), S = Q K^T and
// O += P V on tensor cores for the whole group (attention_tile.cuh, as the chunk kernel over a
// row list); the unit's record per query head at unit index `unit`. Pass 1 also sums each
// head's exact mass over its own exact-head rows (into t.hs at the same unit index). Returns
// the rows read.
template <class T, int D, int kPass>
__device__ __forceinline__ int pass_unit(const PassParams& p, PassShared& sh, unsigned char* s_work, int64_t item,
                                         const HeadSlice& v, int c_lo, int c_hi, bool always_unit, int unit) {
  using Tile = PassTile<D>;
  constexpr int ST = Tile::kStride, KS = D / 16, NT = D / 8;
  typedef cub::BlockScan<long long, kThreads> Scan;
  const StepGeometry& s = p.s;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g8 = lane >> 2, t4 = lane & 3;
  const int64_t hq = s.hkv * s.g, head0 = v.b * hq + v.h * s.g;
  const T* kb = static_cast<const T*>(p.k) + v.hi * s.cap * D;
  const T* vb = static_cast<const T*>(p.v) + v.hi * s.cap * D;
  const int32_t* off = p.offsets + v.hi * (s.cmax + 1);
  uint8_t* lmark = p.layer_mark + item * s.cmax;
  __syncthreads();  // (pass 2: rest_plan is done with the shared memory; it ends with a barrier too)
  if (tid < s.g && !p.reuse) {
    const ThreshInfo in = p.t.info[head0 + tid];
    sh.mx[tid] = in.mx;
    sh.bpl[tid] = in.bpl;
    sh.bh[tid] = in.bh;
    sh.bx[tid] = in.bx;
    sh.all[tid] = in.all;
  }

  // Q as the A operand (attention_tile.cuh).
  uint32_t qa[KS][4];
  const bool head = g8 < s.g;
  load_q_frags<T, D>(p.q + head0 * D, s.g, lane, qa);
  float o[NT][4];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) o[nt][0] = o[nt][1] = o[nt][2] = o[nt][3] = 0.f;
  float m = -FLT_MAX, lsum = 0.f, hsum = 0.f;
  T* wt = reinterpret_cast<T*>(s_work) + warp * Tile::kWarp;
  __syncthreads();

  int rows_read = 0;
  // Rounds: the chosen clusters of [r0, r0 + kRound) listed, then read. The always unit has
  // one round of sinks and recent rows.
  for (int r0 = c_lo; always_unit ? r0 == c_lo : r0 < c_hi; r0 += kRound) {
    int R = 0;
    if (always_unit) {
      R = (int)(v.nsink + v.nrec);
    } else {
      int n_sel = 0, rows = 0;
      int32_t st_[kPerThread], nn[kPerThread];
      uint8_t own[kPerThread];
      bool sel[kPerThread];
#pragma unroll
      for (int e = 0; e < kPerThread; ++e) {
        const int64_t c = r0 + tid * kPerThread + e;
        sel[e] = false;
        own[e] = 0;
        nn[e] = 0;
        st_[e] = 0;
        if (c < c_hi) {
          const int32_t o0 = __ldg(off + c), o1 = __ldg(off + c + 1);
          st_[e] = (int32_t)v.nsink + o0;
          nn[e] = o1 - o0;
          if (p.reuse) {
            sel[e] = lmark[c] == kPass;
          } else {
            bool in1 = false, in2 = false;
            uint8_t mine = 0;
            for (int j = 0; j < s.g; ++j) {
              const int bk = sh.all[j] ? 0 : bucket_of(__ldg(p.scores + (head0 + j) * s.cmax + c), sh.mx[j], sh.bpl[j]);
              const bool h1 = sh.all[j] || bk <= sh.bh[j];
              const bool h2 = sh.all[j] || bk <= sh.bx[j];
              in1 |= h1;
              in2 |= h2;
              if (kPass == 1 ? h1 : h2) mine |= (uint8_t)(1u << j);
            }
            sel[e] = kPass == 1 ? in1 : (in2 && !in1);
            own[e] = mine;
            if (kPass == 2) {
              lmark[c] = in1 ? 1 : (in2 ? 2 : 0);
              if (p.head_mark)
                for (int j = 0; j < s.g; ++j) p.head_mark[(head0 + j) * s.cmax + c] = (mine >> j) & 1;
            }
          }
        }
        if (sel[e]) {
          ++n_sel;
          rows += nn[e];
        }
      }
      long long ex, tot;
      Scan(sh.scan).ExclusiveSum(((long long)n_sel << 32) | (long long)rows, ex, tot);
      int at = (int)(ex >> 32), pre = (int)(ex & 0xffffffffLL);
#pragma unroll
      for (int e = 0; e < kPerThread; ++e)
        if (sel[e]) {
          sh.start[at] = st_[e];
          sh.pre[at] = pre;
          sh.own[at] = own[e];
          ++at;
          pre += nn[e];
        }
      if (tid == 0) {
        sh.n = (int)(tot >> 32);
        sh.rows = (int)(tot & 0xffffffffLL);
        sh.pre[sh.n] = sh.rows;
      }
      __syncthreads();
      R = sh.rows;
    }
    rows_read += R;
    const int n_sel = always_unit ? 0 : sh.n;

    // Row `pos` of the round: its store row and its heads' own bits.
    auto row_of = [&](int pos, uint32_t& bits) -> int64_t {
      if (always_unit) {
        bits = 0xffu;
        return pos < v.nsink ? pos : v.nsink + v.nclu + (pos - v.nsink);
      }
      int lo = 0, hi = n_sel - 1;  // the last listed cluster with pre <= pos
      while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (sh.pre[mid] <= pos) lo = mid; else hi = mid - 1;
      }
      bits = sh.own[lo];
      return (int64_t)sh.start[lo] + (pos - sh.pre[lo]);
    };
    const int ntiles = (R + kTileRows - 1) / kTileRows;
    uint32_t bits_st[kStages] = {0u, 0u};  // lane r < 16: row r's own bits, per stage
    auto issue = [&](int tile, int stage) {
      const int pos = tile * kTileRows + (lane & 15);
      const int ok = pos < R;
      uint32_t bits = 0;
      const int64_t my = ok ? row_of(pos, bits) : 0;
      if (stage == 0) bits_st[0] = bits; else bits_st[1] = bits;
      T* ks = wt + stage * 2 * Tile::kTile;
      copy_tile<T, D, ST>(ks, ks + Tile::kTile, kb, vb, lane, my, ok);
    };
    if (warp < ntiles) issue(warp, 0);
    cp_async_commit();
    int it = 0;
    for (int tile = warp; tile < ntiles; tile += kWarps, ++it) {
      if (tile + kWarps < ntiles) issue(tile + kWarps, (it + 1) & 1);
      cp_async_commit();
      cp_async_wait<1>();
      __syncwarp();
      const T* ks = wt + (it & 1) * 2 * Tile::kTile;
      const T* vs = ks + Tile::kTile;
      const uint32_t tb = (it & 1) ? bits_st[1] : bits_st[0];
      bool mine[4];  // the lane's rows in head g8's own exact head (pass 1)
      const int rix[4] = {2 * t4, 2 * t4 + 1, 8 + 2 * t4, 9 + 2 * t4};
#pragma unroll
      for (int e = 0; e < 4; ++e) mine[e] = (__shfl_sync(kFull, tb, rix[e]) >> (g8 & 7)) & 1u;
      float pr[4];
      const float corr = tile_step<T, D, ST>(ks, vs, qa, lane, R - tile * kTileRows, m, lsum, o, pr);
      if constexpr (kPass == 1)
        hsum = fmaf(hsum, corr, (mine[0] ? pr[0] : 0.f) + (mine[1] ? pr[1] : 0.f) + (mine[2] ? pr[2] : 0.f) +
                                    (mine[3] ? pr[3] : 0.f));
      __syncwarp();
    }
    cp_async_wait<0>();
    __syncthreads();  // the round's list is rebuilt next
  }

  // The warps' partials meet in shared memory, then the unit's record per head.
  lsum += __shfl_xor_sync(kFull, lsum, 1);
  lsum += __shfl_xor_sync(kFull, lsum, 2);
  hsum += __shfl_xor_sync(kFull, hsum, 1);
  hsum += __shfl_xor_sync(kFull, hsum, 2);
  float* s_acc = reinterpret_cast<float*>(s_work);  // [kWarps][8][D]
  float* s_m = s_acc + kWarps * 8 * D;
  float* s_l = s_m + kWarps * 8;
  float* s_h = s_l + kWarps * 8;
  if (head) {
    float* acc = s_acc + (warp * 8 + g8) * D + 2 * t4;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      acc[8 * nt] = o[nt][0] + o[nt][2];
      acc[8 * nt + 1] = o[nt][1] + o[nt][3];
    }
    if (t4 == 0) {
      s_m[warp * 8 + g8] = m;
      s_l[warp * 8 + g8] = lsum;
      s_h[warp * 8 + g8] = hsum;
    }
  }
  __syncthreads();
  const int64_t rec_base = unit * s.g;
  for (int x = tid; x < s.g * D; x += kThreads) {
    const int hh = x / D, dd = x - hh * D;
    float mx = s_m[hh];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) mx = fmaxf(mx, s_m[w * 8 + hh]);
    float acc = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) acc = fmaf(s_acc[(w * 8 + hh) * D + dd], fast_exp2(s_m[w * 8 + hh] - mx), acc);
    p.t.ws_acc[(rec_base + hh) * D + dd] = acc;
  }
  if (tid < s.g) {
    float mx = s_m[tid];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) mx = fmaxf(mx, s_m[w * 8 + tid]);
    float sum = 0.f, hs = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float wgt = fast_exp2(s_m[w * 8 + tid] - mx);
      sum = fmaf(s_l[w * 8 + tid], wgt, sum);
      hs = fmaf(s_h[w * 8 + tid], wgt, hs);
    }
    p.t.ws_ml[(rec_base + tid) * 2] = mx;
    p.t.ws_ml[(rec_base + tid) * 2 + 1] = sum;
    if (kPass == 1 && !p.reuse) p.t.hs[(int64_t)unit * s.g + tid] = hs;
  }
  return rows_read;
}

// The rest pass's plan, computed alike by each of its blocks from the work finish_item left per
// item (no hand-over kernel, so no serial step): item i's first block is bs(i) = i + floor((nb -
// items) wp(i) / W) for the prefix wp of the work, so each item has at least one block, a KV
// head whose group reads most of its context gets most of them, and no block spans two items
// (a block that did would run two units back to back: the wave's longest chain). Where the
// prefix does not fit the shared memory, every item weighs 1. Block 0 writes each item's run
// of rest records for the merge (record of block b: rest_unit0 + b). The work is per layer, so
// reuse balances as the layer's selection did.
__device__ void rest_plan(const PassParams& p, PassShared& sh, unsigned char* s_work, std::size_t smem_bytes) {
  typedef cub::BlockScan<long long, kThreads> Scan;
  const int tid = threadIdx.x;
  const int64_t items = p.items;
  long long* sw = reinterpret_cast<long long*>(s_work);
  const bool fits = (std::size_t)(items + 2) * sizeof(long long) <= smem_bytes;
  long long& s_carry = sw[smem_bytes / 8 - 1];  // past the prefix where it fits
  if (fits) {
    if (tid == 0) s_carry = 0;
    __syncthreads();
    for (int64_t i0 = 0; i0 < items; i0 += kThreads) {
      const int64_t i = i0 + tid;
      const long long w = i < items ? max(1LL, (long long)__ldcg(p.layer_work + i)) : 0;  // (zeroed state: 1)
      long long ex, tot;
      Scan(sh.scan).ExclusiveSum(w, ex, tot);
      if (i < items) sw[i] = s_carry + ex;
      __syncthreads();
      if (tid == 0) s_carry += tot;
      __syncthreads();
    }
    if (tid == 0) sw[items] = s_carry;
    __syncthreads();
  }
  const long long W = fits ? sw[items] : items, spare = p.nb - items;
  auto bs = [&](int64_t i) -> long long { return i + spare * (fits ? sw[i] : (long long)i) / W; };
  if (blockIdx.x == 0)
    for (int64_t i = tid; i < items; i += kThreads) {
      const long long f = bs(i);
      p.t.seg[i] = (int32_t)(bs(i + 1) - f);
      p.t.seg[items + i] = (int32_t)(p.rest_unit0 + f);
    }
  if (tid == 0) {
    const long long b = blockIdx.x;
    int64_t a = 0, z = items - 1;  // the last item with bs <= b
    while (a < z) {
      const int64_t mid = (a + z + 1) >> 1;
      if (bs(mid) <= b) a = mid; else z = mid - 1;
    }
    sh.r_item = a;
    sh.r_k = b - bs(a);
    sh.r_n = bs(a + 1) - bs(a);
  }
  __syncthreads();
}

// Pass 1 blocks are (item, u): u < U - 1 a chunk of the item's clusters, u = U - 1 the sinks
// and recent rows; the last block of an item decides its stop (finish_item). Pass 2 block b
// takes its share k of n of one item's clusters (rest_plan).
template <class T, int D, int kPass>
__global__ void __launch_bounds__(kThreads, 3) thresh_pass_kernel(const PassParams p) {
  pdl_begin();
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  static_assert(sizeof(T) == 2 && D % 16 == 0 && D <= 128, "16-bit K/V, D a multiple of 16 up to 128");
  extern __shared__ __align__(16) unsigned char s_work[];
  __shared__ PassShared sh;
  const StepGeometry& s = p.s;
  const int tid = threadIdx.x;
  const int U = p.units;
  if constexpr (kPass == 1) {
    const int64_t item = blockIdx.x / U;
    const int u = (int)(blockIdx.x - item * U);
    const HeadSlice v = slice(s, item);
    if (blockIdx.x == 0 && tid == 0) p.t.mplan[0] = 1;
    if (u == 0 && tid == 0) {  // the merge's plan: U head-pass records per item (and the rest's run)
      p.t.mplan[1 + item] = (int32_t)(item * U);
      p.t.mcounts[item] = U;
    }
    const bool always_unit = u == U - 1;
    const int c_lo = (int)(v.C * u / (U - 1)), c_hi = always_unit ? c_lo : (int)(v.C * (u + 1) / (U - 1));
    const int rows = pass_unit<T, D, 1>(p, sh, s_work, item, v, c_lo, c_hi, always_unit, (int)(item * U + u));
    if (p.reuse) return;
    if (tid == 0) p.t.urows[item * U + u] = (int32_t)rows;
    __threadfence();
    __syncthreads();
    if (tid == 0) sh.last = atomicAdd(p.t.item_done + item, 1) == U - 1;
    __syncthreads();
    if (!sh.last) return;
    __threadfence();
    finish_item(p, item, v);
  } else {
    rest_plan(p, sh, s_work, PassTile<D>::kBytes);
    const int64_t i = sh.r_item;
    const int k = (int)sh.r_k, n = (int)sh.r_n;
    const HeadSlice v = slice(s, i);
    const int rows = pass_unit<T, D, 2>(p, sh, s_work, i, v, (int)(v.C * k / n), (int)(v.C * (k + 1) / n), false,
                                        (int)(p.rest_unit0 + blockIdx.x));
    if (!p.reuse && threadIdx.x == 0 && rows) atomicAdd(p.counts + i, (int32_t)rows);
  }
#else
  __trap();  // launched only where the binary is sm_80 or newer (threshold_selection_fit)
#endif
}

template <class T, int D, int kPass>
void launch_pass(const PassParams& p, bool pdl, cudaStream_t st) {
  constexpr auto K = thresh_pass_kernel<T, D, kPass>;
  const std::size_t smem = PassTile<D>::kBytes;
  TACTIC_CUDA_CHECK(cudaFuncSetAttribute(K, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
  launch<K>(pdl, dim3((unsigned)(kPass == 1 ? p.items * p.units : p.nb)), dim3(kThreads), smem, st, p);
  TACTIC_CUDA_LAUNCH_CHECK(kPass == 1 ? "thresh_pass_kernel (head)" : "thresh_pass_kernel (rest)");
}

}  // namespace

int threshold_units(int64_t cmax) {
  return (int)std::min<int64_t>(kMaxThreshUnits, std::max<int64_t>(32, (cmax + 255) / 256));
}

std::size_t threshold_state_bytes(int64_t heads, int64_t items, int64_t g, int64_t d, int64_t cmax, int64_t sms) {
  const int units = threshold_units(cmax);
  const ThreshState t = carve(nullptr, heads, items, g, d, units, sms);
  return reinterpret_cast<std::size_t>(t.ws_acc) +
         align16(pass_records(items, units, sms) * g * d * 4);
}

std::string threshold_selection_fit(DType dtype, int64_t d, int64_t g) {
  if (!(dtype == DType::f16 || dtype == DType::bf16)) return "needs float16 or bfloat16 K/V";
  if (!(d == 64 || d == 80 || d == 96 || d == 128)) return "needs head_dim 64, 80, 96 or 128";
  if (g > 8) return "needs at most 8 query heads per KV head";
  if (compiled_arch<thresh_pass_kernel<__half, 128, 1>>() < 80)
    return "needs kernels built for sm_80 or newer; this build's run as sm_" + std::to_string(kernel_arch());
  return "";
}

void threshold_step(const StepGeometry& s, const SelectArgs& a, const ThresholdArgs& ta) {
  cudaStream_t st = as_stream(s.stream);
  const int64_t items = s.batch * s.hkv, heads = items * s.g;
  const std::string why = threshold_selection_fit(a.dtype, s.d, s.g);
  if (!why.empty()) throw UnsupportedError("the threshold selection " + why);
  const int units_max = threshold_units(s.cmax);  // the state's layout
  const int64_t sms = a.sm_count;
  if (heads > ta.max_heads || items > ta.max_items) throw ValueError("threshold_step: the state is sized for fewer heads");
  if (sms <= 0) throw ValueError("threshold_step: sm_count must be set");
  if (!ta.layer_mark || !ta.layer_work) throw ValueError("threshold_step: layer_mark and layer_work must be set");
  if (items == 0) return;
  const ThreshState t = carve(ta.state, ta.max_heads, ta.max_items, s.g, s.d, units_max, sms);
  // Head-pass blocks per item this step: about three waves of 3 blocks per SM over all items, at
  // most the layout's (a large batch in chunks of a few dozen clusters would pay each block's
  // fixed chain, and write records, many times over).
  const int units = (int)std::min<int64_t>(units_max, std::max<int64_t>(4, (9 * sms + items - 1) / items + 1));
  if (!ta.reuse) {
    if (a.head_mark) TACTIC_CUDA_CHECK(cudaMemsetAsync(a.head_mark, 0, (size_t)(heads * s.cmax), st));
    launch_score(s, a);
    // About 2048 clusters per block, and at least two blocks per SM over all heads.
    const int parts = (int)std::max<int64_t>(
        1, std::min<int64_t>(64, std::max<int64_t>((s.cmax + 2047) / 2048, (2 * sms + heads - 1) / heads)));
    launch<thresh_hist_kernel>(s.pdl, dim3((unsigned)(heads * parts)), dim3(kHistThreads), 0, st, s, a, t, parts);
    TACTIC_CUDA_LAUNCH_CHECK("thresh_hist_kernel");
  }
  const AttentionArgs& at = ta.attention;
  PassParams p{};
  p.s = s;
  p.t = t;
  p.k = at.k;
  p.v = at.v;
  p.offsets = a.offsets;
  p.scores = a.scores;
  p.q = at.q;
  p.layer_mark = ta.layer_mark;
  p.layer_work = ta.layer_work;
  p.head_mark = a.head_mark;
  p.head_tokens = a.head_tokens;
  p.est_mass = a.est_mass;
  p.counts = a.counts;
  p.units = units;
  p.items = items;
  p.nb = rest_blocks(items, sms);
  p.rest_unit0 = ta.max_items * units_max;
  p.elem_bytes = 2;  // 16-bit K/V (threshold_selection_fit)
  p.target = a.target;
  p.margin = a.margin;
  p.reuse = ta.reuse;
  dispatch_float(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (sizeof(T) == 2) {
      switch (s.d) {
        case 64: launch_pass<T, 64, 1>(p, s.pdl, st); launch_pass<T, 64, 2>(p, s.pdl, st); break;
        case 80: launch_pass<T, 80, 1>(p, s.pdl, st); launch_pass<T, 80, 2>(p, s.pdl, st); break;
        case 96: launch_pass<T, 96, 1>(p, s.pdl, st); launch_pass<T, 96, 2>(p, s.pdl, st); break;
        default: launch_pass<T, 128, 1>(p, s.pdl, st); launch_pass<T, 128, 2>(p, s.pdl, st); break;
      }
    }
  });
  if (!at.out) return;
  MergeParams mp{};
  mp.hkv = s.hkv;
  mp.g = s.g;
  mp.counts = t.mcounts;
  mp.max_count = units;
  mp.plan = t.mplan;
  mp.counts2 = t.seg;
  mp.plan2 = t.seg + items;
  mp.ws_ml = t.ws_ml;
  mp.ws_acc = t.ws_acc;
  mp.out = at.out;
  mp.out_stride_b = at.out_stride_b;
  mp.out_stride_h = at.out_stride_h;
  launch_merge(mp, items * s.g, LaunchPlan{st, s.pdl, true}, at.out_dtype, s.d);
}

}  // namespace cuda
}  // namespace tactic
