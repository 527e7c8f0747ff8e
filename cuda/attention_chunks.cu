// The CUDA-core chunk kernel of the split-KV decode attention (units and plan: see
// attention_common.cuh). Within a unit (staged 256 row indices at a time), each warp takes
// steps of R rows: a row is read by L = 32 / R
// lanes with 16-byte loads (a warp load covers R consecutive rows, coalesced), and the K/V
// values stay in registers while all GB query heads of the group use them. Each lane group
// keeps an online softmax state (m, l, acc over its 8 elements of d) per head; the groups
// are merged with shuffles, the warps through shared memory, and the chunk's partial goes
// to the workspace. Scores are kept in log2 units (q is multiplied by log2(e) on load) so
// every exponential is one ex2.approx.
//
// Registers: q and acc take 2 * GB * 8 floats per lane, so a block holds at most GB = 4 heads;
// a larger group's unit is taken by ceil(G / 4) blocks on adjacent work indices, 4 heads each
// (each reads the unit's K/V; the twin's reads partly hit L2).
#include <algorithm>
#include <cfloat>
#include <cstdint>

#include "attention_common.cuh"

namespace tactic {
namespace cuda {

namespace {

// Row indices staged in shared memory at a time. The L2 prefetch stays within a piece, so each
// piece's first group of warp steps goes unprefetched (1024-row pieces measured no better).
constexpr int kPiece = 256;

constexpr int ceil_div_c(int a, int b) { return (a + b - 1) / b; }
constexpr int pow2_ceil_c(int x) { return x <= 1 ? 1 : 2 * pow2_ceil_c((x + 1) / 2); }
constexpr int min_c(int a, int b) { return a < b ? a : b; }

// How one row of D elements of T is spread over lanes: 16-byte slots, L lanes per row (a power
// of two, so the dot product reduces with xor shuffles), NS slots per lane (slot t + j * L of
// lane t; lanes past the row's slots hold zeros), 8 elements per lane for every dtype.
template <class T, int D>
struct RowLayout {
  static constexpr int kVec = 16 / (int)sizeof(T);           // elements per 16-byte slot
  static constexpr int kSlots = D / kVec;                     // slots per row
  static constexpr int kLanes = min_c(32, pow2_ceil_c(ceil_div_c(kSlots, 8 / kVec)));
  static constexpr int kNS = ceil_div_c(kSlots, kLanes);      // slots per lane
  static constexpr int kE = kNS * kVec;                       // elements per lane
  static constexpr int kRows = 32 / kLanes;                   // rows per warp step
  static_assert(D % kVec == 0, "head dim must be a multiple of the 16-byte vector");
  static_assert(kE == 8, "every supported (dtype, head dim) gives 8 elements per lane");
};

__device__ __forceinline__ void prefetch_l2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
}

// Blocks per SM the register allocation must allow: 4 (16 warps) for the common 16-bit cases
// up to 4 heads per pass; fewer where the in-flight f32 loads or 8 heads need more registers
// (asking for more there makes ptxas spill).
template <class T, int D, int GB>
constexpr int chunk_min_blocks() {
  return GB >= 8 ? 2 : (sizeof(T) == 4 || D == 256) ? 3 : 4;
}

template <class T, int D, int GB>
__global__ void __launch_bounds__(kThreads, chunk_min_blocks<T, D, GB>()) attention_chunks_kernel(const ChunkParams p) {
  pdl_begin();  // first: wait for the previous kernel (programmatic dependent launch)
  using Lay = RowLayout<T, D>;
  constexpr int L = Lay::kLanes, NS = Lay::kNS, VEC = Lay::kVec, E = Lay::kE, R = Lay::kRows,
                S = Lay::kSlots;
  constexpr int U = GB <= 4 ? 4 : 2;  // warp steps whose loads are in flight together

  extern __shared__ int32_t s_first[];  // [items + 1]: first unit of item i; [items] = all units
  __shared__ int32_t s_rows[kPiece];
  __shared__ float s_acc[kWarps][GB][D];
  __shared__ float s_m[kWarps][GB], s_l[kWarps][GB];
  __shared__ long long s_red[kWarps];
  __shared__ int32_t s_wsum[kWarps];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int grp = lane / L, t = lane % L;  // row within the warp step, lane within the row

  const int len = block_plan(p, s_first, s_red, s_wsum);
  const int32_t units = s_first[p.items];

  // Head split: with hsplit > 1 each unit is taken by hsplit blocks, one per GB query heads;
  // they hold adjacent work indices, so they run at the same time and the second reader of the
  // unit's K/V mostly hits L2 (instead of 8 heads' state in one block's registers).
  const int hsplit = p.hsplit;
  for (int32_t wk = blockIdx.x; wk < units * hsplit; wk += gridDim.x) {
    const int32_t work = wk / hsplit, hpart = wk - work * hsplit;
    const Unit un = find_unit(p, s_first, work, len);
    const int64_t i = un.item, start = un.start;
    const int n = un.n;

    const int64_t hi = p.head_index[i];
    const T* kb = static_cast<const T*>(p.k) + hi * p.cap * D;
    const T* vb = static_cast<const T*>(p.v) + hi * p.cap * D;
    const float* qi = p.q + i * p.g * D;
    const int64_t rec_base = (int64_t)work * p.g;  // partial record of head 0

    const int h_end = hsplit > 1 ? (int)min((int64_t)(hpart + 1) * GB, p.g) : (int)p.g;
    for (int h0 = hpart * GB; h0 < h_end; h0 += GB) {
      const int nh = (int)min((int64_t)GB, p.g - h0);

      // q in log2 units, in registers.
      float q[GB][E];
#pragma unroll
      for (int hh = 0; hh < GB; ++hh)
#pragma unroll
        for (int j = 0; j < NS; ++j)
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            const int slot = t + j * L;
            q[hh][j * VEC + e] =
                (hh < nh && slot < S) ? qi[(int64_t)(h0 + hh) * D + slot * VEC + e] * kLog2e : 0.f;
          }

      // -FLT_MAX rather than -inf: exp2(m_old - m_new) stays 0 or 1, never NaN.
      float m[GB], l[GB], acc[GB][E];
#pragma unroll
      for (int hh = 0; hh < GB; ++hh) {
        m[hh] = -FLT_MAX;
        l[hh] = 0.f;
#pragma unroll
        for (int e = 0; e < E; ++e) acc[hh][e] = 0.f;
      }

      // The chunk in pieces of kPiece rows whose row indices are staged in shared memory.
      for (int p0 = 0; p0 < n; p0 += kPiece) {
      const int pn = min(kPiece, n - p0);
      __syncthreads();  // the previous piece's readers of s_rows are done
      if (p.rows) {
        const int32_t* src = p.rows + i * p.rows_stride + (p.row_start ? p.row_start[i] : 0) + start + p0;
        for (int r = tid; r < pn; r += kThreads) s_rows[r] = src[r];
      }
      __syncthreads();
      // Warp step st covers piece rows [st * R, st * R + R); warps interleave so that a short
      // piece is still spread over all of them.
      for (int st0 = warp; st0 * R < pn; st0 += kWarps * U) {
        uint4 kr[U][NS], vr[U][NS];
        bool valid[U];
        {
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int pos = (st0 + u * kWarps) * R + grp;
          valid[u] = pos < pn;
          const int64_t row = valid[u] ? (p.rows ? (int64_t)s_rows[pos] : start + p0 + pos) : 0;
          const T* kp = kb + row * D;
          const T* vp = vb + row * D;
#pragma unroll
          for (int j = 0; j < NS; ++j) {
            const int slot = t + j * L;
            if (valid[u] && slot < S) {
              kr[u][j] = __ldg(reinterpret_cast<const uint4*>(kp + slot * VEC));
              vr[u][j] = __ldg(reinterpret_cast<const uint4*>(vp + slot * VEC));
            } else {
              kr[u][j] = make_uint4(0u, 0u, 0u, 0u);
              vr[u][j] = make_uint4(0u, 0u, 0u, 0u);
            }
          }
        }

        }  // register loads

        // The next step's rows (this warp's, within the staged piece) into L2 while this
        // step's loads are in flight: more bytes on the way than the registers can hold, so
        // the kernel waits less per load (one prefetch per 128-byte line of K and of V).
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int pos = (st0 + kWarps * U + u * kWarps) * R + grp;
          if (pos < pn) {
            const int64_t row = p.rows ? (int64_t)s_rows[pos] : start + p0 + pos;
#pragma unroll
            for (int j = 0; j < NS; ++j) {
              const int slot = t + j * L;
              if (slot < S && (slot * VEC * (int)sizeof(T)) % 128 == 0) {
                prefetch_l2(kb + row * D + slot * VEC);
                prefetch_l2(vb + row * D + slot * VEC);
              }
            }
          }
        }

        // Scores of this lane group's U rows for every head (log2 units); -inf marks rows
        // past the end of the chunk.
        float s[U][GB];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          float kf[E];
#pragma unroll
          for (int j = 0; j < NS; ++j) unpack16<T>(kr[u][j], kf + j * VEC);
#pragma unroll
          for (int hh = 0; hh < GB; ++hh) {
            float dot = 0.f;
            if (hh < nh) {
#pragma unroll
              for (int e = 0; e < E; ++e) dot = fmaf(q[hh][e], kf[e], dot);
#pragma unroll
              for (int o = L / 2; o > 0; o >>= 1) dot += __shfl_xor_sync(kFull, dot, o);
            }
            s[u][hh] = valid[u] ? dot : -INFINITY;
          }
        }

        // Online softmax per head: s becomes the weights exp2(s - m_new); acc is rescaled once
        // per U steps.
#pragma unroll
        for (int hh = 0; hh < GB; ++hh) {
          if (hh < nh) {
            float mt = s[0][hh];
#pragma unroll
            for (int u = 1; u < U; ++u) mt = fmaxf(mt, s[u][hh]);
            const float mn = fmaxf(m[hh], mt);
            const float corr = fast_exp2(m[hh] - mn);
            m[hh] = mn;
            float ps = 0.f;
#pragma unroll
            for (int u = 0; u < U; ++u) {
              s[u][hh] = fast_exp2(s[u][hh] - mn);
              ps += s[u][hh];
            }
            l[hh] = fmaf(l[hh], corr, ps);
#pragma unroll
            for (int e = 0; e < E; ++e) acc[hh][e] *= corr;
          }
        }
        // V rows one at a time, each shared by all heads (keeps only 8 unpacked floats live).
#pragma unroll
        for (int u = 0; u < U; ++u) {
          float vf[E];
#pragma unroll
          for (int j = 0; j < NS; ++j) unpack16<T>(vr[u][j], vf + j * VEC);
#pragma unroll
          for (int hh = 0; hh < GB; ++hh) {
            if (hh < nh) {
#pragma unroll
              for (int e = 0; e < E; ++e) acc[hh][e] = fmaf(s[u][hh], vf[e], acc[hh][e]);
            }
          }
        }
      }

      }  // pieces

