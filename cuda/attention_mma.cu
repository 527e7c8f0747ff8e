// The tensor-core chunk kernel of the split-KV decode attention (units and plan: see
// attention_common.cuh), and tensor_core_available() (capabilities.hpp).
#include <cfloat>
#include <cstdint>
#include <string>
#include <type_traits>

#include "attention_common.cuh"
#include "attention_tile.cuh"
#include "capabilities.hpp"
#include "mma.cuh"

namespace tactic {
namespace cuda {

namespace {

// ---- Tensor-core chunk kernel: groups of up to 8 query heads, 16-bit K/V, D <= 128 ----
// The CUDA-core kernel (attention_chunks.cu) spends ~100 warp instructions per 512-byte row at G = 8 (8 heads'
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
// dtype) without one extra instruction. Same plan, units and partial records as the CUDA-core
// kernel, so the merge kernel is shared. Hand-written: CUTLASS / FlashInfer kernels do not take
// our gathered row lists and partial layout.
constexpr int kMmaRows = kTileRows;
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

template <class T, int D>
__global__ void __launch_bounds__(kThreads, 3) attention_chunks_mma_kernel(const ChunkParams p) {
  pdl_begin();  // first: wait for the previous kernel (programmatic dependent launch)
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  static_assert(sizeof(T) == 2 && D % 16 == 0 && D <= 128, "16-bit K/V, D a multiple of 16 up to 128");
  using Tile = MmaTile<D>;
  constexpr int ST = Tile::kStride, KS = D / 16, NT = D / 8;
  extern __shared__ __align__(16) unsigned char s_mma[];
  int32_t* s_first = reinterpret_cast<int32_t*>(s_mma);  // [items + 1], as the CUDA-core kernel
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
    const int32_t* rsrc =
        p.rows ? p.rows + un.item * p.rows_stride + (p.row_start ? p.row_start[un.item] : 0) + un.start : nullptr;

    // Q as the A operand of every k-step (attention_tile.cuh).
    uint32_t qa[KS][4];
    const bool head = g8 < p.g;
    load_q_frags<T, D>(qi, p.g, lane, qa);
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
      copy_tile<T, D, ST>(ks, ks + Tile::kTile, kb, vb, lane, my, ok);
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

      float pr[4];
      tile_step<T, D, ST>(ks, vs, qa, lane, un.n - tile * kMmaRows, m, lsum, o, pr);
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

template <class T, int D>
void launch_chunks_mma(const ChunkParams& p, int64_t work, const LaunchPlan& lp) {
  if constexpr (sizeof(T) == 2 && D <= 128) {
    const std::size_t smem = mma_plan_bytes(p.items) + MmaTile<D>::kBytes;  // ~70 KB at D 128: opt in
    TACTIC_CUDA_CHECK(cudaFuncSetAttribute(attention_chunks_mma_kernel<T, D>,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    const int64_t resident = resident_blocks<attention_chunks_mma_kernel<T, D>>(smem, MmaTile<D>::kBytes);
    ChunkParams q = p;
    q.max_units = kUnitRounds * resident;
    const int64_t grid = std::min<int64_t>(work, resident);
    launch<attention_chunks_mma_kernel<T, D>>(lp.pdl, (unsigned)grid, kThreads, smem, lp.stream, q);
    TACTIC_CUDA_LAUNCH_CHECK("attention_chunks_mma_kernel");
  }
}

}  // namespace

bool tensor_core_available() {
  return compiled_arch<attention_chunks_mma_kernel<__half, 128>>() >= 80;
}

void launch_chunks_tensor_cores(const ChunkParams& p, int64_t work, const LaunchPlan& lp, DType kv, int64_t d) {
  if (!((kv == DType::f16 || kv == DType::bf16) && d <= 128))
    throw UnsupportedError("tensor-core attention needs float16/bfloat16 K/V and head_dim <= 128, got " +
                           std::string(dtype_name(kv)) + ", head_dim " + std::to_string(d));
  dispatch_float(kv, [&](auto tag) {
    using T = decltype(tag);
    switch (d) {
      case 64: launch_chunks_mma<T, 64>(p, work, lp); break;
      case 80: launch_chunks_mma<T, 80>(p, work, lp); break;
      case 96: launch_chunks_mma<T, 96>(p, work, lp); break;
      case 128: launch_chunks_mma<T, 128>(p, work, lp); break;
      default: launch_chunks_mma<T, 256>(p, work, lp); break;
    }
  });
}

}  // namespace cuda
}  // namespace tactic
