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
//   BM_EstimateStopUnion  the exact head, estimate, stop and union alone: per iteration a
//                  BM_Select step minus a BM_ScoreRank step (the same difference, step by step).
// Byte models: decoder_traffic.hpp. Shapes register side by side so they share one decoder.
#include <algorithm>
#include <chrono>
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

// The two decoders used last: two, because BM_EstimateStopUnion times a step of the
// score-rank decoder against one of the tactic decoder of the same shape. P is not part of the
// key: a tactic decoder serves every target of its shape through set_target, so a P sweep
// prefills (and clusters: seconds on a CPU) once. Entries stay in place, so a returned
// reference survives a later call that hits.
struct Prefilled {
  std::string key;
  std::unique_ptr<tactic::Decoder> dec;
  std::vector<uint16_t> q, out;
};

Prefilled& prefilled(const Shape& s, Mode mode) {
  static Prefilled cache[2];
  static int64_t last_use[2] = {0, 0}, use_clock = 0;
  const bool low = mode == Mode::score_rank;
  const std::string key = std::string(low ? "score_rank/" : "tactic/") + std::to_string(s.N) + "/" +
                          std::to_string(s.B) + "/" + std::to_string(s.H) + "/" + std::to_string(s.G) + "/" +
                          std::to_string(s.D);
  for (int i = 0; i < 2; ++i)
    if (cache[i].key == key) {
      last_use[i] = ++use_clock;
      if (!low) cache[i].dec->set_target(s.P / 100.0);
      return cache[i];
    }
  const int slot = last_use[0] <= last_use[1] ? 0 : 1;
  last_use[slot] = ++use_clock;
  Prefilled& c = cache[slot];
  c = Prefilled{};
  c.dec = std::make_unique<tactic::Decoder>(config_for(s, mode));
  std::vector<uint16_t> keys(s.N * s.H * s.D), values(s.N * s.H * s.D);
  Mixture mix(s.H, s.D);
  mix.fill_kv(s.N, keys.data(), values.data());
  for (int64_t b = 0; b < s.B; ++b)
    c.dec->prefill(0, b, make_view(keys.data(), DType::f16, {s.N, s.H, s.D}),
                   make_view(values.data(), DType::f16, {s.N, s.H, s.D}));
  c.q.resize(s.B * s.H * s.G * s.D);
  c.out.resize(c.q.size());
  mix.fill_q(s.B, s.G, c.q.data());
  c.key = key;
  return c;
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

// Estimate/stop/union alone: per iteration a score-rank step and a whole selection, wall
// time of each, the difference reported (counters score_rank_us, select_us: their means).
// Byte model: the selection's bytes minus the score-rank step's.
void estimate_stop_union(benchmark::State& st, const Shape& s) {
  using clock = std::chrono::steady_clock;
  try {
    Prefilled& a = prefilled(s, Mode::score_rank);
    Prefilled& b = prefilled(s, Mode::select);  // keeps `a` (two are cached)
    std::vector<int64_t> slots(s.B);
    for (int64_t i = 0; i < s.B; ++i) slots[i] = i;
    const auto qa = make_view(a.q.data(), DType::f16, {s.B, s.H * s.G, s.D});
    const auto qb = make_view(b.q.data(), DType::f16, {s.B, s.H * s.G, s.D});
    int64_t it = 0;
    double base_sum = 0, full_sum = 0;
    for (auto _ : st) {
      const auto t0 = clock::now();
      a.dec->decode(0, qa, nullptr, nullptr, nullptr, slots, nullptr, /*append*/ false);
      const auto t1 = clock::now();
      b.dec->decode(0, qb, nullptr, nullptr, nullptr, slots, nullptr, /*append*/ false);
      const auto t2 = clock::now();
      const double base = std::chrono::duration<double>(t1 - t0).count();
      const double full = std::chrono::duration<double>(t2 - t1).count();
      base_sum += base;
      full_sum += full;
      ++it;
      // Not clipped at zero: clipping would bias the mean upwards when noise makes a
      // difference negative; the reported time is exactly mean(select) - mean(score-rank).
      st.SetIterationTime(full - base);
    }
    const DecoderTraffic ta = decoder_traffic(a.dec->config(), a.dec->stats(0));
    const DecoderTraffic tb = decoder_traffic(b.dec->config(), b.dec->stats(0));
    report_traffic(st, std::max(0.0, tb.select - ta.score_rank));
    report_read(st, tb.read);
    st.counters["score_rank_us"] = benchmark::Counter(it ? base_sum / it * 1e6 : 0);
    st.counters["select_us"] = benchmark::Counter(it ? full_sum / it * 1e6 : 0);
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
      register_shape("BM_EstimateStopUnion/cpu", "NBHGDP", s, estimate_stop_union)
          ->UseManualTime()->Unit(benchmark::kMicrosecond);
      register_shape("BM_DecodeStep/cpu", "NBHGDP", s, [](benchmark::State& st, const Shape& s) {
        run(st, s, Mode::step);
      })->UseRealTime()->Unit(benchmark::kMicrosecond);
    }
  }
}

}  // namespace tactic_bench
