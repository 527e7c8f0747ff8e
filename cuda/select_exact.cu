// Selection stage 3, exact (select_exact): the exact softmax mass of every query head's sinks,
// recent rows and exact-head rows, from the keys themselves, as (max, sum) partials of
// several blocks per head (ExactPart) that select_stop combines. Two kernels: one thread per row
// and query head (select_exact_kernel, any shape), and the group form on tensor cores
// (select_exact_group_kernel, StepPlan::exact), which reads each row once for the KV group.
#include "mma.cuh"
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

// Kernel 2, group form (16-bit K, D 64 / 128, g <= 8, sm_80+; StepPlan::exact): a KV head's
// exact reads for all g query heads at once. select_head marks head j's exact-head clusters as
// bit j of kv_mark (mark_exact_bit); each row of the group's union is read once, by a warp, 8
// rows to an mma.sync m16n8k16 giving every head's logits (q split hi / lo as in
// score_mma_kernel, so about fp32 precision), and each head sums only its own rows. The marks
// are cleared here: select_stop finds kv_mark zero, as before. The thread-per-row kernel read
// the union up to g times, with one row per thread in flight (~2 TB/s at 512K).
constexpr int kExactPieces = 4;  // 8-row pieces whose loads a warp has in flight together

template <class T, int D>
__global__ void __launch_bounds__(kExactThreads, 2) select_exact_group_kernel(StepGeometry s, SelectArgs a) {
  pdl_begin();  // first: wait for the previous kernel (programmatic dependent launch)
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  constexpr int KS = D / 16, PV = D / 32, U = kExactPieces, W = kExactThreads / 32;
  __shared__ float wm[2][W][8], ws[2][W][8];  // [always / head][warp][query head]
  const int64_t item = blockIdx.x, b = item / s.hkv, h = item % s.hkv, hq = s.hkv * s.g;
  const int splits = gridDim.y, split = blockIdx.y;
  const int32_t slot = s.slots[b];
  const SlotCounts st = s.state[s.layer * s.max_batch + slot];
  const int64_t hi = head_index(s, slot, h), seg0 = b * hq + h * s.g;
  const int64_t C = st.n_clusters, nclu = st.n_clustered, nsink = st.n_sink, nrec = st.n_recent;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  // Every head of a group selects all or none (selects_all depends on the KV head only); then
  // kv_mark holds select_all's marks, not exact-head bits, and nothing is read.
  if (a.info[seg0].all) return;  // (select_stop reads no parts of such heads)
  const T* K = static_cast<const T*>(a.k) + hi * s.cap * D;
  const int32_t* off = a.offsets + hi * (s.cmax + 1);
  uint8_t* kmark = a.kv_mark + item * s.cmax;
  uint32_t qa[KS][4];  // A fragments: head g's q (hi rows 0-7, lo rows 8-15) at this lane's dimensions
  {
    const float* qg = a.qf + (seg0 + g) * D + t * (D / 4);
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
  // Head g's online (max, sum) over this lane's rows: sinks + recent (a), exact head (h). Float
  // per lane (a few hundred rows at most); the block's and splits' combines are in double.
  float am = -INFINITY, as = 0.f, hm = -INFINITY, hs = 0.f;
  auto add_f = [](float x, float& m, float& sum) {
    if (x > m) {
      sum = sum * expf(m - x) + 1.f;
      m = x;
    } else {
      sum += expf(x - m);
    }
  };
  const unsigned bit = 1u << g;
  // Up to U pieces of n[u] <= 8 rows from row r0[u]: lane (g, t) loads row g's dimensions
  // [t D / 4, (t + 1) D / 4) of each (the B fragment's column g), all before any mma.
  auto run = [&](const int64_t (&r0)[U], const int (&n)[U], const unsigned (&mk)[U], bool always) {
    uint4 raw[U][PV];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const uint4* src = reinterpret_cast<const uint4*>(K + (r0[u] + (g < n[u] ? g : 0)) * D) + t * PV;
#pragma unroll
      for (int v = 0; v < PV; ++v) raw[u][v] = g < n[u] ? __ldg(src + v) : make_uint4(0u, 0u, 0u, 0u);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (n[u] <= 0) continue;  // warp-uniform
      float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int kk = 0; kk < KS; ++kk) {
        const uint32_t* w = reinterpret_cast<const uint32_t*>(&raw[u][kk / 2]) + (kk & 1) * 2;
        mma16816<T>(acc, qa[kk], w[0], w[1]);
      }
      if (g < s.g && (mk[u] & bit))  // head g's logits of rows 2t, 2t + 1 (hi + lo rows)
#pragma unroll
        for (int e = 0; e < 2; ++e)
          if (2 * t + e < n[u]) {
            if (always) add_f(acc[e] + acc[2 + e], am, as);
            else add_f(acc[e] + acc[2 + e], hm, hs);
          }
    }
  };
  const int64_t gw = (int64_t)split * W + warp, nw = (int64_t)splits * W;
  {  // sinks and recent rows, every head's: 8-row pieces dealt over the KV head's warps
    const int64_t ps = (nsink + 7) / 8, pr = (nrec + 7) / 8;
    for (int64_t p = gw; p < ps + pr; p += nw) {
      int64_t r0[U] = {};
      int n[U] = {};
      unsigned mk[U] = {};
      mk[0] = 0xffu;
      if (p < ps) {
        r0[0] = 8 * p;
        n[0] = nsink - 8 * p < 8 ? (int)(nsink - 8 * p) : 8;
      } else {
        r0[0] = nsink + nclu + 8 * (p - ps);
        n[0] = nrec - 8 * (p - ps) < 8 ? (int)(nrec - 8 * (p - ps)) : 8;
      }
      run(r0, n, mk, true);
    }
  }
  // The clusters, 32 to a warp and a round (interleaved over the KV head's warps, as the marked
  // ones are the best-ranked and need not be spread evenly): each lane one cluster's mark and
  // offsets, the marked ones' 8-row pieces numbered by a warp scan and run U at a time.
  for (int64_t c0 = gw * 32; c0 < C; c0 += nw * 32) {
    const int64_t c = c0 + lane;
    unsigned mark = 0;
    int32_t o0 = 0, sz = 0;
    if (c < C) {
      mark = kmark[c];
      o0 = __ldg(off + c);
      sz = __ldg(off + c + 1) - o0;
      if (mark) kmark[c] = 0;
    }
    const int np = mark ? (sz + 7) / 8 : 0;
    int incl = np;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int y = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += y;
    }
    const int ex = incl - np, total = __shfl_sync(0xffffffffu, incl, 31);
    for (int p0 = 0; p0 < total; p0 += U) {
      int64_t r0[U];
      int n[U];
      unsigned mk[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int p = p0 + u;  // piece p belongs to the last lane with pieces starting at or before it
        const unsigned owners = __ballot_sync(0xffffffffu, np > 0 && ex <= p);
        const int src = owners ? 31 - __clz((int)owners) : 0;
        const int e0 = __shfl_sync(0xffffffffu, ex, src), s0 = __shfl_sync(0xffffffffu, sz, src);
        const int32_t b0 = __shfl_sync(0xffffffffu, o0, src);
        mk[u] = __shfl_sync(0xffffffffu, mark, src);
        const int k = p - e0;
        r0[u] = nsink + b0 + 8 * k;
        n[u] = p < total ? min(8, s0 - 8 * k) : 0;
      }
      run(r0, n, mk, false);
    }
  }
  // Head g's partials: over the lane quad (t), the warps (shared), then one double combine.
  auto comb = [](float& m, float& sum, float m2, float s2) {
    const float M = fmaxf(m, m2);
    if (M == -INFINITY) return;
    sum = sum * expf(m - M) + s2 * expf(m2 - M);
    m = M;
  };
