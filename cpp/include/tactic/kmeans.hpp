// Lloyd k-means over the keys of one (sequence, layer, KV head).
#pragma once
#include <cstdint>
#include <vector>

#include "tactic/options.hpp"
#include "tactic/tensor.hpp"

namespace tactic {

struct KMeansResult {
  int64_t num_clusters = 0;     // C actually used (min(C, N), >= 1 when N >= 1)
  std::vector<double> inertia;  // after each iteration: sum of squared distances (Euclidean)
                                // or of (1 - cos) (spherical) to the assigned centroid
  int iterations = 0;
};

// x: [N, D] rows in any float storage dtype, row stride `ld` elements.
// centroids: [C, D] float32 output; assign: [N] int32 output (values in [0, C)).
// Random seeded initialisation (C distinct rows), at most `max_iters` Lloyd steps, stops
// early when no assignment changes. A cluster that becomes empty is re-seeded with the
// point farthest from its centroid, so no centroid is ever NaN. Spherical: rows and
// centroids are L2-normalised and assignment maximises cosine similarity.
KMeansResult kmeans(const void* x, DType dtype, int64_t n, int64_t d, int64_t ld,
                    const KMeansOptions& opt, float* centroids, int32_t* assign);

// Tensor-view entry point: x [N, D] (CPU). Checks arguments, then calls kmeans above.
KMeansResult kmeans(const TensorView& x, const KMeansOptions& opt, const TensorView& centroids,
                    const TensorView& assign);

// The seeded initialisation shared by every backend: the C distinct row indices (in [0, N))
// whose rows become the initial centroids, in centroid order.
std::vector<int64_t> kmeans_init_rows(int64_t n, int64_t c, uint64_t seed);

// Stable counting sort of rows by cluster: perm[j] is the source row of destination row j,
// offsets[c]..offsets[c+1] the rows of cluster c. offsets has C + 1 entries.
void cluster_permutation(const int32_t* assign, int64_t n, int64_t c, int32_t* perm,
                         int32_t* offsets);

}  // namespace tactic
