#include "tactic/tensor.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <sstream>
#include <utility>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "parallel.hpp"
#include "tactic/convert.hpp"

namespace tactic {

const char* dtype_name(DType t) {
  switch (t) {
    case DType::f32: return "float32";
    case DType::f16: return "float16";
    case DType::bf16: return "bfloat16";
    case DType::i32: return "int32";
    case DType::i64: return "int64";
    case DType::u8: return "uint8";
    case DType::f64: return "float64";
    default: return "unsupported dtype";
  }
}

std::size_t dtype_size(DType t) {
  switch (t) {
    case DType::f32: case DType::i32: return 4;
    case DType::f16: case DType::bf16: return 2;
    case DType::i64: case DType::f64: return 8;
    case DType::u8: return 1;
    default: return 0;
  }
}

std::string device_name(Device d) {
  switch (d.kind) {
    case DeviceKind::cpu: return "cpu";
    case DeviceKind::cuda: return "cuda:" + std::to_string(d.index);
    default: return "unsupported device";
  }
}

bool is_float_storage(DType t) { return t == DType::f32 || t == DType::f16 || t == DType::bf16; }

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int i = 0; i < ndim; ++i) n *= shape[i];
  return n;
}

bool TensorView::is_contiguous() const {
  if (numel() == 0) return true;  // no element to misplace, whatever the strides say
  int64_t expect = 1;
  for (int i = ndim - 1; i >= 0; --i) {
    if (shape[i] != 1 && strides[i] != expect) return false;
    expect *= shape[i];
  }
  return true;
}

std::string TensorView::shape_str() const {
  std::ostringstream s;
  s << "[";
  for (int i = 0; i < ndim; ++i) s << (i ? ", " : "") << shape[i];
  s << "]";
  return s.str();
}

TensorView make_view(void* data, DType dtype, std::initializer_list<int64_t> shape,
                     Device device) {
  if ((int)shape.size() > kMaxDims) throw ValueError("make_view: at most 6 dimensions");
  TensorView t;
  t.data = data;
  t.dtype = dtype;
  t.device = device;
  t.ndim = (int)shape.size();
  int i = 0;
  for (int64_t s : shape) t.shape[i++] = s;
  int64_t stride = 1;
  for (int k = t.ndim - 1; k >= 0; --k) {
    t.strides[k] = stride;
    stride *= t.shape[k];
  }
  return t;
}

void check_ndim(const TensorView& t, const char* name, std::initializer_list<int> allowed) {
  for (int a : allowed)
    if (t.ndim == a) return;
  std::ostringstream s;
  s << "`" << name << "` must have ";
  int i = 0;
  for (int a : allowed) s << (i++ ? " or " : "") << a;
  s << " dimensions, got " << t.ndim << " (shape " << t.shape_str() << ")";
  throw ValueError(s.str());
}

void check_shape(const TensorView& t, const char* name, std::initializer_list<int64_t> shape) {
  bool ok = t.ndim == (int)shape.size();
  int i = 0;
  for (int64_t s : shape) {
    if (!ok) break;
    if (s >= 0 && t.shape[i] != s) ok = false;
    ++i;
  }
  if (ok) return;
  std::ostringstream s;
  s << "`" << name << "` must have shape [";
  i = 0;
  for (int64_t e : shape) {
    s << (i++ ? ", " : "");
    if (e < 0) s << "*"; else s << e;
  }
  s << "], got " << t.shape_str();
  throw ValueError(s.str());
}

