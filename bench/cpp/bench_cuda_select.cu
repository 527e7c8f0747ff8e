// CUDA selection benchmarks, through the public tactic::Decoder only (a selection-only step,
// as SparseDecoder.select runs it: no append, no out), so they hold across rewrites of the
// selection kernels (cuda/select.hpp):
//   BM_ScoreRank/cuda          centroid scoring + ranking: the step at a vanishing target
//                              (P 1e-6, margin 0, head_fraction 0), where estimate/stop/union
//                              shrink to one cluster per query head; what remains is q
//                              preparation, scoring of all C centroids per query head, the
//                              ranking (a score histogram, no sort) and the tiny row lists.
//   BM_Select/cuda             the whole selection at target P: scoring, ranking, exact head,
//                              estimate, stop point, union, row lists.
//   BM_EstimateStopUnion/cuda  the exact head, estimate, stop point and union alone: each
//                              iteration times a score-rank step and a whole selection of the
//                              same layer and reports the difference (counters score_rank_us
//                              and select_us: the means of the two). No launcher isolates
//                              these kernels, and the difference needs no internal API.
// Byte models: decoder_traffic.hpp. The layer index rotates over L2-sized copies (cuda_decoder_fixture).
#include <algorithm>

#include "cuda_decoder_fixture.cuh"
#include "decoder_traffic.hpp"
#include "traffic.hpp"

namespace tactic_bench {

namespace {

// A selection-only step of `layer` (no append, no out).
void select_step(CudaDecoder& d, int64_t layer) {
  d.dec->decode(layer, d.q_view, nullptr, nullptr, nullptr, d.slots, nullptr, /*append*/ false);
}

void select_only(benchmark::State& st, const Shape& s, DecoderMode mode) {
  try {
    CudaDecoder& d = cuda_decoder(s, mode);
    GpuTimer t;
    StreamGuard on(d, t.stream());
    for (int64_t l = 0; l < d.layers; ++l) select_step(d, l);  // warm-up, and the slot list's one upload
    int64_t it = 0;
    for (auto _ : st) {
      const int64_t layer = it++ % d.layers;
      t.start();
      select_step(d, layer);
      st.SetIterationTime(t.stop());
    }
    const DecoderTraffic tr = decoder_traffic(d.dec->config(), d.dec->stats(0));
    report_traffic(st, mode == DecoderMode::score_rank ? tr.score_rank : tr.select);
    report_read(st, tr.read);
  } catch (const std::exception& e) {
    skip_with(st, e);
  }
}

// Byte model: the whole selection's bytes minus the score-rank step's (the exact-head keys
// beyond the score-rank step's few rows; the centroids are counted under scoring).
void estimate_stop_union(benchmark::State& st, const Shape& s) {
  try {
    CudaDecoder& sr = cuda_decoder(s, DecoderMode::score_rank);
    CudaDecoder& tc = cuda_decoder(s, DecoderMode::tactic);  // keeps `sr` (two are cached)
    GpuTimer t;
    StreamGuard on_sr(sr, t.stream()), on_tc(tc, t.stream());
    for (int64_t l = 0; l < tc.layers; ++l) {
      select_step(sr, l);
      select_step(tc, l);
    }
    int64_t it = 0;
    double base_sum = 0, full_sum = 0;
    for (auto _ : st) {
      const int64_t layer = it++ % tc.layers;
      t.start();
      select_step(sr, layer);
      const double base = t.stop();
      t.start();
      select_step(tc, layer);
      const double full = t.stop();
      base_sum += base;
      full_sum += full;
      // Not clipped at zero: clipping would bias the mean upwards when noise makes a
      // difference negative; the reported time is exactly mean(select) - mean(score-rank).
      st.SetIterationTime(full - base);
    }
    const DecoderTraffic a = decoder_traffic(sr.dec->config(), sr.dec->stats(0));
    const DecoderTraffic b = decoder_traffic(tc.dec->config(), tc.dec->stats(0));
    report_traffic(st, std::max(0.0, b.select - a.score_rank));
    report_read(st, b.read);
    st.counters["score_rank_us"] = benchmark::Counter(it ? base_sum / it * 1e6 : 0);
    st.counters["select_us"] = benchmark::Counter(it ? full_sum / it * 1e6 : 0);
  } catch (const std::exception& e) {
    skip_with(st, e);
  }
}

}  // namespace

void register_score_rank(const Shape& base) {
  register_shape("BM_ScoreRank/cuda", "NBHGD", base, [](benchmark::State& st, const Shape& s) {
    select_only(st, s, DecoderMode::score_rank);
  })->UseManualTime()->Unit(benchmark::kMicrosecond);
}

void register_select(const Shape& s) {
  register_shape("BM_Select/cuda", "NBHGDP", s, [](benchmark::State& st, const Shape& s) {
    select_only(st, s, DecoderMode::tactic);
  })->UseManualTime()->Unit(benchmark::kMicrosecond);
  register_shape("BM_EstimateStopUnion/cuda", "NBHGDP", s, estimate_stop_union)
      ->UseManualTime()->Unit(benchmark::kMicrosecond);
}

}  // namespace tactic_bench
