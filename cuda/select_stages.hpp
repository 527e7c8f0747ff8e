// The selection's stage launchers (cuda/select_*.cu), called in order by select_step
// (select.cu). Plain C++: each kernel is launched from the file that defines it, as the build
// has no relocatable device code. Every launcher enqueues on s.stream, with PDL where s.pdl.
#pragma once
#include <cstdint>

#include "select.hpp"

namespace tactic {
namespace cuda {

// select_rank.cu (besides prepare_q and append_token, select.hpp): centroid scores of every
// query head, and each head's best and worst score (seg_max / seg_min).
void launch_score(const StepGeometry& s, const SelectArgs& a);

// select_estimate.cu: the score histogram (tokens and prior mass per bucket) by `tiles` blocks
// per query head; the last block of each head takes its exact head (SelInfo).
void launch_select_hist(const StepGeometry& s, const SelectArgs& a, int tiles);

// select_exact.cu: exact (max, sum) of sinks, recent and exact-head rows and the head's prior,
// `tiles` blocks per query head; the last block of each head takes alpha, z and the stop point
// (SelInfo) and writes the head's statistics.
void launch_select_exact(const StepGeometry& s, const SelectArgs& a, int tiles);

// select_union.cu: each (sequence, KV head)'s union marks from its query heads' stop points,
// then its row list from them (clearing the marks), or, for the dense policy, every row.
void launch_build_rows(const StepGeometry& s, const SelectArgs& a);
void launch_dense_counts(const StepGeometry& s, const SelectArgs& a);

}  // namespace cuda
}  // namespace tactic
