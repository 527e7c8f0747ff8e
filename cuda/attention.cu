// Split-KV decode attention (see attention.hpp).
//
// Kernel 1 (chunks): the rows of all items are cut into units of one common length L (a
// multiple of 64, about total / (kSplits * items) rows), so every unit costs the same however
// unequal the items' counts are (a head whose group selects 90% of the context next to heads
// at 10% no longer leaves most SMs idle behind its long chunks). Each block derives the plan
// (L and the prefix of units per item) from the device counts itself, so nothing syncs with
// the host and a large host bound max_count costs nothing; block 0 also stores it for the
// merge. Persistent blocks of 4 warps take units with a grid stride. Within a unit (staged 256 row indices at a time), each warp takes steps of R rows:
// a row is read by L = 32 / R
// lanes with 16-byte loads (a warp load covers R consecutive rows, coalesced), and the K/V
// values stay in registers while all GB query heads of the group use them. Each lane group
// keeps an online softmax state (m, l, acc over its 8 elements of d) per head; the groups
// are merged with shuffles, the warps through shared memory, and the chunk's partial goes
// to the workspace. Scores are kept in log2 units (q is multiplied by log2(e) on load) so
// every exponential is one ex2.approx.
//
// Kernel 2 (merge): one block per (item, query head) combines the ceil(count / L) partials of
// its units by log-sum-exp and writes acc / l (zeros when the item has no rows).
//
// Registers: q and acc take 2 * GB * 8 floats per lane, so a block holds at most GB = 4 heads;
// a larger group's unit is taken by ceil(G / 4) blocks on adjacent work indices, 4 heads each
// (each reads the unit's K/V; the twin's reads partly hit L2).
#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <type_traits>

#include "attention.hpp"
#include "capabilities.hpp"
#include "common.cuh"

namespace tactic {
namespace cuda {

namespace {

// Units of L = unit_len(total, items) rows (a multiple of 64, at least 64): about kSplits
// units per item on average, enough to fill the GPU for a single sequence (8 KV heads x 64 =
// 512 blocks), units long enough that a partial (g * (d + 2) floats) stays small next to the
// unit's K/V. Sum over items of ceil(count_i / L) <= total / L + items <= (kSplits + 1) * items,
// which bounds the workspace by the item count, not by capacity.
constexpr int kSplits = (int)kAttentionSplits;
constexpr int kMinChunk = 64;
// Row indices staged in shared memory at a time. The L2 prefetch stays within a piece, so each
// piece's first group of warp steps goes unprefetched (1024-row pieces measured no better).
constexpr int kPiece = 256;
constexpr int64_t kMaxItems = 8192;  // plan prefix in shared memory: (items + 1) ints

__host__ __device__ __forceinline__ int unit_len(int64_t total, int64_t items) {
  const int64_t per = (total + kSplits * items - 1) / (kSplits * items);
  const int64_t len = (per + kMinChunk - 1) / kMinChunk * kMinChunk;
  return len < kMinChunk ? kMinChunk : (int)len;
}
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kMergeThreads = 512;  // 16 warps: a long item's ~200 partials in few rounds
constexpr int kMergeWarps = kMergeThreads / 32;
constexpr float kLog2e = 1.4426950408889634f;
constexpr unsigned kFull = 0xffffffffu;

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

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));  // -inf -> 0
  return y;
}


__device__ __forceinline__ void prefetch_l2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
}

