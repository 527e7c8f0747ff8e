// Device self-test of the split-KV decode attention (cuda/attention*.cu) against a float64 host
// reference computed here. Build and run from the repository root (as bench/run_gpu.sh selftest
// does; capabilities.cu, for kernel_arch, brings in the selection's files):
//
//   nvcc -std=c++17 -O2 -arch=sm_90 -DTACTIC_VERSION=\"selftest\" -Icpp/include -Icpp/src -Icuda -Xcompiler -fopenmp \
//     tests/cuda/attention_check.cu cuda/attention*.cu cuda/capabilities.cu cuda/select*.cu cpp/src/*.cpp -o /tmp/attention_check
//   /tmp/attention_check           # all cases + timing; exit status 0 only if every case passes
//   /tmp/attention_check --quick   # no count-32768 items, no timing
//
// Cases: K/V in f32, f16, bf16; g in {1, 3, 4, 8, 16}; d in {64, 80, 128, 256}; batch 2 with
// 2 or 3 KV heads; per-item counts from {0, 1, 2, 17, 256, 257, 511, 1000, 4097, 32768}; each
// case runs dense (rows = nullptr) and with sparse row lists (random clusters of 1..40
// contiguous rows, ascending, like a re-indexed store), with max_count = cap (as the decoder
// passes it), head_index a permutation of the store heads, and workspace/out poisoned with
// NaN beforehand. About every 9th row has a key that gives a -inf-like score (-60000 on the
// bias channel, q[0] = 1), including whole chunks (rows 512..1023). Some cases write f16 / bf16
// outputs with padded strides. Also: a CUDA-graph capture replayed with changed device counts,
// an unsupported head dim, and the timing of dense 1 x 8 x 4 x 128 x 32K fp16.
//
// Error metric per (item, query head): ||out - ref||_2 / ||ref||_2; items with count 0 must be
// exactly zero. Tolerances: f32 K/V 2e-5, f16/bf16 K/V 2e-3 (outputs in f32); f16 outputs
// 2e-3, bf16 outputs 8e-3 (their own rounding).
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <string>
#include <vector>

#include "attention.hpp"
#include "tactic/convert.hpp"
#include "tactic/error.hpp"
#include "tactic/tensor.hpp"

using namespace tactic;

#define CK(call)                                                                          \
  do {                                                                                    \
    cudaError_t e_ = (call);                                                              \
    if (e_ != cudaSuccess) {                                                              \
      std::fprintf(stderr, "CUDA error %s at %s:%d: %s\n", #call, __FILE__, __LINE__,     \
                   cudaGetErrorString(e_));                                               \
      std::exit(2);                                                                       \
    }                                                                                     \
  } while (0)

