#include "tactic/kmeans.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <cstring>
#include <random>

#include "parallel.hpp"
#ifdef TACTIC_WITH_CUDA
#include "device_ops.hpp"  // cuda/device_ops.hpp: the device versions of the ops
#endif
#include "tactic/convert.hpp"

namespace tactic {

namespace {

constexpr int64_t kRowBlock = 4;   // rows per micro-tile
constexpr int64_t kColBlock = 16;  // centroids per micro-tile (4 x 16 accumulators)

// Assignment step written as a blocked matrix product X [N, D] x Ct [D, C]: for Euclidean,
// argmin_c ||c||^2 - 2 x.c; for spherical (unit rows), argmax_c x.c. Hand-written rather
// than BLAS so the core has no BLAS dependency; the 4x16 register tile vectorises well.
// Returns per row the best centroid and its distance term.
TACTIC_HOT
void assign_rows(const float* x, int64_t r0, int64_t r1, int64_t d, const float* ct,
                 const float* cnorm, int64_t c, int64_t cpad, bool spherical, int32_t* best_idx,
                 float* best_val) {
  // ct is [D, cpad] with zero columns past C, so the 16-wide inner loop has no tail and
  // the 4 x 16 accumulator tile stays in vector registers.
  for (int64_t rb = r0; rb < r1; rb += kRowBlock) {
    const int64_t nr = std::min(kRowBlock, r1 - rb);
    const float* xr[kRowBlock];
    for (int r = 0; r < kRowBlock; ++r) xr[r] = x + std::min(rb + r, r1 - 1) * d;
    float bv[kRowBlock];
    int32_t bi[kRowBlock];
    for (int r = 0; r < kRowBlock; ++r) { bv[r] = std::numeric_limits<float>::infinity(); bi[r] = 0; }
    for (int64_t cb = 0; cb < cpad; cb += kColBlock) {
      // GCC vector types make the register tile explicit: 4 rows x 2 vectors of 8.
      typedef float v8 __attribute__((vector_size(32)));
      v8 acc[kRowBlock][2] = {};
      const float* cp = ct + cb;
      for (int64_t k = 0; k < d; ++k) {
        v8 c0, c1;
        std::memcpy(&c0, cp + k * cpad, sizeof(v8));
        std::memcpy(&c1, cp + k * cpad + 8, sizeof(v8));
        for (int r = 0; r < kRowBlock; ++r) {
          const float xv = xr[r][k];
          acc[r][0] += xv * c0;
          acc[r][1] += xv * c1;
        }
      }
      const int64_t nc = std::min(kColBlock, c - cb);
      for (int r = 0; r < nr; ++r)
        for (int j = 0; j < nc; ++j) {
          const float dot = acc[r][j >> 3][j & 7];
          const float v = spherical ? -dot : cnorm[cb + j] - 2.f * dot;
          if (v < bv[r]) { bv[r] = v; bi[r] = (int32_t)(cb + j); }
        }
    }
    for (int r = 0; r < nr; ++r) { best_idx[rb + r] = bi[r]; best_val[rb + r] = bv[r]; }
  }
}

void normalise(float* v, int64_t d) {
  double s = 0;
  for (int64_t k = 0; k < d; ++k) s += (double)v[k] * v[k];
  if (s > 0) {
    const float inv = (float)(1.0 / std::sqrt(s));
    for (int64_t k = 0; k < d; ++k) v[k] *= inv;
  }
}

}  // namespace

KMeansResult kmeans(const void* xdata, DType dtype, int64_t n, int64_t d, int64_t ld,
                    const KMeansOptions& opt, float* centroids, int32_t* assign) {
  validate(opt);
  KMeansResult res;
  if (n <= 0) return res;
  const int64_t c = std::min<int64_t>(opt.num_clusters, n);
  res.num_clusters = c;
  const bool spherical = opt.metric == Metric::spherical;
  const int nthreads = resolve_threads(opt.num_threads);

  // Work in fp32, row-contiguous.
  std::vector<float> x((size_t)(n * d));
  const std::size_t es = dtype_size(dtype);
  for (int64_t i = 0; i < n; ++i)
    load_floats(static_cast<const uint8_t*>(xdata) + i * ld * (int64_t)es, dtype, d, &x[i * d]);
  std::vector<float> xnorm(n);
  if (spherical)
    for (int64_t i = 0; i < n; ++i) normalise(&x[i * d], d);
  for (int64_t i = 0; i < n; ++i) {
    double s = 0;
    for (int64_t k = 0; k < d; ++k) s += (double)x[i * d + k] * x[i * d + k];
    xnorm[i] = (float)s;
  }

  // Seeded random initialisation: C distinct rows.
  const std::vector<int64_t> init = kmeans_init_rows(n, c, opt.seed);
  for (int64_t i = 0; i < c; ++i) std::copy(&x[init[i] * d], &x[init[i] * d] + d, centroids + i * d);

  const int64_t cpad = (c + kColBlock - 1) / kColBlock * kColBlock;
  std::vector<float> ct((size_t)(d * cpad), 0.f), cnorm(c), best(n);
  std::vector<int32_t> cur(n, -1);
  std::vector<double> sums((size_t)(c * d));
  std::vector<int64_t> counts(c);

  auto assign_all = [&]() -> int64_t {
    for (int64_t j = 0; j < c; ++j) {
      double s = 0;
      for (int64_t k = 0; k < d; ++k) {
        ct[k * cpad + j] = centroids[j * d + k];
        s += (double)centroids[j * d + k] * centroids[j * d + k];
      }
      cnorm[j] = (float)s;
    }
    const int64_t blocks = (n + 63) / 64;
    std::vector<int32_t> next(n);
#pragma omp parallel for schedule(static) num_threads(nthreads) if (n * c * d > 262144)
    for (int64_t b = 0; b < blocks; ++b)
      assign_rows(x.data(), b * 64, std::min(n, (b + 1) * 64), d, ct.data(), cnorm.data(), c,
                  cpad, spherical, next.data(), best.data());
    int64_t changed = 0;
    for (int64_t i = 0; i < n; ++i) {
      changed += next[i] != cur[i];
      cur[i] = next[i];
    }
    return changed;
  };
  // Distance of row i to its centroid, recomputed exactly in double (the blocked product is
  // only used to choose the argmin).
  auto distance = [&](int64_t i) -> double {
    const float* ci = centroids + (int64_t)cur[i] * d;
    double s = 0;
    if (spherical) {
      for (int64_t k = 0; k < d; ++k) s += (double)x[i * d + k] * ci[k];
      return xnorm[i] > 0 ? 1.0 - s : 1.0;
    }
    for (int64_t k = 0; k < d; ++k) {
      const double t = (double)x[i * d + k] - ci[k];
      s += t * t;
    }
    return s;
  };
  auto inertia = [&]() {
    double s = 0;
    for (int64_t i = 0; i < n; ++i) s += distance(i);
    return s;
  };
  auto update = [&]() {
    std::fill(sums.begin(), sums.end(), 0.0);
    std::fill(counts.begin(), counts.end(), 0);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t j = cur[i];
      ++counts[j];
      for (int64_t k = 0; k < d; ++k) sums[j * d + k] += x[i * d + k];
    }
    std::vector<int64_t> empty;
    for (int64_t j = 0; j < c; ++j) {
      if (counts[j] == 0) { empty.push_back(j); continue; }
      for (int64_t k = 0; k < d; ++k) centroids[j * d + k] = (float)(sums[j * d + k] / counts[j]);
      if (spherical) normalise(centroids + j * d, d);
    }
    if (empty.empty()) return;
    // Re-seed each empty cluster at the point farthest from its current centroid (distinct
    // points, largest first): this only lowers the inertia and never leaves a NaN centroid.
    std::vector<double> dist(n);
    for (int64_t i = 0; i < n; ++i) dist[i] = distance(i);
    std::vector<int64_t> far(n);
    std::iota(far.begin(), far.end(), 0);
    const int64_t m = std::min<int64_t>((int64_t)empty.size(), n);
    std::partial_sort(far.begin(), far.begin() + m, far.end(), [&](int64_t a, int64_t b) {
      return dist[a] != dist[b] ? dist[a] > dist[b] : a < b;
    });
    for (int64_t e = 0; e < (int64_t)empty.size(); ++e) {
      const int64_t src = far[std::min(e, m - 1)];
      std::copy(&x[src * d], &x[src * d] + d, centroids + empty[e] * d);
    }
  };

