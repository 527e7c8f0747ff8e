// Pieces shared by the split-KV decode attention's files: the chunk kernels
// (attention_chunks.cu on CUDA cores, attention_mma.cu on tensor cores), the merge kernel
// (attention_merge.cu) and the launch policy (attention.cu, decode_attention). The parameter
// structs and the stage launchers cross files (plain host functions: a kernel is launched from
// the file that defines it, as the build has no relocatable device code); the device helpers
// sit in an anonymous namespace, one copy per file that uses them.
//
// The plan: the rows of all items are cut into units of one common length L (a multiple of 64,
// about total / (kSplits * items) rows), so every unit costs the same however unequal the
// items' counts are (a head whose group selects 90% of the context next to heads at 10% no
// longer leaves most SMs idle behind its long chunks). Each block of a chunk kernel derives the
// plan (L and the prefix of units per item) from the device counts itself, so nothing syncs
// with the host and a large host bound max_count costs nothing; block 0 also stores it for the
// merge. Persistent blocks of 4 warps take units with a grid stride.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cstdint>

#include "attention.hpp"
#include "common.cuh"

namespace tactic {
namespace cuda {

struct ChunkParams {
  const void* k;
  const void* v;
  int64_t cap;
  int64_t items, g;
  const int32_t* head_index;
  const float* q;
  const int32_t* rows;
  int64_t rows_stride;
  const int32_t* row_start;  // [items] or null: item i's rows begin at rows[i * rows_stride + row_start[i]]
  const int32_t* counts;
  int32_t max_count;
  float* ws_ml;   // [units, g, 2]: m (log2 units), l
  float* ws_acc;  // [units, g, D]
  int32_t* plan;  // [items + 1]: L, then the first unit of every item (written by block 0)
  int hsplit;     // blocks per unit, each for GB of the group's heads (1: one block, all heads)
  int64_t max_units;  // all items' units at most (0: no cap); set by the launcher, see unit_len
};

struct MergeParams {
  int64_t hkv, g;
  const int32_t* counts;
  int32_t max_count;
  const int32_t* plan;
  const float* ws_ml;
  const float* ws_acc;
  void* out;
  int64_t out_stride_b, out_stride_h;
  // A second run of records per item, or null: counts2[i] units from unit plan2[i] (the
  // threshold selection's rest pass, whose units are spread over items by their work).
  const int32_t* counts2;
  const int32_t* plan2;
  const float* carry_in;  // [items * g] records or null: one more partial per query head (AttentionArgs)
  float* carry_out;       // [items * g] records or null: the unnormalised result instead of out
};

// The launch-time choices of one call: its stream and the plan's variants (resolved).
struct LaunchPlan {
  cudaStream_t stream;
  bool pdl;
  bool tensor_cores;
};

// The stage launchers (each enqueues on lp.stream, with PDL where lp.pdl). d: 64, 80, 96, 128
// or 256 (checked by decode_attention); `work`: units of the plan at most (units_for).
// attention_chunks.cu: the CUDA-core chunk kernel, any float K/V and head dim.
void launch_chunks_cuda_cores(const ChunkParams& p, int64_t work, const LaunchPlan& lp, DType kv, int64_t d);
// attention_mma.cu: the tensor-core chunk kernel (16-bit K/V, d <= 128; UnsupportedError else).
void launch_chunks_tensor_cores(const ChunkParams& p, int64_t work, const LaunchPlan& lp, DType kv, int64_t d);
// attention_merge.cu: the merge of the chunks' partials into `out`, one block per query head.
void launch_merge(const MergeParams& p, int64_t blocks, const LaunchPlan& lp, DType out, int64_t d);

namespace {

// Units of L = unit_len(total, items, max_units) rows (a multiple of 64, at least 64): about
// kSplits units per item on average, enough to fill the GPU for a single sequence (8 KV heads x
// 64 = 512 blocks), units long enough that a partial (g * (d + 2) floats) stays small next to
// the unit's K/V. Sum over items of ceil(count_i / L) <= total / L + items <= (kSplits + 1) *
// items, which bounds the workspace by the item count, not by capacity.
// At large batch kSplits units per item are far more than the GPU runs at once (B 32 x 8 KV
// heads: 16K units of 64 rows, one 16-row tile per warp, so no tile pipelining and a round trip
// per unit); max_units (the launcher's kUnitRounds x resident blocks) then lengthens the units.
// It only ever lengthens them, so the workspace bound above holds.
constexpr int kSplits = (int)kAttentionSplits;
constexpr int kMinChunk = 64;
constexpr int kUnitRounds = 8;  // units per resident block at most: the tail costs <= 1 / 8 of a round

__host__ __device__ __forceinline__ int unit_len(int64_t total, int64_t items, int64_t max_units) {
  int64_t units = kSplits * items;
  if (max_units > 0 && max_units < units) units = max_units;
  const int64_t per = (total + units - 1) / units;
  const int64_t len = (per + kMinChunk - 1) / kMinChunk * kMinChunk;
  return len < kMinChunk ? kMinChunk : (int)len;
}
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr float kLog2e = 1.4426950408889634f;
constexpr unsigned kFull = 0xffffffffu;

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));  // -inf -> 0
  return y;
}

// Counts outside [0, max_count] are clamped so that a bad count can never index past the
// workspace (max_count sizes it) or the row list.
__device__ __forceinline__ int clamp_count(int32_t c, int32_t max_count) {
  return c < 0 ? 0 : (c > max_count ? max_count : c);
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
  const int len = unit_len(tot, p.items, p.max_units);
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

}  // namespace

}  // namespace cuda
}  // namespace tactic