namespace {

struct Rng {
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed * 0x9E3779B97F4A7C15ull + 0x1234567ull) {}
  uint64_t next() {  // splitmix64
    uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  float uniform(float lo, float hi) { return lo + (hi - lo) * (float)((next() >> 40) * (1.0 / 16777216.0)); }
  int64_t below(int64_t n) { return (int64_t)(next() % (uint64_t)n); }
};

// Rows whose key gets -60000 on channel 0 (score ~ -60000 * q[0]): runs of 97 rows and the
// whole chunks 2 and 3. Rows below 64 stay normal so every selection has a finite-score row
// (a softmax over only -60000-ish scores is ill-conditioned in fp32, not a kernel property).
bool special_row(int64_t r) { return r >= 64 && (((r / 97) % 11) == 5 || (r >= 512 && r < 1024)); }

uint16_t to_bits(float x, DType dt) { return dt == DType::f16 ? float_to_half(x) : float_to_bf16(x); }
float from_bits(uint16_t b, DType dt) { return dt == DType::f16 ? half_to_float(b) : bf16_to_float(b); }

// A KV store of `heads` heads x `cap` rows x d on host (rounded values as float) and device.
struct Store {
  DType dt;
  int64_t heads, cap, d;
  std::vector<float> k, v;  // values after rounding to dt
  void* dk = nullptr;
  void* dv = nullptr;
  Store(DType dt_, int64_t heads_, int64_t cap_, int64_t d_, uint64_t seed)
      : dt(dt_), heads(heads_), cap(cap_), d(d_) {
    const size_t n = (size_t)(heads * cap * d);
    k.resize(n);
    v.resize(n);
    Rng rng(seed);
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t r = 0; r < cap; ++r) {
        float* kr = &k[(size_t)((h * cap + r) * d)];
        float* vr = &v[(size_t)((h * cap + r) * d)];
        for (int64_t e = 0; e < d; ++e) {
          kr[e] = rng.uniform(-1.f, 1.f);
          vr[e] = rng.uniform(-1.f, 1.f);
        }
        if (special_row(r)) kr[0] = -60000.f;
      }
    const size_t es = dt == DType::f32 ? 4 : 2;
    CK(cudaMalloc(&dk, n * es));
    CK(cudaMalloc(&dv, n * es));
    if (dt == DType::f32) {
      CK(cudaMemcpy(dk, k.data(), n * 4, cudaMemcpyHostToDevice));
      CK(cudaMemcpy(dv, v.data(), n * 4, cudaMemcpyHostToDevice));
    } else {
      std::vector<uint16_t> b(n);
      for (size_t x = 0; x < n; ++x) {
        b[x] = to_bits(k[x], dt);
        k[x] = from_bits(b[x], dt);
      }
      CK(cudaMemcpy(dk, b.data(), n * 2, cudaMemcpyHostToDevice));
      for (size_t x = 0; x < n; ++x) {
        b[x] = to_bits(v[x], dt);
        v[x] = from_bits(b[x], dt);
      }
      CK(cudaMemcpy(dv, b.data(), n * 2, cudaMemcpyHostToDevice));
    }
  }
  ~Store() {
    cudaFree(dk);
    cudaFree(dv);
  }
  Store(const Store&) = delete;
  Store& operator=(const Store&) = delete;
};

// Ascending rows of `n` rows out of [0, cap): the store is cut into clusters of 1..40
// contiguous rows, clusters are taken in random order (the one holding row 3 first) until n
// rows are reached (the last one truncated), then sorted.
std::vector<int32_t> sparse_rows(int64_t n, int64_t cap, Rng& rng) {
  std::vector<std::pair<int64_t, int64_t>> clusters;  // [begin, end)
  for (int64_t r = 0; r < cap;) {
    const int64_t len = std::min<int64_t>(1 + rng.below(40), cap - r);
    clusters.push_back({r, r + len});
    r += len;
  }
  for (size_t x = clusters.size(); x > 1; --x) std::swap(clusters[x - 1], clusters[(size_t)rng.below((int64_t)x)]);
  for (size_t x = 0; x < clusters.size(); ++x)
    if (clusters[x].first <= 3 && 3 < clusters[x].second) std::swap(clusters[0], clusters[x]);
  std::vector<int32_t> rows;
  for (const auto& c : clusters) {
    for (int64_t r = c.first; r < c.second && (int64_t)rows.size() < n; ++r) rows.push_back((int32_t)r);
    if ((int64_t)rows.size() == n) break;
  }
  std::sort(rows.begin(), rows.end());
  return rows;
}

