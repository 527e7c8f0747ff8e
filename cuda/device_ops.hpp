// CUDA versions of the functional ops (tactic/ops.hpp, tactic/kmeans.hpp) for device arrays.
// Plain C++; the CPU entry points dispatch here when their input lives on a CUDA device.
#pragma once
#include "tactic/kmeans.hpp"
#include "tactic/tensor.hpp"

namespace tactic {
namespace cuda {

// k-means of x [N, D] (contiguous rows, on a CUDA device) into centroids [C, D] fp32 and
// assign [N] int32 on the same device. Euclidean only; `inertia` holds the final value.
KMeansResult kmeans_op(const TensorView& x, const KMeansOptions& opt, const TensorView& centroids,
                       const TensorView& assign);

}  // namespace cuda
}  // namespace tactic
