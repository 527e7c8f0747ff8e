// CPU attention benchmarks over plain arrays (the public functional ops of tactic/ops.hpp):
// dense decode attention, and sparse attention over a given selection. fp16 K/V/q/out, fp32
// accumulation, all cores. Inputs rotate over copies sized to twice the L3 (cpu_rotation.hpp).
#include <vector>

#include "cpu_rotation.hpp"
#include "grid.hpp"
#include "selection.hpp"
#include "tactic/ops.hpp"
#include "traffic.hpp"
#include "workload.hpp"

namespace tactic_bench {

namespace {

using tactic::DType;
using tactic::make_view;

// K and V [B, N, H, D] fp16 (every sequence the same tokens), `copies` times.
struct KVCopies {
  std::vector<std::vector<uint16_t>> k, v;
  KVCopies(const Shape& s, int64_t copies) : k(copies), v(copies) {
    const int64_t per_seq = s.N * s.H * s.D;
    std::vector<uint16_t> keys(per_seq), values(per_seq);
    Mixture(s.H, s.D).fill_kv(s.N, keys.data(), values.data());
    for (int64_t r = 0; r < copies; ++r) {
      k[r].resize(s.B * per_seq);
      v[r].resize(s.B * per_seq);
      for (int64_t b = 0; b < s.B; ++b) {
        std::copy(keys.begin(), keys.end(), k[r].begin() + b * per_seq);
        std::copy(values.begin(), values.end(), v[r].begin() + b * per_seq);
      }
    }
  }
};

double kv_bytes(const Shape& s) { return 2.0 * s.B * s.N * s.H * s.D * 2; }

// tactic::dense_decode: q [B, Hq, D] over keys/values [B, N, H, D].
// Byte model: every K and V row once (2 * B * N * H * D * 2), q and out (2 * B * Hq * D * 2).
void dense(benchmark::State& st, const Shape& s) {
  const int64_t hq = s.H * s.G;
  const int64_t copies = cpu_rotation_copies(kv_bytes(s));
  KVCopies kv(s, copies);
  std::vector<uint16_t> q(s.B * hq * s.D), out(s.B * hq * s.D);
  Mixture(s.H, s.D).fill_q(s.B, s.G, q.data());
  auto qv = make_view(q.data(), DType::f16, {s.B, hq, s.D});
  auto ov = make_view(out.data(), DType::f16, {s.B, hq, s.D});
  int64_t it = 0;
  for (auto _ : st) {
    const int64_t r = it++ % copies;
    tactic::dense_decode(qv, make_view(kv.k[r].data(), DType::f16, {s.B, s.N, s.H, s.D}),
                         make_view(kv.v[r].data(), DType::f16, {s.B, s.N, s.H, s.D}), nullptr, ov, 0.0);
    benchmark::DoNotOptimize(out.data());
  }
  report_traffic(st, kv_bytes(s) + 2.0 * s.B * hq * s.D * 2);
}

// tactic::sparse_decode per sequence: q [Hq, D] over the rows of keys/values [N, H, D] that
// mask [H, N] selects; S percent of each head's rows in 16-row blocks (selection.hpp).
// Byte model: the selected K and V rows once (2 * rows * D * 2 per head and sequence), the
// mask (H * N bytes per sequence, scanned by the op), q and out (2 * Hq * D * 2).
void sparse(benchmark::State& st, const Shape& s) {
  const int64_t hq = s.H * s.G;
  const int64_t copies = cpu_rotation_copies(kv_bytes(s));
  KVCopies kv(s, copies);
  std::vector<uint16_t> q(s.B * hq * s.D), out(s.B * hq * s.D);
  Mixture(s.H, s.D).fill_q(s.B, s.G, q.data());
  std::vector<std::vector<uint8_t>> mask(s.B, std::vector<uint8_t>(s.H * s.N, 0));
  double rows = 0;
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t h = 0; h < s.H; ++h)
      for (int32_t r : block_selection(s.N, s.S, (uint64_t)(b * s.H + h))) {
        mask[b][h * s.N + r] = 1;
        rows += 1;
      }
  const int64_t per_seq = s.N * s.H * s.D;
  int64_t it = 0;
  for (auto _ : st) {
    const int64_t r = it++ % copies;
    for (int64_t b = 0; b < s.B; ++b)
      tactic::sparse_decode(make_view(&q[b * hq * s.D], DType::f16, {hq, s.D}),
                            make_view(&kv.k[r][b * per_seq], DType::f16, {s.N, s.H, s.D}),
                            make_view(&kv.v[r][b * per_seq], DType::f16, {s.N, s.H, s.D}),
                            make_view(mask[b].data(), DType::u8, {s.H, s.N}),
                            make_view(&out[b * hq * s.D], DType::f16, {hq, s.D}), 0.0);
    benchmark::DoNotOptimize(out.data());
  }
  report_traffic(st, rows * s.D * 2 * 2 + (double)s.B * s.H * s.N + 2.0 * s.B * hq * s.D * 2);
  report_read(st, rows / ((double)s.B * s.H * s.N));
}

}  // namespace

void register_attention_cpu(const Axes& axes) {
  for (const Shape& s : shapes("NBHGD", axes))
    register_shape("BM_DenseAttention/cpu", "NBHGD", s, dense)->UseRealTime()->Unit(benchmark::kMicrosecond);
  for (const Shape& s : shapes("NBHGDS", axes))
    register_shape("BM_SparseAttention/cpu", "NBHGDS", s, sparse)->UseRealTime()->Unit(benchmark::kMicrosecond);
}

}  // namespace tactic_bench
