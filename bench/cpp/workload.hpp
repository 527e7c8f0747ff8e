// Synthetic attention inputs. Keys come from a mixture of a few hundred centres per KV head,
// so k-means finds real structure, and each query aims at three of its KV head's centres, so
// its attention is concentrated and Tactic reads a fraction of the context (the benchmarks
// report it as `read`). Same parameters as bench/gpu_step.py (centres of norm 4, key noise
// 0.5, query = 6 x sum of 3 centres + noise 0.3), so C++ and Python timings see alike data.
// Every value is a pure function of (seed, index): filling is parallel and reproducible.
#pragma once
#include <cstdint>
#include <vector>

namespace tactic_bench {

class Mixture {
 public:
  Mixture(int64_t kv_heads, int64_t head_dim, uint64_t seed = 0, int64_t centres = 512);

  // keys, values: [n, H, D] IEEE half bits, token-major (Decoder::prefill's layout).
  void fill_kv(int64_t n, uint16_t* keys, uint16_t* values) const;
  // The same tokens head-major, [H, n, D] (the KV store's row layout per head).
  void fill_kv_heads(int64_t n, uint16_t* keys, uint16_t* values) const;
  // queries: [b, H * g, D] IEEE half bits; batch row r uses its own choice of centres.
  void fill_q(int64_t b, int64_t g, uint16_t* q) const;

 private:
  void fill(int64_t n, uint16_t* keys, uint16_t* values, bool head_major) const;
  float key(int64_t t, int64_t h, int64_t k) const;
  float value(int64_t t, int64_t h, int64_t k) const;
  int64_t h_, d_, m_;
  uint64_t seed_;
  std::vector<float> centres_;  // [H, m, D]
};

}  // namespace tactic_bench