#pragma unroll
  for (int o = 1; o < 4; o <<= 1) {
    const float am2 = __shfl_xor_sync(0xffffffffu, am, o), as2 = __shfl_xor_sync(0xffffffffu, as, o);
    const float hm2 = __shfl_xor_sync(0xffffffffu, hm, o), hs2 = __shfl_xor_sync(0xffffffffu, hs, o);
    comb(am, as, am2, as2);
    comb(hm, hs, hm2, hs2);
  }
  if (t == 0) {
    wm[0][warp][g] = am;
    ws[0][warp][g] = as;
    wm[1][warp][g] = hm;
    ws[1][warp][g] = hs;
  }
  __syncthreads();
  if (tid < s.g) {
    double M[2] = {-INFINITY, -INFINITY}, S2[2] = {0.0, 0.0};
    for (int k = 0; k < 2; ++k) {
      for (int w = 0; w < W; ++w) M[k] = fmax(M[k], (double)wm[k][w][tid]);
      if (M[k] != -INFINITY)
        for (int w = 0; w < W; ++w)
          if (wm[k][w][tid] != -INFINITY) S2[k] += (double)ws[k][w][tid] * exp((double)wm[k][w][tid] - M[k]);
    }
    a.parts[(seg0 + tid) * kMaxExactSplits + split] = ExactPart{M[0], S2[0], M[1], S2[1]};
  }
#else
  __trap();  // launched only where the binary is sm_80 or newer (exact_group_available)
#endif
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

bool exact_group_available() { return compiled_arch<select_exact_group_kernel<__half, 128>>() >= 80; }

bool exact_group_fits(DType dt, int64_t d, int64_t g) {
  return (dt == DType::f16 || dt == DType::bf16) && (d == 64 || d == 128) && g <= 8;
}

void launch_select_exact_group(const StepGeometry& s, const SelectArgs& a, int splits) {
  if (!exact_group_fits(a.dtype, s.d, s.g))
    throw UnsupportedError("select_step: the group exact kernel needs 16-bit K/V, head_dim 64 or 128 and g <= 8");
  cudaStream_t st = as_stream(s.stream);
  const dim3 grid((unsigned)(s.batch * s.hkv), (unsigned)splits);
  dispatch_float(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (!std::is_same<T, float>::value) {
      if (s.d == 64) launch<select_exact_group_kernel<T, 64>>(s.pdl, grid, kExactThreads, 0, st, s, a);
      else launch<select_exact_group_kernel<T, 128>>(s.pdl, grid, kExactThreads, 0, st, s, a);
    }
  });
  TACTIC_CUDA_LAUNCH_CHECK("select_exact (group)");
}

}  // namespace cuda
}  // namespace tactic
