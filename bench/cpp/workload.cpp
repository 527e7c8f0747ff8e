#include "workload.hpp"

#include <cmath>

#include "tactic/convert.hpp"

namespace tactic_bench {

namespace {

// splitmix64's finaliser: a counter-based generator, so any element can be drawn alone.
uint64_t mix(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

uint64_t key_of(uint64_t seed, uint64_t stream, uint64_t i) { return mix(mix(seed ^ (stream << 56)) + i); }

// Standard normal by Box-Muller from 2 x 24 random bits.
float normal(uint64_t r) {
  const double u1 = ((double)(r >> 40) + 0.5) / 16777216.0;
  const double u2 = ((double)(r & 0xFFFFFFu) + 0.5) / 16777216.0;
  return (float)(std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2));
}

enum : uint64_t { kCentre = 1, kPick = 2, kKeyNoise = 3, kValue = 4, kQuery = 5, kQueryPick = 6 };

}  // namespace

Mixture::Mixture(int64_t kv_heads, int64_t head_dim, uint64_t seed, int64_t centres)
    : h_(kv_heads), d_(head_dim), m_(centres), seed_(seed), centres_(kv_heads * centres * head_dim) {
  for (int64_t c = 0; c < h_ * m_; ++c) {
    float* x = &centres_[c * d_];
    double norm = 0;
    for (int64_t k = 0; k < d_; ++k) {
      x[k] = normal(key_of(seed_, kCentre, c * d_ + k));
      norm += (double)x[k] * x[k];
    }
    const float s = (float)(4.0 / std::sqrt(norm));
    for (int64_t k = 0; k < d_; ++k) x[k] *= s;
  }
}

float Mixture::key(int64_t t, int64_t h, int64_t k) const {
  const uint64_t row = (uint64_t)(t * h_ + h);
  const int64_t c = (int64_t)(key_of(seed_, kPick, row) % (uint64_t)m_);
  return centres_[(h * m_ + c) * d_ + k] + 0.5f * normal(key_of(seed_, kKeyNoise, row * d_ + k));
}

float Mixture::value(int64_t t, int64_t h, int64_t k) const {
  return normal(key_of(seed_, kValue, (uint64_t)((t * h_ + h) * d_ + k)));
}

// One loop for both layouts: only the row index of token t, head h differs.
void Mixture::fill(int64_t n, uint16_t* keys, uint16_t* values, bool head_major) const {
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < n; ++t)
    for (int64_t h = 0; h < h_; ++h) {
      const int64_t row = head_major ? h * n + t : t * h_ + h;
      for (int64_t k = 0; k < d_; ++k) {
        keys[row * d_ + k] = tactic::float_to_half(key(t, h, k));
        values[row * d_ + k] = tactic::float_to_half(value(t, h, k));
      }
    }
}

void Mixture::fill_kv(int64_t n, uint16_t* keys, uint16_t* values) const { fill(n, keys, values, false); }

void Mixture::fill_kv_heads(int64_t n, uint16_t* keys, uint16_t* values) const { fill(n, keys, values, true); }

void Mixture::fill_q(int64_t b, int64_t g, uint16_t* q) const {
  const int64_t hq = h_ * g;
  for (int64_t r = 0; r < b; ++r)
    for (int64_t j = 0; j < hq; ++j) {
      const int64_t h = j / g;
      const uint64_t head = (uint64_t)(r * hq + j);
      for (int64_t k = 0; k < d_; ++k) {
        float x = 0.3f * normal(key_of(seed_, kQuery, head * d_ + k));
        for (uint64_t p = 0; p < 3; ++p) {
          const int64_t c = (int64_t)(key_of(seed_, kQueryPick, head * 3 + p) % (uint64_t)m_);
          x += 6.0f * centres_[(h * m_ + c) * d_ + k];
        }
        q[(r * hq + j) * d_ + k] = tactic::float_to_half(x);
      }
    }
}

}  // namespace tactic_bench
