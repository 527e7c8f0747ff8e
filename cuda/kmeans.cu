// CUDA k-means over the keys of many KV heads at once, and the re-index that makes every
// cluster one contiguous block of the store (DESIGN.md, algorithm steps 2-3). Mirrors the CPU
// reference (cpp/src/kmeans.cpp, KVStore::cluster_head); see kmeans.hpp for the contract.
//
// One Lloyd iteration, batched over all heads (each launch covers every head):
//   assign_kernel      tiled fp32 GEMM keys x centroids^T with a fused arg-min
//   accumulate_kernel  per-cluster sums and counts with atomics
//   finalize_kernel    means (renormalised for spherical), ||c||^2, empty-cluster flags
//   distance_kernel    each row's distance to its new centroid; sort keys (head, -distance)
//   radix sort + scan  farthest points per head, rank of each empty cluster within its head
//   seed_kernel        empty cluster e of a head takes the e-th farthest point
#include "kmeans.hpp"

#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "common.cuh"
#include "tactic/kmeans.hpp"

namespace tactic {
namespace cuda {

namespace {

constexpr int kThreads = 256;       // block size of the element-wise kernels
constexpr int kBM = 128;            // assign: keys per block tile
constexpr int kBN = 128;            // assign: centroids per block tile
constexpr int kBK = 8;              // assign: head-dim chunk per shared-memory stage
constexpr int kGemmThreads = 256;   // 16 x 16 threads, each an 8 x 8 register tile
constexpr int kDistRows = 256;      // distance: rows per block (one head per block)
constexpr int64_t kMaxGrid = 1 << 20;  // cap for grid-stride kernels

// ---- loads -------------------------------------------------------------------------------

// V = 16 / sizeof(T) consecutive elements (one 16-byte vector) as floats. kVec: the store is
// 16-byte aligned (rows are, since d % 8 == 0), else element loads.
template <class T, bool kVec>
__device__ __forceinline__ void load_vec(const T* p, float* out) {
  constexpr int V = 16 / sizeof(T);
  if constexpr (kVec) {
    const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
    T e[V];
    memcpy(e, &u, sizeof(u));  // not a pointer cast: no strict-aliasing hazard; registers
#pragma unroll
    for (int i = 0; i < V; ++i) out[i] = to_float<T>(e[i]);
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) out[i] = to_float<T>(p[i]);
  }
}

// 8 consecutive elements as floats (one or two 16-byte vectors).
template <class T, bool kVec>
__device__ __forceinline__ void load8(const T* p, float* out) {
  constexpr int V = 16 / sizeof(T);
#pragma unroll
  for (int i = 0; i < 8; i += V) load_vec<T, kVec>(p + i, out + i);
}

__device__ __forceinline__ void load8f(const float* p, float* out) {  // 32-byte aligned
  const float4 a = __ldg(reinterpret_cast<const float4*>(p));
  const float4 b = __ldg(reinterpret_cast<const float4*>(p) + 1);
  out[0] = a.x; out[1] = a.y; out[2] = a.z; out[3] = a.w;
  out[4] = b.x; out[5] = b.y; out[6] = b.z; out[7] = b.w;
}

__device__ __forceinline__ int64_t global_thread() {
  return (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t grid_threads() { return (int64_t)gridDim.x * blockDim.x; }

// ---- assignment: GEMM with fused arg-min -------------------------------------------------

// Block: kBM keys of one head against all centroids of that head, in tiles of kBN. Each
// stage stages a kBK-wide slice of both operands (fp32, k-major) in shared memory, double
// buffered with a register prefetch of the next slice (one __syncthreads per stage). Thread
// (ty, tx) owns keys {ty*4+i, 64+ty*4+i} x centroids {tx*4+j, 64+tx*4+j}: float4 shared loads,
// 64 FMAs per 4 loads. After the last slice of a centroid tile the 8x8 dot products fold into
// a (value, index) minimum per key: value = bias[j] - scale * k.c_j, with bias = ||c_j||^2 and
// scale = 2 (Euclidean) or bias = 0 and scale = 1 (spherical: argmax k.c_j; the row norm does
// not change the argmax). Padding centroids have bias = +inf, so never win. The 16 threads of
// a key row reduce by shuffles and lane tx == 0 keeps the running minimum in shared memory
// (registers are the limit here). Ties go to the lowest index, as on the CPU.
template <class T, bool kVec>
__global__ void __launch_bounds__(kGemmThreads, 2)
assign_kernel(const T* __restrict__ k, int64_t cap, int64_t row0, int64_t n, int64_t d,
              const float* __restrict__ cent, const float* __restrict__ bias, int64_t c,
              int64_t cpad, float scale, int64_t row_tiles, int32_t* __restrict__ assign) {
  constexpr int V = 16 / sizeof(T);
  constexpr int kXSlots = kBM * kBK / V;  // 16-byte key loads per stage: 256 (fp32), 128 (16-bit)
  static_assert(kXSlots <= kGemmThreads, "key stage needs more loads than threads");
  static_assert(kBN * kBK / 4 == kGemmThreads, "one float4 centroid load per thread per stage");
  __shared__ __align__(16) float As[2][kBK][kBM];
  __shared__ __align__(16) float Bs[2][kBK][kBN];
  __shared__ float best_val[kBM];
  __shared__ int32_t best_idx[kBM];

  const int64_t p = blockIdx.x / row_tiles;
  const int64_t r_base = (blockIdx.x - p * row_tiles) * kBM;
  const int t = threadIdx.x, tx = t & 15, ty = t >> 4;

  // Key loader: slot t -> tile row t % kBM, chunk offset (t / kBM) * V. Rows past n are
  // clamped to n - 1 (computed, never written).
  const int xr = t % kBM, xk = (t / kBM) * V;
  const bool x_on = t < kXSlots;
  const T* xsrc = k + (p * cap + row0 + min(r_base + xr, n - 1)) * d + xk;
  // Centroid loader: thread t -> tile column t % kBN, chunk offset (t / kBN) * 4. Columns
  // past c are clamped to c - 1 (their bias is +inf).
  const int cc = t % kBN, ck = (t / kBN) * 4;
  const float* cbase = cent + p * c * d + ck;
  const float* bbase = bias + p * cpad;

  const int kchunks = (int)(d / kBK);
  const int ctiles = (int)(cpad / kBN);  // cpad < n + kBN, far below 2^31
  const int clast = (int)(c - 1);

  // Prefetch registers hold the raw 16 bytes; conversion to fp32 happens at the shared store.
  uint4 xraw = make_uint4(0u, 0u, 0u, 0u);
  float4 cv;
  auto load = [&](int ct, int kc) {
    if (x_on) {
      if constexpr (kVec) {
        xraw = __ldg(reinterpret_cast<const uint4*>(xsrc + kc * kBK));
      } else {
        T e[V];
#pragma unroll
        for (int i = 0; i < V; ++i) e[i] = xsrc[kc * kBK + i];
        memcpy(&xraw, e, sizeof(xraw));
      }
    }
    cv = __ldg(reinterpret_cast<const float4*>(cbase + (int64_t)min(ct * kBN + cc, clast) * d + kc * kBK));
  };
  auto store = [&](int buf) {
    if (x_on) {
      T e[V];
      memcpy(e, &xraw, sizeof(xraw));
#pragma unroll
      for (int i = 0; i < V; ++i) As[buf][xk + i][xr] = to_float<T>(e[i]);
    }
    Bs[buf][ck + 0][cc] = cv.x;
    Bs[buf][ck + 1][cc] = cv.y;
    Bs[buf][ck + 2][cc] = cv.z;
    Bs[buf][ck + 3][cc] = cv.w;
  };

  float acc[8][8];
#pragma unroll
  for (int i = 0; i < 8; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[i][j] = 0.f;
  // Each key row's running minimum is owned by the thread tx == 0 of its ty: no sync needed.
  if (tx == 0) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int row = i < 4 ? ty * 4 + i : 64 + ty * 4 + (i - 4);
      best_val[row] = INFINITY;
      best_idx[row] = 0;
    }
  }

  load(0, 0);
  store(0);
  __syncthreads();
  int buf = 0;
  for (int ct = 0; ct < ctiles; ++ct) {
    for (int kc = 0; kc < kchunks; ++kc) {
      const bool last_chunk = kc == kchunks - 1;
      const bool has_next = !(last_chunk && ct == ctiles - 1);
      if (has_next) load(last_chunk ? ct + 1 : ct, last_chunk ? 0 : kc + 1);
#pragma unroll
      for (int kk = 0; kk < kBK; ++kk) {
        const float4 a0 = *reinterpret_cast<const float4*>(&As[buf][kk][ty * 4]);
        const float4 a1 = *reinterpret_cast<const float4*>(&As[buf][kk][64 + ty * 4]);
        const float4 b0 = *reinterpret_cast<const float4*>(&Bs[buf][kk][tx * 4]);
        const float4 b1 = *reinterpret_cast<const float4*>(&Bs[buf][kk][64 + tx * 4]);
        const float a[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
        const float b[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
        for (int i = 0; i < 8; ++i)
#pragma unroll
          for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
      }
      if (last_chunk) {
        const float* bt = bbase + ct * kBN;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          // Columns in increasing order, strict <: ties keep the lowest index.
          float v = INFINITY;
          int32_t id = 0;
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            const int col = j < 4 ? tx * 4 + j : 64 + tx * 4 + (j - 4);
            const float val = fmaf(-scale, acc[i][j], __ldg(bt + col));
            if (val < v) { v = val; id = col; }
            acc[i][j] = 0.f;
          }
#pragma unroll
          for (int off = 8; off >= 1; off >>= 1) {  // the 16 lanes tx = 0..15 of a half-warp
            const float ov = __shfl_xor_sync(0xffffffffu, v, off);
            const int32_t oi = __shfl_xor_sync(0xffffffffu, id, off);
            if (ov < v || (ov == v && oi < id)) { v = ov; id = oi; }
          }
          if (tx == 0) {
            const int row = i < 4 ? ty * 4 + i : 64 + ty * 4 + (i - 4);
            if (v < best_val[row]) {  // earlier tiles have lower indices: strict <
              best_val[row] = v;
              best_idx[row] = ct * kBN + id;
            }
          }
        }
      }
      if (has_next) store(buf ^ 1);
      __syncthreads();
      buf ^= 1;
    }
  }
  if (tx == 0) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int row = i < 4 ? ty * 4 + i : 64 + ty * 4 + (i - 4);
      if (r_base + row < n) assign[p * n + r_base + row] = best_idx[row];
    }
  }
}

// ---- per-row kernels ---------------------------------------------------------------------

// 1 / ||x|| per row (0 for a zero row), for the spherical metric. Row r of head p: g = p*n + r.
template <class T, bool kVec>
__global__ void row_invnorm_kernel(const T* __restrict__ k, int64_t cap, int64_t row0, int64_t n,
                                   int64_t d, int64_t rows, float* __restrict__ invnorm) {
  // One thread per row: d <= 256, run once per call.
  for (int64_t g = global_thread(); g < rows; g += grid_threads()) {
    const int64_t p = g / n, r = g - p * n;
    const T* x = k + (p * cap + row0 + r) * d;
    double s = 0;
    for (int64_t e = 0; e < d; e += 8) {
      float v[8];
      load8<T, kVec>(x + e, v);
#pragma unroll
      for (int i = 0; i < 8; ++i) s += (double)v[i] * v[i];
    }
    invnorm[g] = s > 0 ? (float)(1.0 / sqrt(s)) : 0.f;
  }
}

// sums[p, a] += w * x, counts[p, a] += 1 for every row (w = 1 / ||x|| for spherical Lloyd
// steps, else 1). One thread per (row, 8-element chunk).
template <class T, bool kVec>
__global__ void accumulate_kernel(const T* __restrict__ k, int64_t cap, int64_t row0, int64_t n,
                                  int64_t d, int64_t rows, const float* __restrict__ weight,
                                  const int32_t* __restrict__ assign, int64_t c,
                                  float* __restrict__ sums, int32_t* __restrict__ counts) {
  const int64_t chunks = d / 8, total = rows * chunks;
  for (int64_t idx = global_thread(); idx < total; idx += grid_threads()) {
    const int64_t g = idx / chunks, ch = idx - g * chunks;
    const int64_t p = g / n, r = g - p * n;
    const int64_t cl = p * c + assign[g];
    float x[8];
    load8<T, kVec>(k + (p * cap + row0 + r) * d + ch * 8, x);
    const float w = weight ? weight[g] : 1.f;
    float* dst = sums + cl * d + ch * 8;  // 32-byte aligned (d % 8 == 0)
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    atomicAdd(reinterpret_cast<float4*>(dst), make_float4(x[0] * w, x[1] * w, x[2] * w, x[3] * w));
    atomicAdd(reinterpret_cast<float4*>(dst) + 1, make_float4(x[4] * w, x[5] * w, x[6] * w, x[7] * w));
#else
#pragma unroll
    for (int i = 0; i < 8; ++i) atomicAdd(dst + i, x[i] * w);
#endif
    if (ch == 0) atomicAdd(counts + cl, 1);
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off >= 1; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

enum FinalizeMode : int { kEuclidean = 0, kSpherical = 1, kPlainMean = 2 };

// One warp per centroid (d <= 256: 8 values per lane in registers).
//  kEuclidean: non-empty -> mean, bias = ||mean||^2;          empty[j] = count == 0
//  kSpherical: non-empty -> mean / ||mean||, bias = 0;         empty[j] = count == 0
//  kPlainMean: out = mean, 0 for an empty cluster (the stored spherical centroid)
// Empty clusters keep their centroid and bias here; seed_kernel re-seeds them.
__global__ void finalize_kernel(const float* __restrict__ sums, const int32_t* __restrict__ counts,
                                int64_t nprob, int64_t c, int64_t d, int mode, float* __restrict__ out,
                                int64_t out_stride, float* __restrict__ bias, int64_t cpad,
                                int32_t* __restrict__ empty) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = global_thread() >> 5, nwarps = grid_threads() >> 5, items = nprob * c;
  for (int64_t item = warp; item < items; item += nwarps) {  // warp-uniform
    const int64_t p = item / c, j = item - p * c;
    const int32_t cnt = counts[item];
    if (mode != kPlainMean && lane == 0) empty[item] = cnt == 0;
    if (cnt == 0 && mode != kPlainMean) continue;
    const float* s = sums + item * d;
    float* o = out + p * out_stride + j * d;
    const float fc = (float)cnt;
    float v[8];
    float ss = 0.f;
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      const int64_t e = lane + 32 * u;
      v[u] = (e < d && cnt > 0) ? s[e] / fc : 0.f;
      ss += v[u] * v[u];
    }
    ss = warp_sum(ss);
    float mul = 1.f;
    if (mode == kSpherical && ss > 0.f) mul = 1.f / sqrtf(ss);
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      const int64_t e = lane + 32 * u;
      if (e < d) o[e] = v[u] * mul;
    }
    if (mode != kPlainMean && lane == 0) bias[p * cpad + j] = mode == kSpherical ? 0.f : ss;
  }
}

