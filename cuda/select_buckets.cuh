// The score histogram's buckets, shared by the ranked selection (select_common.cuh: select_head,
// select_stop) and the threshold selection (select_threshold.cu): scores as ordered ints (one
// atomicMax keeps a float maximum), and the bucket of a score relative to its head's best
// (score_buckets.hpp).
#pragma once
#include <cmath>
#include <cstdint>

#include "score_buckets.hpp"

namespace tactic {
namespace cuda {
namespace {

// Scores as ordered ints, so one atomicMax keeps a float maximum (larger float, larger int).
__device__ __forceinline__ int32_t order_float(float f) {
  const int32_t i = __float_as_int(f);
  return i >= 0 ? i : i ^ 0x7fffffff;
}
__device__ __forceinline__ float unorder_float(int32_t i) { return __int_as_float(i >= 0 ? i : i ^ 0x7fffffff); }

// The buckets themselves: score_buckets.hpp (one definition with the CPU's threshold twin).
using buckets::kBuckets;
using buckets::bucket_width;
using buckets::bucket_of;

}  // namespace
}  // namespace cuda
}  // namespace tactic