void check_kv_layout(const TensorView& t, const char* name, bool batched, int64_t kv_heads,
                     int64_t q_heads, int64_t head_dim) {
  const std::string n = name;
  std::string want = batched ? "[B, N, Hkv" : "[N, Hkv";
  if (kv_heads > 0) want += "=" + std::to_string(kv_heads);
  want += head_dim > 0 ? ", D=" + std::to_string(head_dim) + "]" : ", D]";
  const std::string intro = "`" + n + "` must be " + want + " (token-major, the layout of K/V in every Tactic call)";
  const int nd = batched ? 4 : 3;
  if (t.ndim != nd)
    throw ValueError(intro + ", got " + std::to_string(t.ndim) + " dimensions (shape " + t.shape_str() + ")");
  const int n_ax = batched ? 1 : 0, h_ax = n_ax + 1;
  auto heads_ok = [&](int64_t h) { return kv_heads > 0 ? h == kv_heads : h >= 1 && q_heads % h == 0; };
  const bool d_ok = head_dim <= 0 || t.shape[nd - 1] == head_dim;
  if (heads_ok(t.shape[h_ax]) && d_ok) return;
  std::string msg = intro;
  if (kv_heads <= 0) msg += " with Hkv dividing the " + std::to_string(q_heads) + " query heads";
  msg += "; got " + t.shape_str();
  if (d_ok && heads_ok(t.shape[n_ax]))
    msg += std::string(", which looks like ") + (batched ? "[B, Hkv, N, D]" : "[Hkv, N, D]") +
           " (head-major, as torch SDPA and Hugging Face caches hold K/V): pass a view with the two axes "
           "swapped, e.g. " + n + (batched ? ".transpose(1, 2) in torch or " + n + ".transpose(0, 2, 1, 3)"
                                           : ".transpose(0, 1) in torch or " + n + ".transpose(1, 0, 2)") +
           " in NumPy (no copy)";
  throw ValueError(msg);
}

void check_float(const TensorView& t, const char* name) {
  if (!is_float_storage(t.dtype))
    throw TypeError(std::string("`") + name + "` must be float16, bfloat16 or float32, got " +
                    dtype_name(t.dtype));
}

void check_dtype(const TensorView& t, const char* name, DType want) {
  if (t.dtype != want)
    throw TypeError(std::string("`") + name + "` must be " + dtype_name(want) + ", got " +
                    dtype_name(t.dtype));
}

void check_device(const TensorView& t, const char* name, Device want) {
  if (t.device != want)
    throw ValueError(std::string("`") + name + "` must be on device " + device_name(want) +
                     ", got " + device_name(t.device));
}

void check_aligned(const TensorView& t, const char* name) {
  if (t.numel() == 0) return;
  const std::size_t size = dtype_size(t.dtype);
  if (size > 1 && reinterpret_cast<uintptr_t>(t.data) % size != 0)
    throw ValueError(std::string("`") + name + "` must be aligned to its " + std::to_string(size) +
                     "-byte elements (its data starts at an odd address); pass an aligned copy");
}

void check_last_dim_contiguous(const TensorView& t, const char* name) {
  if (t.numel() == 0) return;  // nothing is read; exporters give empty arrays any strides
  if (t.ndim > 0 && t.shape[t.ndim - 1] > 1 && t.strides[t.ndim - 1] != 1)
    throw ValueError(std::string("`") + name +
                     "` must have a unit stride in its last dimension (got stride " +
                     std::to_string(t.strides[t.ndim - 1]) + "); pass a contiguous copy");
  for (int i = 0; i < t.ndim; ++i)
    if (t.strides[i] < 0)
      throw ValueError(std::string("`") + name + "` must not have negative strides");
}

void check_contiguous(const TensorView& t, const char* name) {
  if (!t.is_contiguous())
    throw ValueError(std::string("`") + name + "` must be C-contiguous (row-major, no gaps)");
}

