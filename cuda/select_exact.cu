// Selection stage 3, exact (select_exact): the exact softmax mass of every query head's sinks,
// recent rows and exact-head rows, from the keys themselves, as (max, sum) partials of
// several blocks per head (ExactPart) that select_stop combines.
#include "select_common.cuh"

namespace tactic {
namespace cuda {

namespace {

// Kernel 2 (query head x split): exact logits of sinks + recent rows and of the head clusters'
// rows, one thread per row; slot u is head cluster u / 16, rows u % 16, u % 16 + 16, ... of it.
// Spread over many blocks because this is the selection's largest read (~2% of the context
// per query head) and one block per head left most SMs idle.
constexpr int kExactThreads = 256;

template <class T, int D>
__global__ void __launch_bounds__(kExactThreads) select_exact_kernel(StepGeometry s, SelectArgs a) {
  pdl_begin();  // first: wait for the previous kernel (programmatic dependent launch)
  __shared__ float qs[D];
  __shared__ MaxSum wa[kExactThreads / 32], wh[kExactThreads / 32];
  const int64_t hq = s.hkv * s.g, i = blockIdx.x, b = i / hq, qh = i % hq, h = qh / s.g;
  const int splits = gridDim.y, split = blockIdx.y;
  const int32_t slot = s.slots[b];
  const SlotCounts st = s.state[s.layer * s.max_batch + slot];
  const int64_t hi = head_index(s, slot, h);
  const int64_t nclu = st.n_clustered, nsink = st.n_sink, nrec = st.n_recent, always = nsink + nrec;
  const SelInfo info = a.info[i];
  const T* K = static_cast<const T*>(a.k) + hi * s.cap * D;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  for (int e = tid; e < D; e += kExactThreads) qs[e] = a.qf[i * D + e];
  __syncthreads();
  MaxSum ma{-INFINITY, 0.0}, mh{-INFINITY, 0.0};
  if (!info.all) {
    const int64_t stride = (int64_t)splits * kExactThreads, first = (int64_t)split * kExactThreads + tid;
    for (int64_t t = first; t < always; t += stride) {
      const int64_t row = t < nsink ? t : nsink + nclu + (t - nsink);
      ma = add(ma, thread_dot<T, D>(K + row * D, qs));
    }
    const int2* tasks = reinterpret_cast<const int2*>(a.tasks) + i * a.tasks_stride;
    for (int64_t u = first; u < (int64_t)info.n_tasks * 16; u += stride) {
      const int2 tk = tasks[u >> 4];
      const int64_t row = tk.x + (u & 15);
      if (row < tk.y) mh = add(mh, thread_dot<T, D>(K + row * D, qs));
    }
  }
  // Block totals without a chain of rescalings: the largest logit first (max is exact in any
  // order), then every thread rescales its own sum once to it and the sums are added. One exp
  // per thread, all in parallel (a serial combine over lanes and warps cost ~20 dependent
  // double exps, several microseconds of the kernel).
  double m2[2] = {ma.m, mh.m};
  for (int o = 16; o > 0; o >>= 1)
    for (int k = 0; k < 2; ++k) m2[k] = fmax(m2[k], __shfl_xor_sync(0xffffffffu, m2[k], o));
  if (lane == 0) {
    wa[warp].m = m2[0];
    wh[warp].m = m2[1];
  }
  __syncthreads();
  double M[2] = {-INFINITY, -INFINITY};
  for (int w = 0; w < kExactThreads / 32; ++w) {
    M[0] = fmax(M[0], wa[w].m);
    M[1] = fmax(M[1], wh[w].m);
  }
  double s2[2] = {ma.m == -INFINITY ? 0.0 : ma.s * exp(ma.m - M[0]), mh.m == -INFINITY ? 0.0 : mh.s * exp(mh.m - M[1])};
  for (int o = 16; o > 0; o >>= 1)
    for (int k = 0; k < 2; ++k) s2[k] += __shfl_xor_sync(0xffffffffu, s2[k], o);
  if (lane == 0) {
    wa[warp].s = s2[0];
    wh[warp].s = s2[1];
  }
  __syncthreads();
  if (tid == 0) {
    double A = 0.0, H = 0.0;
    for (int w = 0; w < kExactThreads / 32; ++w) {
      A += wa[w].s;
      H += wh[w].s;
    }
    a.parts[i * kMaxExactSplits + split] = ExactPart{M[0], A, M[1], H};
  }
}

}  // namespace

void launch_select_exact(const StepGeometry& s, const SelectArgs& a, int splits) {
  cudaStream_t st = as_stream(s.stream);
  const int64_t heads = s.batch * s.hkv * s.g;
  dispatch_float(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    const dim3 eg((unsigned)heads, (unsigned)splits);
    switch (s.d) {
      case 64: launch<select_exact_kernel<T, 64>>(s.pdl, eg, kExactThreads, 0, st, s, a); break;
      case 80: launch<select_exact_kernel<T, 80>>(s.pdl, eg, kExactThreads, 0, st, s, a); break;
      case 96: launch<select_exact_kernel<T, 96>>(s.pdl, eg, kExactThreads, 0, st, s, a); break;
      case 128: launch<select_exact_kernel<T, 128>>(s.pdl, eg, kExactThreads, 0, st, s, a); break;
      default: launch<select_exact_kernel<T, 256>>(s.pdl, eg, kExactThreads, 0, st, s, a); break;
    }
  });
  TACTIC_CUDA_LAUNCH_CHECK("select_exact");
}

}  // namespace cuda
}  // namespace tactic