  for (int it = 0; it < opt.max_iters; ++it) {
    const int64_t changed = assign_all();
    res.iterations = it + 1;
    res.inertia.push_back(inertia());
    if (changed == 0) break;
    update();
  }
  // Final centroids are the means of their final members, so ranking by q.centroid uses
  // the true cluster means; this can only lower the inertia further.
  update();
  res.inertia.push_back(inertia());
  std::copy(cur.begin(), cur.end(), assign);
  return res;
}

KMeansResult kmeans(const TensorView& x, const KMeansOptions& opt, const TensorView& centroids,
                    const TensorView& assign) {
  check_ndim(x, "x", {2});
  check_float(x, "x");
#ifdef TACTIC_WITH_CUDA
  const bool on_gpu = x.device.kind == DeviceKind::cuda;
#else
  const bool on_gpu = false;
#endif
  check_device(x, "x", on_gpu ? x.device : Device{});
  check_aligned(x, "x");
  check_last_dim_contiguous(x, "x");
  if (!on_gpu) check_finite(x, "x");
  validate(opt);
  const int64_t n = x.shape[0], d = x.shape[1];
  const int64_t c = std::max<int64_t>(1, std::min<int64_t>(opt.num_clusters, n));
  check_shape(centroids, "centroids", {c, d});
  check_dtype(centroids, "centroids", DType::f32);
  check_contiguous(centroids, "centroids");
  check_device(centroids, "centroids", x.device);
  check_aligned(centroids, "centroids");
  check_shape(assign, "assign", {n});
  check_dtype(assign, "assign", DType::i32);
  check_contiguous(assign, "assign");
  check_device(assign, "assign", x.device);
  check_aligned(assign, "assign");
#ifdef TACTIC_WITH_CUDA
  if (on_gpu) return cuda::kmeans_op(x, opt, centroids, assign);
#endif
  return kmeans(x.data, x.dtype, n, d, x.shape[0] > 1 ? x.strides[0] : d, opt,
                centroids.ptr<float>(), assign.ptr<int32_t>());
}

std::vector<int64_t> kmeans_init_rows(int64_t n, int64_t c, uint64_t seed) {
  // Partial Fisher-Yates with a fixed generator: the same indices on every platform.
  std::mt19937_64 rng(seed);
  std::vector<int64_t> idx(n);
  std::iota(idx.begin(), idx.end(), 0);
  for (int64_t i = 0; i < c; ++i) {
    std::uniform_int_distribution<int64_t> pick(i, n - 1);
    std::swap(idx[i], idx[pick(rng)]);
  }
  idx.resize(c);
  return idx;
}

void cluster_permutation(const int32_t* assign, int64_t n, int64_t c, int32_t* perm,
                         int32_t* offsets) {
  std::fill(offsets, offsets + c + 1, 0);
  for (int64_t i = 0; i < n; ++i) ++offsets[assign[i] + 1];
  for (int64_t j = 0; j < c; ++j) offsets[j + 1] += offsets[j];
  std::vector<int32_t> fill(offsets, offsets + c);
  for (int64_t i = 0; i < n; ++i) perm[fill[assign[i]]++] = (int32_t)i;
}

}  // namespace tactic
