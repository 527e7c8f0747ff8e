#include "tactic/store.hpp"

#include <algorithm>
#include <cstring>
#include <new>
#include <string>

#include "host_memory.hpp"
#include "tactic/convert.hpp"
#include "tactic/kmeans.hpp"

namespace tactic {

template <class T>
void KVStore::Buffer<T>::allocate(std::size_t count, const char* what) {
  n = count;
  if (count == 0) { p.reset(); return; }
  T* raw = new (std::nothrow) T[count];
  if (!raw)
    throw CapacityError(std::string("cannot allocate ") + std::to_string(count * sizeof(T)) +
                        " bytes for the KV store's " + what +
                        " (the whole store needs more); lower max_tokens, max_batch or num_layers");
  p.reset(raw);
}

KVStore::KVStore(const DecoderConfig& cfg) : cfg_(cfg) {
  cfg_.validate();
  const std::size_t L = cfg_.num_layers, B = cfg_.max_batch, H = cfg_.num_kv_heads,
                    cap = cfg_.max_tokens, D = cfg_.head_dim;
  row_bytes_ = D * dtype_size(cfg_.dtype);
  max_clusters_ = (cfg_.max_tokens + cfg_.cluster_size - 1) / cfg_.cluster_size + 1;
  max_pages_ = (cfg_.max_tokens + cfg_.select.page_size - 1) / cfg_.select.page_size;
  // Report the whole requirement at once, before allocating, in case it cannot fit.
  require_host_bytes(bytes_needed(cfg_), "the KV store");
  k_.allocate(L * B * H * cap * row_bytes_, "keys");
  v_.allocate(L * B * H * cap * row_bytes_, "values");
  pos_.allocate(L * B * H * cap, "positions");
  if (clusters()) {
    offsets_.allocate(L * B * H * (max_clusters_ + 1), "cluster offsets");
    centroids_.allocate(L * B * H * max_clusters_ * D, "centroids");
    spreads_.allocate(L * B * H * max_clusters_, "cluster spreads");
  }
  if (cfg_.select.policy == Policy::quest) {
    page_min_.allocate(L * B * H * max_pages_ * D, "quest page bounds");
    page_max_.allocate(L * B * H * max_pages_ * D, "quest page bounds");
  }
  num_clusters_.assign(L * B * H, 0);
  state_.assign(L * B, SlotState{});
}

uint64_t KVStore::bytes_needed(const DecoderConfig& c) {
  // Mirrors the allocations of the constructor, in saturating arithmetic.
  const uint64_t heads = mul_sat(mul_sat(c.num_layers, c.max_batch), c.num_kv_heads);
  const uint64_t cap = c.max_tokens, D = c.head_dim;
  const uint64_t clusters = (cap + c.cluster_size - 1) / c.cluster_size + 1;
  const uint64_t pages = (cap + c.select.page_size - 1) / c.select.page_size;
  uint64_t per_head = add_sat(mul_sat(2 * cap, mul_sat(D, dtype_size(c.dtype))), 4 * cap);
  if (c.select.policy == Policy::tactic)
    per_head = add_sat(per_head, mul_sat(4, add_sat(2 * clusters + 1, mul_sat(clusters, D))));
  if (c.select.policy == Policy::quest) per_head = add_sat(per_head, mul_sat(8, mul_sat(pages, D)));
  per_head = add_sat(per_head, sizeof(int64_t));  // num_clusters_
  const uint64_t states = mul_sat(mul_sat(c.num_layers, c.max_batch), sizeof(SlotState));
  return add_sat(mul_sat(heads, per_head), states);
}

std::size_t KVStore::bytes() const {
  return k_.n + v_.n + 4 * (pos_.n + offsets_.n + centroids_.n + spreads_.n + page_min_.n + page_max_.n);
}

const void* KVStore::k_row(int64_t layer, int64_t slot, int64_t head, int64_t row) const {
  return k_.data() + ((std::size_t)lsh(layer, slot, head) * cfg_.max_tokens + row) * row_bytes_;
}
const void* KVStore::v_row(int64_t layer, int64_t slot, int64_t head, int64_t row) const {
  return v_.data() + ((std::size_t)lsh(layer, slot, head) * cfg_.max_tokens + row) * row_bytes_;
}
void* KVStore::k_row_mut(int64_t i, int64_t row) {
  return k_.data() + ((std::size_t)i * cfg_.max_tokens + row) * row_bytes_;
}
void* KVStore::v_row_mut(int64_t i, int64_t row) {
  return v_.data() + ((std::size_t)i * cfg_.max_tokens + row) * row_bytes_;
}
const int32_t* KVStore::positions(int64_t layer, int64_t slot, int64_t head) const {
  return pos_.data() + (std::size_t)lsh(layer, slot, head) * cfg_.max_tokens;
}
int64_t KVStore::num_clusters(int64_t layer, int64_t slot, int64_t head) const {
  return num_clusters_[lsh(layer, slot, head)];
}
const int32_t* KVStore::offsets(int64_t layer, int64_t slot, int64_t head) const {
  return offsets_.data() + (std::size_t)lsh(layer, slot, head) * (max_clusters_ + 1);
}
const float* KVStore::centroids(int64_t layer, int64_t slot, int64_t head) const {
  return centroids_.data() + (std::size_t)lsh(layer, slot, head) * max_clusters_ * cfg_.head_dim;
}
const float* KVStore::spreads(int64_t layer, int64_t slot, int64_t head) const {
  return spreads_.data() + (std::size_t)lsh(layer, slot, head) * max_clusters_;
}
const float* KVStore::page_min(int64_t layer, int64_t slot, int64_t head) const {
  return page_min_.data() + (std::size_t)lsh(layer, slot, head) * max_pages_ * cfg_.head_dim;
}
const float* KVStore::page_max(int64_t layer, int64_t slot, int64_t head) const {
  return page_max_.data() + (std::size_t)lsh(layer, slot, head) * max_pages_ * cfg_.head_dim;
}

namespace {
// Copy one row of d elements from `src` (dtype sd) to `dst` (dtype dd).
void copy_row(const void* src, DType sd, void* dst, DType dd, int64_t d, float* tmp) {
  if (sd == dd) {
    std::memcpy(dst, src, d * dtype_size(sd));
  } else {
    load_floats(src, sd, d, tmp);
    store_floats(tmp, d, dd, dst);
  }
}
}  // namespace

void KVStore::prefill(int64_t layer, int64_t slot, const TensorView& k, const TensorView& v) {
  const int64_t n = k.shape[0], H = cfg_.num_kv_heads, D = cfg_.head_dim;
  std::vector<float> tmp(D);
  const std::size_t ek = dtype_size(k.dtype), ev = dtype_size(v.dtype);
  for (int64_t h = 0; h < H; ++h) {
    const int64_t i = lsh(layer, slot, h);
    int32_t* pos = pos_.data() + (std::size_t)i * cfg_.max_tokens;
    for (int64_t t = 0; t < n; ++t) {
      const uint8_t* ks = static_cast<const uint8_t*>(k.data) + (t * k.strides[0] + h * k.strides[1]) * ek;
      const uint8_t* vs = static_cast<const uint8_t*>(v.data) + (t * v.strides[0] + h * v.strides[1]) * ev;
      copy_row(ks, k.dtype, k_row_mut(i, t), cfg_.dtype, D, tmp.data());
      copy_row(vs, v.dtype, v_row_mut(i, t), cfg_.dtype, D, tmp.data());
      pos[t] = (int32_t)t;
    }
  }
  SlotState& st = state_[ls(layer, slot)];
  st.n_sink = std::min<int64_t>(cfg_.num_sink, n);
  st.n_clustered = n - st.n_sink;
  st.n_recent = 0;
  for (int64_t h = 0; h < H; ++h) {
    if (clusters()) cluster_head(layer, slot, h, st.n_clustered);
    if (cfg_.select.policy == Policy::quest) update_pages(layer, slot, h, 0, n);
  }
}

void KVStore::append(int64_t layer, int64_t slot, const void* k, const void* v, DType dtype,
                     int64_t head_stride_k, int64_t head_stride_v) {
  SlotState& st = state_[ls(layer, slot)];
  if (clusters() && st.n_recent >= cfg_.recluster_interval) recluster(layer, slot);
  const int64_t H = cfg_.num_kv_heads, D = cfg_.head_dim, row = st.total();
  const std::size_t es = dtype_size(dtype);
  std::vector<float> tmp(D);
  for (int64_t h = 0; h < H; ++h) {
    const int64_t i = lsh(layer, slot, h);
    copy_row(static_cast<const uint8_t*>(k) + h * head_stride_k * es, dtype, k_row_mut(i, row),
             cfg_.dtype, D, tmp.data());
    copy_row(static_cast<const uint8_t*>(v) + h * head_stride_v * es, dtype, v_row_mut(i, row),
             cfg_.dtype, D, tmp.data());
    pos_.data()[(std::size_t)i * cfg_.max_tokens + row] = (int32_t)row;
  }
  // A prefill shorter than num_sink leaves sink places open: early tokens stay sinks.
  if (st.n_clustered == 0 && st.n_recent == 0 && st.n_sink < cfg_.num_sink) ++st.n_sink;
  else ++st.n_recent;
  if (cfg_.select.policy == Policy::quest)
    for (int64_t h = 0; h < H; ++h) update_pages(layer, slot, h, row, row + 1);
}

void KVStore::recluster(int64_t layer, int64_t slot) {
  SlotState& st = state_[ls(layer, slot)];
  if (!clusters() || st.n_recent == 0) return;
  st.n_clustered += st.n_recent;
  st.n_recent = 0;
  for (int64_t h = 0; h < cfg_.num_kv_heads; ++h) cluster_head(layer, slot, h, st.n_clustered);
}

void KVStore::cluster_head(int64_t layer, int64_t slot, int64_t head, int64_t nc) {
  const int64_t i = lsh(layer, slot, head), D = cfg_.head_dim;
  const int64_t base = state_[ls(layer, slot)].n_sink;
  int32_t* off = offsets_.data() + (std::size_t)i * (max_clusters_ + 1);
  float* cent = centroids_.data() + (std::size_t)i * max_clusters_ * D;
  if (nc <= 0) {
    num_clusters_[i] = 0;
    off[0] = 0;
    return;
  }
  KMeansOptions ko;
  ko.num_clusters = (nc + cfg_.cluster_size - 1) / cfg_.cluster_size;
  ko.max_iters = cfg_.kmeans_iters;
  ko.metric = cfg_.metric;
  // Independent of the slot, so a sequence clusters the same wherever it lives.
  ko.seed = cfg_.seed * 0x9E3779B97F4A7C15ull + (uint64_t)layer * 1000003ull + (uint64_t)head * 7919ull;
  ko.num_threads = cfg_.num_threads;
  std::vector<int32_t> assign(nc), perm(nc);
  const KMeansResult r = kmeans(k_row_mut(i, base), cfg_.dtype, nc, D, D, ko, cent, assign.data());
  cluster_permutation(assign.data(), nc, r.num_clusters, perm.data(), off);
  num_clusters_[i] = r.num_clusters;
  // Ranking and the mass prior need q.(mean key) of each cluster: the spherical metric's
  // centroids are unit directions, so store the plain mean of the member keys instead.
  if (cfg_.metric == Metric::spherical) {
    std::vector<double> sum(D);
    std::vector<float> row(D);
    for (int64_t j = 0; j < r.num_clusters; ++j) {
      std::fill(sum.begin(), sum.end(), 0.0);
      for (int32_t t = off[j]; t < off[j + 1]; ++t) {
        load_floats(k_row_mut(i, base + perm[t]), cfg_.dtype, D, row.data());
        for (int64_t k = 0; k < D; ++k) sum[k] += row[k];
      }
      const int64_t cnt = off[j + 1] - off[j];
      for (int64_t k = 0; k < D; ++k) cent[j * D + k] = cnt ? (float)(sum[k] / cnt) : 0.f;
    }
  }
  // Ranking reads the centroids in the storage dtype (on the GPU they are the selection's
  // largest read: half the bytes of fp32), so round them here: both backends then score the
  // same values and pick the same clusters.
  if (cfg_.dtype != DType::f32) {
    std::vector<uint8_t> low((std::size_t)r.num_clusters * D * dtype_size(cfg_.dtype));
    store_floats(cent, r.num_clusters * D, cfg_.dtype, low.data());
    load_floats(low.data(), cfg_.dtype, r.num_clusters * D, cent);
  }
  // Re-index: physically permute K, V and positions so each cluster is one block.
  std::vector<uint8_t> kt(nc * row_bytes_), vt(nc * row_bytes_);
  std::vector<int32_t> pt(nc);
  int32_t* pos = pos_.data() + (std::size_t)i * cfg_.max_tokens + base;
  std::memcpy(kt.data(), k_row_mut(i, base), nc * row_bytes_);
  std::memcpy(vt.data(), v_row_mut(i, base), nc * row_bytes_);
  std::memcpy(pt.data(), pos, nc * 4);
  for (int64_t j = 0; j < nc; ++j) {
    std::memcpy(k_row_mut(i, base + j), kt.data() + perm[j] * row_bytes_, row_bytes_);
    std::memcpy(v_row_mut(i, base + j), vt.data() + perm[j] * row_bytes_, row_bytes_);
    pos[j] = pt[perm[j]];
  }
  // Spreads, from the rows as stored and the centroids as ranked (double sums: the CUDA
  // backend computes the same quantity: cluster_spreads in cuda/store.cu).
  float* spr = spreads_.data() + (std::size_t)i * max_clusters_;
  std::vector<float> row(D);
  for (int64_t j = 0; j < r.num_clusters; ++j) {
    double sum = 0;
    for (int32_t t = off[j]; t < off[j + 1]; ++t) {
      load_floats(k_row_mut(i, base + t), cfg_.dtype, D, row.data());
      for (int64_t k = 0; k < D; ++k) {
        const double e = (double)row[k] - cent[j * D + k];
        sum += e * e;
      }
    }
    const int64_t cnt = off[j + 1] - off[j];
    spr[j] = cnt ? (float)(sum / ((double)cnt * D)) : 0.f;
  }
}

void KVStore::update_pages(int64_t layer, int64_t slot, int64_t head, int64_t r0, int64_t r1) {
  // Quest never clusters, so rows are positions and page p is rows [p * ps, (p + 1) * ps).
  const int64_t ps = cfg_.select.page_size, D = cfg_.head_dim, i = lsh(layer, slot, head);
  const int64_t n = state_[ls(layer, slot)].total();
  float* pmin = page_min_.data() + (std::size_t)i * max_pages_ * D;
  float* pmax = page_max_.data() + (std::size_t)i * max_pages_ * D;
  std::vector<float> row(D);
  for (int64_t p = r0 / ps; p * ps < std::min(r1, n); ++p) {
    float* lo = pmin + p * D;
    float* hi = pmax + p * D;
    for (int64_t t = p * ps; t < std::min(n, (p + 1) * ps); ++t) {
      load_floats(k_row_mut(i, t), cfg_.dtype, D, row.data());
      for (int64_t k = 0; k < D; ++k) {
        if (t == p * ps || row[k] < lo[k]) lo[k] = row[k];
        if (t == p * ps || row[k] > hi[k]) hi[k] = row[k];
      }
    }
  }
}

void KVStore::reset(int64_t slot) {
  for (int64_t l = 0; l < cfg_.num_layers; ++l) {
    state_[ls(l, slot)] = SlotState{};
    for (int64_t h = 0; h < cfg_.num_kv_heads; ++h) num_clusters_[lsh(l, slot, h)] = 0;
  }
}

}  // namespace tactic