// Each row's distance to its (updated) centroid: ||x - c||^2, or 1 - cos for spherical (1 for
// a zero row), exactly the CPU's per-point distance. Writes the radix-sort key (head in the
// high 32 bits, ~bits(distance) in the low 32: ascending = farthest first within a head,
// stable on row index for ties, like the CPU's partial_sort) and optionally adds the head's
// inertia. 8 lanes per row; each block covers kDistRows rows of one head, so the inertia is
// one atomic per block.
template <class T, bool kVec>
__global__ void distance_kernel(const T* __restrict__ k, int64_t cap, int64_t row0, int64_t n,
                                int64_t d, int64_t row_chunks, const float* __restrict__ invnorm,
                                const float* __restrict__ cent, int64_t c,
                                const int32_t* __restrict__ assign, uint64_t* __restrict__ keys,
                                int32_t* __restrict__ vals, double* __restrict__ inertia) {
  const int64_t p = blockIdx.x / row_chunks;
  const int64_t r_begin = (blockIdx.x - p * row_chunks) * kDistRows;
  const int64_t r_end = min(n, r_begin + kDistRows);
  const int sub = threadIdx.x & 7;
  const int64_t chunks = d / 8;
  double part = 0;
  for (int pass = 0; pass < kDistRows / (kThreads / 8); ++pass) {  // uniform trip count
    const int64_t r = r_begin + pass * (kThreads / 8) + (threadIdx.x >> 3);
    const bool valid = r < r_end;
    const int64_t g = p * n + r;
    float acc = 0.f;
    if (valid) {
      const T* x = k + (p * cap + row0 + r) * d;
      const float* cr = cent + (p * c + assign[g]) * d;
      for (int64_t ch = sub; ch < chunks; ch += 8) {
        float xv[8], cv[8];
        load8<T, kVec>(x + ch * 8, xv);
        load8f(cr + ch * 8, cv);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          if (invnorm) {
            acc = fmaf(xv[i], cv[i], acc);
          } else {
            const float t = xv[i] - cv[i];
            acc = fmaf(t, t, acc);
          }
        }
      }
    }
#pragma unroll
    for (int off = 4; off >= 1; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (valid && sub == 0) {
      float dist = acc;
      if (invnorm) {
        const float w = invnorm[g];
        dist = w > 0.f ? 1.f - acc * w : 1.f;
      }
      // 1 - cos can round slightly below 0; negative floats would sort as farthest.
      keys[g] = ((uint64_t)p << 32) | (uint64_t)(~__float_as_uint(fmaxf(dist, 0.f)));
      vals[g] = (int32_t)r;
      part += (double)dist;
    }
  }
  if (!inertia) return;
  __shared__ double red[kThreads / 32];
#pragma unroll
  for (int off = 16; off >= 1; off >>= 1) part += __shfl_xor_sync(0xffffffffu, part, off);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = part;
  __syncthreads();
  if (threadIdx.x == 0) {
    double s = 0;
    for (int w = 0; w < kThreads / 32; ++w) s += red[w];
    atomicAdd(inertia + p, s);
  }
}