// Float64 reference: out[(i * g + j) * d + e] over the rows of item i.
void reference(const Store& st, const std::vector<float>& q, const std::vector<int32_t>& head_index,
               const std::vector<std::vector<int32_t>>& rows, int64_t g, std::vector<double>& out) {
  const int64_t items = (int64_t)rows.size(), d = st.d;
  out.assign((size_t)(items * g * d), 0.0);
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t i = 0; i < items; ++i) {
    const std::vector<int32_t>& rl = rows[(size_t)i];
    const int64_t n = (int64_t)rl.size();
    if (n == 0) continue;
    const int64_t hi = head_index[(size_t)i];
    std::vector<double> s((size_t)(n * g));
    for (int64_t x = 0; x < n; ++x) {
      const float* kr = &st.k[(size_t)((hi * st.cap + rl[(size_t)x]) * d)];
      for (int64_t j = 0; j < g; ++j) {
        const float* qj = &q[(size_t)((i * g + j) * d)];
        double acc = 0.0;
        for (int64_t e = 0; e < d; ++e) acc += (double)qj[e] * (double)kr[e];
        s[(size_t)(x * g + j)] = acc;
      }
    }
    for (int64_t j = 0; j < g; ++j) {
      double m = -INFINITY;
      for (int64_t x = 0; x < n; ++x) m = std::max(m, s[(size_t)(x * g + j)]);
      double z = 0.0;
      for (int64_t x = 0; x < n; ++x) {
        const double w = std::exp(s[(size_t)(x * g + j)] - m);
        s[(size_t)(x * g + j)] = w;
        z += w;
      }
      for (int64_t x = 0; x < n; ++x) s[(size_t)(x * g + j)] /= z;
    }
    double* o = &out[(size_t)(i * g * d)];
    for (int64_t x = 0; x < n; ++x) {
      const float* vr = &st.v[(size_t)((hi * st.cap + rl[(size_t)x]) * d)];
      for (int64_t j = 0; j < g; ++j) {
        const double w = s[(size_t)(x * g + j)];
        if (w == 0.0) continue;
        for (int64_t e = 0; e < d; ++e) o[j * d + e] += w * (double)vr[e];
      }
    }
  }
}

struct DevBuf {
  void* p = nullptr;
  size_t bytes = 0;
  explicit DevBuf(size_t b) : bytes(b) { CK(cudaMalloc(&p, std::max<size_t>(b, 16))); }
  ~DevBuf() { cudaFree(p); }
  DevBuf(const DevBuf&) = delete;
  DevBuf& operator=(const DevBuf&) = delete;
  template <class T> T* as() const { return static_cast<T*>(p); }
};

float load_out(const std::vector<uint8_t>& h, DType dt, int64_t idx) {
  if (dt == DType::f32) {
    float f;
    std::memcpy(&f, h.data() + idx * 4, 4);
    return f;
  }
  uint16_t b;
  std::memcpy(&b, h.data() + idx * 2, 2);
  return from_bits(b, dt);
}

struct Problem {
  int64_t batch, hkv, g, d;
  std::vector<int32_t> head_index;
  std::vector<float> q;
  std::vector<std::vector<int32_t>> rows;  // per item, what the kernel should attend
  bool dense;
  int64_t max_count;
  DType out_dt = DType::f32;
  int64_t out_stride_b = 0, out_stride_h = 0;
};

// Uploads everything, runs decode_attention (optionally through a captured graph, replayed
// after changing the device counts to `replay_rows`), compares with the reference.
struct Result {
  double max_err = 0.0;
  bool ok = true;
  std::string why;
};

Result check_output(const Problem& pb, const Store& st, const std::vector<uint8_t>& hout) {
  Result res;
  std::vector<double> ref;
  reference(st, pb.q, pb.head_index, pb.rows, pb.g, ref);
  const double tol_in = st.dt == DType::f32 ? 2e-5 : 2e-3;
  const double tol_out = pb.out_dt == DType::f32 ? 0.0 : pb.out_dt == DType::f16 ? 2e-3 : 8e-3;
  const double tol = std::max(tol_in, tol_out);
  const int64_t items = pb.batch * pb.hkv;
  for (int64_t i = 0; i < items && res.ok; ++i) {
    const int64_t b = i / pb.hkv, h = i % pb.hkv;
    for (int64_t j = 0; j < pb.g; ++j) {
      const int64_t base = b * pb.out_stride_b + (h * pb.g + j) * pb.out_stride_h;
      double num = 0.0, den = 0.0;
      bool finite = true, zero = true;
      for (int64_t e = 0; e < pb.d; ++e) {
        const double o = load_out(hout, pb.out_dt, base + e);
        const double r = ref[(size_t)((i * pb.g + j) * pb.d + e)];
        if (!std::isfinite(o)) finite = false;
        if (o != 0.0) zero = false;
        num += (o - r) * (o - r);
        den += r * r;
      }
      char buf[256];
      if (pb.rows[(size_t)i].empty()) {
        if (!zero) {
          std::snprintf(buf, sizeof buf, "item %lld head %lld: count 0 but output not all zero", (long long)i, (long long)j);
          res.ok = false;
          res.why = buf;
          break;
        }
        continue;
      }
      const double err = std::sqrt(num) / std::max(std::sqrt(den), 1e-30);
      res.max_err = std::max(res.max_err, finite ? err : INFINITY);
      if (!finite || !(err <= tol)) {
        std::snprintf(buf, sizeof buf, "item %lld (count %zu) head %lld: rel err %.3g > tol %.1g%s", (long long)i,
                      pb.rows[(size_t)i].size(), (long long)j, err, tol, finite ? "" : " (non-finite output)");
        res.ok = false;
        res.why = buf;
        break;
      }
    }
  }
  return res;
}

