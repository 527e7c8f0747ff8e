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

// select_estimate.cu: histogram, exact head and its row-range tasks per query head; nsplit
// blocks per head (1, or 2 / 4 in thread-block clusters where head_split_available()).
void launch_select_head(const StepGeometry& s, const SelectArgs& a, int nsplit);
int select_head_split_arch();          // compiled_arch of the split kernel
int select_head_split_clusters(int n);  // clusters of n blocks resident at once; -1: no answer

// select_exact.cu: exact (max, sum) partials of sinks, recent and exact-head rows, `splits`
// blocks per query head (at most kMaxExactSplits).
void launch_select_exact(const StepGeometry& s, const SelectArgs& a, int splits);

// select_stop.cu: stop point, marks and statistics per query head (nsplit as select_head;
// `splits`: the exact partials per head to combine).
void launch_select_stop(const StepGeometry& s, const SelectArgs& a, int nsplit, int splits);
int select_stop_split_arch();
int select_stop_split_clusters(int n);

// select_certify.cu (stop_rule = certified): exact mass of the union per query head, the tail
// sample, the bound and the top-up rounds; marks the top-ups for the union and rewrites the
// heads' statistics.
void launch_certify(const StepGeometry& s, const SelectArgs& a);

// select_union.cu: each (sequence, KV head)'s row list from the union marks, or, for the dense
// policy, every row. The passes: `all` lists sinks, every marked cluster and recent rows into
// a.counts and clears the marks; with group_head, `group_union` lists the clusters marked 1
// (the group's exact heads) into a.union_counts and keeps the marks, and `group_rest` lists
// sinks, the clusters marked 2 and recent rows after them (a.rest_counts; a.counts the whole
// list) and clears every mark.
enum class RowsPass { all, group_union, group_rest };
void launch_build_rows(const StepGeometry& s, const SelectArgs& a, RowsPass pass);
void launch_dense_counts(const StepGeometry& s, const SelectArgs& a);

}  // namespace cuda
}  // namespace tactic