      // Merge the lane groups of the warp (they differ in the lane bits >= log2(L)).
#pragma unroll
      for (int off = L; off < 32; off <<= 1) {
#pragma unroll
        for (int hh = 0; hh < GB; ++hh) {
          if (hh < nh) {
            const float mo = __shfl_xor_sync(kFull, m[hh], off);
            const float lo = __shfl_xor_sync(kFull, l[hh], off);
            const float mn = fmaxf(m[hh], mo);
            const float a = fast_exp2(m[hh] - mn), b = fast_exp2(mo - mn);
            m[hh] = mn;
            l[hh] = l[hh] * a + lo * b;
#pragma unroll
            for (int e = 0; e < E; ++e) {
              const float ao = __shfl_xor_sync(kFull, acc[hh][e], off);
              acc[hh][e] = acc[hh][e] * a + ao * b;
            }
          }
        }
      }

      // Merge the warps through shared memory and write the chunk's partial.
      if (grp == 0) {
#pragma unroll
        for (int hh = 0; hh < GB; ++hh) {
          if (hh < nh) {
#pragma unroll
            for (int j = 0; j < NS; ++j) {
              const int slot = t + j * L;
              if (slot < S) {
#pragma unroll
                for (int e = 0; e < VEC; ++e) s_acc[warp][hh][slot * VEC + e] = acc[hh][j * VEC + e];
              }
            }
            if (t == 0) {
              s_m[warp][hh] = m[hh];
              s_l[warp][hh] = l[hh];
            }
          }
        }
      }
      __syncthreads();
      for (int x = tid; x < nh * D; x += kThreads) {
        const int hh = x / D, dd = x - hh * D;
        float mx = s_m[0][hh];
#pragma unroll
        for (int w = 1; w < kWarps; ++w) mx = fmaxf(mx, s_m[w][hh]);
        float a = 0.f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) a = fmaf(s_acc[w][hh][dd], fast_exp2(s_m[w][hh] - mx), a);
        p.ws_acc[(rec_base + h0 + hh) * D + dd] = a;
      }
      if (tid < nh) {
        float mx = s_m[0][tid];
#pragma unroll
        for (int w = 1; w < kWarps; ++w) mx = fmaxf(mx, s_m[w][tid]);
        float sum = 0.f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) sum = fmaf(s_l[w][tid], fast_exp2(s_m[w][tid] - mx), sum);
        p.ws_ml[(rec_base + h0 + tid) * 2] = mx;
        p.ws_ml[(rec_base + h0 + tid) * 2 + 1] = sum;
      }
      __syncthreads();  // s_acc / s_m / s_l are rewritten by the next pass or chunk
    }
  }
}

