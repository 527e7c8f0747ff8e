// A non-owning tensor view: the only way arrays cross the core's boundary. Framework types
// (numpy, torch, DLPack) never reach the core; the bindings turn them into TensorView.
#pragma once
#include <cstdint>
#include <initializer_list>
#include <string>

#include "tactic/error.hpp"

namespace tactic {

enum class DType : int { f32 = 0, f16 = 1, bf16 = 2, i32 = 3, i64 = 4, u8 = 5, f64 = 6, other = 7 };
enum class DeviceKind : int { cpu = 0, cuda = 1, other = 2 };

struct Device {
  DeviceKind kind = DeviceKind::cpu;
  int index = 0;
  bool operator==(const Device& o) const { return kind == o.kind && index == o.index; }
  bool operator!=(const Device& o) const { return !(*this == o); }
};

const char* dtype_name(DType t);
std::size_t dtype_size(DType t);
std::string device_name(Device d);
bool is_float_storage(DType t);  // f32, f16 or bf16: the dtypes K/V/q may have

constexpr int kMaxDims = 6;

// data + dtype + device + shape + strides (in elements). Does not own `data`.
struct TensorView {
  void* data = nullptr;
  DType dtype = DType::f32;
  Device device{};
  int ndim = 0;
  int64_t shape[kMaxDims] = {0};
  int64_t strides[kMaxDims] = {0};

  int64_t numel() const;
  int64_t size(int d) const { return shape[d < 0 ? d + ndim : d]; }
  int64_t stride(int d) const { return strides[d < 0 ? d + ndim : d]; }
  bool is_contiguous() const;  // row-major, no gaps
  std::string shape_str() const;
  template <class T>
  T* ptr() const { return static_cast<T*>(data); }
};

// Build a contiguous view over raw memory (used by C++ embedders and tests).
TensorView make_view(void* data, DType dtype, std::initializer_list<int64_t> shape,
                     Device device = {});

// Validation helpers: each throws ValueError/TypeError whose message names `name` and the
// expected value. A -1 in `shape` matches any extent.
void check_ndim(const TensorView& t, const char* name, std::initializer_list<int> allowed);
void check_shape(const TensorView& t, const char* name, std::initializer_list<int64_t> shape);
void check_float(const TensorView& t, const char* name);  // f32 / f16 / bf16
void check_dtype(const TensorView& t, const char* name, DType want);
void check_device(const TensorView& t, const char* name, Device want);
void check_last_dim_contiguous(const TensorView& t, const char* name);
void check_contiguous(const TensorView& t, const char* name);
// Throws ValueError if any element is NaN or Inf (float views only; CPU only).
void check_finite(const TensorView& t, const char* name);

}  // namespace tactic