namespace {
// True when row_ok(first element's bytes, length, byte stride) holds for every row (the last
// dimension) of t. Walks the outer strides once per row (the view may be non-contiguous,
// broadcast or transposed), so the per-element work is a plain loop.
template <class RowOk>
bool all_rows(const TensorView& t, RowOk row_ok) {
  if (t.numel() == 0) return true;
  const int nd = t.ndim;
  const int64_t es = (int64_t)dtype_size(t.dtype);
  const int64_t inner = nd ? t.shape[nd - 1] : 1, istride = (nd ? t.strides[nd - 1] : 1) * es;
  const int64_t rows = t.numel() / inner;
  int64_t idx[kMaxDims] = {0};
  for (int64_t r = 0; r < rows; ++r) {
    int64_t off = 0;
    for (int k = 0; k + 1 < nd; ++k) off += idx[k] * t.strides[k];
    if (!row_ok(static_cast<const uint8_t*>(t.data) + off * es, inner, istride)) return false;
    for (int k = nd - 2; k >= 0; --k) {
      if (++idx[k] < t.shape[k]) break;
      idx[k] = 0;
    }
  }
  return true;
}

// True when every element, loaded as float, passes `ok`.
template <class Load, class Ok>
bool all_elements(const TensorView& t, Load load, Ok ok) {
  return all_rows(t, [&](const uint8_t* p, int64_t n, int64_t stride) {
    for (int64_t i = 0; i < n; ++i)
      if (!ok(load(p + i * stride))) return false;
    return true;
  });
}

template <class Ok>
bool all_floats(const TensorView& t, Ok ok) {
  switch (t.dtype) {
    case DType::f32:
      return all_elements(t, [](const uint8_t* p) { float f; std::memcpy(&f, p, 4); return f; }, ok);
    case DType::f16:
      return all_elements(t, [](const uint8_t* p) { uint16_t h; std::memcpy(&h, p, 2); return half_to_float(h); }, ok);
    case DType::bf16:
      return all_elements(t, [](const uint8_t* p) { uint16_t h; std::memcpy(&h, p, 2); return bf16_to_float(h); }, ok);
    default: return true;
  }
}

// True when no element's exponent bits are all ones (NaN or Inf), tested on the raw bits of
// the storage type: no conversion (that and the per-element index walk, with the scalar
// output store, were ~40% of a small CPU decode call, 2026-11-23).
template <class U>
bool all_finite_bits(const TensorView& t, U exp_mask) {
  return all_rows(t, [exp_mask](const uint8_t* p, int64_t n, int64_t stride) {
    bool bad = false;
    for (int64_t i = 0; i < n; ++i) {
      U x;
      std::memcpy(&x, p + i * stride, sizeof(U));
      bad |= (x & exp_mask) == exp_mask;
    }
    return !bad;
  });
}
}  // namespace

void check_finite(const TensorView& t, const char* name) {
  bool ok = true;
  switch (t.dtype) {
    case DType::f32: ok = all_finite_bits<uint32_t>(t, 0x7f800000u); break;
    case DType::f16: ok = all_finite_bits<uint16_t>(t, (uint16_t)0x7c00u); break;
    case DType::bf16: ok = all_finite_bits<uint16_t>(t, (uint16_t)0x7f80u); break;
    default: break;
  }
  if (!ok) throw ValueError(std::string("`") + name + "` contains NaN or Inf values");
}

void check_storable(const TensorView& t, const char* name, DType storage) {
  check_finite(t, name);
  // Only a narrower storage type can overflow: float16 rounds |x| >= 65520 to Inf, bfloat16
  // rounds |x| >= 0x7f7f8000 (about 3.396e38) to Inf; float32 holds every finite input.
  float limit = 0;
  const char* range = "";
  if (storage == DType::f16 && t.dtype != DType::f16) {
    limit = 65520.f;
    range = "65504";
  } else if (storage == DType::bf16 && t.dtype == DType::f32) {
    const uint32_t bits = 0x7f7f8000u;
    std::memcpy(&limit, &bits, 4);
    range = "3.39e38";
  } else {
    return;
  }
  if (!all_floats(t, [limit](float x) { return std::fabs(x) < limit; }))
    throw ValueError(std::string("`") + name + "` holds values beyond the range of the " +
                     dtype_name(storage) + " KV storage (|x| <= " + range +
                     "); they would be stored as Inf: scale them or use dtype='float32'");
}

