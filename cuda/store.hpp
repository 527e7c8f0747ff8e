// Launchers of the KV-store kernels of the CUDA backend: prefill copy, per-slot counts,
// slot lists and store head indices. Plain C++ (no CUDA types).
#pragma once
#include <cstdint>

#include "select.hpp"
#include "tactic/tensor.hpp"

namespace tactic {
namespace cuda {

// Copy keys/values [n, hkv, d] (any float dtype, element strides sk0/sk1, sv0/sv1) into
// rows [0, n) of the hkv consecutive store heads starting at head index `first_head`.
void prefill_copy(const void* keys, const void* values, DType src, int64_t sk0, int64_t sk1,
                  int64_t sv0, int64_t sv1, int64_t n, int64_t hkv, int64_t d, void* k, void* v,
                  int32_t* pos, DType dst, int64_t cap, int64_t first_head, void* stream);

// state[index] = c, written by a kernel (kernel arguments, no host buffer: capturable).
void set_counts(SlotCounts* state, int64_t index, SlotCounts c, void* stream);

// dst[0..n) = slots (n <= 1024 per call; more are written in several launches).
void set_slots(int32_t* dst, const int64_t* slots, int64_t n, void* stream);

// dst[i] = src[i] rounded to `dtype` (f16 or bf16), n elements: the scoring copy of centroids.
void round_centroids(const float* src, void* dst, DType dtype, int64_t n, void* stream);

// spreads[h * cmax + j] = sum over the rows of cluster j of head h of ||k - c_j||^2 / (size_j * d),
// for nheads consecutive store heads: k and centroids point at the first head's row 0 and
// centroid 0, both in the storage dtype (the centroids as ranked); cluster j's rows are
// row0 + offsets[h * off_stride + j] .. row0 + offsets[h * off_stride + j + 1]. Clusters
// [0, c) of every head are written (the CPU store's KVStore::spreads).
void cluster_spreads(const void* k, const void* centroids, DType dtype, int64_t cap, int64_t d,
                     int64_t row0, const int32_t* offsets, int64_t off_stride, int64_t cmax,
                     int64_t nheads, int64_t c, float* spreads, void* stream);

}  // namespace cuda
}  // namespace tactic
