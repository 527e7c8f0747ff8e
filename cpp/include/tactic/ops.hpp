// Functional decode attention over plain arrays (no decoder state), CPU only in this build.
// Inputs are borrowed views read during the call; `out` is caller-owned memory written in
// place. q/keys/values/out: f32, f16 or bf16 (keys and values alike; out may differ, it is
// written in its own dtype), unit stride in the last dimension, other strides free.
// Accumulation is fp32. num_threads: OpenMP threads (0: all cores). Errors: ValueError /
// TypeError naming the argument, before anything is written.
#pragma once
#include <cstdint>

#include "tactic/tensor.hpp"

namespace tactic {

// Dense decode attention. q [B, Hq, D]; keys, values [B, N, Hkv, D] (Hq a multiple of Hkv:
// query head h reads KV head h / (Hq / Hkv)); lengths: null or [B] int32 valid tokens per
// sequence (<= N; 0 writes zeros); out [B, Hq, D]. scale <= 0: 1/sqrt(D).
void dense_decode(const TensorView& q, const TensorView& keys, const TensorView& values,
                  const TensorView* lengths, const TensorView& out, double scale,
                  int num_threads = 0);

// Attention of q [Hq, D] over the tokens of keys/values [N, Hkv, D] whose mask [Hkv, N]
// (uint8, nonzero = attend) is set; out [Hq, D]. A head with an empty mask outputs zeros.
void sparse_decode(const TensorView& q, const TensorView& keys, const TensorView& values,
                   const TensorView& mask, const TensorView& out, double scale,
                   int num_threads = 0);

}  // namespace tactic
