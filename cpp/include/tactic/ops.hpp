// Functional decode attention over plain arrays (no decoder state).
#pragma once
#include <cstdint>

#include "tactic/tensor.hpp"

namespace tactic {

// Dense decode attention. q [B, Hq, D]; keys, values [B, N, Hkv, D]; lengths: null or [B]
// int32 valid tokens per sequence (<= N); out [B, Hq, D]. scale <= 0: 1/sqrt(D).
void dense_decode(const TensorView& q, const TensorView& keys, const TensorView& values,
                  const TensorView* lengths, const TensorView& out, double scale,
                  int num_threads = 0);

// Attention of q [Hq, D] over the tokens of keys/values [N, Hkv, D] whose mask [Hkv, N]
// (uint8, nonzero = attend) is set; out [Hq, D]. A head with an empty mask outputs zeros.
void sparse_decode(const TensorView& q, const TensorView& keys, const TensorView& values,
                   const TensorView& mask, const TensorView& out, double scale,
                   int num_threads = 0);

}  // namespace tactic