// cp.async (sm_80+): 16 bytes global -> shared without registers; this form copies `bytes`
// (16 or 0) and fills the rest of the 16 with zeros.
__device__ __forceinline__ void cp_async16_zfill(void* smem, const void* gmem, int bytes) {
  const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Counts outside [0, max_count] are clamped so that a bad count can never index past the
// workspace (max_count sizes it) or the row list.
__device__ __forceinline__ int clamp_count(int32_t c, int32_t max_count) {
  return c < 0 ? 0 : (c > max_count ? max_count : c);
}

struct ChunkParams {
  const void* k;
  const void* v;
  int64_t cap;
  int64_t items, g;
  const int32_t* head_index;
  const float* q;
  const int32_t* rows;
  int64_t rows_stride;
  const int32_t* counts;
  int32_t max_count;
  float* ws_ml;   // [units, g, 2]: m (log2 units), l
  float* ws_acc;  // [units, g, D]
  int32_t* plan;  // [items + 1]: L, then the first unit of every item (written by block 0)
  int hsplit;     // blocks per unit, each for GB of the group's heads (1: one block, all heads)
};

// Blocks per SM the register allocation must allow: 4 (16 warps) for the common 16-bit cases
// up to 4 heads per pass; fewer where the in-flight f32 loads or 8 heads need more registers
// (asking for more there makes ptxas spill).
template <class T, int D, int GB>
constexpr int chunk_min_blocks() {
  return GB >= 8 ? 2 : (sizeof(T) == 4 || D == 256) ? 3 : 4;
}

// The plan, computed by every block from the device counts (block 0 also stores it for the
// merge): total rows -> unit length (returned) -> exclusive prefix of units per item in
// s_first[0 .. items]; s_first[items] = all units. Block-wide (kThreads threads).
__device__ __forceinline__ int block_plan(const ChunkParams& p, int32_t* s_first, long long* s_red,
                                          int32_t* s_wsum) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  long long tot = 0;
  for (int64_t i = tid; i < p.items; i += kThreads) tot += clamp_count(p.counts[i], p.max_count);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) tot += __shfl_xor_sync(kFull, tot, o);
  if (lane == 0) s_red[warp] = tot;
  __syncthreads();
  tot = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) tot += s_red[w];
  const int len = unit_len(tot, p.items);
  int32_t run = 0;
  for (int64_t base = 0; base < p.items; base += kThreads) {
    const int64_t i = base + tid;
    const int c = i < p.items ? clamp_count(p.counts[i], p.max_count) : 0;
    int32_t x = (int32_t)(((int64_t)c + len - 1) / len);
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int32_t y = __shfl_up_sync(kFull, x, o);
      if (lane >= o) x += y;
    }
    if (lane == 31) s_wsum[warp] = x;
    __syncthreads();
    int32_t before = run;
    for (int w = 0; w < warp; ++w) before += s_wsum[w];
    if (i < p.items) s_first[i + 1] = before + x;
    for (int w = 0; w < kWarps; ++w) run += s_wsum[w];
    __syncthreads();
  }
  if (tid == 0) s_first[0] = 0;
  __syncthreads();
  if (blockIdx.x == 0) {
    for (int64_t i = tid; i < p.items; i += kThreads) p.plan[1 + i] = s_first[i];
    if (tid == 0) p.plan[0] = len;
  }
  return len;
}

