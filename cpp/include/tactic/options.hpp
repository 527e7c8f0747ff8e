// Options shared by the decoder and the functional ops: plain value types, copied by whoever
// takes them. Defaults are the measured best choices (see bench/NOTES.md); every field is
// validated by validate().
#pragma once
#include <cstdint>
#include <string>

#include "tactic/tensor.hpp"

namespace tactic {

// Which tokens a decode step reads.
enum class Policy : int {
  tactic = 0,  // clusters ranked by q.centroid, stop point from an estimated softmax mass
  dense = 1,   // every token
  oracle = 2,  // exact minimal top-p set per query head (reads every key: a reference)
  quest = 3,   // positional pages of `page_size`, per-channel min/max bound, top pages at a budget
  topk = 4,    // exact top-`budget` tokens per KV head by the group's largest probability
               // (reads every key: a reference)
};

// How the tactic policy estimates the mass of the clusters it has not read.
enum class Estimator : int {
  centroid_prior = 0,  // size_c * exp(q.centroid_c / sqrt(D)), scaled to the exact samples
  two_segment = 1,     // the paper's y = a/x + b through two exact segment means
};

// Which chunk kernel the CUDA attention runs.
enum class AttentionKernel : int {
  automatic = 0,     // tensor cores for groups of 3-8 query heads with 16-bit K/V and D <= 128
                     // (measured: bench/NOTES.md, "tensor-core attention"), CUDA cores elsewhere
  cuda_cores = 1,    // any dtype, head dim and group
  tensor_cores = 2,  // mma.sync (sm_80 kernels): 16-bit K/V, D <= 128, groups up to 8
};

// How the CUDA step selects (the prior stop rule; select_threshold.hpp, bench/NOTES.md).
enum class SelectionKernel : int {
  automatic = 0,  // ranked (the threshold selection is a measured opt-in; see the plan)
  ranked = 1,     // score histogram + the crossing buckets ranked exactly, a row list, attention
  threshold = 2,  // whole crossing buckets, the attention reads the chosen clusters in two
                  // passes (exact head, rest) with no row list: 16-bit K/V, D 64/80/96/128,
                  // g <= 8, sm_80 kernels, stop_rule 'prior', not with group_head
};

// An on/off switch whose default the plan resolves from the device and the build.
enum class Switch : int { automatic = -1, off = 0, on = 1 };

// The CUDA step's kernel variants (DecoderConfig::kernels), resolved once into the decoder's
// StepPlan (tactic/plan.hpp) at construction and by Decoder::set_kernels; a request this build
// or device cannot honour is an UnsupportedError then, never a launch failure later.
struct KernelOptions {
  int head_split = 0;  // blocks per query head in the selection: 0 automatic, 1, 2 or 4 (2 and 4
                       // need the sm_90 thread-block-cluster kernels)
  AttentionKernel attention = AttentionKernel::automatic;
  Switch pdl = Switch::automatic;  // programmatic dependent launch (sm_90 kernels): automatic is on there
  SelectionKernel selection = SelectionKernel::automatic;
};

// When the tactic policy stops adding clusters (bench/NOTES.md, "A stop rule with its own
// guarantee").
enum class StopRule : int {
  certified = 0,  // exact mass of what is read + a sampled upper confidence bound on the rest;
                  // top-up rounds until P is certified at `confidence` (the default)
  prior = 1,      // the estimator's tail guess alone, aiming at P + margin * (1 - P)
};

// k-means distance: squared Euclidean, or cosine on L2-normalised rows ("spherical").
enum class Metric : int { euclidean = 0, spherical = 1 };

// Names as the Python API spells them ("tactic", "centroid_prior", "euclidean"); static
// strings. parse_* are the inverses (parse_metric also accepts "cosine").
const char* policy_name(Policy p);
const char* estimator_name(Estimator e);
const char* metric_name(Metric m);
const char* attention_kernel_name(AttentionKernel k);  // "auto", "cuda_cores", "tensor_cores"
AttentionKernel parse_attention_kernel(const std::string& s);  // throws ValueError naming `attention_kernel`
const char* selection_kernel_name(SelectionKernel k);  // "auto", "ranked", "threshold"
SelectionKernel parse_selection_kernel(const std::string& s);  // throws ValueError naming `selection_kernel`
const char* stop_rule_name(StopRule r);
Policy parse_policy(const std::string& s);        // throws ValueError naming `policy`
Estimator parse_estimator(const std::string& s);  // throws ValueError naming `estimator`
Metric parse_metric(const std::string& s);        // throws ValueError naming `metric`
StopRule parse_stop_rule(const std::string& s);   // throws ValueError naming `stop_rule`

// Options of one k-means run (tactic::kmeans).
struct KMeansOptions {
  int64_t num_clusters = 0;  // C >= 1; clamped to N when N < C
  int max_iters = 10;        // Lloyd iterations (>= 1)
  Metric metric = Metric::euclidean;
  uint64_t seed = 0;
  int num_threads = 0;  // 0: all cores
};

// How a decode step chooses the tokens each query head reads (DecoderConfig::select).
struct SelectOptions {
  Policy policy = Policy::tactic;
  double target = 0.9;  // P in (0, 1]: fraction of attention mass to keep
  StopRule stop_rule = StopRule::certified;
  // certified: each query head's kept mass reaches P with at least this probability over the
  // (seeded) tail sample, to the accuracy of a normal approximation of the sample mean.
  double confidence = 0.95;
  int64_t tail_samples = 64;  // certified: unread clusters drawn (with replacement; scored whole) per query head
  int max_rounds = 4;         // certified: top-up rounds at most after the first read
  Estimator estimator = Estimator::centroid_prior;
  // The prior stop rule aims at P_eff = P + margin * (1 - P), against estimation error.
  double margin = 0.35;
  // Ranking and the mass prior score cluster c by q.c + spread * |q|^2 s_c / 2, where s_c is
  // the cluster's mean squared distance to its centroid per dimension: the log-normal mean
  // of exp(q.k) over a cluster of that width, so a wide cluster's mass is not understated
  // (Jensen). 0 ranks by q.c alone (the paper). Measured: bench/NOTES.md, "spread".
  double spread = 0.75;
  double head_fraction = 0.02;    // exact head: first ~2% of ranked clustered tokens (at least
                                  // one cluster; with the certified rule 0 reads none, alpha 1)
  double sample_fraction = 0.01;  // size of each exact sample segment
  double sample_rank_1 = 0.10;    // where the two sample segments start (fraction of ranks)
  double sample_rank_2 = 0.60;
  // Exact sample segments read besides the head: -1 picks 0 for centroid_prior (the exact
  // head calibrates it; measured: fewer reads at equal success) and 2 for two_segment.
  int sample_segments = -1;
  int segments() const {  // sample_segments with -1 resolved
    return sample_segments >= 0 ? sample_segments : (estimator == Estimator::two_segment ? 2 : 0);
  }
  // GQA: a query head scores exactly the clusters earlier heads of its group already chose
  // (they are read for the union anyway). Sequential across the G heads.
  bool share_group = true;
  // GQA: every query head of a group reads exactly the union of the group's exact heads (not
  // its own head alone), calibrates alpha on it and attends it. On a GPU that union is one
  // attention pass whose log-sum-exp gives the exact masses (no separate exact read).
  bool group_head = false;
  int64_t min_clusters = 8;   // with fewer clusters than this, select all (fit degenerate)
  int64_t budget = 0;         // tokens per KV head for quest/topk (0: must be given per call)
  int64_t page_size = 16;     // quest page size
};

// Everything a Decoder is built from: model geometry, capacity (all memory is allocated at
// construction from these), storage dtype, device and selection options. max_tokens has no
// usable default: set it.
struct DecoderConfig {
  int64_t num_layers = 1;
  int64_t num_q_heads = 1;   // Hq, a multiple of num_kv_heads (G = Hq / Hkv query heads per KV head)
  int64_t num_kv_heads = 1;  // Hkv
  int64_t head_dim = 64;     // D, in [1, 1024]
  int64_t max_batch = 1;   // sequence slots
  int64_t max_tokens = 0;  // capacity per slot (prefill + decoded tokens)
  DType dtype = DType::f16;  // KV storage dtype: f32, f16 or bf16
  Device device{};           // where the store lives and every input must be (cuda: CUDA builds only)
  SelectOptions select{};
  KernelOptions kernels{};           // CUDA kernel variants (ignored on the CPU)
  int64_t cluster_size = 16;         // average tokens per k-means cluster
  int kmeans_iters = 10;             // Lloyd iterations per clustering
  Metric metric = Metric::euclidean;
  uint64_t seed = 0;                 // k-means initialisation seed
  int64_t num_sink = 4;              // first tokens always attended exactly, never clustered
  int64_t recluster_interval = 2048; // decoded tokens before the recent segment is re-clustered
  double scale = 0.0;                // softmax scale; 0 means 1/sqrt(head_dim)
  bool record_selection = false;     // keep per-token selection masks for stats() (B*(Hkv+Hq)*max_tokens bytes a layer)
  int num_threads = 0;               // 0: all cores

  // Throws ValueError naming the first bad field and its allowed range (TypeError for a
  // non-float dtype, UnsupportedError for a device this build lacks).
  void validate() const;
  double softmax_scale() const;  // `scale`, or 1/sqrt(head_dim) when it is 0
};

// Empty where selection_kernel='threshold' fits cfg's selection rule (stop_rule 'prior', the
// centroid_prior estimator, query heads independent: no share_group or group_head where a KV
// head has several), else the reason; both backends refuse with it (CUDA adds its kernels' fit).
std::string threshold_rule_fit(const DecoderConfig& cfg);

// Throw ValueError naming the first out-of-range field.
void validate(const SelectOptions& o);
void validate(const KMeansOptions& o);
void validate(const KernelOptions& o);

}  // namespace tactic
