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
// device synchronisation) unless the previous call asked for the same; the previous decoder
// is released first. Throws tactic::Error / std::runtime_error (e.g. CapacityError when the
// store does not fit in device memory).
CudaDecoder& cuda_decoder(const Shape& s, DecoderMode mode);
// Frees the cached decoder (before exit, while the CUDA runtime is still up).
void release_cuda_decoder();

}  // namespace tactic_bench