// One warp per centroid (p, j): centroid = row `src` of head p (scaled by 1/||x|| for
// spherical), bias = ||c||^2 (Euclidean) or 0.
//  init mode (init_rows != null): src = init_rows[p*c + j] (kmeans_init_rows, uploaded)
//  re-seed mode: only clusters flagged empty; the e-th empty cluster of head p (e from the
//  exclusive scan of the flags) takes far_rows[p*n + e], the e-th farthest row of head p.
//  e < #empty <= c <= n, so the points are distinct and in range.
template <class T>
__global__ void seed_kernel(const T* __restrict__ k, int64_t cap, int64_t row0, int64_t n,
                            int64_t d, int64_t nprob, int64_t c, const float* __restrict__ invnorm,
                            const int32_t* __restrict__ init_rows, const int32_t* __restrict__ empty,
                            const int32_t* __restrict__ empty_rank, const int32_t* __restrict__ far_rows,
                            float* __restrict__ cent, float* __restrict__ bias, int64_t cpad,
                            bool spherical) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = global_thread() >> 5, nwarps = grid_threads() >> 5, items = nprob * c;
  for (int64_t item = warp; item < items; item += nwarps) {  // warp-uniform
    const int64_t p = item / c, j = item - p * c;
    int64_t src;
    if (init_rows) {
      src = init_rows[item];
    } else {
      if (!empty[item]) continue;
      const int64_t e = empty_rank[item] - empty_rank[p * c];
      src = far_rows[p * n + e];
    }
    const T* x = k + (p * cap + row0 + src) * d;
    const float w = invnorm ? invnorm[p * n + src] : 1.f;
    float* o = cent + item * d;
    float ss = 0.f;
    for (int64_t e = lane; e < d; e += 32) {
      const float v = to_float<T>(x[e]) * w;
      o[e] = v;
      ss += v * v;
    }
    ss = warp_sum(ss);
    if (lane == 0) bias[p * cpad + j] = spherical ? 0.f : ss;
  }
}

