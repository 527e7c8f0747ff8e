// The score histogram's buckets, one definition for the CPU selection (select.cpp's threshold
// twin) and the CUDA kernels (cuda/select_buckets.cuh): the bucket of a cluster score relative
// to its head's best. The buckets span [worst, best] at at least kMinBucketsPerLogit per logit,
// so a flat head whose clusters lie within a fraction of a logit still spreads over them. Float
// arithmetic on both sides, so both put a score in the same bucket.
#pragma once

#include "host_device.hpp"

namespace tactic {
namespace buckets {

constexpr int kBuckets = 2048;
constexpr float kMinBucketsPerLogit = 64.f;  // a range over 32 logits: the rest in the last bucket
constexpr float kMaxBucketsPerLogit = 1e6f;  // finer than float scores resolve: no use

// Buckets per logit for a head whose scores span [mn, mx]: the range over kBuckets - 1 buckets.
TACTIC_HD float bucket_width(float mx, float mn) {
  const float r = mx - mn;
  if (!(r > 0.f) || !(r <= 3.402823466e38f)) return kMinBucketsPerLogit;  // one score, or -inf / NaN ones
  const float w = (float)(kBuckets - 1) / r;
  return w < kMinBucketsPerLogit ? kMinBucketsPerLogit : (w > kMaxBucketsPerLogit ? kMaxBucketsPerLogit : w);
}

TACTIC_HD int bucket_of(float sc, float mx, float bpl) {
  const float x = (mx - sc) * bpl;
  return x < (float)(kBuckets - 1) ? (x > 0.f ? (int)x : 0) : kBuckets - 1;  // NaN: last bucket
}

}  // namespace buckets
}  // namespace tactic
