// Launcher of the CUDA k-means + re-index of the KV store (DESIGN.md, algorithm steps 2-3).
// Plain C++ (no CUDA types), so host code can include it; the stream is a `void*`.
#pragma once
#include <cstdint>

#include "tactic/tensor.hpp"

namespace tactic {
namespace cuda {

// Lloyd k-means over rows [row0, row0 + n) of `nprob` consecutive store heads at once, with
// the semantics of the CPU reference tactic::kmeans + KVStore::cluster_head:
//  - init: centroid j of head p is row kmeans_init_rows(n, c, seeds[p])[j];
//  - `iters` times {assign; update}, the update re-seeding empty clusters at the points
//    farthest from their centroid (distinct points, largest first). The CPU stops early once
//    no assignment changes; this runs the fixed count (no host sync), same result once
//    converged;
//  - spherical: assignment by cosine, centroids renormalised each update, but the STORED
//    centroid is the plain mean of the member keys (0 for an empty cluster), as in the store;
//  - offsets: counting sort of the final assignment; reindex: stable in-place permutation of
//    the K, V (and pos) rows so every cluster is one contiguous block.
// All work is stream-ordered on `stream` (temporaries via cudaMallocAsync); the call does not
// synchronise unless inertia_out is given. Throws ValueError / TypeError / UnsupportedError on
// bad arguments (d must be a multiple of 8 in [8, 256]) and tactic::Error on CUDA failures.
struct KMeansReindexArgs {
  void* k = nullptr;        // device KV store rows, dtype `dtype`, row length d
  void* v = nullptr;        // (v is only touched when reindex; may be null otherwise)
  int32_t* pos = nullptr;   // device token positions per row (permuted with rows); may be null
  DType dtype = DType::f16;
  int64_t d = 0;
  int64_t cap = 0;          // rows per head: head p's row r is at k + ((p * cap) + r) * d
  int64_t nprob = 0;        // heads clustered together (consecutive heads starting at k)
  int64_t row0 = 0, n = 0;  // cluster rows [row0, row0 + n) of each head
  int64_t c = 0;            // clusters per head (>= 1); min(c, n) is used
  int iters = 10;           // Lloyd iterations (>= 1)
  bool spherical = false;
  const uint64_t* seeds = nullptr;  // HOST [nprob]: per-head seed
  float* centroids = nullptr;       // device; head p's [c, d] fp32 at centroids + p * cent_stride
  int64_t cent_stride = 0;          //   (null: not written)
  int32_t* offsets = nullptr;       // device; head p's c+1 offsets (relative to row0) at
  int64_t off_stride = 0;           //   offsets + p * off_stride (null: not written)
  bool reindex = true;              // permute K, V, pos rows in place (stable within a cluster)
  int32_t* assign_out = nullptr;    // optional device [nprob, n]: final assignment (pre re-index)
  double* inertia_out = nullptr;    // optional HOST [nprob]: final inertia (synchronises)
  void* stream = nullptr;           // cudaStream_t
};

void kmeans_reindex(const KMeansReindexArgs& a);

}  // namespace cuda
}  // namespace tactic