__global__ void fill_kernel(float* __restrict__ x, int64_t count, float value) {
  for (int64_t i = global_thread(); i < count; i += grid_threads()) x[i] = value;
}

// offsets[p][j] = start of cluster j relative to row0. `scan` is the exclusive scan of the
// counts over all heads; every head has exactly n rows, so head p starts at p * n.
__global__ void offsets_kernel(const int32_t* __restrict__ scan, int64_t nprob, int64_t n,
                               int64_t c, int32_t* __restrict__ off, int64_t off_stride) {
  const int64_t total = nprob * (c + 1);
  for (int64_t i = global_thread(); i < total; i += grid_threads()) {
    const int64_t p = i / (c + 1), j = i - p * (c + 1);
    off[p * off_stride + j] = (int32_t)(j < c ? scan[p * c + j] - p * n : n);
  }
}

// Re-index sort input: key = p * c + cluster (heads in order, then clusters), value = row.
__global__ void reindex_keys_kernel(const int32_t* __restrict__ assign, int64_t n, int64_t c,
                                    int64_t rows, uint32_t* __restrict__ keys,
                                    int32_t* __restrict__ vals) {
  for (int64_t g = global_thread(); g < rows; g += grid_threads()) {
    const int64_t p = g / n;
    keys[g] = (uint32_t)(p * c + assign[g]);
    vals[g] = (int32_t)(g - p * n);
  }
}

