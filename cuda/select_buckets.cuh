// The score histogram's buckets, shared by the ranked selection (select_common.cuh: select_head,
// select_stop) and the threshold selection (select_threshold.cu): scores as ordered ints (one
// atomicMax keeps a float maximum) and the bucket of a score relative to its head's best. The
// buckets span [worst, best] at at least kMinBucketsPerLogit per logit, so a flat head whose
// clusters lie within a fraction of a logit still spreads over them.
#pragma once
#include <cmath>
#include <cstdint>

namespace tactic {
namespace cuda {
namespace {

// Scores as ordered ints, so one atomicMax keeps a float maximum (larger float, larger int).
__device__ __forceinline__ int32_t order_float(float f) {
  const int32_t i = __float_as_int(f);
  return i >= 0 ? i : i ^ 0x7fffffff;
}
__device__ __forceinline__ float unorder_float(int32_t i) { return __int_as_float(i >= 0 ? i : i ^ 0x7fffffff); }

constexpr int kBuckets = 2048;
constexpr float kMinBucketsPerLogit = 64.f;  // a range over 32 logits: the rest in the last bucket
constexpr float kMaxBucketsPerLogit = 1e6f;  // finer than float scores resolve: no use

// Buckets per logit for a head whose scores span [mn, mx]: the range over kBuckets - 1 buckets.
__device__ __forceinline__ float bucket_width(float mx, float mn) {
  const float r = mx - mn;
  if (!(r > 0.f) || !isfinite(r)) return kMinBucketsPerLogit;  // one score, or -inf / NaN ones
  return fminf(kMaxBucketsPerLogit, fmaxf(kMinBucketsPerLogit, (float)(kBuckets - 1) / r));
}

__device__ __forceinline__ int bucket_of(float sc, float mx, float bpl) {
  const float x = (mx - sc) * bpl;
  return x < (float)(kBuckets - 1) ? max(0, (int)x) : kBuckets - 1;  // NaN: last bucket
}

}  // namespace
}  // namespace cuda
}  // namespace tactic