// Unit `work` of the plan: its item, first row and row count.
struct Unit {
  int64_t item, start;
  int n;
};
__device__ __forceinline__ Unit find_unit(const ChunkParams& p, const int32_t* s_first, int32_t work, int len) {
  // The item holding unit `work`: the last i with s_first[i] <= work.
  int64_t lo = 0, hi_i = p.items - 1;
  while (lo < hi_i) {
    const int64_t mid = (lo + hi_i + 1) / 2;
    if (s_first[mid] <= work) lo = mid; else hi_i = mid - 1;
  }
  const int count = clamp_count(p.counts[lo], p.max_count);
  const int64_t start = (int64_t)(work - s_first[lo]) * len;
  return Unit{lo, start, (int)min((int64_t)len, count - start)};
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
        const int32_t* src = p.rows + i * p.rows_stride + start + p0;
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

// ---- Tensor-core chunk kernel: groups of up to 8 query heads, 16-bit K/V, D <= 128 ----
// The CUDA-core kernel above spends ~100 warp instructions per 512-byte row at G = 8 (8 heads'
// dots with their shuffles and accumulator updates) and reached ~47% of copy bandwidth there
// (779 us against cuDNN's 359 at 512K, bench/NOTES.md). Here each warp takes tiles of 16 rows:
// the tile's K and V rows are copied into shared memory by cp.async (two stages per warp,
// gathered through the row list, rows past the unit zero-filled), and mma.sync m16n8k16 forms
// S = Q K^T and O += P V for all heads of the group at once: ~200 warp instructions per 16 rows
// (32 of them mma) instead of ~1600. Measured on the H100: 774 -> 384 us at G 8 / 512K (94% of
// copy bandwidth), and faster at G 3-4 too (use_mma).
// The A operand has 16 rows for at most 8 heads, so rows 8-15 carry the low halves of q and p
// (x - half(x)): a head's two halves land in accumulator rows g and g + 8, held by the same
// lane, whose sum keeps q and p at about fp32 precision (K and V are exact in their storage
// dtype) without one extra instruction. Same plan, units and partial records as the kernel
// above, so the merge kernel is shared. Hand-written: CUTLASS / FlashInfer kernels do not take
// our gathered row lists and partial layout.
constexpr int kMmaRows = 16;  // rows per tile
constexpr int kMmaStages = 2;

template <int D>
struct MmaTile {
  static constexpr int kStride = D + 8;  // elements per shared row: 8 rows sit in 8 bank groups (ldmatrix)
  static constexpr int kTile = kMmaRows * kStride;                 // one K or V tile, elements
  static constexpr int kWarp = kMmaStages * 2 * kTile;              // a warp's stages
  static constexpr std::size_t kTileBytes = (std::size_t)kWarps * kWarp * 2;
  static constexpr std::size_t kMergeBytes = (std::size_t)kWarps * 8 * (D + 2) * 4;
  static constexpr std::size_t kBytes = kTileBytes > kMergeBytes ? kTileBytes : kMergeBytes;
};
// The plan prefix, then the warps' tiles (reused for the warps' partials at the unit's end).
__host__ __device__ inline std::size_t mma_plan_bytes(int64_t items) { return ((std::size_t)(items + 1) * 4 + 15) / 16 * 16; }

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

template <bool kTrans, int N>
__device__ __forceinline__ void ldsm(uint32_t (&r)[N], const void* smem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned a = (unsigned)__cvta_generic_to_shared(smem);
  if constexpr (N == 4 && kTrans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
  else if constexpr (N == 4)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(a));
#endif
}

template <class T, int D>
__global__ void __launch_bounds__(kThreads, 3) attention_chunks_mma_kernel(const ChunkParams p) {
  pdl_begin();  // first: wait for the previous kernel (programmatic dependent launch)
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  static_assert(sizeof(T) == 2 && D % 16 == 0 && D <= 128, "16-bit K/V, D a multiple of 16 up to 128");
  using Tile = MmaTile<D>;
  constexpr int ST = Tile::kStride, KS = D / 16, NT = D / 8;
  extern __shared__ __align__(16) unsigned char s_mma[];
  int32_t* s_first = reinterpret_cast<int32_t*>(s_mma);  // [items + 1], as the kernel above
  unsigned char* s_work = s_mma + mma_plan_bytes(p.items);
  __shared__ long long s_red[kWarps];
  __shared__ int32_t s_wsum[kWarps];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g8 = lane >> 2, t4 = lane & 3;  // accumulator row (head) and column pair of this lane
  const int len = block_plan(p, s_first, s_red, s_wsum);
  const int32_t units = s_first[p.items];
  T* wt = reinterpret_cast<T*>(s_work) + warp * Tile::kWarp;  // [stage][K, V][16][ST]
  float* s_acc = reinterpret_cast<float*>(s_work);              // [kWarps][8][D], after the tiles
  float* s_m = s_acc + kWarps * 8 * D;                          // [kWarps][8]
  float* s_l = s_m + kWarps * 8;

  for (int32_t work = blockIdx.x; work < units; work += gridDim.x) {
    const Unit un = find_unit(p, s_first, work, len);
    const int64_t hi = p.head_index[un.item];
    const T* kb = static_cast<const T*>(p.k) + hi * p.cap * D;
    const T* vb = static_cast<const T*>(p.v) + hi * p.cap * D;
    const float* qi = p.q + un.item * p.g * D;
    const int64_t rec_base = (int64_t)work * p.g;
    const int32_t* rsrc = p.rows ? p.rows + un.item * p.rows_stride + un.start : nullptr;

    // Q as the A operand of every k-step, in log2 units: row g8 = head g8, row g8 + 8 = its low half.
    uint32_t qa[KS][4];
    const bool head = g8 < p.g;
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) {
      const float* qr = qi + (int64_t)g8 * D + kk * 16 + 2 * t4;
      split_pack<T>(head ? qr[0] * kLog2e : 0.f, head ? qr[1] * kLog2e : 0.f, qa[kk][0], qa[kk][1]);
      split_pack<T>(head ? qr[8] * kLog2e : 0.f, head ? qr[9] * kLog2e : 0.f, qa[kk][2], qa[kk][3]);
    }
    float o[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) o[nt][0] = o[nt][1] = o[nt][2] = o[nt][3] = 0.f;
    float m = -FLT_MAX, lsum = 0.f;  // -FLT_MAX: exp2(m_old - m_new) stays finite

    // Tile `tile` of the unit into stage `stage`: lanes r and r + 16 look up row r's index,
    // then the warp copies 16 rows x D of K and of V in 16-byte pieces.
    const int ntiles = (un.n + kMmaRows - 1) / kMmaRows;
    auto issue = [&](int tile, int stage) {
      const int pos = tile * kMmaRows + (lane & 15);
      const int ok = pos < un.n;
      const int64_t my = ok ? (rsrc ? (int64_t)rsrc[pos] : un.start + pos) : 0;
      T* ks = wt + stage * 2 * Tile::kTile;
      T* vs = ks + Tile::kTile;
#pragma unroll
      for (int c = lane; c < kMmaRows * NT; c += 32) {  // NT pieces per row; 16 * NT is a multiple of 32
        const int rr = c / NT, cc = c - rr * NT;
        const int64_t row = __shfl_sync(kFull, my, rr);
        const int bytes = __shfl_sync(kFull, ok, rr) ? 16 : 0;
        cp_async16_zfill(ks + rr * ST + cc * 8, kb + row * D + cc * 8, bytes);
        cp_async16_zfill(vs + rr * ST + cc * 8, vb + row * D + cc * 8, bytes);
      }
    };
    if (warp < ntiles) issue(warp, 0);
    cp_async_commit();
    int it = 0;
    for (int tile = warp; tile < ntiles; tile += kWarps, ++it) {
      if (tile + kWarps < ntiles) issue(tile + kWarps, (it + 1) & 1);
      cp_async_commit();
      cp_async_wait<1>();  // this lane's pieces of `tile` have landed
      __syncwarp();        // and every lane's
      const T* ks = wt + (it & 1) * 2 * Tile::kTile;
      const T* vs = ks + Tile::kTile;

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
      // Head g8's scores at tile rows 2t4, 2t4 + 1, 8 + 2t4, 9 + 2t4 (high + low halves).
      const int base = tile * kMmaRows + 2 * t4;
      float sc[4] = {sacc[0][0] + sacc[0][2], sacc[0][1] + sacc[0][3], sacc[1][0] + sacc[1][2],
                     sacc[1][1] + sacc[1][3]};
      sc[0] = base < un.n ? sc[0] : -INFINITY;
      sc[1] = base + 1 < un.n ? sc[1] : -INFINITY;
      sc[2] = base + 8 < un.n ? sc[2] : -INFINITY;
      sc[3] = base + 9 < un.n ? sc[3] : -INFINITY;
      float mt = fmaxf(fmaxf(sc[0], sc[1]), fmaxf(sc[2], sc[3]));
      mt = fmaxf(mt, __shfl_xor_sync(kFull, mt, 1));
      mt = fmaxf(mt, __shfl_xor_sync(kFull, mt, 2));  // the quad holds the head's 16 rows
      const float mn = fmaxf(m, mt);
      const float corr = fast_exp2(m - mn);
      m = mn;
      float pr[4];
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
      __syncwarp();  // every lane is done with this stage before it is refilled
    }
    cp_async_wait<0>();

    // The warps' partials meet in shared memory (over the tiles: every warp must be done).
    lsum += __shfl_xor_sync(kFull, lsum, 1);
    lsum += __shfl_xor_sync(kFull, lsum, 2);
    __syncthreads();
    if (head) {
      float* acc = s_acc + (warp * 8 + g8) * D + 2 * t4;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        acc[8 * nt] = o[nt][0] + o[nt][2];
        acc[8 * nt + 1] = o[nt][1] + o[nt][3];
      }
      if (t4 == 0) {
        s_m[warp * 8 + g8] = m;
        s_l[warp * 8 + g8] = lsum;
      }
    }
    __syncthreads();
    for (int x = tid; x < p.g * D; x += kThreads) {
      const int hh = x / D, dd = x - hh * D;
      float mx = s_m[hh];
#pragma unroll
      for (int w = 1; w < kWarps; ++w) mx = fmaxf(mx, s_m[w * 8 + hh]);
      float a = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) a = fmaf(s_acc[(w * 8 + hh) * D + dd], fast_exp2(s_m[w * 8 + hh] - mx), a);
      p.ws_acc[(rec_base + hh) * D + dd] = a;
    }
    if (tid < p.g) {
      float mx = s_m[tid];
#pragma unroll
      for (int w = 1; w < kWarps; ++w) mx = fmaxf(mx, s_m[w * 8 + tid]);
      float sum = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) sum = fmaf(s_l[w * 8 + tid], fast_exp2(s_m[w * 8 + tid] - mx), sum);
      p.ws_ml[(rec_base + tid) * 2] = mx;
      p.ws_ml[(rec_base + tid) * 2 + 1] = sum;
    }
    __syncthreads();  // the partials' area is the next unit's tiles
  }
