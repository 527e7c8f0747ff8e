// The CUDA decode step's plan: which kernel variants run, resolved once from KernelOptions,
// the decoder's geometry, the device and the build (at construction, and again by
// Decoder::set_kernels / set_target), so no launcher reads a setting of its own.
#pragma once
#include <cstdint>
#include <vector>

#include "tactic/options.hpp"

namespace tactic {

struct StepPlan {
  int device = -1;       // CUDA device index; -1 for a CPU decoder (the rest is then unused)
  int sm_count = 0;      // the device's multiprocessors (sizes the grids)
  int kernel_arch = 0;   // the architecture this build's kernels run as there (90 for sm_90)
  // Blocks per query head in the selection kernels of a step over b sequences: head_split[b - 1]
  // (1, 2 or 4; 2 and 4 are thread-block clusters).
  std::vector<int> head_split;
  AttentionKernel attention = AttentionKernel::cuda_cores;  // resolved: never automatic
  // The centroid-score kernel: tensor cores where the kernels have them (sm_80+) and the shape
  // fits (16-bit K/V, head_dim 64 or 128, at most 8 query heads per KV head); no option, as
  // both give the same scores to about fp32 rounding.
  AttentionKernel score = AttentionKernel::cuda_cores;
  bool pdl = false;      // kernels launched with programmatic dependent launch
  SelectionKernel selection = SelectionKernel::ranked;  // resolved: never automatic
};

}  // namespace tactic
