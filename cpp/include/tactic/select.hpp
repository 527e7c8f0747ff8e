// Token selection for one (sequence, KV head) and its G query heads: every policy of
// options.hpp, the GQA union, and per-head statistics. The building block under
// Decoder::decode, exposed for tools that want selection alone (CPU store only).
#pragma once
#include <cstdint>
#include <vector>

#include "tactic/attention.hpp"
#include "tactic/options.hpp"
#include "tactic/store.hpp"

namespace tactic {

// One (sequence, KV head)'s selection. Row indices are rows of the store's physical layout
// (see store.hpp; KVStore::positions maps them to token positions).
struct KVSelection {
  std::vector<RowRange> rows;  // union over the G heads, sorted, disjoint: what is read
  int64_t union_tokens = 0;    // rows covered by `rows`
  std::vector<int64_t> head_tokens;   // [G] tokens each query head selected on its own
  std::vector<double> est_mass;       // [G] the selector's estimate of its own mass (NaN: none)
  std::vector<std::vector<RowRange>> head_rows;  // [G] per-head sets (only when recorded)
};

// Per-thread scratch so selection allocates nothing in steady state.
struct SelectScratch {
  std::vector<float> score, logit;
  std::vector<int32_t> order;
  std::vector<double> mass;
  std::vector<uint8_t> state, mark;
  std::vector<float> row;
  std::vector<int32_t> fresh, draw_cluster;  // certified stop: prefix to score; sample clusters
  std::vector<double> cdf, draw_y, drawn;    // certified stop: proposal CDF; draw values; drawn clusters' mass
  std::vector<uint8_t> certain;              // certified stop: clusters scored with certainty
  std::vector<double> prior;                 // certified stop: each cluster's prior mass w_j
  std::vector<int32_t> walk;                 // certified stop: the certainty walk's order
  std::vector<float> group_logit;            // tactic: exact logits of read clusters, a block per scoring
  std::vector<int64_t> group_at;             // tactic: each cluster's block in group_logit (-1: none)
  std::vector<int32_t> group_heads;          // tactic: per cluster, the heads [h0, h1) held in group_logit
  std::vector<float> head_score;             // certified stop: [G, clusters] first-pass scores
  std::vector<int32_t> head_order;           // certified stop: [G, clusters] their lazy ranking
  std::vector<int64_t> head_sorted;          // certified stop: its sorted prefix per head
  std::vector<int32_t> bucket;               // threshold: each cluster's score bucket
  std::vector<double> tok, pri;              // threshold: tokens and prior through each bucket
};

// Select for KV head `head` of (layer, slot) and its G query heads; results replace `out`.
// q: [G, D] float32 host memory, already multiplied by the softmax scale.
// budget: tokens for quest/topk (<= 0: the options' budget). record_heads fills
// out.head_rows. `scratch` is reused between calls (one per thread). Arguments are not
// checked here: Decoder::decode checks them. selection (KernelOptions::selection): threshold
// selects as CUDA's threshold selection does (the prior rule, each head's exact head and stop
// taken as whole score buckets; prior rule, heads independent); else by rank.
void select_kv_head(const KVStore& store, int64_t layer, int64_t slot, int64_t head,
                    const float* q, int64_t g, const SelectOptions& opt, int64_t budget,
                    bool record_heads, SelectScratch& scratch, KVSelection& out,
                    SelectionKernel selection = SelectionKernel::automatic);

}  // namespace tactic
