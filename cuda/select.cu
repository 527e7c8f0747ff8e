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
#include <cub/device/device_segmented_radix_sort.cuh>
#include <cuda/functional>

#include <cfloat>
#include <climits>

#include "common.cuh"
#include "select.hpp"

namespace tactic {
namespace cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ int64_t head_index(const StepGeometry& s, int32_t slot, int64_t h) {
  return (s.layer * s.max_batch + slot) * s.hkv + h;
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <class T>
__global__ void prepare_q_kernel(StepGeometry s, const T* q, int64_t sb, int64_t sh, float scale,
                                 float* qf) {
  const int64_t hq = s.hkv * s.g, i = blockIdx.x, b = i / hq, h = i % hq;
  for (int64_t k = threadIdx.x; k < s.d; k += blockDim.x)
    qf[i * s.d + k] = scale * to_float(q[b * sb + h * sh + k]);
}

template <class S, class T>
__global__ void append_kernel(StepGeometry s, const S* kn, const S* vn, int64_t sb, int64_t sh,
                              T* k, T* v, int32_t* pos) {
  const int64_t b = blockIdx.x, h = blockIdx.y;
  const int32_t slot = s.slots[b];
  const SlotCounts st = s.state[s.layer * s.max_batch + slot];
  const int64_t row = (int64_t)st.n_sink + st.n_clustered + st.n_recent;
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
__global__ void count_token_kernel(StepGeometry s, int num_sink) {
  const int64_t b = blockIdx.x * blockDim.x + threadIdx.x;
  if (b >= s.batch) return;
  SlotCounts& st = s.state[s.layer * s.max_batch + s.slots[b]];
  if (st.n_clustered == 0 && st.n_recent == 0 && st.n_sink < num_sink) ++st.n_sink;
  else ++st.n_recent;
}

// scores[b*Hq + h*g + j, c] = qf . centroid_c for the g query heads of KV head h; one warp
// per centroid, the g queries in shared memory. Also writes the sort's segment bounds.
__global__ void score_kernel(StepGeometry s, SelectArgs a) {
  extern __shared__ float qs[];  // [g, d]
  const int64_t item = blockIdx.x, b = item / s.hkv, h = item % s.hkv, hq = s.hkv * s.g;
  const int32_t slot = s.slots[b];
  const SlotCounts st = s.state[s.layer * s.max_batch + slot];
  const int64_t hi = head_index(s, slot, h), c_count = st.n_clusters;
  const float* q = a.qf + (b * hq + h * s.g) * s.d;
  for (int64_t e = threadIdx.x; e < s.g * s.d; e += blockDim.x) qs[e] = q[e];
  if (blockIdx.y == 0 && threadIdx.x < s.g) {
    const int64_t seg = b * hq + h * s.g + threadIdx.x;
    a.seg_begin[seg] = (int32_t)(seg * s.cmax);
    a.seg_end[seg] = (int32_t)(seg * s.cmax + c_count);
  }
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const float* cent = a.centroids + hi * s.cmax * s.d;
  const int64_t per_block = (int64_t)kWarps * 8;
  for (int64_t c = blockIdx.y * per_block + warp; c < min(c_count, (int64_t)(blockIdx.y + 1) * per_block);
       c += kWarps) {
    for (int64_t j = 0; j < s.g; ++j) {
      float acc = 0.f;
      for (int64_t e = lane; e < s.d; e += 32) acc += qs[j * s.d + e] * cent[c * s.d + e];
      acc = warp_sum(acc);
      if (lane == 0) {
        const int64_t seg = b * hq + h * s.g + j;
        a.scores[seg * s.cmax + c] = acc;
        a.ids[seg * s.cmax + c] = (int32_t)c;
      }
    }
  }
}

struct MaxSum {  // online softmax state: sum of exp(x - m)
  double m, s;
};
__device__ __forceinline__ MaxSum combine(MaxSum x, MaxSum y) {
  const double m = fmax(x.m, y.m);
  if (m == -INFINITY) return {m, 0.0};
  return {m, x.s * exp(x.m - m) + y.s * exp(y.m - m)};
}

// Adds exp(x - m) to an online (max, sum) pair: one exp per element.
__device__ __forceinline__ MaxSum add(MaxSum a, double x) {
  if (x > a.m) return {x, a.s * exp(a.m - x) + 1.0};
  return {a.m, a.s + exp(x - a.m)};
}

__device__ __forceinline__ MaxSum warp_combine(MaxSum a) {
  for (int o = 16; o > 0; o >>= 1) {
    MaxSum b{__shfl_xor_sync(0xffffffffu, a.m, o), __shfl_xor_sync(0xffffffffu, a.s, o)};
    a = combine(a, b);
  }
  return a;
}

// q . row for one thread: 16-byte loads (d is a multiple of 8, rows 16-byte aligned).
template <class T>
__device__ __forceinline__ float thread_dot(const T* row, const float* q, int64_t d) {
  constexpr int kPer = 16 / sizeof(T);
  const uint4* p = reinterpret_cast<const uint4*>(row);
  float acc = 0.f;
  for (int64_t c = 0; c < d / kPer; ++c) {
    float e[kPer];
    unpack16<T>(__ldg(p + c), e);
#pragma unroll
    for (int i = 0; i < kPer; ++i) acc += q[c * kPer + i] * e[i];
  }
  return acc;
}

template <class T>
__global__ void __launch_bounds__(kThreads) select_heads_kernel(StepGeometry s, SelectArgs a) {
  typedef cub::BlockScan<int64_t, kThreads> ScanI;
  typedef cub::BlockScan<double, kThreads> ScanD;
  typedef cub::BlockReduce<double, kThreads> ReduceD;
  typedef cub::BlockReduce<int64_t, kThreads> ReduceI;
  __shared__ union {
    typename ScanI::TempStorage scan_i;
    typename ScanD::TempStorage scan_d;
    typename ReduceD::TempStorage reduce_d;
    typename ReduceI::TempStorage reduce_i;
  } tmp;
  __shared__ float qs[256];
  __shared__ MaxSum warp_a[kWarps], warp_h[kWarps];
  __shared__ int64_t sh_i;
  __shared__ double sh_d[4];

  const int64_t hq = s.hkv * s.g, i = blockIdx.x, b = i / hq, qh = i % hq, h = qh / s.g;
  const int32_t slot = s.slots[b];
  const SlotCounts st = s.state[s.layer * s.max_batch + slot];
  const int64_t hi = head_index(s, slot, h);
  const int32_t* off = a.offsets + hi * (s.cmax + 1);
  const int64_t C = st.n_clusters, nclu = st.n_clustered, nsink = st.n_sink, nrec = st.n_recent;
  const int64_t always = nsink + nrec, total = always + nclu;
  uint8_t* kmark = a.kv_mark + (b * s.hkv + h) * s.cmax;
  uint8_t* hmark = a.head_mark ? a.head_mark + i * s.cmax : nullptr;
  const float* sc = a.scores_sorted + i * s.cmax;
  const int32_t* ord = a.ids_sorted + i * s.cmax;
  const T* K = static_cast<const T*>(a.k) + hi * s.cap * s.d;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  auto csize = [&](int64_t j) { return (int64_t)off[j + 1] - off[j]; };
  auto mark = [&](int64_t j) {
    kmark[j] = 1;
    if (hmark) hmark[j] = 1;
  };

  for (int64_t e = tid; e < s.d; e += kThreads) qs[e] = a.qf[i * s.d + e];
  bool all = C == 0 || C < a.min_clusters || a.target >= 1.0;
  if (all) {
    for (int64_t j = tid; j < C; j += kThreads) mark(j);
    if (tid == 0) {
      a.head_tokens[i] = C == 0 ? always : total;
      a.est_mass[i] = 1.0;
    }
    return;
  }
  __syncthreads();

  // 1) The exact head: ranked clusters while fewer than head_fraction * nclu tokens precede.
  const double thr = fmax(1.0, a.head_fraction * (double)nclu);
  int64_t i_head = C, carry = 0;
  for (int64_t base = 0; base < C; base += kThreads) {
    const int64_t r = base + tid;
    const int64_t v = r < C ? csize(ord[r]) : 0;
    int64_t ex, agg;
    ScanI(tmp.scan_i).ExclusiveSum(v, ex, agg);
    __syncthreads();
    const int64_t cand = (r < C && r >= 1 && (double)(ex + carry) >= thr) ? r : INT64_MAX;
    const int64_t first = ReduceI(tmp.reduce_i).Reduce(cand, ::cuda::minimum<>{});
    if (tid == 0) sh_i = first;
    __syncthreads();
    if (sh_i != INT64_MAX) {
      i_head = sh_i;
      break;
    }
    carry += agg;
  }

  // 2) Exact logits: sinks + recent (group A) and head clusters (group H), online max/sum.
  // One thread per row with 16-byte loads, so every thread has a whole row's loads in flight
  // (a warp per row left one latency-bound chain per warp). Head rows: slot u is rank u / 16,
  // rows u % 16, u % 16 + 16, ... of that cluster.
  MaxSum ma{-INFINITY, 0.0}, mh{-INFINITY, 0.0};
  for (int64_t t = tid; t < always; t += kThreads) {
    const int64_t row = t < nsink ? t : nsink + nclu + (t - nsink);
    ma = add(ma, thread_dot(K + row * s.d, qs, s.d));
  }
  for (int64_t u = tid; u < i_head * 16; u += kThreads) {
    const int64_t j = ord[u >> 4];
    for (int64_t row = nsink + off[j] + (u & 15); row < nsink + off[j + 1]; row += 16)
      mh = add(mh, thread_dot(K + row * s.d, qs, s.d));
  }
  ma = warp_combine(ma);
  mh = warp_combine(mh);
  if (lane == 0) {
    warp_a[warp] = ma;
    warp_h[warp] = mh;
  }
  __syncthreads();
  if (tid == 0) {
    MaxSum A{-INFINITY, 0.0}, H{-INFINITY, 0.0};
    for (int w = 0; w < kWarps; ++w) {
      A = combine(A, warp_a[w]);
      H = combine(H, warp_h[w]);
    }
    const double m = fmax(A.m, H.m);
    sh_d[0] = m;
    sh_d[1] = A.m == -INFINITY ? 0.0 : A.s * exp(A.m - m);
    sh_d[2] = H.m == -INFINITY ? 0.0 : H.s * exp(H.m - m);
  }
  __syncthreads();
  const double m = sh_d[0], a_mass = sh_d[1], read_exact = sh_d[2];

  // 3) Prior of the head clusters and of the unread rest.
  double prior_head = 0.0, prior_rest = 0.0;
  for (int64_t r = tid; r < C; r += kThreads) {
    const double p = (double)csize(ord[r]) * exp((double)sc[r] - m);
    if (r < i_head) prior_head += p;
    else prior_rest += p;
  }
  prior_head = ReduceD(tmp.reduce_d).Sum(prior_head);
  __syncthreads();
  prior_rest = ReduceD(tmp.reduce_d).Sum(prior_rest);
  if (tid == 0) {
    sh_d[1] = prior_head;
    sh_d[2] = prior_rest;
  }
  __syncthreads();
  const double alpha = read_exact / sh_d[1];
  const double z = a_mass + read_exact + alpha * sh_d[2];
  if (!(isfinite(alpha) && alpha > 0) || !(z > 0) || !isfinite(z)) {  // read everything
    for (int64_t j = tid; j < C; j += kThreads) mark(j);
    if (tid == 0) {
      a.head_tokens[i] = total;
      a.est_mass[i] = 1.0;
    }
    return;
  }

  // 4) Stop point: ranked unread clusters until the estimate reaches P_eff * z.
  const double p_eff = fmin(1.0, a.target + a.margin * (1.0 - a.target));
  const double goal = p_eff * z;
  double acc = a_mass + read_exact;
  int64_t r_sel = i_head;
  if (acc < goal) {
    r_sel = C;
    for (int64_t base = i_head; base < C; base += kThreads) {
      const int64_t r = base + tid;
      const double e = r < C ? alpha * (double)csize(ord[r]) * exp((double)sc[r] - m) : 0.0;
      double inc, agg;
      ScanD(tmp.scan_d).InclusiveSum(e, inc, agg);
      __syncthreads();
      const int64_t cand = (r < C && acc + inc >= goal) ? r : INT64_MAX;
      const int64_t first = ReduceI(tmp.reduce_i).Reduce(cand, ::cuda::minimum<>{});
      if (tid == 0) sh_i = first;
      __syncthreads();
      if (sh_i != INT64_MAX) {
        if (r == sh_i) sh_d[3] = acc + inc;
        __syncthreads();
        r_sel = sh_i + 1;
        acc = sh_d[3];
        break;
      }
      acc += agg;
    }
  }

  // 5) Marks and counts.
  int64_t tokens = 0;
  for (int64_t r = tid; r < r_sel; r += kThreads) {
    const int64_t j = ord[r];
    mark(j);
    tokens += csize(j);
  }
  tokens = ReduceI(tmp.reduce_i).Sum(tokens);
  if (tid == 0) {
    a.head_tokens[i] = always + tokens;
    a.est_mass[i] = fmin(1.0, acc / z);
  }
}

// Row list of each (sequence, KV head): sinks, the marked clusters in physical order, recent.
// Two passes over chunks of kRowChunk clusters, so every (item, chunk) is its own block: the
// sizes of each chunk's marked clusters, then each chunk's rows at the sum of earlier chunks.
constexpr int64_t kRowChunk = 1024;

__global__ void __launch_bounds__(kThreads) chunk_sums_kernel(StepGeometry s, SelectArgs a) {
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
  typedef cub::BlockScan<int64_t, kThreads> ScanI;
  __shared__ typename ScanI::TempStorage tmp;
  const int64_t item = blockIdx.x, b = item / s.hkv, h = item % s.hkv, chunk = blockIdx.y;
  const int32_t slot = s.slots[b];
  const SlotCounts st = s.state[s.layer * s.max_batch + slot];
  const int32_t* off = a.offsets + head_index(s, slot, h) * (s.cmax + 1);
  const uint8_t* kmark = a.kv_mark + item * s.cmax;
  int32_t* out = a.rows + item * s.cap;
  const int64_t nsink = st.n_sink, nclu = st.n_clustered, nrec = st.n_recent, C = st.n_clusters;
  const int32_t* sums = a.chunk_sums + item * gridDim.y;
  int64_t carry = nsink;
  for (int64_t c = 0; c < chunk; ++c) carry += sums[c];
  if (chunk == 0) {
    int64_t all = nsink;
    for (int64_t c = 0; c < gridDim.y; ++c) all += sums[c];
    for (int64_t t = threadIdx.x; t < nsink; t += kThreads) out[t] = (int32_t)t;
    for (int64_t t = threadIdx.x; t < nrec; t += kThreads) out[all + t] = (int32_t)(nsink + nclu + t);
    if (threadIdx.x == 0) a.counts[item] = (int32_t)(all + nrec);
  }
  const int64_t end = min((chunk + 1) * kRowChunk, C);
  for (int64_t base = chunk * kRowChunk; base < end; base += kThreads) {
    const int64_t j = base + threadIdx.x;
    const int64_t v = (j < end && kmark[j]) ? (int64_t)off[j + 1] - off[j] : 0;
    int64_t ex, agg;
    ScanI(tmp).ExclusiveSum(v, ex, agg);
    __syncthreads();
    for (int64_t k = 0; k < v; ++k) out[carry + ex + k] = (int32_t)(nsink + off[j] + k);
    carry += agg;
  }
}

// Dense: every row of every item, and trivial statistics.
__global__ void dense_counts_kernel(StepGeometry s, SelectArgs a) {
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
               float* qf) {
  dispatch_float(dt, [&](auto tag) {
    using T = decltype(tag);
    prepare_q_kernel<T><<<(unsigned)(s.batch * s.hkv * s.g), 128, 0, as_stream(s.stream)>>>(
        s, static_cast<const T*>(q), sb, sh, scale, qf);
  });
  TACTIC_CUDA_LAUNCH_CHECK("prepare_q");
}

void append_token(const StepGeometry& s, const void* kn, const void* vn, DType src, int64_t sb,
                  int64_t sh, void* k, void* v, int32_t* pos, DType dst, int num_sink) {
  dispatch_float(src, [&](auto stag) {
    using S = decltype(stag);
    dispatch_float(dst, [&](auto ttag) {
      using T = decltype(ttag);
      append_kernel<S, T><<<dim3((unsigned)s.batch, (unsigned)s.hkv), 128, 0, as_stream(s.stream)>>>(
          s, static_cast<const S*>(kn), static_cast<const S*>(vn), sb, sh, static_cast<T*>(k),
          static_cast<T*>(v), pos);
    });
  });
  TACTIC_CUDA_LAUNCH_CHECK("append_token");
  count_token_kernel<<<(unsigned)((s.batch + 127) / 128), 128, 0, as_stream(s.stream)>>>(s, num_sink);
  TACTIC_CUDA_LAUNCH_CHECK("append_token (counts)");
}

int64_t row_chunks(int64_t cmax) { return (cmax + kRowChunk - 1) / kRowChunk; }

size_t select_sort_temp_bytes(int64_t segments, int64_t cmax) {
  size_t bytes = 0;
  TACTIC_CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortPairsDescending(
      nullptr, bytes, (const float*)nullptr, (float*)nullptr, (const int32_t*)nullptr,
      (int32_t*)nullptr, (int64_t)(segments * cmax), (int64_t)segments, (const int32_t*)nullptr,
      (const int32_t*)nullptr));
  return bytes;
}

void select_step(const StepGeometry& s, const SelectArgs& a) {
  cudaStream_t st = as_stream(s.stream);
  const int64_t items = s.batch * s.hkv, heads = items * s.g;
  if (a.dense) {
    dense_counts_kernel<<<(unsigned)((items + 127) / 128), 128, 0, st>>>(s, a);
    TACTIC_CUDA_LAUNCH_CHECK("dense_counts");
    return;
  }
  if (s.d > 256) throw UnsupportedError("CUDA selection supports head_dim <= 256");
  TACTIC_CUDA_CHECK(cudaMemsetAsync(a.kv_mark, 0, (size_t)(items * s.cmax), st));
  if (a.head_mark) TACTIC_CUDA_CHECK(cudaMemsetAsync(a.head_mark, 0, (size_t)(heads * s.cmax), st));
  const int64_t per_block = (int64_t)kWarps * 8;
  const dim3 grid((unsigned)items, (unsigned)((s.cmax + per_block - 1) / per_block));
  score_kernel<<<grid, kThreads, (size_t)(s.g * s.d * sizeof(float)), st>>>(s, a);
  TACTIC_CUDA_LAUNCH_CHECK("score_centroids");
  size_t bytes = a.sort_temp_bytes;
  // Stable radix sort: equal scores keep ascending cluster ids, the CPU's tie-break.
  TACTIC_CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortPairsDescending(
      a.sort_temp, bytes, a.scores, a.scores_sorted, a.ids, a.ids_sorted, heads * s.cmax, heads,
      a.seg_begin, a.seg_end, 0, 32, st));
  dispatch_float(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    select_heads_kernel<T><<<(unsigned)heads, kThreads, 0, st>>>(s, a);
  });
  TACTIC_CUDA_LAUNCH_CHECK("select_heads");
  const dim3 rows_grid((unsigned)items, (unsigned)row_chunks(s.cmax));
  chunk_sums_kernel<<<rows_grid, kThreads, 0, st>>>(s, a);
  TACTIC_CUDA_LAUNCH_CHECK("chunk_sums");
  build_rows_kernel<<<rows_grid, kThreads, 0, st>>>(s, a);
  TACTIC_CUDA_LAUNCH_CHECK("build_rows");
}

}  // namespace cuda
}  // namespace tactic
