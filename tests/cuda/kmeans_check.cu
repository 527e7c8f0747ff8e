// Device self-test of the CUDA k-means + re-index (cuda/kmeans.cu) against the CPU reference
// tactic::kmeans. Build and run from the repository root:
//
//   nvcc -std=c++17 -O2 -arch=sm_90 -Icpp/include -Icpp/src -Icuda tests/cuda/kmeans_check.cu cuda/kmeans.cu cpp/src/*.cpp -Xcompiler -fopenmp -lgomp -o /tmp/kmeans_check
//   /tmp/kmeans_check            # all cases; exit status 0 only if every case passes
//   /tmp/kmeans_check --quick    # skip the n = 32768 cases (and the timing cases)
//   /tmp/kmeans_check --max-n N  # only the cases with n <= N
//   /tmp/kmeans_check --filter S # only the cases whose name contains S
//
// Each case: random Gaussian-mixture keys in the store rows [row0, row0 + n) of nprob heads
// (rows outside stay as sentinels), kmeans_reindex on the GPU, then
//  - final inertia within 1% of the CPU's tactic::kmeans with the same seed, and equal to the
//    inertia recomputed on the host from the GPU's own assignment;
//  - offsets monotone from 0 to n, equal to the histogram of the final assignment;
//  - centroids = member means (fp32 for Euclidean; plain mean of the raw keys for spherical,
//    0 for an empty cluster) within 1e-3 relative;
//  - re-index: K, V, pos rows are exactly the stable counting-sort permutation of the final
//    assignment (each original row once, cluster j's rows are those assigned j, original
//    order within a cluster); rows outside the range untouched.
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kmeans.hpp"
#include "tactic/convert.hpp"
#include "tactic/error.hpp"
#include "tactic/kmeans.hpp"
#include "tactic/options.hpp"

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

struct Case {
  std::string name;
  DType dtype = DType::f16;
  int64_t d = 64, n = 1000, nprob = 3;
  int64_t c = 0;  // 0: ceil(n / 16)
  bool spherical = false;
  int dup = 0;  // 1: 3/4 of the rows copy 7 rows (clusters go empty on the way);
                // 2: every row copies one of 20 rows (c > 20: clusters stay empty)
  bool reindex = true;
  bool with_pos = true;
  bool misalign = false;   // store base not 16-byte aligned: element-load paths
  int iters = 10;
  int64_t check_heads = -1;  // heads compared against the CPU (-1: all)
  int timed_runs = 0;        // extra timed runs (no inertia, no checks)
};

void to_dtype(const std::vector<float>& src, DType dt, std::vector<uint8_t>& dst) {
  const size_t es = dtype_size(dt);
  dst.resize(src.size() * es);
  for (size_t i = 0; i < src.size(); ++i) {
    if (dt == DType::f32) {
      std::memcpy(&dst[i * 4], &src[i], 4);
    } else {
      const uint16_t h = dt == DType::f16 ? float_to_half(src[i]) : float_to_bf16(src[i]);
      std::memcpy(&dst[i * 2], &h, 2);
    }
  }
}

std::vector<float> to_float_vec(const std::vector<uint8_t>& src, DType dt) {
  const size_t es = dtype_size(dt), count = src.size() / es;
  std::vector<float> out(count);
  load_floats(src.data(), dt, (int64_t)count, out.data());
  return out;
}

int failures = 0;

bool check(bool ok, const Case& cs, const std::string& what) {
  if (!ok) std::printf("    [%s] check failed: %s\n", cs.name.c_str(), what.c_str());
  return ok;
}