struct DeviceProblem {
  DevBuf head_index, q, rows, counts, ws, out;
  size_t out_bytes;
  int64_t rows_stride;
  DeviceProblem(const Problem& pb, const Store& st)
      : head_index(pb.head_index.size() * 4),
        q(pb.q.size() * 4),
        rows(pb.dense ? 16 : (size_t)(pb.batch * pb.hkv * pb.max_count) * 4),
        counts((size_t)(pb.batch * pb.hkv) * 4),
        ws(cuda::attention_workspace_bytes(pb.batch, pb.hkv, pb.g, pb.d, pb.max_count)),
        out(out_size(pb)),
        out_bytes(out_size(pb)),
        rows_stride(pb.max_count) {
    (void)st;
    CK(cudaMemcpy(head_index.p, pb.head_index.data(), head_index.bytes, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(q.p, pb.q.data(), q.bytes, cudaMemcpyHostToDevice));
    upload_rows(pb.rows, pb.dense);
  }
  static size_t out_size(const Problem& pb) {
    const size_t es = pb.out_dt == DType::f32 ? 4 : 2;
    return (size_t)((pb.batch - 1) * pb.out_stride_b + (pb.hkv * pb.g - 1) * pb.out_stride_h + pb.d) * es;
  }
  void upload_rows(const std::vector<std::vector<int32_t>>& rl, bool dense) {
    const int64_t items = (int64_t)rl.size();
    std::vector<int32_t> c((size_t)items);
    for (int64_t i = 0; i < items; ++i) c[(size_t)i] = (int32_t)rl[(size_t)i].size();
    CK(cudaMemcpy(counts.p, c.data(), c.size() * 4, cudaMemcpyHostToDevice));
    if (!dense) {
      // Entries past each count are a sentinel that faults if the kernel ever reads them.
      std::vector<int32_t> h((size_t)(items * rows_stride), INT32_MAX);
      for (int64_t i = 0; i < items; ++i)
        std::copy(rl[(size_t)i].begin(), rl[(size_t)i].end(), h.begin() + i * rows_stride);
      CK(cudaMemcpy(rows.p, h.data(), h.size() * 4, cudaMemcpyHostToDevice));
    }
  }
  void poison() {
    CK(cudaMemset(ws.p, 0xff, ws.bytes));  // NaN everywhere: a partial read before written shows
    CK(cudaMemset(out.p, 0xff, out_bytes));
  }
  cuda::AttentionArgs args(const Problem& pb, const Store& st, cudaStream_t stream) const {
    cuda::AttentionArgs a;
    a.k = st.dk;
    a.v = st.dv;
    a.kv_dtype = st.dt;
    a.cap = st.cap;
    a.d = pb.d;
    a.batch = pb.batch;
    a.hkv = pb.hkv;
    a.g = pb.g;
    a.head_index = head_index.as<int32_t>();
    a.q = q.as<float>();
    a.rows = pb.dense ? nullptr : rows.as<int32_t>();
    a.rows_stride = pb.dense ? 0 : rows_stride;
    a.counts = counts.as<int32_t>();
    a.max_count = pb.max_count;
    a.workspace = ws.as<float>();
    a.out = out.p;
    a.out_dtype = pb.out_dt;
    a.out_stride_b = pb.out_stride_b;
    a.out_stride_h = pb.out_stride_h;
    a.stream = stream;
    return a;
  }
  std::vector<uint8_t> download() const {
    std::vector<uint8_t> h(out_bytes);
    CK(cudaMemcpy(h.data(), out.p, out_bytes, cudaMemcpyDeviceToHost));
    return h;
  }
};

Problem make_problem(const Store& st, int64_t batch, int64_t hkv, int64_t g,
                     const std::vector<int64_t>& counts, bool dense, Rng& rng) {
  Problem pb;
  pb.batch = batch;
  pb.hkv = hkv;
  pb.g = g;
  pb.d = st.d;
  pb.dense = dense;
  pb.max_count = st.cap;  // like the decoder: the bound is the capacity, counts stay on device
  const int64_t items = batch * hkv;
  // Item i reads store head (3 i + 1) mod heads: not the identity.
  for (int64_t i = 0; i < items; ++i) pb.head_index.push_back((int32_t)((3 * i + 1) % st.heads));
  const float a = 6.f / std::sqrt((float)st.d);  // score std ~ 2: neither flat nor one-hot
  pb.q.resize((size_t)(items * g * st.d));
  for (size_t x = 0; x < pb.q.size(); ++x) pb.q[x] = (x % st.d == 0) ? 1.f : rng.uniform(-a, a);
  for (int64_t i = 0; i < items; ++i) {
    const int64_t n = counts[(size_t)i];
    if (dense) {
      std::vector<int32_t> r((size_t)n);
      std::iota(r.begin(), r.end(), 0);
      pb.rows.push_back(r);
    } else {
      pb.rows.push_back(sparse_rows(n, st.cap, rng));
    }
  }
  pb.out_stride_h = st.d;
  pb.out_stride_b = hkv * g * st.d;
  return pb;
}

const char* dname(DType dt) { return dtype_name(dt); }

int g_failures = 0;

void report(const std::string& name, const Result& r) {
  std::printf("%s %-78s max rel err %.3g%s%s\n", r.ok ? "PASS" : "FAIL", name.c_str(), r.max_err,
              r.ok ? "" : "  <- ", r.ok ? "" : r.why.c_str());
  std::fflush(stdout);
  if (!r.ok) ++g_failures;
}

Result run_direct(const Problem& pb, const Store& st) {
  DeviceProblem dp(pb, st);
  dp.poison();
  cuda::decode_attention(dp.args(pb, st, nullptr));
  CK(cudaGetLastError());
  CK(cudaDeviceSynchronize());
  return check_output(pb, st, dp.download());
}

// Captures one decode_attention into a graph, then replays it with two different sets of
// device counts / row lists: the graph must read them at replay time.
void graph_case(bool quick) {
  const int64_t d = 128, g = 4, batch = 2, hkv = 2, cap = quick ? 6000 : 20000;
  Store st(DType::f16, batch * hkv + 1, cap, d, 777);
  Rng rng(4242);
  Problem pa = make_problem(st, batch, hkv, g, {4097, 0, 300, 17}, false, rng);
  Problem pb2 = make_problem(st, batch, hkv, g, {5, 2000, 0, quick ? 5000 : 19000}, false, rng);
  pb2.q = pa.q;  // the graph holds pointers: only the device contents change
  DeviceProblem dp(pa, st);
  cudaStream_t s;
  CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  // Warm call first (as a decoder would before capturing), then capture.
  dp.poison();
  cuda::decode_attention(dp.args(pa, st, s));
  CK(cudaStreamSynchronize(s));
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
  cuda::decode_attention(dp.args(pa, st, s));
  CK(cudaStreamEndCapture(s, &graph));
  CK(cudaGraphInstantiate(&exec, graph, 0));
  dp.poison();
  CK(cudaGraphLaunch(exec, s));
  CK(cudaStreamSynchronize(s));
  report("graph replay 1 (f16, g 4, d 128, sparse, counts 4097/0/300/17)", check_output(pa, st, dp.download()));
  dp.upload_rows(pb2.rows, false);
  dp.poison();
  CK(cudaGraphLaunch(exec, s));
  CK(cudaStreamSynchronize(s));
  report("graph replay 2 (same graph, device counts changed to 5/2000/0/19000)", check_output(pb2, st, dp.download()));
  CK(cudaGraphExecDestroy(exec));
  CK(cudaGraphDestroy(graph));
  CK(cudaStreamDestroy(s));
}

void unsupported_case() {
  cuda::AttentionArgs a;
  a.d = 72;
  a.batch = 1;
  a.hkv = 1;
  a.g = 1;
  Result r;
  try {
    cuda::decode_attention(a);
    r.ok = false;
    r.why = "no exception for head dim 72";
  } catch (const UnsupportedError& e) {
    std::printf("     (message: %s)\n", e.what());
  } catch (const std::exception& e) {
    r.ok = false;
    r.why = std::string("wrong exception type: ") + e.what();
  }
  report("head dim 72 raises UnsupportedError", r);
}

double median(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  return v.size() % 2 ? v[v.size() / 2] : 0.5 * (v[v.size() / 2 - 1] + v[v.size() / 2]);
}

// Median time of one decode_attention (cudaEvents around each of 100 calls after warm-up).
double time_attention(const cuda::AttentionArgs& a) {
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  for (int w = 0; w < 20; ++w) cuda::decode_attention(a);
  CK(cudaDeviceSynchronize());
  std::vector<float> ms;
  for (int it = 0; it < 100; ++it) {
    CK(cudaEventRecord(e0, nullptr));
    cuda::decode_attention(a);
    CK(cudaEventRecord(e1, nullptr));
    CK(cudaEventSynchronize(e1));
    float t = 0.f;
    CK(cudaEventElapsedTime(&t, e0, e1));
    ms.push_back(t);
  }
  CK(cudaEventDestroy(e0));
  CK(cudaEventDestroy(e1));
  return median(ms) * 1e3;  // us
}

// Device-to-device copy bandwidth (read + write bytes / time), the practical HBM ceiling.
double copy_bandwidth_gbs() {
  const size_t bytes = (size_t)512 << 20;
  DevBuf a(bytes), b(bytes);
  CK(cudaMemset(a.p, 1, bytes));
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  for (int w = 0; w < 3; ++w) CK(cudaMemcpyAsync(b.p, a.p, bytes, cudaMemcpyDeviceToDevice));
  std::vector<float> ms;
  for (int it = 0; it < 20; ++it) {
    CK(cudaEventRecord(e0, nullptr));
    CK(cudaMemcpyAsync(b.p, a.p, bytes, cudaMemcpyDeviceToDevice));
    CK(cudaEventRecord(e1, nullptr));
    CK(cudaEventSynchronize(e1));
    float t = 0.f;
    CK(cudaEventElapsedTime(&t, e0, e1));
    ms.push_back(t);
  }
  CK(cudaEventDestroy(e0));
  CK(cudaEventDestroy(e1));
  return 2.0 * bytes / (median(ms) * 1e-3) / 1e9;
}

void timing(int64_t n, int64_t g, int64_t hkv) {
  const int64_t batch = 1, d = 128;
  Store st(DType::f16, hkv, n, d, 99);
  Rng rng(5);
  Problem pb = make_problem(st, batch, hkv, g, std::vector<int64_t>((size_t)hkv, n), true, rng);
  for (int64_t i = 0; i < hkv; ++i) pb.head_index[(size_t)i] = (int32_t)i;
  DeviceProblem dp(pb, st);
  dp.poison();
  const cuda::AttentionArgs a = dp.args(pb, st, nullptr);
  cuda::decode_attention(a);
  CK(cudaDeviceSynchronize());
  report("timing case output (dense 1 x 8 x 4 x 128 x 32768 f16)", check_output(pb, st, dp.download()));
  const double kv_bytes = 2.0 * batch * hkv * n * d * 2;  // K and V, fp16
  const double us = time_attention(a);
  const double copy = copy_bandwidth_gbs();
  std::printf("TIME dense batch 1, hkv %lld, g %lld, d 128, fp16, count %lld: median %.2f us, %.0f GB/s "
              "(K+V %.1f MB); device-to-device copy %.0f GB/s -> %.0f%% of it\n",
              (long long)hkv, (long long)g, (long long)n, us, kv_bytes / (us * 1e-6) / 1e9, kv_bytes / 1e6, copy, 100.0 * kv_bytes / (us * 1e-6) / 1e9 / copy);

  // The same rows through the gather path, with max_count 4x the counts (the decoder passes
  // the capacity): the persistent grid must not pay for the empty chunks.
  Problem ps = pb;
  ps.dense = false;
  ps.max_count = 4 * n;
  DeviceProblem dps(ps, st);
  const double us2 = time_attention(dps.args(ps, st, nullptr));
  std::printf("TIME same via row list (0..%lld), max_count %lld: median %.2f us, %.0f GB/s\n",
              (long long)(n - 1), (long long)(4 * n), us2,
              kv_bytes / (us2 * 1e-6) / 1e9);
  std::fflush(stdout);
}

}  // namespace

