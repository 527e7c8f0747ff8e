// Embedding Tactic from C++ with no Python: prefill a decoder with clustered random KV, run
// decode steps at several targets P, and check every output against an independent float64
// attention computed here.
//
// Checks, per (sequence, query head, step):
//   P = 1:  the decoder reads everything, so ||o - o_ref|| <= tol.
//   P < 1:  for the set U the head actually attended (its KV head's union, from the recorded
//           selection mask), ||o - o_ref|| <= 2 (1 - p(U)) max_i ||v_i|| + tol, where p(U) is
//           the true softmax mass of U computed here. The mean true mass of the query heads'
//           own sets must also reach P - 0.05 (the selector aims at P, not at "something").
//           Where a backend records no selection masks, only the next check bounds P < 1.
//   The mean error does not grow with P (0.5 -> 0.9 -> 1).
// Also: tactic::dense_decode over plain arrays, and a bad call that must throw tactic::Error
// and leave the decoder unchanged. Runs on the CPU, and on CUDA when the library was built
// with it (TACTIC_WITH_CUDA) and a device is present. Exit status 0 only if every check passed.
#include <tactic/convert.hpp>
#include <tactic/decoder.hpp>
#include <tactic/error.hpp>
#include <tactic/ops.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <random>
#include <string>
#include <vector>

#ifdef TACTIC_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace {

// Model geometry: G = 3 query heads per KV head, two layers, two sequences of odd lengths.
constexpr int64_t kLayers = 2, kHq = 6, kHkv = 2, kG = kHq / kHkv, kD = 64, kSteps = 4;
constexpr int64_t kPrompt[2] = {3001, 1777};
constexpr int64_t kBatch = 2;
constexpr int kCenters = 24;  // Gaussian-mixture components of the keys

int g_failures = 0, g_checks = 0;

void check(bool ok, const std::string& what) {
  ++g_checks;
  if (!ok) {
    ++g_failures;
    if (g_failures <= 20) std::printf("  FAIL: %s\n", what.c_str());
  }
}

// ---- synthetic KV with structure ----------------------------------------------------------
// Keys are drawn around a few centres per KV head and each query sits near one centre, so
// attention is skewed the way real heads are and a P < 1 selection is a real choice.
struct Sequence {
  int64_t prompt = 0;
  std::vector<float> k, v;  // [prompt + kSteps, Hkv, D]
  std::vector<float> q;     // [kSteps, Hq, D]
};

float round_to(tactic::DType dt, float x) {
  if (dt == tactic::DType::f16) return tactic::half_to_float(tactic::float_to_half(x));
  if (dt == tactic::DType::bf16) return tactic::bf16_to_float(tactic::float_to_bf16(x));
  return x;
}

Sequence make_sequence(int64_t prompt, uint64_t seed, tactic::DType dt) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::uniform_int_distribution<int> pick(0, kCenters - 1);
  std::vector<float> centers(kHkv * kCenters * kD);
  for (float& c : centers) c = normal(rng);
  Sequence s;
  s.prompt = prompt;
  const int64_t n = prompt + kSteps;
  s.k.resize(n * kHkv * kD);
  s.v.resize(n * kHkv * kD);
  s.q.resize(kSteps * kHq * kD);
  for (int64_t t = 0; t < n; ++t)
    for (int64_t h = 0; h < kHkv; ++h) {
      const float* c = &centers[(h * kCenters + pick(rng)) * kD];
      for (int64_t d = 0; d < kD; ++d) {
        s.k[(t * kHkv + h) * kD + d] = round_to(dt, c[d] + 0.6f * normal(rng));
        s.v[(t * kHkv + h) * kD + d] = round_to(dt, normal(rng));
      }
    }
  for (int64_t t = 0; t < kSteps; ++t)
    for (int64_t h = 0; h < kHq; ++h) {
      const float* c = &centers[((h / kG) * kCenters + pick(rng)) * kD];
      for (int64_t d = 0; d < kD; ++d)
        s.q[(t * kHq + h) * kD + d] = round_to(dt, 0.9f * c[d] + 0.7f * normal(rng));
    }
  return s;
}

// ---- the independent reference: float64 softmax attention of one query head -------------
struct Reference {
  std::vector<double> out;   // [D]
  std::vector<double> prob;  // [n] softmax probabilities
};

