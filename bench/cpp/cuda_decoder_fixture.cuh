// A CUDA tactic::Decoder prefilled for one benchmark shape, shared by consecutive benchmarks
// of that shape (bench_cuda_select.cu, bench_cuda_step.cu). The context is stored in as many
// layers as l2_rotation_copies asks for (together >= 4x the L2); benchmarks rotate the layer
// index, so each step reads a KV that is not L2-resident.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "cuda_support.cuh"
#include "grid.hpp"
#include "tactic/decoder.hpp"

namespace tactic_bench {

enum class DecoderMode {
  score_rank,  // policy tactic at a vanishing target (P 1e-6, margin 0, head_fraction 0)
  tactic,      // policy tactic at target P
  dense,       // policy dense
};

struct CudaDecoder {
  std::string key;
  std::unique_ptr<tactic::Decoder> dec;
  int64_t layers = 0;
  DeviceBuffer q, out;            // [B, Hq, D] fp16
  tactic::TensorView q_view, out_view;
  std::vector<int64_t> slots;     // 0 .. B-1
};

// The decoder for (shape, mode), built (prefill + clustering of every layer and slot, then a
// device synchronisation) unless one of the last two calls asked for the same shape and mode
// (a tactic decoder is then set to target s.P); the least recently used of the two held
// decoders is released first. A returned reference stays valid until the second next call
// that builds. Throws tactic::Error / std::runtime_error (e.g. CapacityError when the
// store does not fit in device memory).
CudaDecoder& cuda_decoder(const Shape& s, DecoderMode mode);
// Frees the cached decoders (before exit, while the CUDA runtime is still up).
void release_cuda_decoder();

// Points a decoder at a benchmark's stream for the guard's life: a benchmark that fails half
// way must not leave a cached decoder on a stream its GpuTimer has destroyed (declare the
// guard after the timer, so it resets first).
class StreamGuard {
 public:
  StreamGuard(CudaDecoder& d, cudaStream_t s) : dec_(*d.dec) { dec_.set_stream(s); }
  ~StreamGuard() { dec_.set_stream(nullptr); }
  StreamGuard(const StreamGuard&) = delete;
  StreamGuard& operator=(const StreamGuard&) = delete;

 private:
  tactic::Decoder& dec_;
};

// The decoder benchmarks of one shape, registered by register_cuda_decoder (bench_cuda_step.cu)
// in the order that builds each decoder once per shape: dense, score-rank, then per target P
// the tactic decoder's (set_target, no new prefill).
void register_dense(const Shape& base);         // BM_DenseAttention (bench_cuda_step.cu)
void register_score_rank(const Shape& base);    // BM_ScoreRank (bench_cuda_select.cu)
void register_select(const Shape& s);           // BM_Select, BM_EstimateStopUnion at s.P
void register_step(const Shape& s);             // BM_DecodeStep, BM_StepAttention, BM_DecodeStepGraph

}  // namespace tactic_bench
