// Selection stage 1, rank: the step's inputs (q scaled to fp32 and the store head index per
// (sequence, KV head); the new token appended and counted) and the centroid scores of every
// query head (score_kernel), with each head's best and worst score for the histogram.
#include <string>

#include "mma.cuh"
#include "select_common.cuh"

namespace tactic {
namespace cuda {

namespace {

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


// The same scores on tensor cores (16-bit centroids, D 64 or 128, g <= 8; sm_80+), which the
// CUDA-core kernel above computes with ~G x D FMAs and conversions per centroid and lane quad:
// at 512K that arithmetic, not the 64 MiB of centroids, set its time (44 us on the H200, 1.5 TB/s).
// One mma.sync m16n8k16 takes 8 centroids x 16 dimensions for all heads: A rows 0-7 hold the
// heads' q rounded to 16 bits, rows 8-15 what that rounding missed (as in attention_mma.cu), so
// a score is the sum of the two accumulator rows a lane holds, at about fp32 precision. The
// dimensions are permuted (a dot product does not care, as long as q and the centroids agree):
// lane (g, t) reads centroid g's dimensions [t D / 4, (t + 1) D / 4) as whole 16-byte loads, and
// k-step kk takes dimensions t D / 4 + 4 kk + {0, 1} and {2, 3} of that run. Each warp walks
// tiles of 8 centroids, kScoreTiles at a time so their loads are in flight together.
constexpr int kScoreTiles = 2;

template <class T, int D>
__global__ void __launch_bounds__(kThreads) score_mma_kernel(StepGeometry s, SelectArgs a) {
  pdl_begin();  // first: wait for the previous kernel (programmatic dependent launch)
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  constexpr int KS = D / 16, PV = D / 32;  // k-steps; 16-byte loads per lane and centroid
  __shared__ int32_t s_max[8], s_min[8];
  __shared__ float s_w[8];  // spread * |q_j|^2 / 2 per head
  const int64_t item = blockIdx.x, b = item / s.hkv, h = item % s.hkv, hq = s.hkv * s.g;
  const int32_t slot = s.slots[b];
  const SlotCounts st = s.state[s.layer * s.max_batch + slot];
  const int64_t hi = head_index(s, slot, h), C = st.n_clusters;
  const int64_t seg0 = b * hq + h * s.g;
  const float* q = a.qf + seg0 * D;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  if (tid < 8) {
    s_max[tid] = INT_MIN;
    s_min[tid] = INT_MAX;
    float qq = 0.f;  // |q|^2 summed in the CPU backend's order (select.cpp)
    if (tid < s.g)
      for (int e = 0; e < D; ++e) qq = fmaf(q[tid * D + e], q[tid * D + e], qq);
    s_w[tid] = 0.5f * (float)a.spread * qq;
  }
  // A fragments: head g's q (hi in rows 0-7, lo in rows 8-15) at this lane's dimensions.
  uint32_t qa[KS][4];
  {
    const float* qg = q + (int64_t)g * D + t * (D / 4);
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) {
      float x[4] = {0.f, 0.f, 0.f, 0.f};
      if (g < s.g)
#pragma unroll
        for (int e = 0; e < 4; ++e) x[e] = qg[4 * kk + e];
      split_pack<T>(x[0], x[1], qa[kk][0], qa[kk][1]);
      split_pack<T>(x[2], x[3], qa[kk][2], qa[kk][3]);
    }
  }
  __syncthreads();
  const T* cent = static_cast<const T*>(a.centroids) + hi * s.cmax * D;
  float best = -INFINITY, worst = INFINITY;  // head g's, over this lane's centroids
  const int64_t warps = (int64_t)gridDim.y * (kThreads / 32);
  for (int64_t c0 = ((int64_t)blockIdx.y * (kThreads / 32) + warp) * 8 * kScoreTiles; c0 < C;
       c0 += warps * 8 * kScoreTiles) {
    uint4 raw[kScoreTiles][PV];
#pragma unroll
    for (int u = 0; u < kScoreTiles; ++u) {
      const int64_t c = c0 + 8 * u + g;
      const uint4* src = reinterpret_cast<const uint4*>(cent + (c < C ? c : 0) * D) + t * PV;
#pragma unroll
      for (int v = 0; v < PV; ++v) raw[u][v] = c < C ? __ldg(src + v) : make_uint4(0u, 0u, 0u, 0u);
    }
#pragma unroll
    for (int u = 0; u < kScoreTiles; ++u) {
      float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int kk = 0; kk < KS; ++kk) {
        const uint32_t* w = reinterpret_cast<const uint32_t*>(&raw[u][kk / 2]) + (kk & 1) * 2;
        mma16816<T>(acc, qa[kk], w[0], w[1]);
      }
      // Lane (g, t): head g's scores of centroids c0 + 8u + 2t and + 1 (hi row + lo row).
      if (g < s.g) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int64_t c = c0 + 8 * u + 2 * t + e;
          if (c < C) {
            const float spr = a.spread > 0 ? __ldg(a.spreads + hi * s.cmax + c) : 0.f;
            const float sc = fmaf(s_w[g], spr, acc[e] + acc[2 + e]);
            a.scores[(seg0 + g) * s.cmax + c] = sc;
            best = fmaxf(best, sc);
            worst = fminf(worst, sc);
          }
        }
      }
    }
  }
  // Head g's extremes over the warp's lanes of that head (the four t), then shared, then global.
