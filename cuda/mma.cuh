// Tensor-core helpers shared by the attention (attention_mma.cu) and the centroid scores
// (select_rank.cu): 16-bit packing, the hi / lo split that keeps an fp32 operand at about fp32
// precision through a 16-bit MMA, and mma.sync m16n8k16 (sm_80+; an empty body below).
#pragma once
#include <cstdint>
#include <type_traits>

#include "common.cuh"

namespace tactic {
namespace cuda {
namespace {

template <class T> __device__ __forceinline__ uint16_t bits16(T x);
template <> __device__ __forceinline__ uint16_t bits16<__half>(__half x) { return __half_as_ushort(x); }
template <> __device__ __forceinline__ uint16_t bits16<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat16_as_ushort(x); }

// (a, b) -> the packed pair of their T roundings (hi) and of what those roundings missed (lo).
template <class T>
__device__ __forceinline__ void split_pack(float a, float b, uint32_t& hi, uint32_t& lo) {
  const T ha = from_float<T>(a), hb = from_float<T>(b);
  const T la = from_float<T>(a - to_float(ha)), lb = from_float<T>(b - to_float(hb));
  hi = (uint32_t)bits16(ha) | ((uint32_t)bits16(hb) << 16);
  lo = (uint32_t)bits16(la) | ((uint32_t)bits16(lb) << 16);
}

// d += a . b for one m16n8k16 tile (fp32 accumulators).
template <class T>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same<T, __half>::value) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#endif
}

}  // namespace
}  // namespace cuda
}  // namespace tactic
