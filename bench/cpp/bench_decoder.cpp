// CPU benchmarks of the decode step through the public tactic::Decoder (the C++ side of
// tactic.SparseDecoder), on one prefilled layer (the CPU store is not rotated: prefill's
// k-means costs seconds per copy here; the selection is compute-bound on the CPU):
//   BM_ScoreRank   centroid scoring + ranking: a selection-only step (no append, no out, as
//                  SparseDecoder.select runs it) at a vanishing target (P = 1e-6, margin 0,
//                  head_fraction 0), so the estimate/stop/union work is one cluster per head.
//                  The CPU ranks lazily (partial sorts up to the stop point), so this is the
//                  scoring of all C centroids plus the first ranks.
//   BM_Select      the whole selection (scoring, ranking, exact head, estimate, stop, union)
//                  at target P: a selection-only step.
//   BM_DecodeStep  selection + sparse attention: decode without append into `out`.
// The estimate/stop/union cost is BM_Select minus BM_ScoreRank of the same shape.
// Byte models: decoder_traffic.hpp. Shapes register side by side so they share one decoder.
#include <memory>
#include <string>
#include <vector>

#include "decoder_traffic.hpp"
#include "grid.hpp"
#include "tactic/decoder.hpp"
#include "traffic.hpp"
#include "workload.hpp"

namespace tactic_bench {

namespace {

using tactic::DType;
using tactic::make_view;

enum class Mode { score_rank, select, step };

tactic::DecoderConfig config_for(const Shape& s, Mode mode) {
  tactic::DecoderConfig cfg;
  cfg.num_layers = 1;
  cfg.num_kv_heads = s.H;
  cfg.num_q_heads = s.H * s.G;
  cfg.head_dim = s.D;
  cfg.max_batch = s.B;
  cfg.max_tokens = s.N;
  cfg.dtype = DType::f16;
  if (mode == Mode::score_rank) {
    cfg.select.target = 1e-6;
    cfg.select.margin = 0;
    cfg.select.head_fraction = 0;
  } else {
    cfg.select.target = s.P / 100.0;
  }
  return cfg;
}

// The last decoder built, kept while consecutive benchmarks ask for the same configuration.
struct Prefilled {
  std::string key;
  std::unique_ptr<tactic::Decoder> dec;
  std::vector<uint16_t> q, out;
};

Prefilled& prefilled(const Shape& s, Mode mode) {
  static Prefilled cache;
  const tactic::DecoderConfig cfg = config_for(s, mode);
  const std::string key = std::to_string(s.N) + "/" + std::to_string(s.B) + "/" + std::to_string(s.H) + "/" +
                          std::to_string(s.G) + "/" + std::to_string(s.D) + "/" + std::to_string(cfg.select.target);
  if (cache.key == key) return cache;
  cache = Prefilled{};
  cache.dec = std::make_unique<tactic::Decoder>(cfg);
  std::vector<uint16_t> keys(s.N * s.H * s.D), values(s.N * s.H * s.D);
  Mixture mix(s.H, s.D);
  mix.fill_kv(s.N, keys.data(), values.data());
  for (int64_t b = 0; b < s.B; ++b)
    cache.dec->prefill(0, b, make_view(keys.data(), DType::f16, {s.N, s.H, s.D}),
                       make_view(values.data(), DType::f16, {s.N, s.H, s.D}));
  cache.q.resize(s.B * s.H * s.G * s.D);
  cache.out.resize(cache.q.size());
  mix.fill_q(s.B, s.G, cache.q.data());
  cache.key = key;
  return cache;
}

void run(benchmark::State& st, const Shape& s, Mode mode) {
  try {
    Prefilled& p = prefilled(s, mode);
    const int64_t hq = s.H * s.G;
    std::vector<int64_t> slots(s.B);
    for (int64_t b = 0; b < s.B; ++b) slots[b] = b;
    const auto qv = make_view(p.q.data(), DType::f16, {s.B, hq, s.D});
    const auto ov = make_view(p.out.data(), DType::f16, {s.B, hq, s.D});
    const tactic::TensorView* out = mode == Mode::step ? &ov : nullptr;
    for (auto _ : st) {
      p.dec->decode(0, qv, nullptr, nullptr, out, slots, nullptr, /*append*/ false);
      benchmark::DoNotOptimize(p.out.data());
    }
    const DecoderTraffic t = decoder_traffic(p.dec->config(), p.dec->stats(0));
    report_traffic(st, mode == Mode::score_rank ? t.score_rank : mode == Mode::select ? t.select : t.step);
    report_read(st, t.read);
  } catch (const std::exception& e) {
    st.SkipWithError(e.what());
  }
}

}  // namespace

void register_decoder_cpu(const Axes& axes) {
  Axes no_p = axes;
  no_p.erase('P');
  for (const Shape& base : shapes("NBHGD", no_p)) {
    register_shape("BM_ScoreRank/cpu", "NBHGD", base, [](benchmark::State& st, const Shape& s) {
      run(st, s, Mode::score_rank);
    })->UseRealTime()->Unit(benchmark::kMicrosecond);
    for (int64_t p : axes.at('P')) {
      Shape s = base;
      s.P = p;
      register_shape("BM_Select/cpu", "NBHGDP", s, [](benchmark::State& st, const Shape& s) {
        run(st, s, Mode::select);
      })->UseRealTime()->Unit(benchmark::kMicrosecond);
      register_shape("BM_DecodeStep/cpu", "NBHGDP", s, [](benchmark::State& st, const Shape& s) {
        run(st, s, Mode::step);
      })->UseRealTime()->Unit(benchmark::kMicrosecond);
    }
  }
}

}  // namespace tactic_bench