template <class T, int D, int GB>
void launch_chunks(const ChunkParams& p, int64_t work, const LaunchPlan& lp) {
  const std::size_t smem = (std::size_t)(p.items + 1) * sizeof(int32_t);
  // Past the default 48 KB with the static arrays (up to 32 KB): opt in (once is enough, but
  // the call is cheap and rare).
  if (smem > 16 * 1024) {
    TACTIC_CUDA_CHECK(cudaFuncSetAttribute(attention_chunks_kernel<T, D, GB>,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
  }
  const int64_t resident = resident_blocks<attention_chunks_kernel<T, D, GB>>(smem);
  ChunkParams q = p;
  q.max_units = std::max<int64_t>(1, kUnitRounds * resident / p.hsplit);  // a unit takes hsplit blocks
  const int64_t grid = std::min<int64_t>(work * p.hsplit, resident);
  launch<attention_chunks_kernel<T, D, GB>>(lp.pdl, (unsigned)grid, kThreads, smem, lp.stream, q);
  TACTIC_CUDA_LAUNCH_CHECK("attention_chunks_kernel");
}

template <class T, int D>
void launch_chunks_g(const ChunkParams& p, int64_t work, const LaunchPlan& lp) {
  // Heads per block: the group size rounded up to a power of two, at most 4.
  if (p.g <= 1) launch_chunks<T, D, 1>(p, work, lp);
  else if (p.g <= 2) launch_chunks<T, D, 2>(p, work, lp);
  else if (p.g <= 4) launch_chunks<T, D, 4>(p, work, lp);
  else {  // 4 heads per block, ceil(g / 4) blocks per unit (registers: 8 heads' state per warp
          // left 2 blocks of 4 warps per SM, 1254 -> 779 us at 512K, G 8)
    ChunkParams q = p;
    q.hsplit = (int)((p.g + 3) / 4);
    launch_chunks<T, D, 4>(q, work, lp);
  }
}

}  // namespace

void launch_chunks_cuda_cores(const ChunkParams& p, int64_t work, const LaunchPlan& lp, DType kv, int64_t d) {
  dispatch_float(kv, [&](auto tag) {
    using T = decltype(tag);
    switch (d) {
      case 64: launch_chunks_g<T, 64>(p, work, lp); break;
      case 80: launch_chunks_g<T, 80>(p, work, lp); break;
      case 96: launch_chunks_g<T, 96>(p, work, lp); break;
      case 128: launch_chunks_g<T, 128>(p, work, lp); break;
      default: launch_chunks_g<T, 256>(p, work, lp); break;
    }
  });
}

}  // namespace cuda
}  // namespace tactic