// dst row r of head p = src row perm[p*n + r] (identity if perm is null), in units U.
template <class U>
__global__ void gather_kernel(const U* __restrict__ src, int64_t src_head,
                              const int32_t* __restrict__ perm, U* __restrict__ dst,
                              int64_t dst_head, int64_t heads, int64_t n, int64_t units) {
  const int64_t total = heads * n * units;
  for (int64_t i = global_thread(); i < total; i += grid_threads()) {
    const int64_t g = i / units, u = i - g * units;
    const int64_t p = g / n, r = g - p * n;
    const int64_t s = perm ? perm[g] : r;
    dst[p * dst_head + r * units + u] = src[p * src_head + s * units + u];
  }
}

// ---- host side ---------------------------------------------------------------------------

int grid_for(int64_t work, int threads = kThreads) {
  const int64_t b = (work + threads - 1) / threads;
  return (int)std::max<int64_t>(1, std::min(b, kMaxGrid));
}

int bits_for(uint64_t x) {  // bits needed to represent x (0 -> 0)
  int b = 0;
  while (x) { ++b; x >>= 1; }
  return b;
}

// Stream-ordered temporaries, released on the stream when the launcher returns or throws
// (work already queued still completes before the memory is reused).
class StreamScratch {
 public:
  explicit StreamScratch(cudaStream_t s) : s_(s) {}
  ~StreamScratch() {
    for (void* p : ptrs_) cudaFreeAsync(p, s_);
  }
  StreamScratch(const StreamScratch&) = delete;
  StreamScratch& operator=(const StreamScratch&) = delete;
  template <class T>
  T* get(int64_t count) {
    void* p = nullptr;
    TACTIC_CUDA_CHECK(cudaMallocAsync(&p, (size_t)std::max<int64_t>(count, 1) * sizeof(T), s_));
    ptrs_.push_back(p);
    return static_cast<T*>(p);
  }

 private:
  cudaStream_t s_;
  std::vector<void*> ptrs_;
};

struct Plan {
  KMeansReindexArgs a;
  int64_t c = 0, cpad = 0, rows = 0;
  cudaStream_t s = nullptr;
};

// Permute the rows [row0, row0 + n) of `nprob` heads of `store` (row_bytes each, head stride
// cap rows) by perm, through a temporary buffer of at most `tmp_heads` heads.
template <class U>
void permute_rows(void* store, int64_t row_bytes, const Plan& pl, const int32_t* perm, void* tmp,
                  int64_t tmp_heads) {
  const KMeansReindexArgs& a = pl.a;
  const int64_t units = row_bytes / (int64_t)sizeof(U);
  for (int64_t h0 = 0; h0 < a.nprob; h0 += tmp_heads) {
    const int64_t heads = std::min(tmp_heads, a.nprob - h0);
    U* base = reinterpret_cast<U*>(static_cast<uint8_t*>(store) + (h0 * a.cap + a.row0) * row_bytes);
    U* t = static_cast<U*>(tmp);
    const int grid = grid_for(heads * a.n * units);
    gather_kernel<U><<<grid, kThreads, 0, pl.s>>>(base, a.cap * units, perm + h0 * a.n, t,
                                                   a.n * units, heads, a.n, units);
    TACTIC_CUDA_LAUNCH_CHECK("kmeans gather_kernel");
    gather_kernel<U><<<grid, kThreads, 0, pl.s>>>(t, a.n * units, nullptr, base, a.cap * units,
                                                   heads, a.n, units);
    TACTIC_CUDA_LAUNCH_CHECK("kmeans gather_kernel");
  }
}

