// Small vector helpers shared by the CPU kernels (attention, selection). Internal header:
// not installed, not part of the API.
#pragma once
#include <cstdint>

namespace tactic {

// exp(x) for x <= 0 in a form the compiler vectorises (std::exp stays a scalar libm call
// without -ffast-math, and was the largest single cost of a block). Hand-written because
// pulling in SLEEF for one function is not worth a dependency: Cody-Waite range reduction
// x = n ln2 + r, |r| <= ln2/2 (n rounded by the 1.5 * 2^23 trick, which vectorises where
// roundeven does not), then a degree-6 Taylor polynomial (rel. error < 2e-7, below fp32
// accumulation noise); inputs below -87.3 flush to 0 like expf underflow.
// The reduction runs on x clamped to [-87.3, 0] so that n converts to an int in [-126, 0]
// for every input (NaN or x > 0 would make the int conversion and the shift undefined, as
// UBSan reported); x > 0 gives 1, NaN stays NaN, both as blends the vectoriser keeps.
// The reduction and polynomial for xc in [-87.3, 0], one float or a vector of them: exp(xc) =
// p * 2^n (n returned as a float holding an integer in [-126, 0]).
template <class V>
inline V exp_reduced(V xc, V& n) {
  n = (xc * 1.44269504088896341f + 12582912.f) - 12582912.f;
  const V r = (xc - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  V p = r * (1.f / 720.f) + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  return p * r + 1.f;
}

inline float exp_nonpos(float x) {
  const bool under = x < -87.3f;
  float xc = x >= -87.3f ? x : -87.3f;  // NaN -> -87.3
  xc = xc <= 0.f ? xc : 0.f;
  float n;
  const float p = exp_reduced(xc, n);
  const int32_t bits = ((int32_t)n + 127) * (int32_t(1) << 23);
  float scale;
  __builtin_memcpy(&scale, &bits, 4);
  return x != x ? x : under ? 0.f : p * scale;
}

// 8 floats; unaligned loads/stores through memcpy. In the AVX2 clone these are ymm
// registers, in the baseline clone pairs of xmm. Explicit vectors because the compiler's own
// vectorisation of these loops left one long dependency chain per row.
typedef float v8 __attribute__((vector_size(32)));
inline v8 ld(const float* p) { v8 v; __builtin_memcpy(&v, p, sizeof v); return v; }
inline void st(float* p, v8 v) { __builtin_memcpy(p, &v, sizeof v); }
inline float hsum(v8 v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

// exp_nonpos on 8 lanes at once (the same arithmetic on the vector type: the auto-vectoriser
// leaves the scalar form's selects as branches in short loops).
typedef int32_t v8i __attribute__((vector_size(32)));
inline v8 exp_nonpos8(v8 x) {
  const v8i under = x < -87.3f;
  v8 xc = under ? -87.3f : x;  // (NaN compares false: it stays, then becomes 0 below)
  xc = xc <= 0.f ? xc : 0.f;
  v8 n;
  const v8 p = exp_reduced(xc, n);
  const v8i bits = (__builtin_convertvector(n, v8i) + 127) * (int32_t(1) << 23);
  v8 scale;
  __builtin_memcpy(&scale, &bits, sizeof scale);
  const v8 y = under ? 0.f : p * scale;
  return x != x ? x : y;
}

// e[j] = q . rows[j] for nb contiguous rows of d = 8 * nv floats, 4 rows at a time (4
// independent chains). NV > 0 fixes nv at compile time.
template <int NV>
inline void dot_rows(const float* qh, const float* kb, int64_t nb, int64_t nv_rt, float* e) {
  const int64_t nv = NV > 0 ? NV : nv_rt, d = nv * 8;
  int64_t j = 0;
  for (; j + 4 <= nb; j += 4) {
    v8 a0 = {}, a1 = {}, a2 = {}, a3 = {};
    const float* k0 = kb + j * d;
    for (int64_t c = 0; c < nv; ++c) {
      const v8 qc = ld(qh + 8 * c);
      a0 += qc * ld(k0 + 8 * c);
      a1 += qc * ld(k0 + d + 8 * c);
      a2 += qc * ld(k0 + 2 * d + 8 * c);
      a3 += qc * ld(k0 + 3 * d + 8 * c);
    }
    e[j] = hsum(a0);
    e[j + 1] = hsum(a1);
    e[j + 2] = hsum(a2);
    e[j + 3] = hsum(a3);
  }
  for (; j < nb; ++j) {
    v8 a = {};
    for (int64_t c = 0; c < nv; ++c) a += ld(qh + 8 * c) * ld(kb + j * d + 8 * c);
    e[j] = hsum(a);
  }
}

// dot_rows for any d: the vector path when d % 8 == 0, a plain loop otherwise.
inline void dot_rows_any(const float* q, const float* rows, int64_t nb, int64_t d, float* e) {
  if (d % 8 == 0) return dot_rows<0>(q, rows, nb, d / 8, e);
  for (int64_t j = 0; j < nb; ++j) {
    float s = 0.f;
    for (int64_t k = 0; k < d; ++k) s += q[k] * rows[j * d + k];
    e[j] = s;
  }
}

}  // namespace tactic