Reference reference(const Sequence& s, int64_t step, int64_t head) {
  const int64_t n = s.prompt + step + 1;  // the step's own token is appended before attending
  const int64_t hk = head / kG;
  const float* q = &s.q[(step * kHq + head) * kD];
  const double scale = 1.0 / std::sqrt((double)kD);
  Reference r;
  r.prob.resize(n);
  double m = -INFINITY;
  for (int64_t t = 0; t < n; ++t) {
    const float* k = &s.k[(t * kHkv + hk) * kD];
    double dot = 0;
    for (int64_t d = 0; d < kD; ++d) dot += (double)q[d] * k[d];
    r.prob[t] = dot * scale;
    m = std::max(m, r.prob[t]);
  }
  double z = 0;
  for (double& p : r.prob) z += (p = std::exp(p - m));
  r.out.assign(kD, 0.0);
  for (int64_t t = 0; t < n; ++t) {
    r.prob[t] /= z;
    const float* v = &s.v[(t * kHkv + hk) * kD];
    for (int64_t d = 0; d < kD; ++d) r.out[d] += r.prob[t] * v[d];
  }
  return r;
}

double max_value_norm(const Sequence& s, int64_t n, int64_t hk) {
  double best = 0;
  for (int64_t t = 0; t < n; ++t) {
    double sq = 0;
    for (int64_t d = 0; d < kD; ++d) sq += (double)s.v[(t * kHkv + hk) * kD + d] * s.v[(t * kHkv + hk) * kD + d];
    best = std::max(best, std::sqrt(sq));
  }
  return best;
}

// ---- memory the decoder reads: host vectors, or device buffers on CUDA --------------------
class Memory {
 public:
  explicit Memory(tactic::Device dev) : dev_(dev) {}
  Memory(const Memory&) = delete;
  Memory& operator=(const Memory&) = delete;
  ~Memory() {
#ifdef TACTIC_WITH_CUDA
    for (void* p : device_) cudaFree(p);
#endif
  }
  // A buffer holding `x` converted to `dt`, on this memory's device.
  void* upload(const std::vector<float>& x, tactic::DType dt) {
    std::vector<uint8_t> bytes(x.size() * tactic::dtype_size(dt));
    if (dt == tactic::DType::f32) std::memcpy(bytes.data(), x.data(), bytes.size());
    else tactic::store_floats(x.data(), (int64_t)x.size(), dt, bytes.data());
    void* p = allocate(bytes.size());
    copy(p, bytes.data(), bytes.size());
    return p;
  }
  void* allocate(std::size_t bytes) {
#ifdef TACTIC_WITH_CUDA
    if (dev_.kind == tactic::DeviceKind::cuda) {
      void* p = nullptr;
      if (cudaMalloc(&p, bytes) != cudaSuccess) throw std::runtime_error("cudaMalloc failed");
      device_.push_back(p);
      return p;
    }
#endif
    host_.emplace_back(bytes);
    return host_.back().data();
  }
  // Read `n` floats back to the host (waits for the device's work first).
  std::vector<float> download(const void* p, std::size_t n) {
    std::vector<float> out(n);
#ifdef TACTIC_WITH_CUDA
    if (dev_.kind == tactic::DeviceKind::cuda) {
      cudaDeviceSynchronize();
      if (cudaMemcpy(out.data(), p, n * sizeof(float), cudaMemcpyDeviceToHost) != cudaSuccess)
        throw std::runtime_error("cudaMemcpy to host failed");
      return out;
    }
#endif
    std::memcpy(out.data(), p, n * sizeof(float));
    return out;
  }

 private:
  void copy(void* dst, const void* src, std::size_t bytes) {
#ifdef TACTIC_WITH_CUDA
    if (dev_.kind == tactic::DeviceKind::cuda) {
      if (cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice) != cudaSuccess)
        throw std::runtime_error("cudaMemcpy to device failed");
      return;
    }
#endif
    std::memcpy(dst, src, bytes);
  }
  tactic::Device dev_;
  std::vector<std::vector<uint8_t>> host_;
  std::vector<void*> device_;
};

