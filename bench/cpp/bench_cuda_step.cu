// CUDA decode-step benchmarks through the public tactic::Decoder, no append (the step that
// can be captured in a CUDA graph), out in fp16:
//   BM_DenseAttention/cuda   policy dense: q preparation + attention over every row
//   BM_DecodeStep/cuda       policy tactic at target P: selection + sparse attention
//   BM_StepAttention/cuda    sparse attention alone over the step's own selection at target P
//                            (Decoder::attend: the selection a real step made, where
//                            BM_SparseAttention uses synthetic 16-row blocks)
//   BM_DecodeStepGraph/cuda  the step captured once per layer in a CUDA graph and replayed:
//                            GPU time without the host's launch gaps
// Byte models: decoder_traffic.hpp. The layer index rotates over L2-sized copies.
#include <vector>

#include "cuda_decoder_fixture.cuh"
#include "decoder_traffic.hpp"
#include "traffic.hpp"

namespace tactic_bench {

namespace {

void step_once(CudaDecoder& d, int64_t layer) {
  d.dec->decode(layer, d.q_view, nullptr, nullptr, &d.out_view, d.slots, nullptr, /*append*/ false);
}

void report(benchmark::State& st, CudaDecoder& d, double DecoderTraffic::*bytes) {
  const DecoderTraffic tr = decoder_traffic(d.dec->config(), d.dec->stats(0));
  report_traffic(st, tr.*bytes);
  report_read(st, tr.read);
}

void step(benchmark::State& st, const Shape& s, DecoderMode mode) {
  try {
    CudaDecoder& d = cuda_decoder(s, mode);
    GpuTimer t;
    StreamGuard on(d, t.stream());
    for (int64_t l = 0; l < d.layers; ++l) step_once(d, l);  // warm-up
    int64_t it = 0;
    for (auto _ : st) {
      const int64_t layer = it++ % d.layers;
      t.start();
      step_once(d, layer);
      st.SetIterationTime(t.stop());
    }
    report(st, d, mode == DecoderMode::dense ? &DecoderTraffic::dense : &DecoderTraffic::step);
  } catch (const std::exception& e) {
    skip_with(st, e);
  }
}

void step_attention(benchmark::State& st, const Shape& s) {
  try {
    CudaDecoder& d = cuda_decoder(s, DecoderMode::tactic);
    GpuTimer t;
    StreamGuard on(d, t.stream());
    // One step per layer at this target leaves the selection that attend() reads.
    for (int64_t l = 0; l < d.layers; ++l) step_once(d, l);
    for (int64_t l = 0; l < d.layers; ++l) d.dec->attend(l, d.q_view, d.out_view, d.slots);  // warm-up
    int64_t it = 0;
    for (auto _ : st) {
      const int64_t layer = it++ % d.layers;
      t.start();
      d.dec->attend(layer, d.q_view, d.out_view, d.slots);
      st.SetIterationTime(t.stop());
    }
    report(st, d, &DecoderTraffic::attend);
  } catch (const std::exception& e) {
    skip_with(st, e);
  }
}

void step_graph(benchmark::State& st, const Shape& s) {
  std::vector<cudaGraphExec_t> execs;
  try {
    CudaDecoder& d = cuda_decoder(s, DecoderMode::tactic);
    GpuTimer t;
    StreamGuard on(d, t.stream());
    for (int64_t l = 0; l < d.layers; ++l) {
      // One eager step first: the slot list's upload happens outside the capture.
      step_once(d, l);
      TB_CUDA_OK(cudaStreamSynchronize(t.stream()));
      cudaGraph_t g = nullptr;
      TB_CUDA_OK(cudaStreamBeginCapture(t.stream(), cudaStreamCaptureModeGlobal));
      try {
        step_once(d, l);
      } catch (...) {
        cudaStreamEndCapture(t.stream(), &g);
        if (g) cudaGraphDestroy(g);
        throw;
      }
      TB_CUDA_OK(cudaStreamEndCapture(t.stream(), &g));
      cudaGraphExec_t e = nullptr;
      const cudaError_t err = cudaGraphInstantiateWithFlags(&e, g, 0);
      cudaGraphDestroy(g);
      TB_CUDA_OK(err);
      execs.push_back(e);
    }
    for (cudaGraphExec_t e : execs) TB_CUDA_OK(cudaGraphLaunch(e, t.stream()));  // warm-up
    int64_t it = 0;
    for (auto _ : st) {
      const int64_t layer = it++ % d.layers;
      t.start();
      TB_CUDA_OK(cudaGraphLaunch(execs[layer], t.stream()));
      st.SetIterationTime(t.stop());
    }
    report(st, d, &DecoderTraffic::step);
  } catch (const std::exception& e) {
    skip_with(st, e);
  }
  for (cudaGraphExec_t e : execs) cudaGraphExecDestroy(e);
}

}  // namespace

void register_dense(const Shape& base) {
  register_shape("BM_DenseAttention/cuda", "NBHGD", base, [](benchmark::State& st, const Shape& s) {
    step(st, s, DecoderMode::dense);
  })->UseManualTime()->Unit(benchmark::kMicrosecond);
}

void register_step(const Shape& s) {
  register_shape("BM_DecodeStep/cuda", "NBHGDP", s, [](benchmark::State& st, const Shape& s) {
    step(st, s, DecoderMode::tactic);
  })->UseManualTime()->Unit(benchmark::kMicrosecond);
  register_shape("BM_StepAttention/cuda", "NBHGDP", s, step_attention)->UseManualTime()->Unit(benchmark::kMicrosecond);
  register_shape("BM_DecodeStepGraph/cuda", "NBHGDP", s, step_graph)->UseManualTime()->Unit(benchmark::kMicrosecond);
}

void register_cuda_decoder(const Axes& axes) {
  Axes no_p = axes;
  no_p.erase('P');
  for (const Shape& base : shapes("NBHGD", no_p)) {
    register_dense(base);
    register_score_rank(base);
    for (int64_t p : axes.at('P')) {
      Shape s = base;
      s.P = p;
      register_select(s);
      register_step(s);
    }
  }
}

}  // namespace tactic_bench