bool run_case(const Case& cs) {
  const int64_t d = cs.d, n = cs.n, np = cs.nprob;
  const int64_t c = std::min<int64_t>(cs.c > 0 ? cs.c : (n + 15) / 16, n);
  const int64_t row0 = 3, cap = row0 + n + 5;  // sinks before, spare rows after
  const size_t es = dtype_size(cs.dtype);
  const int64_t cent_stride = c * d + 8, off_stride = c + 3;
  const int64_t check_heads = cs.check_heads < 0 ? np : std::min(cs.check_heads, np);

  // ---- data: per head a Gaussian mixture (about 32 rows per component) ----
  std::mt19937_64 rng(1234 + n * 7 + d * 131 + (int)cs.dtype * 17 + cs.spherical * 5 + cs.dup * 3);
  std::normal_distribution<float> N01(0.f, 1.f);
  std::vector<float> kf((size_t)(np * cap * d)), vf(kf.size());
  for (auto& x : kf) x = 3.f * N01(rng);  // sentinels outside the range too
  for (auto& x : vf) x = N01(rng);
  for (int64_t p = 0; p < np; ++p) {
    const int64_t m = std::max<int64_t>(2, n / 32);
    std::vector<float> mu((size_t)(m * d));
    for (auto& x : mu) x = 2.f * N01(rng) + 0.5f;  // offset: spherical sees a non-centred cloud
    std::uniform_int_distribution<int64_t> pick(0, m - 1);
    for (int64_t r = 0; r < n; ++r) {
      float* x = &kf[(size_t)((p * cap + row0 + r) * d)];
      const int64_t comp = pick(rng);
      for (int64_t e = 0; e < d; ++e) x[e] = mu[(size_t)(comp * d + e)] + 0.6f * N01(rng);
    }
    const int64_t first_copy = cs.dup == 1 ? n / 4 : 20, distinct = cs.dup == 1 ? 7 : 20;
    if (cs.dup)
      for (int64_t r = first_copy; r < n; ++r)
        std::memcpy(&kf[(size_t)((p * cap + row0 + r) * d)],
                    &kf[(size_t)((p * cap + row0 + r % distinct) * d)], (size_t)d * sizeof(float));
  }
  std::vector<uint8_t> hk, hv;
  to_dtype(kf, cs.dtype, hk);
  to_dtype(vf, cs.dtype, hv);
  kf = to_float_vec(hk, cs.dtype);  // the values the store really holds
  std::vector<int32_t> hpos((size_t)(np * cap));
  for (int64_t i = 0; i < np * cap; ++i) hpos[(size_t)i] = (int32_t)(1000000 + i);
  std::vector<uint64_t> seeds((size_t)np);
  for (int64_t p = 0; p < np; ++p) seeds[(size_t)p] = 0x9E3779B97F4A7C15ull * (uint64_t)(p + 1) + (uint64_t)n;

  // ---- device buffers ----
  const size_t kv_bytes = hk.size(), shift = cs.misalign ? es : 0;
  uint8_t *dk_raw = nullptr, *dv_raw = nullptr;
  int32_t *dpos = nullptr, *doff = nullptr, *dassign = nullptr;
  float* dcent = nullptr;
  CK(cudaMalloc(&dk_raw, kv_bytes + 16));
  CK(cudaMalloc(&dv_raw, kv_bytes + 16));
  uint8_t* dk = dk_raw + shift;
  uint8_t* dv = dv_raw + shift;
  CK(cudaMalloc(&dpos, hpos.size() * 4));
  CK(cudaMalloc(&dcent, (size_t)(np * cent_stride) * 4));
  CK(cudaMalloc(&doff, (size_t)(np * off_stride) * 4));
  CK(cudaMalloc(&dassign, (size_t)(np * n) * 4));
  CK(cudaMemcpy(dk, hk.data(), kv_bytes, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dv, hv.data(), kv_bytes, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dpos, hpos.data(), hpos.size() * 4, cudaMemcpyHostToDevice));
  CK(cudaMemset(dcent, 0xff, (size_t)(np * cent_stride) * 4));  // NaN: catches unwritten
  CK(cudaMemset(doff, 0xff, (size_t)(np * off_stride) * 4));    // -1
  CK(cudaMemset(dassign, 0xff, (size_t)(np * n) * 4));
  cudaStream_t stream;
  CK(cudaStreamCreate(&stream));
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));

  cuda::KMeansReindexArgs a{};
  a.k = dk;
  a.v = dv;
  a.pos = cs.with_pos ? dpos : nullptr;
  a.dtype = cs.dtype;
  a.d = d;
  a.cap = cap;
  a.nprob = np;
  a.row0 = row0;
  a.n = n;
  a.c = cs.c > 0 ? cs.c : (n + 15) / 16;
  a.iters = cs.iters;
  a.spherical = cs.spherical;
  a.seeds = seeds.data();
  a.centroids = dcent;
  a.cent_stride = cent_stride;
  a.offsets = doff;
  a.off_stride = off_stride;
  a.reindex = cs.reindex;
  a.assign_out = dassign;
  std::vector<double> gpu_inertia((size_t)np, -1.0);
  a.inertia_out = gpu_inertia.data();
  a.stream = stream;

  CK(cudaEventRecord(e0, stream));
  try {
    cuda::kmeans_reindex(a);
  } catch (const std::exception& ex) {
    std::printf("FAIL %-40s threw: %s\n", cs.name.c_str(), ex.what());
    ++failures;
    return false;
  }
  CK(cudaEventRecord(e1, stream));
  CK(cudaStreamSynchronize(stream));
  CK(cudaGetLastError());
  float gpu_ms = 0.f;
  CK(cudaEventElapsedTime(&gpu_ms, e0, e1));

  std::vector<uint8_t> gk(kv_bytes), gv(kv_bytes);
  std::vector<int32_t> gpos(hpos.size()), goff((size_t)(np * off_stride)), gassign((size_t)(np * n));
  std::vector<float> gcent((size_t)(np * cent_stride));
  CK(cudaMemcpy(gk.data(), dk, kv_bytes, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(gv.data(), dv, kv_bytes, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(gpos.data(), dpos, gpos.size() * 4, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(goff.data(), doff, goff.size() * 4, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(gassign.data(), dassign, gassign.size() * 4, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(gcent.data(), dcent, gcent.size() * 4, cudaMemcpyDeviceToHost));

  bool ok = true;
  double worst_rel = 0.0, cpu_s = 0.0;
  int64_t empty_clusters = 0;  // in the final assignment, all heads (shows the re-seed path ran)
  const size_t row_bytes = (size_t)d * es;
  for (int64_t p = 0; p < np; ++p) {
    const int32_t* asg = &gassign[(size_t)(p * n)];
    const int32_t* off = &goff[(size_t)(p * off_stride)];
    bool assign_ok = true;
    for (int64_t i = 0; i < n; ++i) assign_ok &= asg[i] >= 0 && asg[i] < c;
    ok &= check(assign_ok, cs, "assignment out of [0, c) in head " + std::to_string(p));
    if (!assign_ok) break;

    // Offsets vs the CPU's stable counting sort of the GPU assignment.
    std::vector<int32_t> perm((size_t)n), ref_off((size_t)(c + 1));
    cluster_permutation(asg, n, c, perm.data(), ref_off.data());
    bool off_ok = off[0] == 0 && off[c] == n;
    for (int64_t j = 0; j <= c; ++j) off_ok &= off[j] == ref_off[(size_t)j];
    for (int64_t j = 0; j < c; ++j) off_ok &= off[j] <= off[j + 1];
    for (int64_t j = c + 1; j < off_stride; ++j) off_ok &= off[j] == -1;  // stride gap untouched
    ok &= check(off_ok, cs, "offsets wrong in head " + std::to_string(p));

    // Host means of the GPU's final members: raw keys, and unit keys for spherical.
    std::vector<double> mean_raw((size_t)(c * d), 0.0), mean_unit((size_t)(c * d), 0.0);
    std::vector<int64_t> cnt((size_t)c, 0);
    std::vector<float> unit((size_t)(n * d));
    double sumsq = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      const float* x = &kf[(size_t)((p * cap + row0 + i) * d)];
      double s = 0;
      for (int64_t e = 0; e < d; ++e) s += (double)x[e] * x[e];
      sumsq += s;
      const float inv = s > 0 ? (float)(1.0 / std::sqrt(s)) : 0.f;
      const int64_t j = asg[i];
      ++cnt[(size_t)j];
      for (int64_t e = 0; e < d; ++e) {
        unit[(size_t)(i * d + e)] = x[e] * inv;
        mean_raw[(size_t)(j * d + e)] += x[e];
        mean_unit[(size_t)(j * d + e)] += x[e] * inv;
      }
    }
    for (int64_t j = 0; j < c; ++j) empty_clusters += cnt[(size_t)j] == 0;
    bool cent_ok = true;
    std::vector<double> work((size_t)(c * d));  // the centroids the inertia refers to
    for (int64_t j = 0; j < c; ++j) {
      const float* g = &gcent[(size_t)(p * cent_stride + j * d)];
      if (cnt[(size_t)j] == 0) {
        for (int64_t e = 0; e < d; ++e)
          cent_ok &= cs.spherical ? g[e] == 0.f : std::isfinite(g[e]);
        continue;
      }
      double mx = 0, err = 0, nn = 0;
      for (int64_t e = 0; e < d; ++e) {
        const double m = mean_raw[(size_t)(j * d + e)] / (double)cnt[(size_t)j];
        mx = std::max(mx, std::fabs(m));
        err = std::max(err, std::fabs(m - (double)g[e]));  // NaN fails below
        if (!std::isfinite(g[e])) err = INFINITY;
        const double u = (cs.spherical ? mean_unit : mean_raw)[(size_t)(j * d + e)] / (double)cnt[(size_t)j];
        work[(size_t)(j * d + e)] = u;
        nn += u * u;
      }
      cent_ok &= err <= 1e-3 * mx + 1e-6;
      if (cs.spherical && nn > 0)
        for (int64_t e = 0; e < d; ++e) work[(size_t)(j * d + e)] /= std::sqrt(nn);
    }
    ok &= check(cent_ok, cs, "centroids are not the member means in head " + std::to_string(p));

    // Inertia recomputed on the host from the GPU assignment.
    double host_inertia = 0;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t j = asg[i];
      const float* x = cs.spherical ? &unit[(size_t)(i * d)] : &kf[(size_t)((p * cap + row0 + i) * d)];
      double s = 0, xx = 0;
      for (int64_t e = 0; e < d; ++e) {
        if (cs.spherical) {
          s += (double)x[e] * work[(size_t)(j * d + e)];
          xx += (double)x[e] * x[e];
        } else {
          const double t = (double)x[e] - work[(size_t)(j * d + e)];
          s += t * t;
        }
      }
      host_inertia += cs.spherical ? (xx > 0 ? 1.0 - s : 1.0) : s;
    }
    const double scale_abs = cs.spherical ? 1e-5 * (double)n : 1e-6 * sumsq;
    const double gi = gpu_inertia[(size_t)p];
    ok &= check(std::fabs(gi - host_inertia) <= 1e-4 * host_inertia + scale_abs, cs,
                "inertia_out " + std::to_string(gi) + " != host recomputation " + std::to_string(host_inertia) +
                    " in head " + std::to_string(p));

    // CPU reference with the same seed.
    if (p < check_heads) {
      KMeansOptions opt;
      opt.num_clusters = a.c;
      opt.max_iters = cs.iters;
      opt.metric = cs.spherical ? Metric::spherical : Metric::euclidean;
      opt.seed = seeds[(size_t)p];
      std::vector<float> ccpu((size_t)(c * d));
      std::vector<int32_t> acpu((size_t)n);
      const auto t0 = std::chrono::steady_clock::now();
      const KMeansResult r = kmeans(&hk[(size_t)((p * cap + row0) * d) * es], cs.dtype, n, d, d, opt, ccpu.data(),
                                    acpu.data());
      cpu_s += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      const double ci = r.inertia.back();
      const double rel = std::fabs(gi - ci) / std::max(ci, 1e-300);
      worst_rel = std::max(worst_rel, rel);
      ok &= check(std::fabs(gi - ci) <= 0.01 * ci + scale_abs, cs,
                  "GPU inertia " + std::to_string(gi) + " vs CPU " + std::to_string(ci) + " in head " +
                      std::to_string(p));
    }

    // Store contents: the permuted rows, sentinels untouched.
    bool store_ok = true;
    for (int64_t r = 0; r < cap; ++r) {
      const bool inside = r >= row0 && r < row0 + n;
      const int64_t src = (inside && cs.reindex) ? row0 + perm[(size_t)(r - row0)] : r;
      const size_t dst_at = (size_t)(p * cap + r), src_at = (size_t)(p * cap + src);
      store_ok &= std::memcmp(&gk[dst_at * row_bytes], &hk[src_at * row_bytes], row_bytes) == 0;
      store_ok &= std::memcmp(&gv[dst_at * row_bytes], &hv[src_at * row_bytes], row_bytes) == 0;
      store_ok &= gpos[dst_at] == (cs.with_pos ? hpos[src_at] : hpos[dst_at]);
    }
    ok &= check(store_ok, cs, "re-indexed K/V/pos rows wrong in head " + std::to_string(p));
  }

  std::printf("%s %-48s gpu %8.2f ms  cpu %6.2f s  max |gpu/cpu inertia - 1| %.1e  empty %lld\n",
              ok ? "PASS" : "FAIL", cs.name.c_str(), gpu_ms, cpu_s, worst_rel, (long long)empty_clusters);

  // Timed repeats: no inertia (no sync inside), the store keeps being re-indexed in place.
  if (cs.timed_runs > 0) {
    a.inertia_out = nullptr;
    a.assign_out = nullptr;
    std::vector<float> ms;
    for (int t = 0; t < cs.timed_runs; ++t) {
      CK(cudaEventRecord(e0, stream));
      cuda::kmeans_reindex(a);
      CK(cudaEventRecord(e1, stream));
      CK(cudaEventSynchronize(e1));
      float x = 0.f;
      CK(cudaEventElapsedTime(&x, e0, e1));
      ms.push_back(x);
    }
    std::sort(ms.begin(), ms.end());
    const double med = ms[ms.size() / 2];
    const double flops = 2.0 * (double)np * (double)n * (double)c * (double)d * cs.iters;
    std::printf("     timing %s: median %.2f ms, min %.2f ms over %d runs (%d iters; assign GEMM alone "
                "would be %.1f TFLOP/s at the median)\n",
                cs.name.c_str(), med, (double)ms.front(), cs.timed_runs, cs.iters, flops / (med * 1e-3) / 1e12);
  }

  CK(cudaEventDestroy(e0));
  CK(cudaEventDestroy(e1));
  CK(cudaStreamDestroy(stream));
  CK(cudaFree(dk_raw));
  CK(cudaFree(dv_raw));
  CK(cudaFree(dpos));
  CK(cudaFree(dcent));
  CK(cudaFree(doff));
  CK(cudaFree(dassign));
  if (!ok) ++failures;
  return ok;
}

// Unsupported head dims are rejected before any device work.
void check_rejects() {
  for (int64_t d : {100, 264, 4}) {
    cuda::KMeansReindexArgs a{};
    a.d = d;
    bool threw = false;
    try {
      cuda::kmeans_reindex(a);
    } catch (const UnsupportedError& e) {
      threw = true;
      if (d == 100) std::printf("     (d=100 rejected: %s)\n", e.what());
    } catch (...) {
    }
    std::printf("%s rejects d=%lld with UnsupportedError\n", threw ? "PASS" : "FAIL", (long long)d);
    if (!threw) ++failures;
  }
}

std::string dname(DType t) { return t == DType::f32 ? "f32" : t == DType::f16 ? "f16" : "bf16"; }

}  // namespace

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // progress shows up when piped to a file
  int64_t max_n = INT64_MAX;
  std::string filter;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--quick") max_n = 8192;
    else if (arg == "--max-n" && i + 1 < argc) max_n = std::atoll(argv[++i]);
    else if (arg == "--filter" && i + 1 < argc) filter = argv[++i];
    else {
      std::fprintf(stderr, "usage: %s [--quick] [--max-n N] [--filter SUBSTRING]\n", argv[0]);
      return 2;
    }
  }
  int dev = 0;
  cudaDeviceProp prop;
  CK(cudaGetDevice(&dev));
  CK(cudaGetDeviceProperties(&prop, dev));
  std::printf("device: %s (sm_%d%d)\n", prop.name, prop.major, prop.minor);

  check_rejects();

  std::vector<Case> cases;
  auto add = [&](DType dt, int64_t d, int64_t n, bool sph) {
    Case cs;
    cs.dtype = dt;
    cs.d = d;
    cs.n = n;
    cs.spherical = sph;
    cs.name = std::string(sph ? "spherical " : "euclidean ") + dname(dt) + " d=" + std::to_string(d) +
              " n=" + std::to_string(n) + " x3";
    return cs;
  };
  for (DType dt : {DType::f16, DType::f32})
    for (int64_t d : {64, 128})
      for (int64_t n : {17, 1000, 4097, 32768}) cases.push_back(add(dt, d, n, false));
  for (int64_t d : {64, 128})
    for (int64_t n : {17, 1000, 4097}) cases.push_back(add(DType::f16, d, n, true));
  cases.push_back(add(DType::f32, 128, 32768, true));
  cases.push_back(add(DType::bf16, 80, 1000, false));
  cases.push_back(add(DType::bf16, 96, 4097, true));
  cases.push_back(add(DType::f16, 256, 4097, false));
  cases.push_back(add(DType::f32, 72, 1000, true));
  {
    Case cs = add(DType::f16, 64, 4097, false);
    cs.dup = 1;
    cs.name += " duplicates";
    cases.push_back(cs);
    cs = add(DType::f16, 64, 4097, true);
    cs.dup = 1;
    cs.name += " duplicates";
    cases.push_back(cs);
    cs = add(DType::f32, 128, 1000, false);
    cs.dup = 1;
    cs.name += " duplicates";
    cases.push_back(cs);
    cs = add(DType::f16, 64, 1000, false);
    cs.dup = 2;
    cs.name += " 20 distinct rows";
    cases.push_back(cs);
    cs = add(DType::f32, 128, 1000, true);
    cs.dup = 2;
    cs.name += " 20 distinct rows";
    cases.push_back(cs);
    cs = add(DType::f16, 64, 17, false);
    cs.c = 40;  // c > n: c = n, one row per cluster
    cs.name += " c>n";
    cases.push_back(cs);
    cs = add(DType::f16, 128, 1000, false);
    cs.with_pos = false;
    cs.name += " pos=null";
    cases.push_back(cs);
    cs = add(DType::f32, 64, 1000, false);
    cs.reindex = false;
    cs.name += " no-reindex";
    cases.push_back(cs);
    cs = add(DType::f16, 64, 4097, false);
    cs.misalign = true;
    cs.name += " misaligned";
    cases.push_back(cs);
    cs = add(DType::f32, 80, 1000, true);
    cs.misalign = true;
    cs.name += " misaligned";
    cases.push_back(cs);
    cs = add(DType::f16, 64, 1000, false);
    cs.iters = 1;
    cs.name += " iters=1";
    cases.push_back(cs);
    cs = add(DType::f16, 64, 5000, false);
    cs.nprob = 1;
    cs.name = "euclidean f16 d=64 n=5000 x1";
    cases.push_back(cs);
  }
  {
    Case cs = add(DType::f16, 128, 32768, false);
    cs.nprob = 8;
    cs.c = 2048;
    cs.timed_runs = 5;
    cs.name = "TIMING euclidean f16 d=128 n=32768 C=2048 x8";
    cases.push_back(cs);
    cs.spherical = true;
    cs.check_heads = 2;
    cs.name = "TIMING spherical f16 d=128 n=32768 C=2048 x8";
    cases.push_back(cs);
  }

  int run = 0;
  for (const Case& cs : cases) {
    if (cs.n > max_n || cs.name.find(filter) == std::string::npos) continue;
    run_case(cs);
    ++run;
  }
  std::printf("%s: %d of %d k-means cases failed\n", failures ? "FAIL" : "PASS", failures, run);
  return failures ? 1 : 0;
}
