// Selection stage 2, estimate (select_hist): per query head, the score histogram: tokens,
// clusters and centroid-prior mass per bucket, added by `tiles` blocks per head (each over
// 1/tiles of the head's clusters) into the head's accumulators, which select_exact reads (and
// its last block clears). No decision is taken here: select_exact's blocks find the exact head's
// crossing bucket from the finished histogram themselves.
#include "select_common.cuh"

namespace tactic {
namespace cuda {

namespace {

__global__ void __launch_bounds__(kSelThreads) select_hist_kernel(StepGeometry s, SelectArgs a) {
  pdl_begin();  // first: wait for the previous kernel (programmatic dependent launch)
  __shared__ int32_t tok[kBuckets], cnt[kBuckets];
  __shared__ float pri[kBuckets];
  const int64_t i = blockIdx.x;
  const int tiles = gridDim.y, tile = blockIdx.y, tid = threadIdx.x;
  const HeadView v = head_view(s, a, i);
  if (selects_all(v, a)) return;
  const float mx = unorder_float(a.seg_max[i]);
  const float bpl = bucket_width(mx, unorder_float(a.seg_min[i]));
  for (int k = tid; k < kBuckets; k += kSelThreads) {
    tok[k] = 0;
    pri[k] = 0.f;
    cnt[k] = 0;
  }
  __syncthreads();
  for_clusters_in(v.sc, v.off, v.C * tile / tiles, v.C * (tile + 1) / tiles, [&](int64_t, float x, int32_t n) {
    const int bk = bucket_of(x, mx, bpl);
    atomicAdd(&tok[bk], n);
    atomicAdd(&pri[bk], (float)n * __expf(x - mx));
    atomicAdd(&cnt[bk], 1);
  });
  __syncthreads();
  int32_t* gtok = a.acc_tok + i * kBuckets;
  int32_t* gcnt = a.acc_cnt + i * kBuckets;
  float* gpri = a.acc_pri + i * kBuckets;
  for (int k = tid; k < kBuckets; k += kSelThreads)
    if (cnt[k]) {
      atomicAdd(gtok + k, tok[k]);
      atomicAdd(gcnt + k, cnt[k]);
      atomicAdd(gpri + k, pri[k]);
    }
}

}  // namespace

void launch_select_hist(const StepGeometry& s, const SelectArgs& a, int tiles) {
  const int64_t heads = s.batch * s.hkv * s.g;
  launch<select_hist_kernel>(s.pdl, dim3((unsigned)heads, (unsigned)tiles), kSelThreads, 0, as_stream(s.stream), s, a);
  TACTIC_CUDA_LAUNCH_CHECK("select_hist");
}

}  // namespace cuda
}  // namespace tactic