// ---- one run: a decoder at target P on `dev`, storage dtype `dt` --------------------------
struct Summary {
  double read = 0, own_mass = 0, union_mass = 0, max_err = 0, mean_err = 0, worst_ratio = 0;
  int64_t heads = 0, reached = 0;
  bool masks = false;  // the backend recorded selection masks (true masses known)
};

double tolerance(double vmax) {
  // Inputs are exact in every storage dtype (drawn already rounded) and the output is fp32,
  // so what is left is fp32 accumulation over a few thousand rows.
  return 2e-5 * vmax + 1e-6;
}

Summary run(tactic::Device dev, tactic::DType dt, double target,
            const std::vector<std::vector<Sequence>>& data /* [layer][slot] */) {
  using namespace tactic;
  DecoderConfig cfg;
  cfg.num_layers = kLayers;
  cfg.num_q_heads = kHq;
  cfg.num_kv_heads = kHkv;
  cfg.head_dim = kD;
  cfg.max_batch = kBatch;
  cfg.max_tokens = *std::max_element(kPrompt, kPrompt + kBatch) + kSteps;
  cfg.dtype = dt;
  cfg.device = dev;
  cfg.select.target = target;
  cfg.record_selection = true;  // masks in stats(): what each head read, for the bound
  cfg.seed = 7;
  Decoder dec(cfg);
  Memory mem(dev);

  for (int64_t layer = 0; layer < kLayers; ++layer)
    for (int64_t b = 0; b < kBatch; ++b) {
      const Sequence& s = data[layer][b];
      // The prompt is the first `prompt` tokens; the rest arrive one per decode step.
      std::vector<float> k(s.k.begin(), s.k.begin() + s.prompt * kHkv * kD);
      std::vector<float> v(s.v.begin(), s.v.begin() + s.prompt * kHkv * kD);
      dec.prefill(layer, b, make_view(mem.upload(k, dt), dt, {s.prompt, kHkv, kD}, dev),
                  make_view(mem.upload(v, dt), dt, {s.prompt, kHkv, kD}, dev));
    }

  Summary sum;
  const std::vector<int64_t> slots = {0, 1};
  for (int64_t step = 0; step < kSteps; ++step)
    for (int64_t layer = 0; layer < kLayers; ++layer) {
      // Pack this step's inputs of both sequences: q [B, Hq, D], k_new/v_new [B, Hkv, D].
      std::vector<float> q, kn, vn;
      for (int64_t b = 0; b < kBatch; ++b) {
        const Sequence& s = data[layer][b];
        const int64_t t = s.prompt + step;
        q.insert(q.end(), &s.q[step * kHq * kD], &s.q[(step + 1) * kHq * kD]);
        kn.insert(kn.end(), &s.k[t * kHkv * kD], &s.k[(t + 1) * kHkv * kD]);
        vn.insert(vn.end(), &s.v[t * kHkv * kD], &s.v[(t + 1) * kHkv * kD]);
      }
      const TensorView qv = make_view(mem.upload(q, dt), dt, {kBatch, kHq, kD}, dev);
      const TensorView kv = make_view(mem.upload(kn, dt), dt, {kBatch, kHkv, kD}, dev);
      const TensorView vv = make_view(mem.upload(vn, dt), dt, {kBatch, kHkv, kD}, dev);
      void* out_ptr = mem.allocate(kBatch * kHq * kD * sizeof(float));
      const TensorView ov = make_view(out_ptr, DType::f32, {kBatch, kHq, kD}, dev);
      dec.decode(layer, qv, &kv, &vv, &ov, slots);
      const std::vector<float> out = mem.download(out_ptr, kBatch * kHq * kD);

      const LayerStats& st = dec.stats(layer);
      for (int64_t b = 0; b < kBatch; ++b) {
        const Sequence& s = data[layer][b];
        const int64_t n = s.prompt + step + 1;
        check(st.context[b] == n, "stats().context");
        for (int64_t h = 0; h < kHq; ++h) {
          const int64_t hk = h / kG;
          const Reference ref = reference(s, step, h);
          double err2 = 0;
          for (int64_t d = 0; d < kD; ++d) {
            const double e = out[(b * kHq + h) * kD + d] - ref.out[d];
            err2 += e * e;
          }
          const double err = std::sqrt(err2), vmax = max_value_norm(s, n, hk);
          const double tol = tolerance(vmax);
          double bound = tol;
          std::string where = "P=" + std::to_string(target) + " layer " + std::to_string(layer) +
                              " seq " + std::to_string(b) + " head " + std::to_string(h) + " step " +
                              std::to_string(step);
          if (!st.kv_mask.empty()) {
            // Masks are over token positions; the union U is what this head attended.
            const uint8_t* um = &st.kv_mask[(b * kHkv + hk) * st.mask_len];
            const uint8_t* hm = &st.head_mask[(b * kHq + h) * st.mask_len];
            double pu = 0, ph = 0;
            for (int64_t t = 0; t < n; ++t) {
              if (um[t]) pu += ref.prob[t];
              if (hm[t]) ph += ref.prob[t];
            }
            bound = 2 * std::max(0.0, 1 - pu) * vmax + tol;
            sum.union_mass += pu;
            sum.own_mass += ph;
            sum.reached += ph >= target - 1e-9;
            sum.masks = true;
          } else {
            bound = 2 * vmax + tol;  // nothing known about the set: the trivial bound
          }
          if (target >= 1.0) bound = tol;
          check(err <= bound, where + ": |o - o_ref| = " + std::to_string(err) + " > bound " +
                                  std::to_string(bound));
          sum.max_err = std::max(sum.max_err, err);
          sum.mean_err += err;
          sum.worst_ratio = std::max(sum.worst_ratio, err / bound);
          ++sum.heads;
        }
        for (int64_t hk = 0; hk < kHkv; ++hk) sum.read += (double)st.kv_tokens[b * kHkv + hk] / n / kHkv;
      }
    }
  sum.read /= kSteps * kLayers * kBatch;
  sum.own_mass /= sum.heads;
  sum.union_mass /= sum.heads;
  sum.mean_err /= sum.heads;
  if (target < 1.0 && sum.masks)
    check(sum.own_mass >= target - 0.05,
          "P=" + std::to_string(target) + ": mean true mass of the heads' own sets " +
              std::to_string(sum.own_mass) + " is far below P");
  else
    check(sum.read > 0.999, "P=1 must read every token");
  return sum;
}

