// certify_mass_kernel and certify_kernel for float K/V, every head dim (select_certify.cuh).
#include "select_certify.cuh"

namespace tactic {
namespace cuda {

void launch_certify_typed(float, const StepGeometry& s, const SelectArgs& a, int splits, cudaStream_t st) {
  certify_by_dim<float>(s, a, splits, st);
}

}  // namespace cuda
}  // namespace tactic
