// Selection stage 5 of the certified stop rule: the entry point. The kernels and their
// description are in select_certify.cuh, compiled in select_certify_f32/f16/bf16.cu.
#include "select_certify.cuh"

namespace tactic {
namespace cuda {

int certify_max_samples() { return kMaxDraws; }

void launch_certify(const StepGeometry& s, const SelectArgs& a) {
  if (a.tail_samples < 2 || a.tail_samples > kMaxDraws)
    throw UnsupportedError("the CUDA certified stop rule draws at most " + std::to_string(kMaxDraws) +
                           " tail samples per query head, got tail_samples=" + std::to_string(a.tail_samples));
  if (s.g > kMaxG) throw UnsupportedError("the CUDA certified stop rule supports up to 16 query heads per KV head");
  cudaStream_t st = as_stream(s.stream);
  const int64_t items = s.batch * s.hkv, sms = a.sm_count > 0 ? a.sm_count : 132;
  // About four blocks of certify_mass per SM (it is latency-bound: one thread per row).
  const int splits = (int)std::max<int64_t>(1, std::min<int64_t>(kMaxCertSplits, (4 * sms + items - 1) / items));
  dispatch_float(a.dtype, [&](auto tag) { launch_certify_typed(tag, s, a, splits, st); });
}

}  // namespace cuda
}  // namespace tactic