#else
  __trap();  // launched only where the binary is sm_80 or newer (use_mma)
#endif
}

struct MergeParams {
  int64_t hkv, g;
  const int32_t* counts;
  int32_t max_count;
  const int32_t* plan;
  const float* ws_ml;
  const float* ws_acc;
  void* out;
  int64_t out_stride_b, out_stride_h;
};

// One block per (item, query head of the group): warps take interleaved chunks, lanes hold
// float4 pieces of d; the warps' sums meet in shared memory.
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
  TO* out = static_cast<TO*>(p.out) + b * p.out_stride_b + (h * p.g + j) * p.out_stride_h;
  const int count = clamp_count(p.counts[i], p.max_count);
  if (count == 0) {  // uniform over the block; the plan is not read (no chunk kernel ran then)
    for (int dd = tid; dd < D; dd += kMergeThreads) out[dd] = from_float<TO>(0.f);
    return;
  }
  const int len = p.plan[0];
  const int nch = (int)(((int64_t)count + len - 1) / len);
  const int64_t rec0 = (int64_t)p.plan[1 + i] * p.g + j;  // unit c's record: rec0 + c * g

  float mx = -FLT_MAX;
  for (int c = tid; c < nch; c += kMergeThreads) mx = fmaxf(mx, p.ws_ml[(rec0 + c * p.g) * 2]);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(kFull, mx, o));
  if (lane == 0) s_red[warp] = mx;
  __syncthreads();
  mx = s_red[0];
