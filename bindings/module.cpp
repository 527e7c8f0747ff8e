// The nanobind module: DLPack-capable arrays (numpy, torch, CuPy, JAX, ...) become
// non-owning TensorViews with no copy; core errors become Python exceptions.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cstring>
#include <mutex>
#include <optional>
#include <vector>

#include "tactic/convert.hpp"
#include "tactic/decoder.hpp"
#include "tactic/kmeans.hpp"
#include "tactic/ops.hpp"

namespace nb = nanobind;
using namespace tactic;

namespace {

using InArray = nb::ndarray<nb::ro>;  // read-only inputs accepted (no copy either way)

template <class A>
TensorView view_of(const A& a, const char* name, bool bf16_bits = false) {
  TensorView t;
  t.data = const_cast<void*>(static_cast<const void*>(a.data()));
  const nb::dlpack::dtype dt = a.dtype();
  using C = nb::dlpack::dtype_code;
  if (dt.lanes != 1) t.dtype = DType::other;
  else if (dt.code == (uint8_t)C::Float && dt.bits == 32) t.dtype = DType::f32;
  else if (dt.code == (uint8_t)C::Float && dt.bits == 16) t.dtype = DType::f16;
  else if (dt.code == (uint8_t)C::Float && dt.bits == 64) t.dtype = DType::f64;
  else if (dt.code == (uint8_t)C::Bfloat && dt.bits == 16) t.dtype = DType::bf16;
  else if (dt.code == (uint8_t)C::Int && dt.bits == 32) t.dtype = DType::i32;
  else if (dt.code == (uint8_t)C::Int && dt.bits == 64) t.dtype = DType::i64;
  else if ((dt.code == (uint8_t)C::UInt || dt.code == (uint8_t)C::Bool) && dt.bits == 8) t.dtype = DType::u8;
  else t.dtype = DType::other;
  if (bf16_bits) t.dtype = DType::bf16;  // uint16 bits of a numpy (ml_dtypes) bfloat16 array
  const int dev = a.device_type();
  if (dev == nb::device::cpu::value) t.device = {DeviceKind::cpu, 0};
  else if (dev == nb::device::cuda::value) t.device = {DeviceKind::cuda, a.device_id()};
  else t.device = {DeviceKind::other, a.device_id()};
  if (a.ndim() > (size_t)kMaxDims)
    throw ValueError(std::string("`") + name + "` has too many dimensions (" + std::to_string(a.ndim()) + ")");
  t.ndim = (int)a.ndim();
  for (int i = 0; i < t.ndim; ++i) {
    t.shape[i] = (int64_t)a.shape(i);
    t.strides[i] = (int64_t)a.stride(i);
  }
  return t;
}

// numpy has no bfloat16 of its own, and ml_dtypes' bfloat16 arrays export neither DLPack nor a
// buffer format nanobind knows: such an array is read as its uint16 bits (same memory).
bool is_numpy_bfloat16(nb::handle obj) {
  static nb::object ndarray_type = nb::module_::import_("numpy").attr("ndarray");
  if (!PyObject_IsInstance(obj.ptr(), ndarray_type.ptr())) return false;
  nb::object dt = obj.attr("dtype");
  return nb::cast<std::string>(dt.attr("name")) == "bfloat16" && nb::cast<int>(dt.attr("itemsize")) == 2;
}

std::string describe(nb::handle obj) {
  nb::handle tp = (PyObject*)Py_TYPE(obj.ptr());
  std::string d = nb::cast<std::string>(tp.attr("__module__")) + "." + nb::cast<std::string>(tp.attr("__name__"));
  if (nb::hasattr(obj, "dtype")) {
    nb::object dt = obj.attr("dtype");
    d += std::string(" of dtype ") + nb::str(dt).c_str();
  }
  return d;
}

// An array argument imported through DLPack or the buffer protocol, never copied; `arr` keeps
// the producer's memory alive for the call. An object nanobind cannot import gets a TypeError
// that names the argument and says why (instead of an anonymous overload error).
struct Arg {
  InArray arr;
  TensorView view;
  explicit operator bool() const { return arr.is_valid(); }
};

Arg import_array(nb::handle obj, const char* name, bool writable) {
  Arg a;
  if (obj.is_none()) return a;
  nb::object src = nb::borrow(obj);
  const bool bf16 = is_numpy_bfloat16(obj);
  if (bf16) src = obj.attr("view")("uint16");
  bool ok;
  if (writable) {
    nb::ndarray<> w;
    ok = nb::try_cast(src, w, /*convert=*/false);
    if (ok) a.arr = InArray(w);
  } else {
    ok = nb::try_cast(src, a.arr, /*convert=*/false);
  }
  if (!ok) {
    std::string why;
    if (writable && nb::try_cast(src, a.arr, false)) {
      throw ValueError(std::string("`") + name + "` must be a writable array, got a read-only " + describe(obj));
    } else if (nb::hasattr(obj, "__dlpack__")) {
      try {
        (void)obj.attr("__dlpack__")();
        why = "its DLPack export was refused";
      } catch (nb::python_error& e) {
        nb::object ename = e.type().attr("__name__");
        why = std::string("its __dlpack__ raised ") + nb::str(ename).c_str() + ": " + nb::str(e.value()).c_str();
      }
    } else {
      why = "it supports neither DLPack nor the buffer protocol";
    }
    throw TypeError(std::string("`") + name + "` cannot be read without a copy (" + describe(obj) + "): " + why +
                    "; pass a numpy, torch, CuPy or JAX array of float16, bfloat16 or float32 (int32/int64 "
                    "for lengths and budgets, bool/uint8 for masks)");
  }
  a.view = view_of(a.arr, name, bf16);
  return a;
}

// A numpy array that owns a copy of `v` (stats are small and outlive the call).
template <class T>
nb::ndarray<nb::numpy, T> to_numpy(const std::vector<T>& v, std::vector<size_t> shape) {
  T* buf = new T[v.size() ? v.size() : 1];
  if (!v.empty()) std::memcpy(buf, v.data(), v.size() * sizeof(T));
  nb::capsule owner(buf, [](void* p) noexcept { delete[] static_cast<T*>(p); });
  return nb::ndarray<nb::numpy, T>(buf, shape.size(), shape.data(), owner);
}

// A Decoder plus the lock that serialises Python threads calling the same one.
struct PyDecoder {
  Decoder dec;
  std::mutex mu;
  explicit PyDecoder(const DecoderConfig& c) : dec(c) {}
};

// Run fn(decoder) without the GIL, holding the decoder's lock; returns fn's (C++) result.
template <class Fn>
auto locked(PyDecoder& d, Fn&& fn) {
  nb::gil_scoped_release release;
  std::lock_guard<std::mutex> guard(d.mu);
  return fn(d.dec);
}

DType parse_dtype(const std::string& s) {
  if (s == "float32" || s == "fp32" || s == "float") return DType::f32;
  if (s == "float16" || s == "fp16" || s == "half") return DType::f16;
  if (s == "bfloat16" || s == "bf16") return DType::bf16;
  throw TypeError("`dtype` must be 'float16', 'bfloat16' or 'float32', got '" + s + "'");
}

}  // namespace

