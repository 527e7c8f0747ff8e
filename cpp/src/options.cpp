#include "tactic/options.hpp"

#include <cmath>
#include <sstream>

namespace tactic {

const char* policy_name(Policy p) {
  switch (p) {
    case Policy::tactic: return "tactic";
    case Policy::dense: return "dense";
    case Policy::oracle: return "oracle";
    case Policy::quest: return "quest";
    case Policy::topk: return "topk";
  }
  return "?";
}
const char* estimator_name(Estimator e) {
  return e == Estimator::centroid_prior ? "centroid_prior" : "two_segment";
}
const char* metric_name(Metric m) { return m == Metric::euclidean ? "euclidean" : "spherical"; }

const char* attention_kernel_name(AttentionKernel k) {
  switch (k) {
    case AttentionKernel::automatic: return "auto";
    case AttentionKernel::cuda_cores: return "cuda_cores";
    case AttentionKernel::tensor_cores: return "tensor_cores";
  }
  return "?";
}

AttentionKernel parse_attention_kernel(const std::string& s) {
  for (AttentionKernel k : {AttentionKernel::automatic, AttentionKernel::cuda_cores, AttentionKernel::tensor_cores})
    if (s == attention_kernel_name(k)) return k;
  throw ValueError("`attention_kernel` must be 'auto', 'cuda_cores' or 'tensor_cores', got '" + s + "'");
}
const char* selection_kernel_name(SelectionKernel k) {
  switch (k) {
    case SelectionKernel::automatic: return "auto";
    case SelectionKernel::ranked: return "ranked";
    case SelectionKernel::threshold: return "threshold";
  }
  return "?";
}

SelectionKernel parse_selection_kernel(const std::string& s) {
  for (SelectionKernel k : {SelectionKernel::automatic, SelectionKernel::ranked, SelectionKernel::threshold})
    if (s == selection_kernel_name(k)) return k;
  throw ValueError("`selection_kernel` must be 'auto', 'ranked' or 'threshold', got '" + s + "'");
}

std::string threshold_rule_fit(const DecoderConfig& cfg) {
  const SelectOptions& o = cfg.select;
  const bool grouped = cfg.num_q_heads > cfg.num_kv_heads;
  if (o.stop_rule != StopRule::prior) return "needs stop_rule='prior'";
  if (o.group_head && grouped) return "does not run with group_head";
  if (o.share_group && grouped) return "selects each query head independently: set share_group=False";
  if (o.estimator != Estimator::centroid_prior) return "needs estimator='centroid_prior'";
  return "";
}
const char* stop_rule_name(StopRule r) { return r == StopRule::certified ? "certified" : "prior"; }

Policy parse_policy(const std::string& s) {
  for (Policy p : {Policy::tactic, Policy::dense, Policy::oracle, Policy::quest, Policy::topk})
    if (s == policy_name(p)) return p;
  throw ValueError("`policy` must be one of 'tactic', 'dense', 'oracle', 'quest', 'topk', got '" +
                   s + "'");
}
Estimator parse_estimator(const std::string& s) {
  if (s == "centroid_prior") return Estimator::centroid_prior;
  if (s == "two_segment") return Estimator::two_segment;
  throw ValueError("`estimator` must be 'centroid_prior' or 'two_segment', got '" + s + "'");
}
Metric parse_metric(const std::string& s) {
  if (s == "euclidean") return Metric::euclidean;
  if (s == "spherical" || s == "cosine") return Metric::spherical;
  throw ValueError("`metric` must be 'euclidean' or 'spherical', got '" + s + "'");
}

StopRule parse_stop_rule(const std::string& s) {
  if (s == "certified") return StopRule::certified;
  if (s == "prior") return StopRule::prior;
  throw ValueError("`stop_rule` must be 'certified' or 'prior', got '" + s + "'");
}

namespace {
template <class T>
void require(bool ok, const char* name, const char* expect, T got) {
  if (ok) return;
  std::ostringstream s;
  s << "`" << name << "` must be " << expect << ", got " << got;
  throw ValueError(s.str());
}
}  // namespace

void validate(const SelectOptions& o) {
  require(std::isfinite(o.target) && o.target > 0 && o.target <= 1, "target", "in (0, 1]", o.target);
  require(std::isfinite(o.confidence) && o.confidence > 0 && o.confidence < 1, "confidence",
          "in (0, 1)", o.confidence);
  require(o.tail_samples >= 2 && o.tail_samples <= 65536, "tail_samples", "in [2, 65536]",
          o.tail_samples);
  require(o.max_rounds >= 0 && o.max_rounds <= 64, "max_rounds", "in [0, 64]", o.max_rounds);
  require(std::isfinite(o.margin) && o.margin >= 0 && o.margin <= 1, "margin", "in [0, 1]", o.margin);
  require(std::isfinite(o.spread) && o.spread >= 0 && o.spread <= 4, "spread", "in [0, 4]", o.spread);
  require(std::isfinite(o.head_fraction) && o.head_fraction >= 0 && o.head_fraction <= 1,
          "head_fraction", "in [0, 1]", o.head_fraction);
  require(std::isfinite(o.sample_fraction) && o.sample_fraction > 0 && o.sample_fraction <= 0.5,
          "sample_fraction", "in (0, 0.5]", o.sample_fraction);
  require(o.sample_rank_1 > 0 && o.sample_rank_1 < o.sample_rank_2 && o.sample_rank_2 < 1,
          "sample_rank_1, sample_rank_2", "0 < r1 < r2 < 1", o.sample_rank_1);
  require(o.sample_segments >= -1 && o.sample_segments <= 2, "sample_segments",
          "-1 (auto), 0, 1 or 2", o.sample_segments);
  require(o.estimator != Estimator::two_segment || o.segments() == 2, "sample_segments",
          "2 for the two_segment estimator", o.sample_segments);
  require(o.min_clusters >= 1, "min_clusters", ">= 1", o.min_clusters);
  require(o.budget >= 0, "budget", ">= 0", o.budget);
  require(o.page_size >= 1 && o.page_size <= 4096, "page_size", "in [1, 4096]", o.page_size);
}

void validate(const KMeansOptions& o) {
  require(o.num_clusters >= 1, "num_clusters", ">= 1", o.num_clusters);
  require(o.max_iters >= 1 && o.max_iters <= 1000, "max_iters", "in [1, 1000]", o.max_iters);
  require(o.num_threads >= 0, "num_threads", ">= 0", o.num_threads);
}

void DecoderConfig::validate() const {
  require(num_layers >= 1, "num_layers", ">= 1", num_layers);
  require(num_kv_heads >= 1, "num_kv_heads", ">= 1", num_kv_heads);
  require(num_q_heads >= 1 && num_q_heads % num_kv_heads == 0, "num_q_heads",
          "a positive multiple of num_kv_heads", num_q_heads);
  require(head_dim >= 1 && head_dim <= 1024, "head_dim", "in [1, 1024]", head_dim);
  require(max_batch >= 1, "max_batch", ">= 1", max_batch);
  require(max_tokens >= 1 && max_tokens < (int64_t(1) << 31), "max_tokens", "in [1, 2^31)",
          max_tokens);
  if (!is_float_storage(dtype))
    throw TypeError(std::string("`dtype` must be float16, bfloat16 or float32, got ") +
                    dtype_name(dtype));
#ifdef TACTIC_WITH_CUDA
  if (device.kind != DeviceKind::cpu && device.kind != DeviceKind::cuda)
#else
  if (device.kind != DeviceKind::cpu)
#endif
    throw UnsupportedError("`device` " + device_name(device) + " is not available in this build (" +
#ifdef TACTIC_WITH_CUDA
                           "CPU and CUDA backends)");
#else
                           "CPU backend only: built without CUDA)");
#endif
  tactic::validate(select);
  tactic::validate(kernels);
  require(cluster_size >= 1, "cluster_size", ">= 1", cluster_size);
  require(kmeans_iters >= 1 && kmeans_iters <= 1000, "kmeans_iters", "in [1, 1000]", kmeans_iters);
  require(num_sink >= 0, "num_sink", ">= 0", num_sink);
  require(recluster_interval >= 1, "recluster_interval", ">= 1", recluster_interval);
  require(std::isfinite(scale) && scale >= 0, "scale", ">= 0 (0: 1/sqrt(head_dim))", scale);
  require(num_threads >= 0, "num_threads", ">= 0", num_threads);
}

void validate(const KernelOptions& o) {
  const int h = o.head_split;
  require(h == 0 || h == 1 || h == 2 || h == 4, "head_split", "0 (automatic), 1, 2 or 4", h);
  const int a = (int)o.attention, p = (int)o.pdl;
  require(a >= 0 && a <= 2, "attention_kernel", "'auto', 'cuda_cores' or 'tensor_cores'", a);
  require(p >= -1 && p <= 1, "pdl", "automatic (-1), off (0) or on (1)", p);
  const int sk = (int)o.selection;
  require(sk >= 0 && sk <= 2, "selection_kernel", "'auto', 'ranked' or 'threshold'", sk);
}

double DecoderConfig::softmax_scale() const {
  return scale > 0 ? scale : 1.0 / std::sqrt((double)head_dim);
}

}  // namespace tactic
