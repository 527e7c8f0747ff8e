// The nanobind module: DLPack-capable arrays (numpy, torch, CuPy, JAX, ...) become
// non-owning TensorViews with no copy; core errors become Python exceptions.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cstring>
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
      .def("set_device", [](DecoderConfig& c, const std::string& kind, int index) {
        if (kind == "cpu") c.device = {DeviceKind::cpu, 0};
        else if (kind == "cuda") c.device = {DeviceKind::cuda, index};
        else throw ValueError("`device` must be 'cpu' or 'cuda[:N]', got '" + kind + "'");
      })
      .def_prop_rw("target", [](DecoderConfig& c) { return c.select.target; }, [](DecoderConfig& c, double v) { c.select.target = v; })
      .def_prop_rw("margin", [](DecoderConfig& c) { return c.select.margin; }, [](DecoderConfig& c, double v) { c.select.margin = v; })
      .def_prop_rw("head_fraction", [](DecoderConfig& c) { return c.select.head_fraction; }, [](DecoderConfig& c, double v) { c.select.head_fraction = v; })
      .def_prop_rw("sample_fraction", [](DecoderConfig& c) { return c.select.sample_fraction; }, [](DecoderConfig& c, double v) { c.select.sample_fraction = v; })
      .def_prop_rw("sample_segments", [](DecoderConfig& c) { return c.select.sample_segments; }, [](DecoderConfig& c, int v) { c.select.sample_segments = v; })
      .def_prop_rw("min_clusters", [](DecoderConfig& c) { return c.select.min_clusters; }, [](DecoderConfig& c, int64_t v) { c.select.min_clusters = v; })
      .def_prop_rw("share_group", [](DecoderConfig& c) { return c.select.share_group; }, [](DecoderConfig& c, bool v) { c.select.share_group = v; })
      .def_prop_rw("budget", [](DecoderConfig& c) { return c.select.budget; }, [](DecoderConfig& c, int64_t v) { c.select.budget = v; })
      .def_prop_rw("page_size", [](DecoderConfig& c) { return c.select.page_size; }, [](DecoderConfig& c, int64_t v) { c.select.page_size = v; })
      .def("validate", &DecoderConfig::validate);

  nb::class_<Decoder>(m, "Decoder")
      .def(nb::init<const DecoderConfig&>(), nb::arg("config"))
      .def("prefill",
           [](Decoder& d, int64_t layer, int64_t slot, InArray k, InArray v) {
             TensorView kv = view_of(k, "keys"), vv = view_of(v, "values");
             nb::gil_scoped_release release;
             d.prefill(layer, slot, kv, vv);
           },
           nb::arg("layer"), nb::arg("slot"), nb::arg("keys"), nb::arg("values"))
      .def("check_prefill",
           [](const Decoder& d, int64_t layer, int64_t slot, InArray k, InArray v) {
             TensorView kv = view_of(k, "keys"), vv = view_of(v, "values");
             nb::gil_scoped_release release;
             d.check_prefill(layer, slot, kv, vv);
           },
           nb::arg("layer"), nb::arg("slot"), nb::arg("keys"), nb::arg("values"))
      .def("decode",
           [](Decoder& d, int64_t layer, InArray q, std::optional<InArray> k, std::optional<InArray> v,
              std::optional<OutArray> out, std::vector<int64_t> slots, std::optional<InArray> budgets,
              bool append) {
             TensorView qv = view_of(q, "q"), kv, vv, ov, bv;
             if (k) kv = view_of(*k, "k_new");
             if (v) vv = view_of(*v, "v_new");
             if (out) ov = view_of(*out, "out");
             std::vector<int64_t> b;
             if (budgets) {
               bv = view_of(*budgets, "budget");
               const int64_t want = (int64_t)slots.size() * d.config().num_kv_heads;
               if (bv.dtype != DType::i64 || !bv.is_contiguous() || bv.numel() != want)
                 throw ValueError("`budget` must be an int or an int64 array of " + std::to_string(want) +
                                  " entries ([B, num_kv_heads])");
               b.assign(bv.ptr<int64_t>(), bv.ptr<int64_t>() + want);
             }
             nb::gil_scoped_release release;
             d.decode(layer, qv, k ? &kv : nullptr, v ? &vv : nullptr, out ? &ov : nullptr, slots,
                      budgets ? b.data() : nullptr, append);
           },
           nb::arg("layer"), nb::arg("q"), nb::arg("k_new").none(), nb::arg("v_new").none(),
           nb::arg("out").none(), nb::arg("slots"), nb::arg("budgets").none(), nb::arg("append"))
      .def("attend",
           [](Decoder& d, int64_t layer, InArray q, OutArray out, std::vector<int64_t> slots) {
             TensorView qv = view_of(q, "q"), ov = view_of(out, "out");
             nb::gil_scoped_release release;
             d.attend(layer, qv, ov, slots);
           },
           nb::arg("layer"), nb::arg("q"), nb::arg("out"), nb::arg("slots"))
      .def("set_target", &Decoder::set_target, nb::arg("target"))
      .def("stats",
           [](const Decoder& d, int64_t layer) {
             const LayerStats& s = d.stats(layer);
             const size_t B = s.batch, H = d.config().num_kv_heads, Hq = d.config().num_q_heads;
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
      .def("length", &Decoder::length, nb::arg("layer"), nb::arg("slot"))
      .def("reset", &Decoder::reset, nb::arg("slot"))
      .def("reset_all", &Decoder::reset_all)
      .def("recluster", &Decoder::recluster, nb::arg("layer"), nb::arg("slot"))
      .def("store_bytes", &Decoder::store_bytes)
      .def("set_stream", [](Decoder& d, uintptr_t s) { d.set_stream(reinterpret_cast<void*>(s)); },
           nb::arg("stream"))
      .def("layout",
           [](const Decoder& d, int64_t layer, int64_t slot, int64_t head) {
             // The physical layout of one (layer, slot, KV head), as copies (tests, debugging).
             (void)d.length(layer, slot);
             if (head < 0 || head >= d.config().num_kv_heads)
               throw ValueError("`head` must be in [0, " + std::to_string(d.config().num_kv_heads) + ")");
             const KVStore& st = d.store();
             const SlotState& ss = st.state(layer, slot);
             const int64_t n = ss.total(), D = d.config().head_dim, C = st.num_clusters(layer, slot, head);
             std::vector<float> k(n * D), v(n * D);
             for (int64_t r = 0; r < n; ++r) {
               load_floats(st.k_row(layer, slot, head, r), d.config().dtype, D, &k[r * D]);
               load_floats(st.v_row(layer, slot, head, r), d.config().dtype, D, &v[r * D]);
             }
             const int32_t* pos = st.positions(layer, slot, head);
             nb::dict r;
             r["n_sink"] = ss.n_sink;
             r["n_clustered"] = ss.n_clustered;
             r["n_recent"] = ss.n_recent;
             r["positions"] = to_numpy(std::vector<int32_t>(pos, pos + n), {(size_t)n});
             r["keys"] = to_numpy(k, {(size_t)n, (size_t)D});
             r["values"] = to_numpy(v, {(size_t)n, (size_t)D});
             if (C > 0) {
               const int32_t* off = st.offsets(layer, slot, head);
               const float* c = st.centroids(layer, slot, head);
               r["offsets"] = to_numpy(std::vector<int32_t>(off, off + C + 1), {(size_t)C + 1});
               r["centroids"] = to_numpy(std::vector<float>(c, c + C * D), {(size_t)C, (size_t)D});
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
