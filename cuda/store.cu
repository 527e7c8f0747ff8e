#include <algorithm>
#include "store.hpp"

#include "common.cuh"

namespace tactic {
namespace cuda {

namespace {

template <class S, class T>
__global__ void prefill_copy_kernel(const S* ks, const S* vs, int64_t sk0, int64_t sk1, int64_t sv0,
                                    int64_t sv1, int64_t n, int64_t d, T* k, T* v, int32_t* pos,
                                    int64_t cap, int64_t first_head) {
  // grid: (ceil(n / rows per block), hkv); a warp per row.
  const int64_t h = blockIdx.y, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t t = (int64_t)blockIdx.x * (blockDim.x / 32) + warp;
  if (t >= n) return;
  const int64_t hi = first_head + h;
  T* kd = k + (hi * cap + t) * d;
  T* vd = v + (hi * cap + t) * d;
  for (int64_t e = lane; e < d; e += 32) {
    kd[e] = from_float<T>(to_float(ks[t * sk0 + h * sk1 + e]));
    vd[e] = from_float<T>(to_float(vs[t * sv0 + h * sv1 + e]));
  }
  if (lane == 0 && pos) pos[hi * cap + t] = (int32_t)t;
}

__global__ void set_counts_kernel(SlotCounts* state, int64_t index, SlotCounts c) { state[index] = c; }

struct SlotBatch {
  int32_t v[1024];
};
__global__ void set_slots_kernel(int32_t* dst, SlotBatch b, int64_t n) {
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) dst[i] = b.v[i];
}

}  // namespace

void prefill_copy(const void* keys, const void* values, DType src, int64_t sk0, int64_t sk1,
                  int64_t sv0, int64_t sv1, int64_t n, int64_t hkv, int64_t d, void* k, void* v,
                  int32_t* pos, DType dst, int64_t cap, int64_t first_head, void* stream) {
  if (n == 0) return;
  const dim3 grid((unsigned)((n + 7) / 8), (unsigned)hkv);
  dispatch_float(src, [&](auto stag) {
    using S = decltype(stag);
    dispatch_float(dst, [&](auto ttag) {
      using T = decltype(ttag);
      prefill_copy_kernel<S, T><<<grid, 256, 0, as_stream(stream)>>>(
          static_cast<const S*>(keys), static_cast<const S*>(values), sk0, sk1, sv0, sv1, n, d,
          static_cast<T*>(k), static_cast<T*>(v), pos, cap, first_head);
    });
  });
  TACTIC_CUDA_LAUNCH_CHECK("prefill_copy");
}

void set_counts(SlotCounts* state, int64_t index, SlotCounts c, void* stream) {
  set_counts_kernel<<<1, 1, 0, as_stream(stream)>>>(state, index, c);
  TACTIC_CUDA_LAUNCH_CHECK("set_counts");
}

void set_slots(int32_t* dst, const int64_t* slots, int64_t n, void* stream) {
  for (int64_t base = 0; base < n; base += 1024) {
    SlotBatch b;
    const int64_t m = n - base < 1024 ? n - base : 1024;
    for (int64_t i = 0; i < m; ++i) b.v[i] = (int32_t)slots[base + i];
    set_slots_kernel<<<1, 256, 0, as_stream(stream)>>>(dst + base, b, m);
    TACTIC_CUDA_LAUNCH_CHECK("set_slots");
  }
}

namespace {
template <class T>
__global__ void round_kernel(const float* src, T* dst, int64_t n) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    dst[i] = from_float<T>(src[i]);
}
}  // namespace

void round_centroids(const float* src, void* dst, DType dtype, int64_t n, void* stream) {
  if (n <= 0) return;
  const unsigned blocks = (unsigned)std::min<int64_t>((n + 255) / 256, 4096);
  dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    round_kernel<T><<<blocks, 256, 0, as_stream(stream)>>>(src, static_cast<T*>(dst), n);
  });
  TACTIC_CUDA_LAUNCH_CHECK("round_centroids");
}

namespace {
// A warp per cluster; double sums as on the CPU (clustering time, not the step).
template <class T>
__global__ void spread_kernel(const T* k, const T* cent, int64_t cap, int64_t d, int64_t row0,
                              const int32_t* offsets, int64_t off_stride, int64_t cmax, int64_t c,
                              float* out) {
  const int64_t h = blockIdx.y, lane = threadIdx.x % 32;
  const int64_t j = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  if (j >= c) return;
  const int32_t* off = offsets + h * off_stride;
  const int32_t b = off[j], e = off[j + 1];
  const T* cj = cent + (h * cmax + j) * d;
  double sum = 0;
  for (int32_t r = b; r < e; ++r) {
    const T* row = k + (h * cap + row0 + r) * d;
    for (int64_t x = lane; x < d; x += 32) {
      const double diff = (double)to_float(row[x]) - (double)to_float(cj[x]);
      sum += diff * diff;
    }
  }
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  if (lane == 0) out[h * cmax + j] = e > b ? (float)(sum / ((double)(e - b) * d)) : 0.f;
}
}  // namespace

void cluster_spreads(const void* k, const void* centroids, DType dtype, int64_t cap, int64_t d,
                     int64_t row0, const int32_t* offsets, int64_t off_stride, int64_t cmax,
                     int64_t nheads, int64_t c, float* spreads, void* stream) {
  if (c <= 0 || nheads <= 0) return;
  constexpr int kWarps = 8;
  const dim3 grid((unsigned)((c + kWarps - 1) / kWarps), (unsigned)nheads);
  dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    spread_kernel<T><<<grid, kWarps * 32, 0, as_stream(stream)>>>(
        static_cast<const T*>(k), static_cast<const T*>(centroids), cap, d, row0, offsets, off_stride, cmax, c,
        spreads);
  });
  TACTIC_CUDA_LAUNCH_CHECK("cluster_spreads");
}

}  // namespace cuda
}  // namespace tactic