// tactic::dense_decode over plain host arrays: q [1, Hq, D], keys/values [1, N, Hkv, D].
void run_dense_op(tactic::DType dt, const Sequence& s) {
  using namespace tactic;
  Memory mem(Device{});
  const int64_t step = kSteps - 1, n = s.prompt + step + 1;
  std::vector<float> q(&s.q[step * kHq * kD], &s.q[(step + 1) * kHq * kD]);
  std::vector<float> k(s.k.begin(), s.k.begin() + n * kHkv * kD), v(s.v.begin(), s.v.begin() + n * kHkv * kD);
  std::vector<float> out(kHq * kD);
  dense_decode(make_view(mem.upload(q, dt), dt, {1, kHq, kD}), make_view(mem.upload(k, dt), dt, {1, n, kHkv, kD}),
               make_view(mem.upload(v, dt), dt, {1, n, kHkv, kD}), nullptr,
               make_view(out.data(), DType::f32, {1, kHq, kD}), /*scale: 1/sqrt(D)*/ 0.0);
  double worst = 0;
  for (int64_t h = 0; h < kHq; ++h) {
    const Reference ref = reference(s, step, h);
    double err2 = 0;
    for (int64_t d = 0; d < kD; ++d) err2 += std::pow(out[h * kD + d] - ref.out[d], 2);
    const double tol = tolerance(max_value_norm(s, n, h / kG));
    worst = std::max(worst, std::sqrt(err2) / tol);
    check(std::sqrt(err2) <= tol, std::string("dense_decode ") + dtype_name(dt) + " head " + std::to_string(h));
  }
  std::printf("  dense_decode %-8s error/tol %.3f\n", dtype_name(dt), worst);
}

