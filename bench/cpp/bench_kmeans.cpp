// CPU clustering benchmarks: one Lloyd iteration of k-means, and the re-index that makes each
// cluster a contiguous block of K/V rows (DESIGN.md steps 2-3). Arguments N, H, D: the
// prefill clusters H heads of N keys each into C = ceil(N / 16) clusters (the default
// cluster_size). The keys are small enough to sit in the L3 here; k-means is compute-bound
// (its GFLOP/s counter is the figure to watch) and re-index is timed on rotated copies.
#include <cstring>
#include <memory>
#include <vector>

#include "cpu_rotation.hpp"
#include "grid.hpp"
#include "tactic/kmeans.hpp"
#include "traffic.hpp"
#include "workload.hpp"

namespace tactic_bench {

namespace {

constexpr int64_t kClusterSize = 16;  // DecoderConfig::cluster_size's default

int64_t clusters_for(int64_t n) { return (n + kClusterSize - 1) / kClusterSize; }

// One Lloyd iteration per head: tactic::kmeans with max_iters = 1 (the pointer overload the
// KV store calls: no argument checks), so each call is the seeded initialisation (C rows
// copied), one assignment and one update.
// Byte model per head: the keys are read by the assignment and again by the update
// (2 * N * D * 2 bytes, fp16), the centroids are read and written (2 * C * D * 4) and the
// assignment written (N * 4). FLOP model: the assignment's N x C x D dot products, 2 N C D.
void kmeans_iter(benchmark::State& st, const Shape& s) {
  const int64_t n = s.N, h = s.H, d = s.D, c = clusters_for(n);
  std::vector<uint16_t> keys(n * h * d), values(n * h * d);
  Mixture(h, d).fill_kv_heads(n, keys.data(), values.data());
  std::vector<float> cent(c * d);
  std::vector<int32_t> assign(n);
  tactic::KMeansOptions opt;
  opt.num_clusters = c;
  opt.max_iters = 1;
  for (auto _ : st)
    for (int64_t p = 0; p < h; ++p) {
      opt.seed = (uint64_t)p;
      tactic::kmeans(&keys[p * n * d], tactic::DType::f16, n, d, d, opt, cent.data(), assign.data());
      benchmark::DoNotOptimize(cent.data());
    }
  const double per_head = 2.0 * n * d * 2 + 2.0 * c * d * 4 + n * 4.0;
  report_traffic(st, h * per_head);
  report_flops(st, h * 2.0 * n * c * d);
}

// Re-index per head: tactic::cluster_permutation (the library's counting sort of rows by
// cluster) and the row permutation of K and V that KVStore::cluster_head does after it (a
// copy of the rows to a temporary, then a gather back in cluster order; the store's code is
// private, so it is repeated here). The assignment is uniform over the C clusters, which
// scatters rows like a real clustering does.
// Byte model per head (compulsory): K and V rows read once and written once
// (2 * 2 * N * D * 2 bytes), the assignment read (N * 4), the permutation written (N * 4) and
// the offsets written ((C + 1) * 4). The two-pass copy moves twice the K/V bytes.
void reindex(benchmark::State& st, const Shape& s) {
  const int64_t n = s.N, h = s.H, d = s.D, c = clusters_for(n);
  const std::size_t row = (std::size_t)d * 2, head_bytes = (std::size_t)n * row;
  const int64_t copies = cpu_rotation_copies(2.0 * h * head_bytes);
  std::vector<std::vector<uint8_t>> k(copies), v(copies);
  {
    std::vector<uint16_t> keys(n * h * d), values(n * h * d);
    Mixture(h, d).fill_kv_heads(n, keys.data(), values.data());
    for (int64_t r = 0; r < copies; ++r) {
      k[r].assign((uint8_t*)keys.data(), (uint8_t*)keys.data() + h * head_bytes);
      v[r].assign((uint8_t*)values.data(), (uint8_t*)values.data() + h * head_bytes);
    }
  }
  std::vector<int32_t> assign(n * h), perm(n), offsets(c + 1);
  uint64_t x = 88172645463325252ull;
  for (auto& a : assign) {  // xorshift64: a fixed, uniform assignment
    x ^= x << 13, x ^= x >> 7, x ^= x << 17;
    a = (int32_t)(x % (uint64_t)c);
  }
  std::vector<uint8_t> tmp(head_bytes);
  int64_t it = 0;
  for (auto _ : st) {
    const int64_t r = it++ % copies;
    for (int64_t p = 0; p < h; ++p) {
      tactic::cluster_permutation(&assign[p * n], n, c, perm.data(), offsets.data());
      for (auto* store : {&k[r], &v[r]}) {
        uint8_t* base = store->data() + p * head_bytes;
        std::memcpy(tmp.data(), base, head_bytes);
        for (int64_t j = 0; j < n; ++j) std::memcpy(base + j * row, tmp.data() + (std::size_t)perm[j] * row, row);
      }
    }
    benchmark::DoNotOptimize(k[r].data());
  }
  const double per_head = 2.0 * 2 * (double)head_bytes + n * 4.0 * 2 + (c + 1) * 4.0;
  report_traffic(st, h * per_head);
}

}  // namespace

void register_kmeans_cpu(const Axes& axes) {
  for (const Shape& s : shapes("NHD", axes)) {
    register_shape("BM_KMeansIter/cpu", "NHD", s, kmeans_iter)->UseRealTime()->Unit(benchmark::kMillisecond);
    register_shape("BM_Reindex/cpu", "NHD", s, reindex)->UseRealTime()->Unit(benchmark::kMillisecond);
  }
}

}  // namespace tactic_bench