void export_build_info(nb::module_& m);  // build_info.cpp

NB_MODULE(_core, m) {
  m.doc() = "Tactic C++ core (CPU backend)";
  m.attr("__version__") = TACTIC_VERSION;
#ifdef TACTIC_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
#ifdef _OPENMP
  m.attr("with_openmp") = true;
#else
  m.attr("with_openmp") = false;
#endif
  export_build_info(m);

  static nb::object capacity_error =
      nb::exception<CapacityError>(m, "CapacityError", PyExc_ValueError);
  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const CapacityError& e) {
      PyErr_SetString(capacity_error.ptr(), e.what());
    } catch (const TypeError& e) {
      PyErr_SetString(PyExc_TypeError, e.what());
    } catch (const ValueError& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    } catch (const UnsupportedError& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what());
    } catch (const Error& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what());
    }
  });

  nb::class_<DecoderConfig>(m, "DecoderConfig")
      .def(nb::init<>())
      .def_rw("num_layers", &DecoderConfig::num_layers)
      .def_rw("num_q_heads", &DecoderConfig::num_q_heads)
      .def_rw("num_kv_heads", &DecoderConfig::num_kv_heads)
      .def_rw("head_dim", &DecoderConfig::head_dim)
      .def_rw("max_batch", &DecoderConfig::max_batch)
      .def_rw("max_tokens", &DecoderConfig::max_tokens)
      .def_rw("cluster_size", &DecoderConfig::cluster_size)
      .def_rw("kmeans_iters", &DecoderConfig::kmeans_iters)
      .def_rw("seed", &DecoderConfig::seed)
      .def_rw("num_sink", &DecoderConfig::num_sink)
      .def_rw("recluster_interval", &DecoderConfig::recluster_interval)
      .def_rw("scale", &DecoderConfig::scale)
      .def_rw("record_selection", &DecoderConfig::record_selection)
      .def_rw("num_threads", &DecoderConfig::num_threads)
      .def("set_dtype", [](DecoderConfig& c, const std::string& s) { c.dtype = parse_dtype(s); })
      .def("set_policy", [](DecoderConfig& c, const std::string& s) { c.select.policy = parse_policy(s); })
      .def("set_estimator", [](DecoderConfig& c, const std::string& s) { c.select.estimator = parse_estimator(s); })
      .def("set_metric", [](DecoderConfig& c, const std::string& s) { c.metric = parse_metric(s); })
      .def("set_stop_rule", [](DecoderConfig& c, const std::string& s) { c.select.stop_rule = parse_stop_rule(s); })
      .def_prop_ro("stop_rule", [](DecoderConfig& c) { return std::string(stop_rule_name(c.select.stop_rule)); })
      .def_prop_rw("confidence", [](DecoderConfig& c) { return c.select.confidence; }, [](DecoderConfig& c, double v) { c.select.confidence = v; })
      .def_prop_rw("tail_samples", [](DecoderConfig& c) { return c.select.tail_samples; }, [](DecoderConfig& c, int64_t v) { c.select.tail_samples = v; })
      .def_prop_rw("group_head", [](DecoderConfig& c) { return c.select.group_head; }, [](DecoderConfig& c, bool v) { c.select.group_head = v; })
      .def_prop_rw("max_rounds", [](DecoderConfig& c) { return c.select.max_rounds; }, [](DecoderConfig& c, int v) { c.select.max_rounds = v; })
      .def("set_device", [](DecoderConfig& c, const std::string& kind, int index) {
        if (kind == "cpu") c.device = {DeviceKind::cpu, 0};
        else if (kind == "cuda") c.device = {DeviceKind::cuda, index};
        else throw ValueError("`device` must be 'cpu' or 'cuda[:N]', got '" + kind + "'");
      })
      .def_prop_rw("target", [](DecoderConfig& c) { return c.select.target; }, [](DecoderConfig& c, double v) { c.select.target = v; })
      .def_prop_rw("margin", [](DecoderConfig& c) { return c.select.margin; }, [](DecoderConfig& c, double v) { c.select.margin = v; })
      .def_prop_rw("spread", [](DecoderConfig& c) { return c.select.spread; }, [](DecoderConfig& c, double v) { c.select.spread = v; })
      .def_prop_rw("head_fraction", [](DecoderConfig& c) { return c.select.head_fraction; }, [](DecoderConfig& c, double v) { c.select.head_fraction = v; })
      .def_prop_rw("sample_fraction", [](DecoderConfig& c) { return c.select.sample_fraction; }, [](DecoderConfig& c, double v) { c.select.sample_fraction = v; })
      .def_prop_rw("sample_segments", [](DecoderConfig& c) { return c.select.sample_segments; }, [](DecoderConfig& c, int v) { c.select.sample_segments = v; })
      .def_prop_rw("min_clusters", [](DecoderConfig& c) { return c.select.min_clusters; }, [](DecoderConfig& c, int64_t v) { c.select.min_clusters = v; })
      .def_prop_rw("share_group", [](DecoderConfig& c) { return c.select.share_group; }, [](DecoderConfig& c, bool v) { c.select.share_group = v; })
      .def_prop_rw("budget", [](DecoderConfig& c) { return c.select.budget; }, [](DecoderConfig& c, int64_t v) { c.select.budget = v; })
      .def_prop_rw("page_size", [](DecoderConfig& c) { return c.select.page_size; }, [](DecoderConfig& c, int64_t v) { c.select.page_size = v; })
      .def_prop_rw("head_split", [](DecoderConfig& c) { return c.kernels.head_split; }, [](DecoderConfig& c, int v) { c.kernels.head_split = v; })
      .def_prop_rw("pdl", [](DecoderConfig& c) { return (int)c.kernels.pdl; }, [](DecoderConfig& c, int v) { c.kernels.pdl = (Switch)v; })
      .def("set_attention_kernel", [](DecoderConfig& c, const std::string& s) { c.kernels.attention = parse_attention_kernel(s); })
      .def("set_selection_kernel", [](DecoderConfig& c, const std::string& s) { c.kernels.selection = parse_selection_kernel(s); })
      .def("validate", &DecoderConfig::validate);

  // Every method releases the GIL for its C++ work (other Python threads run meanwhile) and
  // then takes the decoder's own lock, so calls on one decoder from several threads run one
  // at a time instead of racing on its store. Lock after releasing: a thread that waits for
  // the lock never holds the GIL that the lock's holder needs to return.
  nb::class_<PyDecoder>(m, "Decoder")
      .def("__init__",
           [](PyDecoder* self, const DecoderConfig& c) {
             nb::gil_scoped_release release;
             new (self) PyDecoder(c);
           },
           nb::arg("config"))
      .def("prefill",
           [](PyDecoder& d, int64_t layer, int64_t slot, nb::handle k, nb::handle v) {
             Arg ka = import_array(k, "keys", false), va = import_array(v, "values", false);
             locked(d, [&](Decoder& dec) { dec.prefill(layer, slot, ka.view, va.view); });
           },
           nb::arg("layer"), nb::arg("slot"), nb::arg("keys"), nb::arg("values"))
      .def("prefill_batch",
           // keys/values [B, N, Hkv, D]: sequence b's first lengths[b] rows go to slots[b]. The
           // per-sequence views point into the caller's arrays (no copy, any framework); every
           // sequence is checked before any is stored.
           [](PyDecoder& d, int64_t layer, std::vector<int64_t> slots, nb::handle k, nb::handle v,
              std::vector<int64_t> lengths) {
             Arg ka = import_array(k, "keys", false), va = import_array(v, "values", false);
             const DecoderConfig& c = d.dec.config();
             check_kv_layout(ka.view, "keys", true, c.num_kv_heads, c.num_q_heads, c.head_dim);
             check_kv_layout(va.view, "values", true, c.num_kv_heads, c.num_q_heads, c.head_dim);
             const TensorView& K = ka.view;
             check_shape(va.view, "values", {K.shape[0], K.shape[1], K.shape[2], K.shape[3]});
             if ((int64_t)slots.size() != K.shape[0] || lengths.size() != slots.size())
               throw ValueError("`seq` and `lengths` must hold " + std::to_string(K.shape[0]) + " entries");
             auto row_block = [](const TensorView& t, int64_t b, int64_t n) {
               TensorView r = t;
               r.data = static_cast<uint8_t*>(t.data) + b * t.strides[0] * (int64_t)dtype_size(t.dtype);
               r.ndim = 3;
               for (int i = 0; i < 3; ++i) {
                 r.shape[i] = t.shape[i + 1];
                 r.strides[i] = t.strides[i + 1];
               }
               r.shape[0] = n;
               return r;
             };
             std::vector<TensorView> ks, vs;
             for (size_t b = 0; b < slots.size(); ++b) {
               if (lengths[b] < 0 || lengths[b] > K.shape[1])
                 throw ValueError("`lengths` must be in [0, " + std::to_string(K.shape[1]) + "], got " +
                                  std::to_string(lengths[b]));
               ks.push_back(row_block(K, (int64_t)b, lengths[b]));
               vs.push_back(row_block(va.view, (int64_t)b, lengths[b]));
             }
             locked(d, [&](Decoder& dec) {
               for (size_t b = 0; b < slots.size(); ++b) dec.check_prefill(layer, slots[b], ks[b], vs[b]);
               for (size_t b = 0; b < slots.size(); ++b) dec.prefill(layer, slots[b], ks[b], vs[b]);
             });
           },
           nb::arg("layer"), nb::arg("slots"), nb::arg("keys"), nb::arg("values"), nb::arg("lengths"))
      .def("decode",
           [](PyDecoder& d, int64_t layer, nb::handle q_, nb::handle k_, nb::handle v_, nb::handle out_,
              std::vector<int64_t> slots, nb::handle budgets_, bool append) {
             Arg q = import_array(q_, "q", false), k = import_array(k_, "k_new", false),
                 v = import_array(v_, "v_new", false), out = import_array(out_, "out", true),
                 budgets = import_array(budgets_, "budget", false);
             TensorView qv = q.view, kv = k.view, vv = v.view, ov = out.view, bv;
             std::vector<int64_t> b;
             if (budgets) {
               bv = budgets.view;
               const int64_t want = (int64_t)slots.size() * d.dec.config().num_kv_heads;
               if (bv.dtype != DType::i64 || bv.device.kind != DeviceKind::cpu || !bv.is_contiguous() ||
                   bv.numel() != want)
                 throw ValueError("`budget` must be an int or a CPU int64 array of " + std::to_string(want) +
                                  " entries ([B, num_kv_heads])");
               b.assign(bv.ptr<int64_t>(), bv.ptr<int64_t>() + want);
             }
             locked(d, [&](Decoder& dec) {
               dec.decode(layer, qv, k ? &kv : nullptr, v ? &vv : nullptr, out ? &ov : nullptr, slots,
                          budgets ? b.data() : nullptr, append);
             });
           },
           nb::arg("layer"), nb::arg("q"), nb::arg("k_new").none(), nb::arg("v_new").none(),
           nb::arg("out").none(), nb::arg("slots"), nb::arg("budgets").none(), nb::arg("append"))
      .def("attend",
           [](PyDecoder& d, int64_t layer, nb::handle q_, nb::handle out_, std::vector<int64_t> slots) {
             Arg q = import_array(q_, "q", false), out = import_array(out_, "out", true);
             locked(d, [&](Decoder& dec) { dec.attend(layer, q.view, out.view, slots); });
           },
           nb::arg("layer"), nb::arg("q"), nb::arg("out"), nb::arg("slots"))
      .def("set_target",
           [](PyDecoder& d, double target) { locked(d, [&](Decoder& dec) { dec.set_target(target); }); },
           nb::arg("target"))
      .def("plan",
           [](PyDecoder& d) {
             const StepPlan p = locked(d, [&](Decoder& dec) { return dec.plan(); });
             nb::dict r;
             r["device"] = p.device;
             r["sm_count"] = p.sm_count;
             r["kernel_arch"] = p.kernel_arch;
             r["head_split"] = p.head_split;
             r["attention_kernel"] = attention_kernel_name(p.attention);
             r["score_kernel"] = attention_kernel_name(p.score);
             r["pdl"] = p.pdl;
             r["selection_kernel"] = selection_kernel_name(p.selection);
             return r;
           })
      .def("set_kernels",
           [](PyDecoder& d, int head_split, const std::string& attention, int pdl, const std::string& selection) {
             KernelOptions k;
             k.head_split = head_split;
             k.attention = parse_attention_kernel(attention);
             k.pdl = (Switch)pdl;
             k.selection = parse_selection_kernel(selection);
             locked(d, [&](Decoder& dec) { dec.set_kernels(k); });
           },
           nb::arg("head_split"), nb::arg("attention_kernel"), nb::arg("pdl"), nb::arg("selection_kernel"))
      .def("stats",
           [](PyDecoder& d, int64_t layer) {
             // A copy taken under the lock: the next decode of the layer replaces the original.
             const LayerStats s = locked(d, [&](Decoder& dec) { return dec.stats(layer); });
             const size_t B = s.batch, H = d.dec.config().num_kv_heads, Hq = d.dec.config().num_q_heads;
             nb::dict r;
             r["slots"] = to_numpy(s.slots, {B});
             r["context"] = to_numpy(s.context, {B});
             r["kv_tokens"] = to_numpy(s.kv_tokens, {B, H});
             r["head_tokens"] = to_numpy(s.head_tokens, {B, Hq});
             r["est_mass"] = to_numpy(s.est_mass, {B, Hq});
             if (!s.kv_mask.empty()) {
               r["kv_mask"] = to_numpy(s.kv_mask, {B, H, (size_t)s.mask_len});
               r["head_mask"] = to_numpy(s.head_mask, {B, Hq, (size_t)s.mask_len});
             }
             return r;
           },
           nb::arg("layer"))
      .def("length",
           [](PyDecoder& d, int64_t layer, int64_t slot) {
             return locked(d, [&](Decoder& dec) { return dec.length(layer, slot); });
           },
           nb::arg("layer"), nb::arg("slot"))
      .def("reset", [](PyDecoder& d, int64_t slot) { locked(d, [&](Decoder& dec) { dec.reset(slot); }); },
           nb::arg("slot"))
      .def("reset_all", [](PyDecoder& d) { locked(d, [&](Decoder& dec) { dec.reset_all(); }); })
      .def("recluster",
           [](PyDecoder& d, int64_t layer, int64_t slot) {
             locked(d, [&](Decoder& dec) { dec.recluster(layer, slot); });
           },
           nb::arg("layer"), nb::arg("slot"))
      .def("store_bytes", [](PyDecoder& d) { return d.dec.store_bytes(); })
      .def("set_stream",
           [](PyDecoder& d, uintptr_t s) {
             locked(d, [&](Decoder& dec) { dec.set_stream(reinterpret_cast<void*>(s)); });
           },
           nb::arg("stream"))
      .def("layout",
           [](PyDecoder& d, int64_t layer, int64_t slot, int64_t head) {
             // The physical layout of one (layer, slot, KV head), as copies (tests, debugging).
             struct Layout {
               SlotState ss;
               int64_t C = 0;
               std::vector<float> k, v, centroids, spreads;
               std::vector<int32_t> pos, offsets;
             };
             const int64_t D = d.dec.config().head_dim;
             const Layout lay = locked(d, [&](Decoder& dec) {
               (void)dec.length(layer, slot);  // checks layer and slot
               if (head < 0 || head >= dec.config().num_kv_heads)
                 throw ValueError("`head` must be in [0, " + std::to_string(dec.config().num_kv_heads) + "), got " +
                                  std::to_string(head));
               const KVStore& st = dec.store();
               Layout r;
               r.ss = st.state(layer, slot);
               const int64_t n = r.ss.total();
               r.C = st.num_clusters(layer, slot, head);
               r.k.resize(n * D);
               r.v.resize(n * D);
               for (int64_t i = 0; i < n; ++i) {
                 load_floats(st.k_row(layer, slot, head, i), dec.config().dtype, D, &r.k[i * D]);
                 load_floats(st.v_row(layer, slot, head, i), dec.config().dtype, D, &r.v[i * D]);
               }
               const int32_t* pos = st.positions(layer, slot, head);
               r.pos.assign(pos, pos + n);
               if (r.C > 0) {
                 const int32_t* off = st.offsets(layer, slot, head);
                 const float* c = st.centroids(layer, slot, head);
                 r.offsets.assign(off, off + r.C + 1);
                 r.centroids.assign(c, c + r.C * D);
                 const float* sp = st.spreads(layer, slot, head);
                 r.spreads.assign(sp, sp + r.C);
               }
               return r;
             });
             const size_t n = lay.pos.size();
             nb::dict r;
             r["n_sink"] = lay.ss.n_sink;
             r["n_clustered"] = lay.ss.n_clustered;
             r["n_recent"] = lay.ss.n_recent;
             r["positions"] = to_numpy(lay.pos, {n});
             r["keys"] = to_numpy(lay.k, {n, (size_t)D});
             r["values"] = to_numpy(lay.v, {n, (size_t)D});
             if (lay.C > 0) {
               r["offsets"] = to_numpy(lay.offsets, {(size_t)lay.C + 1});
               r["centroids"] = to_numpy(lay.centroids, {(size_t)lay.C, (size_t)D});
               r["spreads"] = to_numpy(lay.spreads, {(size_t)lay.C});
             }
             return r;
           },
           nb::arg("layer"), nb::arg("slot"), nb::arg("head"));

  m.def("kmeans",
        [](nb::handle x_, int64_t num_clusters, int max_iters, const std::string& metric, uint64_t seed,
           int num_threads, nb::handle centroids_, nb::handle assign_) {
          KMeansOptions o;
          o.num_clusters = num_clusters;
          o.max_iters = max_iters;
          o.metric = parse_metric(metric);
          o.seed = seed;
          o.num_threads = num_threads;
          Arg x = import_array(x_, "x", false), centroids = import_array(centroids_, "centroids", true),
              assign = import_array(assign_, "assign", true);
          TensorView xv = x.view, cv = centroids.view, av = assign.view;
          KMeansResult r;
          {
            nb::gil_scoped_release release;
            r = kmeans(xv, o, cv, av);
          }
          return std::make_pair(r.inertia, r.iterations);
        },
        nb::arg("x"), nb::arg("num_clusters"), nb::arg("max_iters"), nb::arg("metric"), nb::arg("seed"),
        nb::arg("num_threads"), nb::arg("centroids"), nb::arg("assign"));

  m.def("dense_decode",
        [](nb::handle q_, nb::handle k_, nb::handle v_, nb::handle lengths_, nb::handle out_, double scale,
           int num_threads) {
          Arg q = import_array(q_, "q", false), k = import_array(k_, "keys", false),
              v = import_array(v_, "values", false), lengths = import_array(lengths_, "lengths", false),
              out = import_array(out_, "out", true);
          nb::gil_scoped_release release;
          dense_decode(q.view, k.view, v.view, lengths ? &lengths.view : nullptr, out.view, scale, num_threads);
        },
        nb::arg("q"), nb::arg("keys"), nb::arg("values"), nb::arg("lengths").none(), nb::arg("out"),
        nb::arg("scale"), nb::arg("num_threads"));

  m.def("sparse_decode",
        [](nb::handle q_, nb::handle k_, nb::handle v_, nb::handle mask_, nb::handle out_, double scale,
           int num_threads) {
          Arg q = import_array(q_, "q", false), k = import_array(k_, "keys", false),
              v = import_array(v_, "values", false), mask = import_array(mask_, "mask", false),
              out = import_array(out_, "out", true);
          nb::gil_scoped_release release;
          sparse_decode(q.view, k.view, v.view, mask.view, out.view, scale, num_threads);
        },
        nb::arg("q"), nb::arg("keys"), nb::arg("values"), nb::arg("mask"), nb::arg("out"), nb::arg("scale"),
        nb::arg("num_threads"));

  m.def("check_kv_layout",
        [](nb::handle t, const std::string& name, bool batched, int64_t kv_heads, int64_t q_heads,
           int64_t head_dim) {
          Arg a = import_array(t, name.c_str(), false);
          check_kv_layout(a.view, name.c_str(), batched, kv_heads, q_heads, head_dim);
        },
        nb::arg("array"), nb::arg("name"), nb::arg("batched"), nb::arg("kv_heads"), nb::arg("q_heads"),
        nb::arg("head_dim"), "ValueError unless `array` is K/V in Tactic's token-major layout ([N, Hkv, D], "
        "batched [B, N, Hkv, D]); kv_heads 0: any divisor of q_heads; head_dim <= 0: any.");

  // What the core sees of an array (tests check that imports are zero-copy and typed right).
  m.def("view_info",
        [](nb::handle t, bool writable) {
          Arg a = import_array(t, "array", writable);
          nb::dict r;
          r["data"] = reinterpret_cast<uintptr_t>(a.view.data);
          r["dtype"] = dtype_name(a.view.dtype);
          r["device"] = device_name(a.view.device);
          std::vector<int64_t> shape(a.view.shape, a.view.shape + a.view.ndim),
              strides(a.view.strides, a.view.strides + a.view.ndim);
          r["shape"] = nb::tuple(nb::cast(shape));
          r["strides"] = nb::tuple(nb::cast(strides));
          return r;
        },
        nb::arg("array"), nb::arg("writable") = false);
}