void check_no_overlap(const TensorView& t, const char* name) {
  if (t.numel() == 0) return;
  // Sufficient test: sorted by stride, each dimension's stride exceeds the furthest offset
  // the smaller-stride dimensions reach. Extent-1 dimensions never overlap.
  std::vector<std::pair<int64_t, int64_t>> dims;  // (|stride|, extent)
  for (int i = 0; i < t.ndim; ++i)
    if (t.shape[i] > 1) dims.push_back({t.strides[i] < 0 ? -t.strides[i] : t.strides[i], t.shape[i]});
  std::sort(dims.begin(), dims.end());
  int64_t reach = 0;
  for (const auto& d : dims) {
    if (d.first <= reach || d.first == 0)
      throw ValueError(std::string("`") + name + "` has overlapping elements (strides " +
                       [&] {
                         std::ostringstream s;
                         s << "[";
                         for (int i = 0; i < t.ndim; ++i) s << (i ? ", " : "") << t.strides[i];
                         s << "]";
                         return s.str();
                       }() + " for shape " + t.shape_str() + "); pass a writable array with distinct elements");
    reach += (d.second - 1) * d.first;
  }
}

namespace {
// The half -> float loop is the inner loop of every K/V read. GCC converts _Float16 one
// element at a time even in the AVX2 clone, so the F16C path is written with intrinsics and
// picked once by a CPU check; elsewhere the portable bit-exact conversion is used.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(TACTIC_NO_CLONES)
__attribute__((target("avx,f16c")))
void load_half_f16c(const uint16_t* s, int64_t n, float* dst) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))));
  for (; i < n; ++i) dst[i] = half_to_float(s[i]);
}
__attribute__((target("avx,f16c")))
void store_half_f16c(const float* s, int64_t n, uint16_t* dst) {
  int64_t i = 0;  // round to nearest even, as float_to_half (the two differ only in NaN payloads)
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm256_cvtps_ph(_mm256_loadu_ps(s + i), _MM_FROUND_TO_NEAREST_INT));
  for (; i < n; ++i) dst[i] = float_to_half(s[i]);
}
bool has_f16c() {
  static const bool yes = [] {
    __builtin_cpu_init();  // may run before libgcc's own constructor
    return __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx");
  }();
  return yes;
}
#endif

void load_half(const uint16_t* s, int64_t n, float* dst) {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(TACTIC_NO_CLONES)
  if (has_f16c()) return load_half_f16c(s, n, dst);
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = half_to_float(s[i]);
}
TACTIC_HOT
void load_bf16(const uint16_t* s, int64_t n, float* dst) {
  uint32_t* d = reinterpret_cast<uint32_t*>(dst);
  for (int64_t i = 0; i < n; ++i) d[i] = (uint32_t)s[i] << 16;
}
}  // namespace

void load_floats(const void* src, DType dtype, int64_t n, float* dst) {
  switch (dtype) {
    case DType::f32: std::memcpy(dst, src, n * 4); break;
    case DType::f16: load_half(static_cast<const uint16_t*>(src), n, dst); break;
    case DType::bf16: load_bf16(static_cast<const uint16_t*>(src), n, dst); break;
    default: throw TypeError(std::string("cannot load ") + dtype_name(dtype) + " as float");
  }
}

void store_floats(const float* src, int64_t n, DType dtype, void* dst) {
  switch (dtype) {
    case DType::f32: std::memcpy(dst, src, n * 4); break;
    case DType::f16: {
      uint16_t* d = static_cast<uint16_t*>(dst);
#if defined(__x86_64__) && defined(__GNUC__) && !defined(TACTIC_NO_CLONES)
      if (has_f16c()) {
        store_half_f16c(src, n, d);
        break;
      }
#endif
      for (int64_t i = 0; i < n; ++i) d[i] = float_to_half(src[i]);
      break;
    }
    case DType::bf16: {
      uint16_t* d = static_cast<uint16_t*>(dst);
      for (int64_t i = 0; i < n; ++i) d[i] = float_to_bf16(src[i]);
      break;
    }
    default: throw TypeError(std::string("cannot store float as ") + dtype_name(dtype));
  }
}

}  // namespace tactic