template <class T, bool kVec>
void run(const Plan& pl) {
  const KMeansReindexArgs& a = pl.a;
  const cudaStream_t s = pl.s;
  const int64_t n = a.n, d = a.d, c = pl.c, cpad = pl.cpad, rows = pl.rows, np = a.nprob;
  const T* k = static_cast<const T*>(a.k);
  StreamScratch scratch(s);

  // Seeded initial rows, computed on the host exactly as the CPU backend does.
  std::vector<int32_t> init_host((size_t)(np * c));
  for (int64_t p = 0; p < np; ++p) {
    const std::vector<int64_t> r = kmeans_init_rows(n, c, a.seeds[p]);
    for (int64_t j = 0; j < c; ++j) init_host[(size_t)(p * c + j)] = (int32_t)r[(size_t)j];
  }

  int32_t* init_rows = scratch.get<int32_t>(np * c);
  float* cent = scratch.get<float>(np * c * d);
  float* bias = scratch.get<float>(np * cpad);
  float* invnorm = a.spherical ? scratch.get<float>(rows) : nullptr;
  int32_t* assign = scratch.get<int32_t>(rows);
  float* sums = scratch.get<float>(np * c * d);
  int32_t* counts = scratch.get<int32_t>(np * c);
  int32_t* empty = scratch.get<int32_t>(np * c);
  int32_t* scan = scratch.get<int32_t>(np * c);
  uint64_t* keys_in = scratch.get<uint64_t>(rows);
  uint64_t* keys_out = scratch.get<uint64_t>(rows);
  int32_t* vals_in = scratch.get<int32_t>(rows);
  int32_t* vals_out = scratch.get<int32_t>(rows);
  double* inertia = a.inertia_out ? scratch.get<double>(np) : nullptr;

  // Sorts run on DoubleBuffers (both halves are scratch), so CUB needs no extra copy of the
  // keys; after a sort the result is in Current() (selected on the host at dispatch).
  const int sort_end_bit = 32 + bits_for((uint64_t)(np - 1));
  const int reindex_end_bit = std::max(1, bits_for((uint64_t)(np * c - 1)));
  uint32_t* rk_in = reinterpret_cast<uint32_t*>(keys_in);  // re-index keys reuse the buffers
  uint32_t* rk_out = reinterpret_cast<uint32_t*>(keys_out);
  size_t tmp_bytes = 0, b = 0;
  {
    cub::DoubleBuffer<uint64_t> kb(keys_in, keys_out);
    cub::DoubleBuffer<int32_t> vb(vals_in, vals_out);
    TACTIC_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, b, kb, vb, (int)rows, 0, sort_end_bit, s));
    tmp_bytes = std::max(tmp_bytes, b);
    cub::DoubleBuffer<uint32_t> rb(rk_in, rk_out);
    TACTIC_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, b, rb, vb, (int)rows, 0, reindex_end_bit, s));
    tmp_bytes = std::max(tmp_bytes, b);
  }
  TACTIC_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(nullptr, b, empty, scan, (int)(np * c), s));
  tmp_bytes = std::max(tmp_bytes, b);
  void* cub_tmp = scratch.get<uint8_t>((int64_t)tmp_bytes);

  TACTIC_CUDA_CHECK(cudaMemcpyAsync(init_rows, init_host.data(), init_host.size() * sizeof(int32_t),
                                    cudaMemcpyHostToDevice, s));
  if (inertia) TACTIC_CUDA_CHECK(cudaMemsetAsync(inertia, 0, (size_t)np * sizeof(double), s));

  // Padding columns of the assignment tiles must never win: bias +inf.
  fill_kernel<<<grid_for(np * cpad), kThreads, 0, s>>>(bias, np * cpad, INFINITY);
  TACTIC_CUDA_LAUNCH_CHECK("kmeans fill_kernel");
  if (a.spherical) {
    row_invnorm_kernel<T, kVec><<<grid_for(rows), kThreads, 0, s>>>(k, a.cap, a.row0, n, d, rows, invnorm);
    TACTIC_CUDA_LAUNCH_CHECK("kmeans row_invnorm_kernel");
  }
  const int warp_grid = grid_for(np * c * 32);
  seed_kernel<T><<<warp_grid, kThreads, 0, s>>>(k, a.cap, a.row0, n, d, np, c, invnorm, init_rows, nullptr,
                                                nullptr, nullptr, cent, bias, cpad, a.spherical);
  TACTIC_CUDA_LAUNCH_CHECK("kmeans seed_kernel (init)");

  const int64_t row_tiles = (n + kBM - 1) / kBM;
  const int64_t row_chunks = (n + kDistRows - 1) / kDistRows;
  const float scale = a.spherical ? 1.f : 2.f;
  const int acc_grid = grid_for(rows * (d / 8));
  for (int it = 0; it < a.iters; ++it) {
    const bool last = it == a.iters - 1;
    assign_kernel<T, kVec><<<(unsigned)(np * row_tiles), kGemmThreads, 0, s>>>(
        k, a.cap, a.row0, n, d, cent, bias, c, cpad, scale, row_tiles, assign);
    TACTIC_CUDA_LAUNCH_CHECK("kmeans assign_kernel");
    // Update: member means (spherical: of the unit rows, then renormalised).
    TACTIC_CUDA_CHECK(cudaMemsetAsync(sums, 0, (size_t)(np * c * d) * sizeof(float), s));
    TACTIC_CUDA_CHECK(cudaMemsetAsync(counts, 0, (size_t)(np * c) * sizeof(int32_t), s));
    accumulate_kernel<T, kVec><<<acc_grid, kThreads, 0, s>>>(k, a.cap, a.row0, n, d, rows, invnorm, assign,
                                                             c, sums, counts);
    TACTIC_CUDA_LAUNCH_CHECK("kmeans accumulate_kernel");
    finalize_kernel<<<warp_grid, kThreads, 0, s>>>(sums, counts, np, c, d, a.spherical ? kSpherical : kEuclidean,
                                                   cent, c * d, bias, cpad, empty);
    TACTIC_CUDA_LAUNCH_CHECK("kmeans finalize_kernel");
    // Empty clusters: re-seed at the farthest points of their head. Every step is queued
    // unconditionally (deciding on the host would need a sync); with no empty cluster the
    // seed kernel writes nothing. On the last step the distances are the final inertia.
    distance_kernel<T, kVec><<<(unsigned)(np * row_chunks), kThreads, 0, s>>>(
        k, a.cap, a.row0, n, d, row_chunks, invnorm, cent, c, assign, keys_in, vals_in,
        last ? inertia : nullptr);
    TACTIC_CUDA_LAUNCH_CHECK("kmeans distance_kernel");
    cub::DoubleBuffer<uint64_t> kb(keys_in, keys_out);
    cub::DoubleBuffer<int32_t> vb(vals_in, vals_out);
    size_t tb = tmp_bytes;
    TACTIC_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(cub_tmp, tb, kb, vb, (int)rows, 0, sort_end_bit, s));
    tb = tmp_bytes;
    TACTIC_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(cub_tmp, tb, empty, scan, (int)(np * c), s));
    seed_kernel<T><<<warp_grid, kThreads, 0, s>>>(k, a.cap, a.row0, n, d, np, c, invnorm, nullptr, empty, scan,
                                                  vb.Current(), cent, bias, cpad, a.spherical);
    TACTIC_CUDA_LAUNCH_CHECK("kmeans seed_kernel (re-seed)");
  }
  // `counts` now holds the histogram of the final assignment and `cent` its member means.

  if (a.assign_out)
    TACTIC_CUDA_CHECK(cudaMemcpyAsync(a.assign_out, assign, (size_t)rows * sizeof(int32_t),
                                      cudaMemcpyDeviceToDevice, s));
  if (a.centroids) {
    if (a.spherical) {
      // Stored centroid = plain mean of the member keys (ranking needs q . mean key).
      TACTIC_CUDA_CHECK(cudaMemsetAsync(sums, 0, (size_t)(np * c * d) * sizeof(float), s));
      TACTIC_CUDA_CHECK(cudaMemsetAsync(counts, 0, (size_t)(np * c) * sizeof(int32_t), s));
      accumulate_kernel<T, kVec><<<acc_grid, kThreads, 0, s>>>(k, a.cap, a.row0, n, d, rows, nullptr, assign,
                                                               c, sums, counts);
      TACTIC_CUDA_LAUNCH_CHECK("kmeans accumulate_kernel");
      finalize_kernel<<<warp_grid, kThreads, 0, s>>>(sums, counts, np, c, d, kPlainMean, a.centroids,
                                                     a.cent_stride, nullptr, cpad, nullptr);
      TACTIC_CUDA_LAUNCH_CHECK("kmeans finalize_kernel");
    } else {
      const size_t width = (size_t)(c * d) * sizeof(float);
      const size_t dpitch = np > 1 ? (size_t)a.cent_stride * sizeof(float) : width;
      TACTIC_CUDA_CHECK(cudaMemcpy2DAsync(a.centroids, dpitch, cent, width, width, (size_t)np,
                                          cudaMemcpyDeviceToDevice, s));
    }
  }
  if (a.offsets) {
    size_t tb = tmp_bytes;
    TACTIC_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(cub_tmp, tb, counts, scan, (int)(np * c), s));
    offsets_kernel<<<grid_for(np * (c + 1)), kThreads, 0, s>>>(scan, np, n, c, a.offsets, a.off_stride);
    TACTIC_CUDA_LAUNCH_CHECK("kmeans offsets_kernel");
  }
  if (a.reindex) {
    // Stable sort by (head, cluster): radix sort keeps the original row order within a key.
    reindex_keys_kernel<<<grid_for(rows), kThreads, 0, s>>>(assign, n, c, rows, rk_in, vals_in);
    TACTIC_CUDA_LAUNCH_CHECK("kmeans reindex_keys_kernel");
    cub::DoubleBuffer<uint32_t> rb(rk_in, rk_out);
    cub::DoubleBuffer<int32_t> vb(vals_in, vals_out);
    size_t tb = tmp_bytes;
    TACTIC_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(cub_tmp, tb, rb, vb, (int)rows, 0, reindex_end_bit, s));
    const int32_t* perm = vb.Current();  // perm[p*n + r]: source row of destination row r of head p
    const int64_t es = (int64_t)sizeof(T), row_bytes = d * es;
    // The temporary holds whole heads, at most ~512 MiB (at least one head).
    const int64_t tmp_heads = std::max<int64_t>(1, std::min<int64_t>(np, (int64_t(512) << 20) / (n * row_bytes)));
    void* tmp = scratch.get<uint8_t>(tmp_heads * n * row_bytes);
    auto aligned16 = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
    for (void* store : {a.k, a.v}) {
      if (aligned16(store)) permute_rows<uint4>(store, row_bytes, pl, perm, tmp, tmp_heads);
      else if (es == 4) permute_rows<uint32_t>(store, row_bytes, pl, perm, tmp, tmp_heads);
      else permute_rows<uint16_t>(store, row_bytes, pl, perm, tmp, tmp_heads);
    }
    if (a.pos) permute_rows<int32_t>(a.pos, 4, pl, perm, tmp, tmp_heads);
  }
  if (a.inertia_out) {
    TACTIC_CUDA_CHECK(cudaMemcpyAsync(a.inertia_out, inertia, (size_t)np * sizeof(double),
                                      cudaMemcpyDeviceToHost, s));
    TACTIC_CUDA_CHECK(cudaStreamSynchronize(s));
  }
}

}  // namespace