#pragma unroll
  for (int o = 1; o < 4; o <<= 1) {
    best = fmaxf(best, __shfl_xor_sync(0xffffffffu, best, o));
    worst = fminf(worst, __shfl_xor_sync(0xffffffffu, worst, o));
  }
  if (t == 0 && g < s.g && best >= worst) {
    atomicMax(&s_max[g], order_float(best));
    atomicMin(&s_min[g], order_float(worst));
  }
  __syncthreads();
  if (tid < s.g && s_max[tid] != INT_MIN) {
    atomicMax(a.seg_max + seg0 + tid, s_max[tid]);
    atomicMin(a.seg_min + seg0 + tid, s_min[tid]);
  }
#else
  __trap();  // launched only where the binary is sm_80 or newer (score_tensor_cores_available)
#endif
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

bool score_tensor_cores_available() { return compiled_arch<score_mma_kernel<__half, 128>>() >= 80; }

bool score_tensor_cores_fit(DType dt, int64_t d, int64_t g) {
  return (dt == DType::f16 || dt == DType::bf16) && (d == 64 || d == 128) && g <= 8;
}

void launch_score(const StepGeometry& s, const SelectArgs& a) {
  cudaStream_t st = as_stream(s.stream);
  const int64_t items = s.batch * s.hkv;
  if (a.score_tensor_cores) {
    if (!score_tensor_cores_fit(a.dtype, s.d, s.g))
      throw UnsupportedError("select_step: tensor-core scores need 16-bit K/V, head_dim 64 or 128 and g <= 8");
    // Enough warps for about 16 per multiprocessor, at most one per kScoreTiles tiles of 8 centroids.
    const int64_t sms = a.sm_count > 0 ? a.sm_count : 132;
    const int64_t per_block = (kThreads / 32) * 8 * kScoreTiles;
    const int64_t by = std::max<int64_t>(1, std::min<int64_t>((s.cmax + per_block - 1) / per_block,
                                                              (2 * sms + items - 1) / items));
    const dim3 grid((unsigned)items, (unsigned)by);
    dispatch_float(a.dtype, [&](auto tag) {
      using T = decltype(tag);
      if constexpr (!std::is_same<T, float>::value) {
        if (s.d == 64) launch<score_mma_kernel<T, 64>>(s.pdl, grid, kThreads, 0, st, s, a);
        else launch<score_mma_kernel<T, 128>>(s.pdl, grid, kThreads, 0, st, s, a);
      }
    });
    TACTIC_CUDA_LAUNCH_CHECK("score_centroids (tensor cores)");
    return;
  }
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
}

}  // namespace cuda
}  // namespace tactic
