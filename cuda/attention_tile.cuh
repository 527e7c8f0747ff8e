// One warp's steps of the tensor-core decode attention, shared by the chunk kernel over a row
// list (attention_mma.cu) and the threshold selection's passes over chosen clusters
// (select_threshold.cu): the group's queries as A fragments, a 16-row tile of K and V copied
// into shared memory, and the tile's S = Q K^T, online softmax update and O += P V.
// The A operand has 16 rows for at most 8 heads: rows 8-15 carry the low halves of q and p
// (x - half(x)), so a head's two halves land in accumulator rows g and g + 8 of the same lane
// and their sum keeps q and p at about fp32 precision (K and V are exact in their dtype).
#pragma once
#include <cstdint>

#include "attention_common.cuh"
#include "mma.cuh"

namespace tactic {
namespace cuda {
namespace {

constexpr int kTileRows = 16;  // rows per tile

// Q (fp32, scaled) of the g heads at qi as the A operand of every k-step, in log2 units: row g8
// = head g8, row g8 + 8 = its low half; rows of heads >= g are zero.
template <class T, int D>
__device__ __forceinline__ void load_q_frags(const float* qi, int64_t g, int lane, uint32_t (&qa)[D / 16][4]) {
  const int g8 = lane >> 2, t4 = lane & 3;
  const bool head = g8 < g;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    const float* qr = qi + (int64_t)g8 * D + kk * 16 + 2 * t4;
    split_pack<T>(head ? qr[0] * kLog2e : 0.f, head ? qr[1] * kLog2e : 0.f, qa[kk][0], qa[kk][1]);
    split_pack<T>(head ? qr[8] * kLog2e : 0.f, head ? qr[9] * kLog2e : 0.f, qa[kk][2], qa[kk][3]);
  }
}

// The warp copies 16 rows x D of K and of V into ks / vs (ST elements a row) in 16-byte
// cp.async pieces; lane r (and r + 16) holds row r's store index `my` and whether it exists
// (`ok`: else zeros).
template <class T, int D, int ST>
__device__ __forceinline__ void copy_tile(T* ks, T* vs, const T* kb, const T* vb, int lane, int64_t my, int ok) {
  constexpr int NT = D / 8;
#pragma unroll
  for (int c = lane; c < kTileRows * NT; c += 32) {  // NT pieces per row; 16 * NT is a multiple of 32
    const int rr = c / NT, cc = c - rr * NT;
    const int64_t row = __shfl_sync(kFull, my, rr);
    const int bytes = __shfl_sync(kFull, ok, rr) ? 16 : 0;
    cp_async16_zfill(ks + rr * ST + cc * 8, kb + row * D + cc * 8, bytes);
    cp_async16_zfill(vs + rr * ST + cc * 8, vb + row * D + cc * 8, bytes);
  }
}

// One tile in shared memory, `valid` of its rows real (the rest score -inf): S = Q K^T, the
// online softmax update of (m, lsum, o) and O += P V. pr: this lane's probabilities of head g8 at
// tile rows 2t4, 2t4 + 1, 8 + 2t4, 9 + 2t4 relative to the new m; returns the factor the old
// sums were scaled by.
template <class T, int D, int ST>
__device__ __forceinline__ float tile_step(const T* ks, const T* vs, const uint32_t (&qa)[D / 16][4], int lane,
                                           int valid, float& m, float& lsum, float (&o)[D / 8][4], float (&pr)[4]) {
  constexpr int KS = D / 16, NT = D / 8;
  const int t4 = lane & 3;
  // S = Q K^T over two column tiles of 8 rows: the B operand is K itself (rows = columns).
  float sacc[2][4];
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    sacc[j][0] = sacc[j][1] = sacc[j][2] = sacc[j][3] = 0.f;
    const T* kr = ks + (8 * j + (lane & 7)) * ST;
#pragma unroll
    for (int kk = 0; kk + 1 < KS; kk += 2) {
      uint32_t b[4];
      ldsm<false, 4>(b, kr + kk * 16 + 8 * (lane >> 3));
      mma16816<T>(sacc[j], qa[kk], b[0], b[1]);
      mma16816<T>(sacc[j], qa[kk + 1], b[2], b[3]);
    }
    if constexpr (KS % 2 == 1) {
      uint32_t b[2];
      ldsm<false, 2>(b, kr + (KS - 1) * 16 + 8 * ((lane >> 3) & 1));
      mma16816<T>(sacc[j], qa[KS - 1], b[0], b[1]);
    }
  }
  // Head g8's scores (high + low halves).
  const int base = 2 * t4;
  float sc[4] = {sacc[0][0] + sacc[0][2], sacc[0][1] + sacc[0][3], sacc[1][0] + sacc[1][2],
                 sacc[1][1] + sacc[1][3]};
  sc[0] = base < valid ? sc[0] : -INFINITY;
  sc[1] = base + 1 < valid ? sc[1] : -INFINITY;
  sc[2] = base + 8 < valid ? sc[2] : -INFINITY;
  sc[3] = base + 9 < valid ? sc[3] : -INFINITY;
  float mt = fmaxf(fmaxf(sc[0], sc[1]), fmaxf(sc[2], sc[3]));
  mt = fmaxf(mt, __shfl_xor_sync(kFull, mt, 1));
  mt = fmaxf(mt, __shfl_xor_sync(kFull, mt, 2));  // the quad holds the head's 16 rows
  const float mn = fmaxf(m, mt);
  const float corr = fast_exp2(m - mn);
  m = mn;
#pragma unroll
  for (int e = 0; e < 4; ++e) pr[e] = fast_exp2(sc[e] - mn);
  lsum = fmaf(lsum, corr, (pr[0] + pr[1]) + (pr[2] + pr[3]));
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    o[nt][0] *= corr;
    o[nt][1] *= corr;
    o[nt][2] *= corr;
    o[nt][3] *= corr;
  }
  // O += P V: P (rows: heads and their low halves; k: the tile's 16 rows) is the score
  // accumulators' own layout; V's B fragments come transposed from shared memory.
  uint32_t pa[4];
  split_pack<T>(pr[0], pr[1], pa[0], pa[1]);
  split_pack<T>(pr[2], pr[3], pa[2], pa[3]);
  const T* vr = vs + (((lane >> 3) & 1) * 8 + (lane & 7)) * ST + 8 * (lane >> 4);
#pragma unroll
  for (int nt = 0; nt < NT; nt += 2) {
    uint32_t b[4];
    ldsm<true, 4>(b, vr + 8 * nt);
    mma16816<T>(o[nt], pa, b[0], b[1]);
    mma16816<T>(o[nt + 1], pa, b[2], b[3]);
  }
  return corr;
}

}  // namespace
}  // namespace cuda
}  // namespace tactic