void kmeans_reindex(const KMeansReindexArgs& a) {
  const std::string where = "kmeans_reindex: ";
  if (a.dtype != DType::f32 && a.dtype != DType::f16 && a.dtype != DType::bf16)
    throw TypeError(where + "`dtype` must be float32, float16 or bfloat16, got " + dtype_name(a.dtype));
  if (a.d < 8 || a.d > 256 || a.d % 8 != 0)
    throw UnsupportedError(where + "the CUDA k-means supports head_dim d a multiple of 8 in [8, 256], got " +
                           std::to_string(a.d));
  if (a.nprob < 0) throw ValueError(where + "`nprob` must be >= 0, got " + std::to_string(a.nprob));
  if (a.n < 0) throw ValueError(where + "`n` must be >= 0, got " + std::to_string(a.n));
  if (a.nprob == 0) return;
  if (a.c < 1) throw ValueError(where + "`c` (clusters per head) must be >= 1, got " + std::to_string(a.c));
  if (a.iters < 1) throw ValueError(where + "`iters` must be >= 1, got " + std::to_string(a.iters));
  if (a.row0 < 0 || a.row0 + a.n > a.cap)
    throw ValueError(where + "rows [row0, row0 + n) = [" + std::to_string(a.row0) + ", " +
                     std::to_string(a.row0 + a.n) + ") must lie in [0, cap = " + std::to_string(a.cap) + ")");
  if (a.nprob * a.n > std::numeric_limits<int32_t>::max())
    throw ValueError(where + "nprob * n = " + std::to_string(a.nprob * a.n) + " exceeds 2^31 - 1 rows per call");
  if (!a.k) throw ValueError(where + "`k` is null");
  if (a.reindex && !a.v) throw ValueError(where + "`v` is null but reindex is set");
  if (!a.seeds) throw ValueError(where + "`seeds` is null");
  const cudaStream_t s = as_stream(a.stream);
  const int64_t c = std::min(a.c, a.n);
  if (a.centroids && a.nprob > 1 && a.cent_stride < c * a.d)
    throw ValueError(where + "`cent_stride` must be >= c * d = " + std::to_string(c * a.d) + ", got " +
                     std::to_string(a.cent_stride));
  if (a.offsets && a.nprob > 1 && a.off_stride < c + 1)
    throw ValueError(where + "`off_stride` must be >= c + 1 = " + std::to_string(c + 1) + ", got " +
                     std::to_string(a.off_stride));
  if (a.n == 0) {  // nothing to cluster: every head has 0 clusters and offsets {0}
    if (a.offsets) {
      offsets_kernel<<<grid_for(a.nprob), kThreads, 0, s>>>(nullptr, a.nprob, 0, 0, a.offsets, a.off_stride);
      TACTIC_CUDA_LAUNCH_CHECK("kmeans offsets_kernel");
    }
    if (a.inertia_out) std::fill(a.inertia_out, a.inertia_out + a.nprob, 0.0);
    return;
  }
  Plan pl;
  pl.a = a;
  pl.c = c;
  pl.cpad = (c + kBN - 1) / kBN * kBN;
  pl.rows = a.nprob * a.n;
  pl.s = s;
  const bool vec = reinterpret_cast<uintptr_t>(a.k) % 16 == 0;
  dispatch_float(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (vec) run<T, true>(pl);
    else run<T, false>(pl);
  });
}

}  // namespace cuda
}  // namespace tactic
