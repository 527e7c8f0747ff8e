// The KV store: per (layer, sequence slot, KV head), K and V rows up to a fixed capacity.
//
// Row layout of one (layer, slot, head), all in the storage dtype:
//   [0, n_sink)                          attention sinks (the first tokens), arrival order
//   [n_sink, n_sink + n_clustered)       clustered region: cluster c is the contiguous block
//                                        offsets[c] .. offsets[c+1] (relative to n_sink)
//   [n_sink + n_clustered, n_total)      recent segment: decoded tokens in arrival order
// positions[row] is the token's position in its sequence, so every layout can be mapped
// back to token order. Policies other than `tactic` never cluster: their clustered region
// stays in arrival order (one block), which quest's positional pages rely on.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "tactic/options.hpp"
#include "tactic/tensor.hpp"

namespace tactic {

// Token counts of one (layer, slot); the same for every KV head.
struct SlotState {
  int64_t n_sink = 0;       // rows [0, n_sink)
  int64_t n_clustered = 0;  // rows after the sinks, grouped by cluster
  int64_t n_recent = 0;     // decoded since the last clustering, in arrival order
  int64_t total() const { return n_sink + n_clustered + n_recent; }  // tokens held
};

// Owns K/V rows, positions and cluster indexes for every (layer, slot, KV head), sized from
// the config once. A Decoder owns one and hands out const access (Decoder::store()); the
// mutating calls below do not check their arguments, Decoder does that first.
class KVStore {
 public:
  // Allocates everything up front; CapacityError naming the bytes needed when they exceed
  // the machine's memory (RAM + swap) or cannot be allocated.
  explicit KVStore(const DecoderConfig& cfg);
  // Bytes a store for `cfg` allocates (saturates at UINT64_MAX), before building it.
  static uint64_t bytes_needed(const DecoderConfig& cfg);

  const DecoderConfig& config() const { return cfg_; }
  int64_t capacity() const { return cfg_.max_tokens; }  // tokens per (layer, slot)
  int64_t max_clusters() const { return max_clusters_; }  // cluster slots per head
  std::size_t bytes() const;  // bytes held

  // Layout counts and length of one (layer, slot). Indices are not checked here.
  const SlotState& state(int64_t layer, int64_t slot) const { return state_[ls(layer, slot)]; }
  int64_t length(int64_t layer, int64_t slot) const { return state(layer, slot).total(); }

  // Row pointers (storage dtype, head_dim elements each; rows of a head are contiguous).
  // Pointers into the store: valid for its life, contents change with the next mutation.
  const void* k_row(int64_t layer, int64_t slot, int64_t head, int64_t row) const;
  const void* v_row(int64_t layer, int64_t slot, int64_t head, int64_t row) const;
  const int32_t* positions(int64_t layer, int64_t slot, int64_t head) const;  // [length] row -> position
  // Cluster index of the clustered region (policy tactic; C = 0 before any clustering).
  int64_t num_clusters(int64_t layer, int64_t slot, int64_t head) const;  // C
  const int32_t* offsets(int64_t layer, int64_t slot, int64_t head) const;   // [C + 1]
  const float* centroids(int64_t layer, int64_t slot, int64_t head) const;   // [C, D]
  // [C]: each cluster's mean squared distance of its keys (storage dtype) to its centroid
  // (as ranked: rounded to the storage dtype), per dimension. SelectOptions::spread uses it.
  const float* spreads(int64_t layer, int64_t slot, int64_t head) const;
  // Quest page bounds over positions (policy quest only): [pages, D] each.
  const float* page_min(int64_t layer, int64_t slot, int64_t head) const;
  const float* page_max(int64_t layer, int64_t slot, int64_t head) const;

  // Replace the slot's content for `layer` with n tokens: k, v are [n, Hkv, D] views (any
  // float dtype, outer strides free). Clusters the keys when the policy needs it.
  // Preconditions (checked by the Decoder): n <= capacity.
  void prefill(int64_t layer, int64_t slot, const TensorView& k, const TensorView& v);
  // Append one token per head: k / v point at Hkv rows (dtype `dtype`) with the given
  // stride in elements between heads.
  // Re-clusters first when the recent segment has reached recluster_interval.
  void append(int64_t layer, int64_t slot, const void* k, const void* v, DType dtype,
              int64_t head_stride_k, int64_t head_stride_v);
  // Fold the recent segment into the clustered region and re-cluster it.
  void recluster(int64_t layer, int64_t slot);
  void reset(int64_t slot);  // forget the slot in every layer

 private:
  int64_t ls(int64_t layer, int64_t slot) const { return layer * cfg_.max_batch + slot; }
  int64_t lsh(int64_t layer, int64_t slot, int64_t head) const {
    return ls(layer, slot) * cfg_.num_kv_heads + head;
  }
  void* k_row_mut(int64_t lsh_index, int64_t row);
  void* v_row_mut(int64_t lsh_index, int64_t row);
  void cluster_head(int64_t layer, int64_t slot, int64_t head, int64_t n_clustered);
  void update_pages(int64_t layer, int64_t slot, int64_t head, int64_t row_begin,
                    int64_t row_end);
  bool clusters() const { return cfg_.select.policy == Policy::tactic; }

  DecoderConfig cfg_;
  std::size_t row_bytes_ = 0;
  int64_t max_clusters_ = 0, max_pages_ = 0;
  // Uninitialised, lazily committed buffers: a large capacity costs address space, not
  // page faults, until rows are written.
  template <class T>
  struct Buffer {
    std::unique_ptr<T[]> p;
    std::size_t n = 0;
    void allocate(std::size_t count, const char* what);
    T* data() const { return p.get(); }
  };
  Buffer<uint8_t> k_, v_;            // [L, B, Hkv, cap, D] storage dtype
  Buffer<int32_t> pos_;              // [L, B, Hkv, cap]
  Buffer<int32_t> offsets_;          // [L, B, Hkv, Cmax + 1]
  Buffer<float> centroids_;          // [L, B, Hkv, Cmax, D]
  Buffer<float> spreads_;            // [L, B, Hkv, Cmax]
  std::vector<int64_t> num_clusters_;     // [L, B, Hkv]
  Buffer<float> page_min_, page_max_;  // [L, B, Hkv, pages, D] (quest only)
  std::vector<SlotState> state_;          // [L, B]
};

}  // namespace tactic
