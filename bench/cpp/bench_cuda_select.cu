// CUDA selection benchmarks, through the public tactic::Decoder only (a selection-only step,
// as SparseDecoder.select runs it: no append, no out), so they hold across rewrites of the
// selection kernels (cuda/select.hpp):
//   BM_ScoreRank/cuda  centroid scoring + ranking: the step at a vanishing target (P 1e-6,
//                      margin 0, head_fraction 0), where estimate/stop/union shrink to one
//                      cluster per query head; what remains is q preparation, scoring of all
//                      C centroids per query head, the ranking and the (tiny) row lists.
//   BM_Select/cuda     the whole selection at target P: scoring, ranking, exact head,
//                      estimate, stop point, union, row lists.
// Estimate/stop/union cost = BM_Select - BM_ScoreRank of the same shape. Byte models:
// decoder_traffic.hpp. The layer index rotates over L2-sized copies (cuda_decoder_fixture).
#include "cuda_decoder_fixture.cuh"
#include "decoder_traffic.hpp"
#include "traffic.hpp"

namespace tactic_bench {

namespace {

void select_only(benchmark::State& st, const Shape& s, DecoderMode mode) {
  try {
    CudaDecoder& d = cuda_decoder(s, mode);
    GpuTimer t;
    d.dec->set_stream(t.stream());
    for (int64_t l = 0; l < d.layers; ++l)  // warm-up, and the slot list's one upload
      d.dec->decode(l, d.q_view, nullptr, nullptr, nullptr, d.slots, nullptr, false);
    int64_t it = 0;
    for (auto _ : st) {
      const int64_t layer = it++ % d.layers;
      t.start();
      d.dec->decode(layer, d.q_view, nullptr, nullptr, nullptr, d.slots, nullptr, /*append*/ false);
      st.SetIterationTime(t.stop());
    }
    const DecoderTraffic tr = decoder_traffic(d.dec->config(), d.dec->stats(0));
    report_traffic(st, mode == DecoderMode::score_rank ? tr.score_rank : tr.select);
    report_read(st, tr.read);
    d.dec->set_stream(nullptr);
  } catch (const std::exception& e) {
    skip_with(st, e);
  }
}

}  // namespace

void register_cuda_select(const Axes& axes) {
  Axes no_p = axes;
  no_p.erase('P');
  for (const Shape& base : shapes("NBHGD", no_p)) {
    register_shape("BM_ScoreRank/cuda", "NBHGD", base, [](benchmark::State& st, const Shape& s) {
      select_only(st, s, DecoderMode::score_rank);
    })->UseManualTime()->Unit(benchmark::kMicrosecond);
    for (int64_t p : axes.at('P')) {
      Shape s = base;
      s.P = p;
      register_shape("BM_Select/cuda", "NBHGDP", s, [](benchmark::State& st, const Shape& s) {
        select_only(st, s, DecoderMode::tactic);
      })->UseManualTime()->Unit(benchmark::kMicrosecond);
    }
  }
}

}  // namespace tactic_bench