int main(int argc, char** argv) {
  bool quick = false, time_only = false;
  int64_t time_n = 32768, time_g = 4, time_hkv = 8;
  for (int x = 1; x < argc; ++x) {
    if (std::string(argv[x]) == "--quick") quick = true;
    if (std::string(argv[x]) == "--time-only") time_only = true;  // just the timing case
    if (std::string(argv[x]) == "--time-n" && x + 1 < argc) time_n = std::atoll(argv[++x]);
    if (std::string(argv[x]) == "--time-g" && x + 1 < argc) time_g = std::atoll(argv[++x]);
    if (std::string(argv[x]) == "--time-hkv" && x + 1 < argc) time_hkv = std::atoll(argv[++x]);
  }
  int dev = 0;
  CK(cudaGetDevice(&dev));
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, dev));
  std::printf("device: %s (%d SMs)\n", prop.name, prop.multiProcessorCount);
  if (time_only) {
    timing(time_n, time_g, time_hkv);
    return g_failures ? 1 : 0;
  }

  const std::vector<int64_t> count_list = {0, 1, 17, 4097, 32768, 256, 257, 1000, 511, 2};
  const DType dts[] = {DType::f32, DType::f16, DType::bf16};
  const int64_t gs[] = {1, 3, 4, 8, 16};
  const int64_t ds[] = {64, 80, 128, 256};
  int k = 0;
  for (DType dt : dts)
    for (int64_t g : gs)
      for (int64_t d : ds) {
        const int64_t batch = 2, hkv = 2 + (k % 2), items = batch * hkv;
        std::vector<int64_t> counts;
        for (int64_t i = 0; i < items; ++i) {
          int64_t c = count_list[(size_t)((k * 3 + i * 7) % count_list.size())];
          if (quick && c > 4097) c = 4097;
          counts.push_back(c);
        }
        const int64_t maxc = *std::max_element(counts.begin(), counts.end());
        const int64_t cap = std::max<int64_t>(maxc + maxc / 4 + 64, 1100);
        Store st(dt, items + 1, cap, d, 1000 + k);
        for (int mode = 0; mode < 2; ++mode) {
          const bool dense = mode == 0;
          Rng rng(77 * k + mode);
          Problem pb = make_problem(st, batch, hkv, g, counts, dense, rng);
          std::string outs = "f32";
          if (k % 5 == 4) {  // 16-bit outputs with padded strides
            pb.out_dt = (k % 2) ? DType::bf16 : DType::f16;
            pb.out_stride_h = d + 16;
            pb.out_stride_b = hkv * g * (d + 16) + 32;
            outs = dname(pb.out_dt) + std::string(" strided");
          }
          std::string cs;
          for (int64_t c : counts) cs += (cs.empty() ? "" : "/") + std::to_string(c);
          char name[200];
          std::snprintf(name, sizeof name, "%-8s g %2lld d %3lld hkv %lld %-6s counts %s out %s", dname(dt),
                        (long long)g, (long long)d, (long long)hkv, dense ? "dense" : "sparse", cs.c_str(),
                        outs.c_str());
          report(name, run_direct(pb, st));
        }
        ++k;
      }

  graph_case(quick);
  unsupported_case();
  if (!quick) timing(time_n, time_g, time_hkv);

  if (g_failures) {
    std::printf("%d case(s) FAILED\n", g_failures);
    return 1;
  }
  std::printf("all cases passed\n");
  return 0;
}
