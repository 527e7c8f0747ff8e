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
using OutArray = nb::ndarray<>;

template <class A>
TensorView view_of(const A& a, const char* name) {
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
           [](PyDecoder& d, int64_t layer, int64_t slot, InArray k, InArray v) {
             TensorView kv = view_of(k, "keys"), vv = view_of(v, "values");
             locked(d, [&](Decoder& dec) { dec.prefill(layer, slot, kv, vv); });
           },
           nb::arg("layer"), nb::arg("slot"), nb::arg("keys"), nb::arg("values"))
      .def("check_prefill",
           [](PyDecoder& d, int64_t layer, int64_t slot, InArray k, InArray v) {
             TensorView kv = view_of(k, "keys"), vv = view_of(v, "values");
             locked(d, [&](Decoder& dec) { dec.check_prefill(layer, slot, kv, vv); });
           },
           nb::arg("layer"), nb::arg("slot"), nb::arg("keys"), nb::arg("values"))
      .def("decode",
           [](PyDecoder& d, int64_t layer, InArray q, std::optional<InArray> k, std::optional<InArray> v,
              std::optional<OutArray> out, std::vector<int64_t> slots, std::optional<InArray> budgets,
              bool append) {
             TensorView qv = view_of(q, "q"), kv, vv, ov, bv;
             if (k) kv = view_of(*k, "k_new");
             if (v) vv = view_of(*v, "v_new");
             if (out) ov = view_of(*out, "out");
             std::vector<int64_t> b;
             if (budgets) {
               bv = view_of(*budgets, "budget");
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
           [](PyDecoder& d, int64_t layer, InArray q, OutArray out, std::vector<int64_t> slots) {
             TensorView qv = view_of(q, "q"), ov = view_of(out, "out");
             locked(d, [&](Decoder& dec) { dec.attend(layer, qv, ov, slots); });
           },
           nb::arg("layer"), nb::arg("q"), nb::arg("out"), nb::arg("slots"))
      .def("set_target",
           [](PyDecoder& d, double target) { locked(d, [&](Decoder& dec) { dec.set_target(target); }); },
           nb::arg("target"))
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
        [](InArray x, int64_t num_clusters, int max_iters, const std::string& metric, uint64_t seed,
           int num_threads, OutArray centroids, OutArray assign) {
          KMeansOptions o;
          o.num_clusters = num_clusters;
          o.max_iters = max_iters;
          o.metric = parse_metric(metric);
          o.seed = seed;
          o.num_threads = num_threads;
          TensorView xv = view_of(x, "x"), cv = view_of(centroids, "centroids"), av = view_of(assign, "assign");
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
        [](InArray q, InArray k, InArray v, std::optional<InArray> lengths, OutArray out, double scale,
           int num_threads) {
          TensorView qv = view_of(q, "q"), kv = view_of(k, "keys"), vv = view_of(v, "values"),
                     ov = view_of(out, "out"), lv;
          if (lengths) lv = view_of(*lengths, "lengths");
          nb::gil_scoped_release release;
          dense_decode(qv, kv, vv, lengths ? &lv : nullptr, ov, scale, num_threads);
        },
        nb::arg("q"), nb::arg("keys"), nb::arg("values"), nb::arg("lengths").none(), nb::arg("out"),
        nb::arg("scale"), nb::arg("num_threads"));

  m.def("sparse_decode",
        [](InArray q, InArray k, InArray v, InArray mask, OutArray out, double scale, int num_threads) {
          TensorView qv = view_of(q, "q"), kv = view_of(k, "keys"), vv = view_of(v, "values"),
                     mv = view_of(mask, "mask"), ov = view_of(out, "out");
          nb::gil_scoped_release release;
          sparse_decode(qv, kv, vv, mv, ov, scale, num_threads);
        },
        nb::arg("q"), nb::arg("keys"), nb::arg("values"), nb::arg("mask"), nb::arg("out"), nb::arg("scale"),
        nb::arg("num_threads"));
}
