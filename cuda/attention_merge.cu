// The merge kernel of the split-KV decode attention: one block per (item, query head)
// combines the ceil(count / L) partials of its units by log-sum-exp and writes acc / l (zeros
// when the item has no rows).
#include <cfloat>
#include <cstdint>

#include "attention_common.cuh"

namespace tactic {
namespace cuda {

namespace {

constexpr int kMergeThreads = 512;  // 16 warps: a long item's ~200 partials in few rounds
constexpr int kMergeWarps = kMergeThreads / 32;

// One block per (item, query head of the group): warps take interleaved chunks, lanes hold
// float4 pieces of d; the warps' sums meet in shared memory. With carry_out the block stores
// its unnormalised (m, l, acc) record instead of the output; with carry_in that record of an
// earlier pass joins as one more chunk.
template <class TO, int D>
__global__ void __launch_bounds__(kMergeThreads) attention_merge_kernel(const MergeParams p) {
  pdl_begin();  // first: wait for the previous kernel (programmatic dependent launch)
  constexpr int NV4 = D / 4, PER = (NV4 + 31) / 32;
  static_assert(D % 4 == 0, "head dim must be a multiple of 4");
  __shared__ float s_acc[kMergeWarps][D];
  __shared__ float s_l[kMergeWarps];
  __shared__ float s_red[kMergeWarps];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t blk = blockIdx.x, i = blk / p.g, j = blk - i * p.g;
  const int64_t b = i / p.hkv, h = i - b * p.hkv;
  TO* out = p.out ? static_cast<TO*>(p.out) + b * p.out_stride_b + (h * p.g + j) * p.out_stride_h : nullptr;
  const int64_t rec_len = carry_record_floats(D);
  const float* cin = p.carry_in ? p.carry_in + blk * rec_len : nullptr;
  float* cout = p.carry_out ? p.carry_out + blk * rec_len : nullptr;
  const int count = clamp_count(p.counts[i], p.max_count);
  const int n2 = p.counts2 ? p.counts2[i] : 0;
  if (count == 0 && n2 == 0 && !cin) {  // uniform over the block; the plan is not read (no chunk kernel ran then)
    if (cout) {
      for (int dd = tid; dd < D; dd += kMergeThreads) cout[kCarryAcc + dd] = 0.f;
      if (tid == 0) cout[0] = -FLT_MAX, cout[1] = 0.f;
    } else {
      for (int dd = tid; dd < D; dd += kMergeThreads) out[dd] = from_float<TO>(0.f);
    }
    return;
  }
  const int len = count > 0 ? p.plan[0] : 1;
  const int nch = (int)(((int64_t)count + len - 1) / len);
  // unit c's record: rec0 + c * g (no unit, no plan read: a carried record alone)
  const int64_t rec0 = nch > 0 ? (int64_t)p.plan[1 + i] * p.g + j : 0;
  const int64_t rec2 = n2 > 0 ? (int64_t)p.plan2[i] * p.g + j : 0;
  const int ntot = nch + n2;
  auto rec_of = [&](int c) { return c < nch ? rec0 + (int64_t)c * p.g : rec2 + (int64_t)(c - nch) * p.g; };

  float mx = -FLT_MAX;
  for (int c = tid; c < ntot; c += kMergeThreads) mx = fmaxf(mx, p.ws_ml[rec_of(c) * 2]);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(kFull, mx, o));
  if (lane == 0) s_red[warp] = mx;
  __syncthreads();
  mx = s_red[0];
#pragma unroll
  for (int w = 1; w < kMergeWarps; ++w) mx = fmaxf(mx, s_red[w]);
  if (cin) mx = fmaxf(mx, cin[0]);  // the carried partial counts as one more chunk

  float4 a[PER];
#pragma unroll
  for (int k = 0; k < PER; ++k) a[k] = make_float4(0.f, 0.f, 0.f, 0.f);
  float lsum = 0.f;
#pragma unroll 4
  for (int c = warp; c < ntot; c += kMergeWarps) {
    const int64_t rec = rec_of(c);
    const float wgt = fast_exp2(p.ws_ml[rec * 2] - mx);
    lsum = fmaf(wgt, p.ws_ml[rec * 2 + 1], lsum);
    const float4* src = reinterpret_cast<const float4*>(p.ws_acc + rec * D);
#pragma unroll
    for (int k = 0; k < PER; ++k) {
      const int v = lane + 32 * k;
      if (v < NV4) {
        const float4 x = src[v];
        a[k].x = fmaf(wgt, x.x, a[k].x);
        a[k].y = fmaf(wgt, x.y, a[k].y);
        a[k].z = fmaf(wgt, x.z, a[k].z);
        a[k].w = fmaf(wgt, x.w, a[k].w);
      }
    }
  }
#pragma unroll
  for (int k = 0; k < PER; ++k) {
    const int v = lane + 32 * k;
    if (v < NV4) {
      s_acc[warp][4 * v] = a[k].x;
      s_acc[warp][4 * v + 1] = a[k].y;
      s_acc[warp][4 * v + 2] = a[k].z;
      s_acc[warp][4 * v + 3] = a[k].w;
    }
  }
  if (lane == 0) s_l[warp] = lsum;
  __syncthreads();
  const float cw = cin ? fast_exp2(cin[0] - mx) : 0.f;
  float ltot = cin ? cw * cin[1] : 0.f;
#pragma unroll
  for (int w = 0; w < kMergeWarps; ++w) ltot += s_l[w];
  if (cout && tid == 0) cout[0] = mx, cout[1] = ltot;
  const float inv = ltot > 0.f ? 1.f / ltot : 0.f;  // no mass (all scores -inf): zeros
  for (int dd = tid; dd < D; dd += kMergeThreads) {
    float sum = cin ? cw * cin[kCarryAcc + dd] : 0.f;
#pragma unroll
    for (int w = 0; w < kMergeWarps; ++w) sum += s_acc[w][dd];
    if (cout) cout[kCarryAcc + dd] = sum;
    else out[dd] = from_float<TO>(sum * inv);
  }
}

}  // namespace

void launch_merge(const MergeParams& p, int64_t blocks, const LaunchPlan& lp, DType out, int64_t d) {
  dispatch_float(out, [&](auto tag) {
    using TO = decltype(tag);
    switch (d) {
      case 64: launch<attention_merge_kernel<TO, 64>>(lp.pdl, (unsigned)blocks, kMergeThreads, 0, lp.stream, p); break;
      case 80: launch<attention_merge_kernel<TO, 80>>(lp.pdl, (unsigned)blocks, kMergeThreads, 0, lp.stream, p); break;
      case 96: launch<attention_merge_kernel<TO, 96>>(lp.pdl, (unsigned)blocks, kMergeThreads, 0, lp.stream, p); break;
      case 128: launch<attention_merge_kernel<TO, 128>>(lp.pdl, (unsigned)blocks, kMergeThreads, 0, lp.stream, p); break;
      default: launch<attention_merge_kernel<TO, 256>>(lp.pdl, (unsigned)blocks, kMergeThreads, 0, lp.stream, p); break;
    }
    TACTIC_CUDA_LAUNCH_CHECK("attention_merge_kernel");
  });
}

}  // namespace cuda
}  // namespace tactic
