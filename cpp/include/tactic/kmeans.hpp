// Lloyd k-means over the keys of one (sequence, layer, KV head), and the permutation that
// makes each cluster a contiguous block of rows. CPU only; all buffers are the caller's.
#pragma once
#include <cstdint>
#include <vector>

#include "tactic/options.hpp"
#include "tactic/tensor.hpp"

namespace tactic {

// Summary of one k-means run (centroids and assignments go to caller buffers).
struct KMeansResult {
  int64_t num_clusters = 0;     // C actually used (min(C, N), >= 1 when N >= 1)
  std::vector<double> inertia;  // after each iteration: sum of squared distances (Euclidean)
                                // or of (1 - cos) (spherical) to the assigned centroid
  int iterations = 0;           // Lloyd steps run (<= max_iters)
};

// x: [N, D] rows in any float storage dtype, row stride `ld` elements (host memory).
// centroids: [C, D] float32 output with C = max(1, min(num_clusters, N)), contiguous;
// assign: [N] int32 output (values in [0, C)). Arguments are not checked here.
// Random seeded initialisation (C distinct rows), at most `max_iters` Lloyd steps, stops
// early when no assignment changes. A cluster that becomes empty is re-seeded with the
// point farthest from its centroid, so no centroid is ever NaN. Spherical: rows and
// centroids are L2-normalised and assignment maximises cosine similarity.
KMeansResult kmeans(const void* x, DType dtype, int64_t n, int64_t d, int64_t ld,
                    const KMeansOptions& opt, float* centroids, int32_t* assign);

// Tensor-view entry point: x [N, D] (CPU, float, finite), centroids [C, D] f32 and assign
// [N] i32 contiguous, C as above. Checks arguments (ValueError/TypeError), then calls kmeans.
KMeansResult kmeans(const TensorView& x, const KMeansOptions& opt, const TensorView& centroids,
                    const TensorView& assign);

// The seeded initialisation shared by every backend: the C distinct row indices (in [0, N))
// whose rows become the initial centroids, in centroid order.
std::vector<int64_t> kmeans_init_rows(int64_t n, int64_t c, uint64_t seed);

// Stable counting sort of rows by cluster: perm[j] is the source row of destination row j,
// offsets[c]..offsets[c+1] the rows of cluster c. assign [N] in [0, C); caller-owned
// outputs perm [N] and offsets [C + 1].
void cluster_permutation(const int32_t* assign, int64_t n, int64_t c, int32_t* perm,
                         int32_t* offsets);

}  // namespace tactic
