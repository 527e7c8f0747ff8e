// Resolving KernelOptions into the CUDA step's StepPlan (tactic/plan.hpp). Plain C++ header.
#pragma once
#include <cstdint>

#include "tactic/options.hpp"
#include "tactic/plan.hpp"

namespace tactic {
namespace cuda {

// The plan of a decoder of `cfg` on the current device whose heads have room for `cmax`
// clusters. UnsupportedError, naming the option, for a variant this build or device lacks.
StepPlan make_step_plan(const DecoderConfig& cfg, int64_t cmax);

}  // namespace cuda
}  // namespace tactic