#pragma unroll
  for (int w = 1; w < kMergeWarps; ++w) mx = fmaxf(mx, s_red[w]);

  float4 a[PER];
#pragma unroll
  for (int k = 0; k < PER; ++k) a[k] = make_float4(0.f, 0.f, 0.f, 0.f);
  float lsum = 0.f;
#pragma unroll 4
  for (int c = warp; c < nch; c += kMergeWarps) {
    const int64_t rec = rec0 + (int64_t)c * p.g;
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
  float ltot = 0.f;
#pragma unroll
  for (int w = 0; w < kMergeWarps; ++w) ltot += s_l[w];
  const float inv = ltot > 0.f ? 1.f / ltot : 0.f;  // no mass (all scores -inf): zeros
  for (int dd = tid; dd < D; dd += kMergeThreads) {
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < kMergeWarps; ++w) sum += s_acc[w][dd];
    out[dd] = from_float<TO>(sum * inv);
  }
}

constexpr int kMaxDevices = 64;

// Resident blocks of the chunk kernel on the current device (SMs x occupancy), queried once
// per instantiation and device for a small plan (the common case; a larger plan is queried
// each call): the persistent grid never exceeds one wave.
// `fixed`: the dynamic shared bytes besides the plan (the tensor-core kernel's tiles).
template <auto Kernel>
int resident_blocks(std::size_t smem, std::size_t fixed = 0) {
  static std::atomic<int> cache[kMaxDevices];
  const std::size_t small_plan = fixed + 4096;
  int dev = 0;
  TACTIC_CUDA_CHECK(cudaGetDevice(&dev));
  const bool cached = smem <= small_plan && dev >= 0 && dev < kMaxDevices;
  if (cached) {
    const int v = cache[dev].load(std::memory_order_relaxed);
    if (v > 0) return v;
  }
  int sms = 0, per_sm = 0;
  TACTIC_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  TACTIC_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      &per_sm, Kernel, kThreads, cached ? small_plan : smem));
  const int v = (sms > 0 ? sms : 1) * (per_sm > 0 ? per_sm : 1);
  if (cached) cache[dev].store(v, std::memory_order_relaxed);
  return v;
}

