// Split-KV decode attention (see attention.hpp): the launch policy. decode_attention checks
// the arguments, lays out the workspace (partials, then the plan), picks the chunk kernel
// (resolve_attention_kernel) and enqueues it and the merge:
//   attention_common.cuh  the plan (unit_len, block_plan), parameter structs, shared helpers
//   attention_chunks.cu   chunk kernel on CUDA cores (any float K/V, head dim up to 256)
//   attention_mma.cu      chunk kernel on tensor cores (mma.sync; 16-bit K/V, head dim <= 128)
//   attention_merge.cu    log-sum-exp merge of each query head's partials
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "attention.hpp"
#include "attention_common.cuh"
#include "capabilities.hpp"

namespace tactic {
namespace cuda {

namespace {

constexpr int64_t kMaxItems = 8192;  // plan prefix in shared memory: (items + 1) ints

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
  require(a.counts && a.head_index && (a.out || a.carry_out) && a.workspace,
          "counts, head_index, out (or carry_out) and workspace must be set");
  require(!(a.carry_in && a.carry_out), "carry_in and carry_out are two passes: set one of them");
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
  cp.row_start = a.row_start;
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
  mp.carry_in = a.carry_in;
  mp.carry_out = a.carry_out;

  const LaunchPlan lp{as_stream(a.stream), a.pdl,
                      resolve_attention_kernel(a.kernel, a.kv_dtype, a.d, a.g) == AttentionKernel::tensor_cores};
  // (resolve_attention_kernel asks for tensor cores only where they fit: 16-bit K/V, d <= 128.)
  const bool mma = lp.tensor_cores && (a.kv_dtype == DType::f16 || a.kv_dtype == DType::bf16) && a.d <= 128;
  if (work > 0) {
    if (mma) launch_chunks_tensor_cores(cp, work, lp, a.kv_dtype, a.d);
    else launch_chunks_cuda_cores(cp, work, lp, a.kv_dtype, a.d);
  }
  launch_merge(mp, merge_blocks, lp, a.out_dtype, a.d);
}

}  // namespace cuda
}  // namespace tactic
