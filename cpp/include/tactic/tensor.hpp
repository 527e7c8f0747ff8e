// A non-owning tensor view: the only way arrays cross the core's boundary. Framework types
// (numpy, torch, DLPack) never reach the core; the bindings turn them into TensorView, and a
// C++ embedder builds one over its own memory with make_view().
//
// Ownership: a TensorView never owns, allocates or frees memory. The caller keeps `data`
// alive for the duration of the call it is passed to; no function of the library keeps a
// view (or its pointer) after returning. (CUDA work is stream-ordered: device memory must stay
// valid until the stream has run the work that reads it.)
#pragma once
#include <cstdint>
#include <initializer_list>
#include <string>

#include "tactic/error.hpp"

namespace tactic {

// Element type of a view. K/V/q/out use f32, f16 (IEEE half) or bf16; i32, i64 and u8 are
// index, budget and mask arrays; f64 and `other` exist so that bindings can describe any
// array and let the checks reject it with a readable message.
enum class DType : int { f32 = 0, f16 = 1, bf16 = 2, i32 = 3, i64 = 4, u8 = 5, f64 = 6, other = 7 };
// Where a view's memory lives: host memory, or a CUDA device's global memory.
enum class DeviceKind : int { cpu = 0, cuda = 1, other = 2 };

// A device: kind plus ordinal (`index` is the CUDA device number; 0 for the CPU).
struct Device {
  DeviceKind kind = DeviceKind::cpu;
  int index = 0;
  bool operator==(const Device& o) const { return kind == o.kind && index == o.index; }
  bool operator!=(const Device& o) const { return !(*this == o); }
};

// Name as NumPy spells it ("float16", ...); a static string, never null.
const char* dtype_name(DType t);
// Bytes per element (0 for DType::other).
std::size_t dtype_size(DType t);
// "cpu" or "cuda:N".
std::string device_name(Device d);
bool is_float_storage(DType t);  // f32, f16 or bf16: the dtypes K/V/q may have

constexpr int kMaxDims = 6;  // the most dimensions a view can have

// data + dtype + device + shape + strides (in elements). Does not own `data`.
// Element (i0, i1, ...) lives at data + (i0 * strides[0] + i1 * strides[1] + ...) *
// dtype_size(dtype) bytes. Entries of shape/strides past `ndim` are unused.
struct TensorView {
  void* data = nullptr;  // first element; on `device`; not owned
  DType dtype = DType::f32;
  Device device{};
  int ndim = 0;
  int64_t shape[kMaxDims] = {0};
  int64_t strides[kMaxDims] = {0};  // in elements, not bytes

  int64_t numel() const;  // product of the shape (1 for ndim 0)
  int64_t size(int d) const { return shape[d < 0 ? d + ndim : d]; }     // d < 0 counts from the end
  int64_t stride(int d) const { return strides[d < 0 ? d + ndim : d]; }
  bool is_contiguous() const;  // row-major, no gaps
  std::string shape_str() const;  // "[2, 8, 128]", for messages
  template <class T>
  T* ptr() const { return static_cast<T*>(data); }  // unchecked cast of `data`
};

// A contiguous row-major view of `shape` over memory the caller owns (no copy; the view is
// valid while that memory is). `data` must hold numel * dtype_size(dtype) bytes on `device`.
// Throws ValueError for more than kMaxDims dimensions. Used by C++ embedders and tests; to
// describe strided memory, fill a TensorView's fields directly.
TensorView make_view(void* data, DType dtype, std::initializer_list<int64_t> shape,
                     Device device = {});

// Validation helpers (the library runs them on every input; embedders may reuse them): each
// throws ValueError/TypeError whose message names `name` and the expected value.
void check_ndim(const TensorView& t, const char* name, std::initializer_list<int> allowed);
// Shape equals `shape` exactly (also in ndim); a -1 in `shape` matches any extent.
void check_shape(const TensorView& t, const char* name, std::initializer_list<int64_t> shape);
// Keys/values in the layout every Tactic call takes: token-major, [N, Hkv, D] for one sequence
// and [B, N, Hkv, D] for a batch (FlashInfer's "NHD"). kv_heads: the Hkv expected, or 0 when
// any divisor of q_heads will do; head_dim <= 0: any. An array whose axes fit the head-major
// layout instead ([Hkv, N, D] / [B, Hkv, N, D], as torch SDPA and Hugging Face caches hold
// K/V) gets a ValueError that says so and names the transposed view to pass.
void check_kv_layout(const TensorView& t, const char* name, bool batched, int64_t kv_heads,
                     int64_t q_heads, int64_t head_dim);
void check_float(const TensorView& t, const char* name);  // f32 / f16 / bf16 (TypeError)
void check_dtype(const TensorView& t, const char* name, DType want);  // TypeError
void check_device(const TensorView& t, const char* name, Device want);
// Last dimension has unit stride (rows are contiguous) and no stride is negative.
void check_last_dim_contiguous(const TensorView& t, const char* name);
// ValueError unless `data` is a multiple of the element size (DLPack allows any byte offset;
// the kernels read typed elements, and a misaligned one is undefined behaviour in C++ and a
// fault on the GPU).
void check_aligned(const TensorView& t, const char* name);
void check_contiguous(const TensorView& t, const char* name);  // row-major, no gaps
// Throws ValueError if any element is NaN or Inf (float views only; CPU only).
void check_finite(const TensorView& t, const char* name);
// check_finite, and also ValueError if a finite element would round to Inf when converted
// to `storage` (e.g. |x| >= 65520 into float16): what is stored must stay finite.
void check_storable(const TensorView& t, const char* name, DType storage);
// ValueError if two index tuples of `t` address the same element (a zero or interleaved
// stride): an output written through such a view would overwrite its own results.
void check_no_overlap(const TensorView& t, const char* name);

}  // namespace tactic