// The launch-time choices of one call: its stream and the plan's variants (resolved).
struct LaunchPlan {
  cudaStream_t stream;
  bool pdl;
  bool tensor_cores;
};

template <class T, int D, int GB>
void launch_chunks(const ChunkParams& p, int64_t work, const LaunchPlan& lp) {
  const std::size_t smem = (std::size_t)(p.items + 1) * sizeof(int32_t);
  // Past the default 48 KB with the static arrays (up to 32 KB): opt in (once is enough, but
  // the call is cheap and rare).
  if (smem > 16 * 1024) {
    TACTIC_CUDA_CHECK(cudaFuncSetAttribute(attention_chunks_kernel<T, D, GB>,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
  }
  const int64_t grid = std::min<int64_t>(work * p.hsplit, resident_blocks<attention_chunks_kernel<T, D, GB>>(smem));
  launch<attention_chunks_kernel<T, D, GB>>(lp.pdl, (unsigned)grid, kThreads, smem, lp.stream, p);
  TACTIC_CUDA_LAUNCH_CHECK("attention_chunks_kernel");
}

template <class T, int D>
void launch_chunks_mma(const ChunkParams& p, int64_t work, const LaunchPlan& lp) {
  if constexpr (sizeof(T) == 2 && D <= 128) {
    const std::size_t smem = mma_plan_bytes(p.items) + MmaTile<D>::kBytes;  // ~70 KB at D 128: opt in
    TACTIC_CUDA_CHECK(cudaFuncSetAttribute(attention_chunks_mma_kernel<T, D>,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    const int64_t grid = std::min<int64_t>(work, resident_blocks<attention_chunks_mma_kernel<T, D>>(smem, MmaTile<D>::kBytes));
    launch<attention_chunks_mma_kernel<T, D>>(lp.pdl, (unsigned)grid, kThreads, smem, lp.stream, p);
    TACTIC_CUDA_LAUNCH_CHECK("attention_chunks_mma_kernel");
  }
}

template <class T, int D>
void launch_chunks_g(const ChunkParams& p, int64_t work, const LaunchPlan& lp) {
  if constexpr (sizeof(T) == 2 && D <= 128) {
    if (lp.tensor_cores) return launch_chunks_mma<T, D>(p, work, lp);
  }
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

template <int D>
void launch_d(const AttentionArgs& a, const ChunkParams& cp, const MergeParams& mp, int64_t work,
              int64_t merge_blocks, const LaunchPlan& lp) {
  if (work > 0)
    dispatch_float(a.kv_dtype, [&](auto tag) {
      using T = decltype(tag);
      launch_chunks_g<T, D>(cp, work, lp);
    });
  dispatch_float(a.out_dtype, [&](auto tag) {
    using TO = decltype(tag);
    launch<attention_merge_kernel<TO, D>>(lp.pdl, (unsigned)merge_blocks, kMergeThreads, 0, lp.stream, mp);
    TACTIC_CUDA_LAUNCH_CHECK("attention_merge_kernel");
  });
}

bool supported_head_dim(int64_t d) { return d == 64 || d == 80 || d == 96 || d == 128 || d == 256; }

// Units for all items together at most (see unit_len); none when no item can have rows.
int64_t units_for(int64_t items, int64_t max_count) { return max_count > 0 ? (kSplits + 1) * items : 0; }

// Float offset of the acc section: the (m, l) section rounded up to 16 bytes for float4 reads.
int64_t acc_offset(int64_t records) { return (records * 2 + 3) / 4 * 4; }

void require(bool ok, const std::string& msg) {
  if (!ok) throw ValueError("decode_attention: " + msg);
}

// The plan (items + 1 ints) after the partials.
int64_t plan_floats(int64_t items) { return items + 1; }

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

}  // namespace

bool tensor_core_available() {
  return compiled_arch<attention_chunks_mma_kernel<__half, 128>>() >= 80;
}

// Automatic: the tensor-core kernel for groups of 3-8 heads where it fits. From the H100 A/B
// (dense, fp16, D 128, Hkv 8; CUDA-core -> tensor-core us at 32K / 128K / 512K): G 4 70.5 /
// 224 / 831 -> 65.4 / 201 / 745; G 3 70.7 / 216 / 788 -> 66.9 / 202 / 744; G 2 a wash; G 1
// 59.0 / 197 / 750 -> 64.7 / 203 / 745 (slower where it matters).
AttentionKernel resolve_attention_kernel(AttentionKernel requested, DType kv, int64_t d, int64_t g) {
  const bool fits = (kv == DType::f16 || kv == DType::bf16) && d <= 128 && g <= 8;
  switch (requested) {
    case AttentionKernel::cuda_cores: return requested;
    case AttentionKernel::tensor_cores:
      if (!fits)
        throw UnsupportedError("attention_kernel='tensor_cores' needs float16/bfloat16 K/V, head_dim <= 128 and "
                               "at most 8 query heads per KV head, got " + std::string(dtype_name(kv)) +
                               ", head_dim " + std::to_string(d) + ", " + std::to_string(g) + " heads per KV head");
      if (!tensor_core_available())
        throw UnsupportedError("attention_kernel='tensor_cores' needs kernels built for sm_80 or newer; this "
                               "build's run as sm_" + std::to_string(kernel_arch()) + " on this GPU");
      return requested;
    default:
      return fits && g >= 3 && tensor_core_available() ? AttentionKernel::tensor_cores : AttentionKernel::cuda_cores;
  }
}

std::size_t attention_workspace_bytes(int64_t batch, int64_t hkv, int64_t g, int64_t d,
                                      int64_t max_count) {
  if (batch < 0 || hkv < 0 || g < 0 || d < 0 || max_count < 0)
    throw ValueError("attention_workspace_bytes: sizes must be non-negative, got batch=" +
                     std::to_string(batch) + " hkv=" + std::to_string(hkv) + " g=" +
                     std::to_string(g) + " d=" + std::to_string(d) +
                     " max_count=" + std::to_string(max_count));
  const int64_t items = batch * hkv;
  const int64_t records = units_for(items, max_count) * g;
  const int64_t floats = acc_offset(records) + records * d + plan_floats(items);
  return std::max<std::size_t>(16, (std::size_t)floats * sizeof(float));
}

void decode_attention(const AttentionArgs& a) {
  if (!supported_head_dim(a.d))
    throw UnsupportedError("decode_attention: head dim " + std::to_string(a.d) +
                           " is not supported by the CUDA kernel (supported: 64, 80, 96, 128, 256)");
  require(a.batch >= 0 && a.hkv >= 0, "batch and hkv must be non-negative, got batch=" +
                                          std::to_string(a.batch) + " hkv=" + std::to_string(a.hkv));
  if (!is_float_storage(a.kv_dtype) || !is_float_storage(a.out_dtype))
    throw TypeError(std::string("decode_attention: K/V and out must be float32, float16 or bfloat16, got ") +
                    dtype_name(a.kv_dtype) + " and " + dtype_name(a.out_dtype));
  require(a.g >= 1, "group size g must be >= 1, got " + std::to_string(a.g));
  require(a.max_count >= 0 && a.max_count <= INT32_MAX,
          "max_count must be in [0, 2^31), got " + std::to_string(a.max_count));
  require(a.cap >= 0, "cap must be non-negative, got " + std::to_string(a.cap));
  const int64_t items = a.batch * a.hkv;
  if (items == 0) return;
  require(a.rows != nullptr || a.max_count <= a.cap,
          "dense attention (rows = nullptr) needs max_count <= cap, got max_count=" +
              std::to_string(a.max_count) + " cap=" + std::to_string(a.cap));
  require(a.rows == nullptr || a.rows_stride >= a.max_count,
          "rows_stride must be >= max_count, got rows_stride=" + std::to_string(a.rows_stride) +
              " max_count=" + std::to_string(a.max_count));
  require(a.counts && a.head_index && a.out && a.workspace, "counts, head_index, out and workspace must be set");
  require(a.max_count == 0 || (a.k && a.v && a.q), "k, v and q must be set");
  require(aligned16(a.k) && aligned16(a.v), "k and v must be 16-byte aligned");
  require(aligned16(a.workspace), "workspace must be 16-byte aligned");
  require(items <= kMaxItems, "batch * hkv must be <= " + std::to_string(kMaxItems) + ", got " +
                                 std::to_string(items));
  const int64_t work = units_for(items, a.max_count);
  const int64_t merge_blocks = items * a.g;
  require(merge_blocks <= INT32_MAX, "batch * hkv * g must be < 2^31");
  const int64_t records = work * a.g;

  ChunkParams cp{};
  cp.k = a.k;
  cp.v = a.v;
  cp.cap = a.cap;
  cp.items = items;
  cp.g = a.g;
  cp.head_index = a.head_index;
  cp.q = a.q;
  cp.rows = a.rows;
  cp.rows_stride = a.rows_stride;
  cp.counts = a.counts;
  cp.max_count = (int32_t)a.max_count;
  cp.ws_ml = a.workspace;
  cp.ws_acc = a.workspace + acc_offset(records);
  cp.plan = reinterpret_cast<int32_t*>(cp.ws_acc + records * a.d);
  cp.hsplit = 1;

  MergeParams mp{};
  mp.hkv = a.hkv;
  mp.g = a.g;
  mp.counts = a.counts;
  mp.max_count = (int32_t)a.max_count;
  mp.plan = cp.plan;
  mp.ws_ml = cp.ws_ml;
  mp.ws_acc = cp.ws_acc;
  mp.out = a.out;
  mp.out_stride_b = a.out_stride_b;
  mp.out_stride_h = a.out_stride_h;

  const LaunchPlan lp{as_stream(a.stream), a.pdl,
                      resolve_attention_kernel(a.kernel, a.kv_dtype, a.d, a.g) == AttentionKernel::tensor_cores};
  switch (a.d) {
    case 64: launch_d<64>(a, cp, mp, work, merge_blocks, lp); break;
    case 80: launch_d<80>(a, cp, mp, work, merge_blocks, lp); break;
    case 96: launch_d<96>(a, cp, mp, work, merge_blocks, lp); break;
    case 128: launch_d<128>(a, cp, mp, work, merge_blocks, lp); break;
    default: launch_d<256>(a, cp, mp, work, merge_blocks, lp); break;
  }
}

}  // namespace cuda
}  // namespace tactic
