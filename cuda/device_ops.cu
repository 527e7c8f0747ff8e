#include "device_ops.hpp"

#include <algorithm>
#include <string>

#include "common.cuh"
#include "kmeans.hpp"

namespace tactic {
namespace cuda {

KMeansResult kmeans_op(const TensorView& x, const KMeansOptions& opt, const TensorView& centroids,
                       const TensorView& assign) {
  if (opt.metric != Metric::euclidean)
    throw UnsupportedError("tactic.ops.kmeans on CUDA arrays supports metric='euclidean' only "
                           "(SparseDecoder(device='cuda') supports both)");
  check_contiguous(x, "x");
  const int64_t n = x.shape[0], d = x.shape[1];
  const int64_t c = std::max<int64_t>(1, std::min<int64_t>(opt.num_clusters, n));
  KMeansResult r;
  r.num_clusters = n > 0 ? c : 0;
  if (n == 0) return r;
  int prev = 0;
  TACTIC_CUDA_CHECK(cudaGetDevice(&prev));
  TACTIC_CUDA_CHECK(cudaSetDevice((int)x.device.index));
  KMeansReindexArgs a{};
  a.k = x.data;
  a.dtype = x.dtype;
  a.d = d;
  a.cap = n;
  a.nprob = 1;
  a.row0 = 0;
  a.n = n;
  a.c = c;
  a.iters = opt.max_iters;
  a.spherical = false;
  const uint64_t seed = opt.seed;
  a.seeds = &seed;
  a.centroids = centroids.ptr<float>();
  a.cent_stride = c * d;
  a.reindex = false;
  a.assign_out = assign.ptr<int32_t>();
  double inertia = 0;
  a.inertia_out = &inertia;  // synchronises: the op returns finished results
  try {
    kmeans_reindex(a);
  } catch (...) {
    cudaSetDevice(prev);
    throw;
  }
  TACTIC_CUDA_CHECK(cudaSetDevice(prev));
  r.inertia = {inertia};
  r.iterations = opt.max_iters;
  return r;
}

}  // namespace cuda
}  // namespace tactic
