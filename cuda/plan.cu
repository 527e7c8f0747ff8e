#include "plan.hpp"

#include <string>

#include "attention.hpp"
#include "capabilities.hpp"
#include "common.cuh"
#include "select.hpp"
#include "select_threshold.hpp"

namespace tactic {
namespace cuda {

StepPlan make_step_plan(const DecoderConfig& cfg, int64_t cmax) {
  const KernelOptions& k = cfg.kernels;
  validate(k);
  StepPlan p;
  TACTIC_CUDA_CHECK(cudaGetDevice(&p.device));
  TACTIC_CUDA_CHECK(cudaDeviceGetAttribute(&p.sm_count, cudaDevAttrMultiProcessorCount, p.device));
  p.kernel_arch = kernel_arch();
  const std::string here = "; this build's kernels run as sm_" + std::to_string(p.kernel_arch) + " on this GPU";
  if (k.head_split > 1 && !head_split_available())
    throw UnsupportedError("head_split=" + std::to_string(k.head_split) +
                           " needs the thread-block-cluster selection kernels (sm_90)" + here);
  if (k.pdl == Switch::on && p.kernel_arch < 90)
    throw UnsupportedError("pdl=True needs kernels built for sm_90 or newer" + here);
  p.pdl = k.pdl == Switch::automatic ? p.kernel_arch >= 90 : k.pdl == Switch::on;
  const int64_t g = cfg.num_q_heads / cfg.num_kv_heads;
  p.attention = resolve_attention_kernel(k.attention, cfg.dtype, cfg.head_dim, g);
  p.score = score_tensor_cores_available() && score_tensor_cores_fit(cfg.dtype, cfg.head_dim, g)
                ? AttentionKernel::tensor_cores
                : AttentionKernel::cuda_cores;
  p.selection = SelectionKernel::ranked;
  if (k.selection == SelectionKernel::threshold && cfg.select.policy == Policy::tactic) {  // (dense: no selection)
    std::string why = threshold_selection_fit(cfg.dtype, cfg.head_dim, g);
    if (why.empty()) why = threshold_rule_fit(cfg);
    if (!why.empty()) throw UnsupportedError("selection_kernel='threshold' " + why + here);
    p.selection = SelectionKernel::threshold;
  }
  p.head_split.resize((std::size_t)cfg.max_batch);
  for (int64_t b = 1; b <= cfg.max_batch; ++b)
    p.head_split[(std::size_t)b - 1] = k.head_split ? k.head_split : auto_head_split(b * cfg.num_q_heads, cmax);
  return p;
}

}  // namespace cuda
}  // namespace tactic
