// A given selection for the sparse-attention benchmarks: S percent of a head's N rows, as
// randomly chosen whole blocks of 16 consecutive rows (a cluster of the default size in the
// re-indexed store), sorted. Fixed seed: every run and backend reads the same rows.
#pragma once
#include <algorithm>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

namespace tactic_bench {

inline std::vector<int32_t> block_selection(int64_t n, int64_t percent, uint64_t seed) {
  constexpr int64_t kBlock = 16;
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  const int64_t take = std::clamp<int64_t>((blocks * percent + 50) / 100, 1, blocks);
  std::vector<int64_t> idx(blocks);
  std::iota(idx.begin(), idx.end(), 0);
  std::mt19937_64 rng(seed);
  for (int64_t i = 0; i < take; ++i) std::swap(idx[i], idx[std::uniform_int_distribution<int64_t>(i, blocks - 1)(rng)]);
  idx.resize(take);
  std::sort(idx.begin(), idx.end());
  std::vector<int32_t> rows;
  for (int64_t b : idx)
    for (int64_t r = b * kBlock; r < std::min(n, (b + 1) * kBlock); ++r) rows.push_back((int32_t)r);
  return rows;
}

}  // namespace tactic_bench