// A call with bad input throws a tactic::Error naming the argument and changes nothing.
void run_bad_input() {
  using namespace tactic;
  DecoderConfig cfg;
  cfg.num_q_heads = kHq;
  cfg.num_kv_heads = kHkv;
  cfg.head_dim = kD;
  cfg.max_tokens = 64;
  Decoder dec(cfg);
  std::vector<float> kv(10 * kHkv * kD, 0.5f), q((kHq + 1) * kD, 0.1f), out(kHq * kD);
  dec.prefill(0, 0, make_view(kv.data(), DType::f32, {10, kHkv, kD}), make_view(kv.data(), DType::f32, {10, kHkv, kD}));
  const TensorView bad_q = make_view(q.data(), DType::f32, {1, kHq + 1, kD});  // one head too many
  const TensorView k1 = make_view(kv.data(), DType::f32, {1, kHkv, kD});
  const TensorView o = make_view(out.data(), DType::f32, {1, kHq, kD});
  std::string message;
  try {
    dec.decode(0, bad_q, &k1, &k1, &o, {0});
  } catch (const ValueError& e) {
    message = e.what();
  }
  check(message.find("`q`") != std::string::npos, "bad q must raise ValueError naming `q`, got '" + message + "'");
  check(dec.length(0, 0) == 10, "a failed decode must not append");
  std::printf("  bad input -> tactic::ValueError: %s\n", message.c_str());
}

bool run_device(tactic::Device dev, const char* label, const std::vector<tactic::DType>& dtypes) {
  for (tactic::DType dt : dtypes) {
    std::vector<std::vector<Sequence>> data(kLayers);
    for (int64_t layer = 0; layer < kLayers; ++layer)
      for (int64_t b = 0; b < kBatch; ++b) data[layer].push_back(make_sequence(kPrompt[b], 1000 + 10 * layer + b, dt));
    double last_err = INFINITY;
    for (double p : {0.5, 0.9, 1.0}) {
      Summary s;
      try {
        s = run(dev, dt, p, data);
      } catch (const tactic::UnsupportedError& e) {
        // The library was built with CUDA but this operation has no CUDA path (yet).
        std::printf("  %s: skipped: %s\n", label, e.what());
        return false;
      }
      if (s.masks)
        std::printf("  %-4s %-8s P=%.2f  read %5.1f%%  true mass own %.3f union %.3f  heads >= P %5.1f%%  "
                    "|o-o_ref| mean %.2e max %.2e  max err/bound %.3f\n",
                    label, tactic::dtype_name(dt), p, 100 * s.read, s.own_mass, s.union_mass,
                    100.0 * s.reached / s.heads, s.mean_err, s.max_err, s.worst_ratio);
      else
        std::printf("  %-4s %-8s P=%.2f  read %5.1f%%  (no selection masks)  |o-o_ref| mean %.2e max %.2e\n",
                    label, tactic::dtype_name(dt), p, 100 * s.read, s.mean_err, s.max_err);
      check(s.mean_err <= last_err * 1.05 + 1e-6,
            std::string(label) + " " + tactic::dtype_name(dt) + ": mean error grew from " +
                std::to_string(last_err) + " to " + std::to_string(s.mean_err) + " at P=" + std::to_string(p));
      last_err = s.mean_err;
    }
    if (dev.kind == tactic::DeviceKind::cpu) run_dense_op(dt, data[0][0]);
  }
  return true;
}

}  // namespace

int main() {
  std::printf("embed_demo: tactic %s, %lld layers, %lld q / %lld kv heads, head_dim %lld, prompts %lld and %lld, "
              "%lld decode steps\n",
              TACTIC_VERSION, (long long)kLayers, (long long)kHq, (long long)kHkv, (long long)kD,
              (long long)kPrompt[0], (long long)kPrompt[1], (long long)kSteps);
  const char* cuda_state = "not built";
  try {
    run_device(tactic::Device{tactic::DeviceKind::cpu, 0}, "cpu", {tactic::DType::f32, tactic::DType::f16});
    run_bad_input();
#ifdef TACTIC_WITH_CUDA
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
      cuda_state = "built, no device";
    } else {
      cuda_state = run_device(tactic::Device{tactic::DeviceKind::cuda, 0}, "cuda",
                              {tactic::DType::f16, tactic::DType::bf16})
                       ? "ran"
                       : "built, decoder unsupported";
    }
#endif
  } catch (const std::exception& e) {
    std::printf("  FAIL: unexpected exception: %s\n", e.what());
    ++g_failures;
  }
  std::printf("embed_demo: %s: %d checks, %d failed (CUDA: %s)\n", g_failures ? "FAIL" : "PASS", g_checks,
              g_failures, cuda_state);
  return g_failures ? 1 : 0;
}
