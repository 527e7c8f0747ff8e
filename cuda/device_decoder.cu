#include "device_decoder.hpp"

#include <algorithm>
#include <cstring>
#include <string>

#include "attention.hpp"
#include "capabilities.hpp"
#include "common.cuh"
#include "host_memory.hpp"
#include "kmeans.hpp"
#include "plan.hpp"
#include "select.hpp"
#include "select_threshold.hpp"
#include "store.hpp"
#include "tail_sample.hpp"
#include "tactic/decoder.hpp"

namespace tactic {
namespace cuda {

namespace {

// Device allocation owned by the decoder; freed on destruction, even after an exception.
struct DeviceBuffer {
  void* p = nullptr;
  std::size_t n = 0;
  void allocate(std::size_t bytes, const char* what) {
    if (bytes == 0) return;
    const cudaError_t e = cudaMalloc(&p, bytes);
    if (e != cudaSuccess) {
      cudaGetLastError();  // clear the sticky-free error state of a failed allocation
      throw CapacityError(std::string("cannot allocate ") + std::to_string(bytes) + " bytes of GPU memory for " +
                          what + " (" + cudaGetErrorString(e) + "); lower max_tokens or max_batch");
    }
    n = bytes;
  }
  ~DeviceBuffer() {
    if (p) cudaFree(p);
  }
  template <class T> T* as() const { return static_cast<T*>(p); }
};

// Makes the decoder's device current for the lifetime of a call, then restores the caller's.
struct DeviceGuard {
  int prev = -1;
  explicit DeviceGuard(int dev) {
    TACTIC_CUDA_CHECK(cudaGetDevice(&prev));
    if (prev != dev) TACTIC_CUDA_CHECK(cudaSetDevice(dev));
  }
  ~DeviceGuard() {
    int cur = -1;
    if (cudaGetDevice(&cur) == cudaSuccess && cur != prev) cudaSetDevice(prev);
  }
};

}  // namespace

struct DeviceDecoder::Impl {
  DecoderConfig cfg;
  int dev = 0;
  StepPlan plan;  // the step's kernel variants, resolved (make_step_plan)
  double z_conf = 0.0;  // the certified rule's normal quantile of `confidence` (fixed at construction)
  int64_t L, B, H, Hq, G, D, cap, cmax;
  std::size_t es;
  DeviceBuffer k, v, pos, centroids, centroids_low, spreads, offsets, state;
  DeviceBuffer qf, scores, seg_max, ids, tasks, sel_scratch;
  DeviceBuffer kv_mark, head_mark, rows, chunk_sums, counts, head_tokens, est_mass, head_index, slots, attn_ws;
  DeviceBuffer cert_mark;                     // [B * Hq, cmax] the certified rule's per-head marks
  DeviceBuffer carry, pass_counts;            // group_head: [B * Hq] union records; [2, B * Hkv] pass rows
  DeviceBuffer thr_state, layer_mark;         // the threshold selection's state; per layer marks and work (lazy)
  DeviceBuffer lost;                          // [L * B] int32: tokens a replayed append found no room for
  std::vector<SlotState> host_state;          // [L * B] mirror of the device counts
  // [L * B]: an append of this (layer, slot) was captured in a CUDA graph. Its replays advance
  // the device counts behind the host's back, so from then on the mirror is re-read from the
  // device before every host use (refresh).
  std::vector<uint8_t> graphed;
  bool graphs_seen = false;  // a step was captured: replays may rewrite `slots` at any time
  std::vector<std::vector<int64_t>> last_slots;  // [L] slots of the last decode
  std::vector<int64_t> slots_on_device;          // what `slots` holds now

  // Uploads the step's slot list unless the device already holds it (decode and attend).
  // A captured step always records the upload (its replays must set their own list), and once
  // one was captured the device list is never assumed: a replay may have changed it.
  void use_slots(const std::vector<int64_t>& slot_list, void* stream) {
    const bool cap = capturing(stream);
    if (!cap && !graphs_seen && slot_list == slots_on_device) return;
    set_slots(slots.as<int32_t>(), slot_list.data(), (int64_t)slot_list.size(), stream);
    slots_on_device = slot_list;
    graphs_seen = graphs_seen || cap;
  }

  // The start of decode and attend: the slot list and the step's geometry.
  StepGeometry begin_step(int64_t layer, const std::vector<int64_t>& slot_list, void* stream) {
    use_slots(slot_list, stream);
    return geometry(layer, (int64_t)slot_list.size(), stream);
  }

  static bool capturing(void* stream) {
    cudaStreamCaptureStatus st = cudaStreamCaptureStatusNone;
    if (cudaStreamIsCapturing(as_stream(stream), &st) != cudaSuccess) {
      (void)cudaGetLastError();
      return false;
    }
    return st == cudaStreamCaptureStatusActive;
  }

  // The mirror of (layer, slot) from the device, where replays of a captured append may have
  // advanced it (not while `stream` is capturing: no synchronisation is allowed then, and the
  // counts cannot have moved since the capture began). Raises CapacityError, once, for tokens
  // those replays could not store.
  void refresh(int64_t layer, int64_t slot, void* stream) {
    const int64_t i = ls(layer, slot);
    if (!graphed[i] || capturing(stream)) return;
    TACTIC_CUDA_CHECK(cudaDeviceSynchronize());  // replays may run on any stream
    SlotCounts c{};
    int32_t n_lost = 0;
    TACTIC_CUDA_CHECK(cudaMemcpy(&c, state.as<SlotCounts>() + i, sizeof c, cudaMemcpyDeviceToHost));
    TACTIC_CUDA_CHECK(cudaMemcpy(&n_lost, lost.as<int32_t>() + i, sizeof n_lost, cudaMemcpyDeviceToHost));
    // (The last selection stays valid: a replayed append is followed by its step's selection.)
    SlotState& st = host_state[i];
    st.n_sink = c.n_sink;
    st.n_clustered = c.n_clustered;
    st.n_recent = c.n_recent;
    if (n_lost > 0) {
      TACTIC_CUDA_CHECK(cudaMemset(lost.as<int32_t>() + i, 0, sizeof n_lost));
      throw CapacityError("sequence slot " + std::to_string(slot) + " of layer " + std::to_string(layer) +
                          " filled up during replays of a captured decode step: " + std::to_string(n_lost) +
                          " appended token(s) past `max_tokens`=" + std::to_string(cap) +
                          " were not stored (the slot keeps its first max_tokens tokens)");
    }
  }

  int64_t ls(int64_t l, int64_t s) const { return l * B + s; }
  // A selection of `layer` that covers `slot` is stale once the slot's rows change.
  void forget_selection(int64_t layer, int64_t slot) {
    std::vector<int64_t>& ls_ = last_slots[layer];
    if (std::find(ls_.begin(), ls_.end(), slot) != ls_.end()) ls_.clear();
  }
  int64_t lsh(int64_t l, int64_t s, int64_t h) const { return ls(l, s) * H + h; }
  bool clusters() const { return cfg.select.policy == Policy::tactic; }
  bool certified() const { return clusters() && cfg.select.stop_rule == StopRule::certified; }
  bool group_head() const { return clusters() && cfg.select.group_head && G > 1; }
  bool threshold() const { return clusters() && plan.selection == SelectionKernel::threshold; }
  // The threshold selection's state and per-layer marks, allocated and zeroed the first time a
  // plan picks that selection (a decoder that never does keeps the memory); CapacityError, with
  // nothing changed, where they do not fit.
  void ensure_threshold_state(const StepPlan& p) {
    if (!clusters() || p.selection != SelectionKernel::threshold || (thr_state.p && layer_mark.p)) return;
    const uint64_t items = (uint64_t)B * H;
    const uint64_t st = threshold_state_bytes(B * Hq, (int64_t)items, G, D, cmax, p.sm_count),
                   marks = add_sat(mark_bytes(), mul_sat((uint64_t)L, items * 8));
    std::size_t free_bytes = 0, device_bytes = 0;
    TACTIC_CUDA_CHECK(cudaMemGetInfo(&free_bytes, &device_bytes));
    const uint64_t total = add_sat(thr_state.p ? 0 : st, layer_mark.p ? 0 : marks);
    if (total > free_bytes)
      throw CapacityError("the threshold selection needs " + std::to_string(total) + " more bytes (" + gib(total) +
                          ") of GPU memory; cuda:" + std::to_string(dev) + " has " + std::to_string(free_bytes) +
                          " free; lower max_tokens or max_batch");
    if (!thr_state.p) {
      thr_state.allocate(st, "threshold selection state");
      TACTIC_CUDA_CHECK(cudaMemset(thr_state.p, 0, thr_state.n));
    }
    if (!layer_mark.p) {
      layer_mark.allocate(marks, "selection marks");
      TACTIC_CUDA_CHECK(cudaMemset(layer_mark.p, 0, layer_mark.n));
    }
  }
  // layer_mark's [L, B * Hkv, cmax] marks; then, 16-byte aligned, [L, B * Hkv] rest-pass work.
  uint64_t mark_bytes() const { return (mul_sat((uint64_t)L, mul_sat((uint64_t)B * H, (uint64_t)cmax)) + 15) / 16 * 16; }
  // The threshold selection's step (select_threshold.hpp); `reuse`: attention over the layer's
  // last selection only.
  void threshold(int64_t layer, const StepGeometry& geo, const SelectArgs& a, const TensorView* out, bool reuse);
  // Clusters of a clustered region of n tokens: ceil(n / cluster_size), at most n (the CPU
  // store's count).
  int64_t clusters_for(int64_t n) const {
    return n > 0 ? std::min<int64_t>((n + cfg.cluster_size - 1) / cfg.cluster_size, n) : 0;
  }

  // The attention over the layer's row list; `rest`: only the rows after the union (group_head,
  // right after a selection), merged with the union pass's records.
  void attention(int64_t layer, const StepGeometry& geo, const TensorView& out, bool rest = false);
  // group_head's row counts per pass: [union | rest], B * Hkv each (pass_counts).
  int32_t* union_counts() const { return pass_counts.as<int32_t>(); }
  int32_t* rest_counts() const { return pass_counts.as<int32_t>() + (std::size_t)(B * H); }
  void fill_attention(int64_t layer, const StepGeometry& geo, AttentionArgs& at) const;

  StepGeometry geometry(int64_t layer, int64_t batch, void* stream) {
    StepGeometry g;
    g.layer = layer;
    g.max_batch = B;
    g.hkv = H;
    g.g = G;
    g.d = D;
    g.cap = cap;
    g.cmax = cmax;
    g.batch = batch;
    g.slots = slots.as<int32_t>();
    g.state = state.as<SlotCounts>();
    g.stream = stream;
    g.pdl = plan.pdl;
    return g;
  }

  void push_counts(int64_t layer, int64_t slot, void* stream) {
    const SlotState& st = host_state[ls(layer, slot)];
    const int64_t c = clusters() ? clusters_for(st.n_clustered) : 0;
    set_counts(state.as<SlotCounts>(), ls(layer, slot),
               SlotCounts{(int32_t)st.n_sink, (int32_t)st.n_clustered, (int32_t)st.n_recent, (int32_t)c}, stream);
  }

  // Cluster the clustered region of every KV head of (layer, slot) and re-index it.
  void cluster(int64_t layer, int64_t slot, void* stream) {
    const SlotState& st = host_state[ls(layer, slot)];
    if (!clusters() || st.n_clustered <= 0) return;
    const int64_t n = st.n_clustered;
    std::vector<uint64_t> seeds(H);
    for (int64_t h = 0; h < H; ++h)  // the CPU store's per-head seed
      seeds[h] = cfg.seed * 0x9E3779B97F4A7C15ull + (uint64_t)layer * 1000003ull + (uint64_t)h * 7919ull;
    const int64_t first = lsh(layer, slot, 0);
    KMeansReindexArgs a{};
    a.k = static_cast<uint8_t*>(k.p) + (std::size_t)first * cap * D * es;
    a.v = static_cast<uint8_t*>(v.p) + (std::size_t)first * cap * D * es;
    a.pos = pos.as<int32_t>() + (std::size_t)first * cap;
    a.dtype = cfg.dtype;
    a.d = D;
    a.cap = cap;
    a.nprob = H;
    a.row0 = st.n_sink;
    a.n = n;
    a.c = clusters_for(n);
    a.iters = (int)cfg.kmeans_iters;
    a.spherical = cfg.metric == Metric::spherical;
    a.seeds = seeds.data();
    a.centroids = centroids.as<float>() + (std::size_t)first * cmax * D;
    a.cent_stride = cmax * D;
    a.offsets = offsets.as<int32_t>() + (std::size_t)first * (cmax + 1);
    a.off_stride = cmax + 1;
    a.reindex = true;
    a.assign_out = nullptr;
    a.inertia_out = nullptr;
    a.stream = stream;
    kmeans_reindex(a);
    if (centroids_low.p)  // only the a.c centroids each head has (the rest was never written)
      for (int64_t h = 0; h < H; ++h)
        round_centroids(a.centroids + (std::size_t)h * cmax * D,
                        static_cast<uint8_t*>(centroids_low.p) + ((std::size_t)first + h) * cmax * D * es,
                        cfg.dtype, a.c * D, stream);
    // The ranking's spread term, from the rows as stored and the centroids as ranked.
    const void* ranked = centroids_low.p
                             ? static_cast<const void*>(static_cast<uint8_t*>(centroids_low.p) + (std::size_t)first * cmax * D * es)
                             : static_cast<const void*>(a.centroids);
    cluster_spreads(a.k, ranked, cfg.dtype, cap, D, st.n_sink, a.offsets, a.off_stride, cmax, H, a.c,
                    spreads.as<float>() + (std::size_t)first * cmax, stream);
  }
};

DeviceDecoder::DeviceDecoder(const DecoderConfig& cfg) : p_(new Impl) {
  Impl& m = *p_;
  m.cfg = cfg;
  m.dev = (int)cfg.device.index;
  int count = 0;
  const cudaError_t probe = cudaGetDeviceCount(&count);
  if (probe != cudaSuccess) {
    cudaGetLastError();
    throw UnsupportedError("`device` cuda:" + std::to_string(m.dev) +
                           " is not available: this build has the CUDA backend but no usable GPU (" +
                           cudaGetErrorString(probe) + ")");
  }
  if (m.dev < 0 || m.dev >= count)
    throw ValueError("`device` cuda:" + std::to_string(m.dev) + " does not exist (" + std::to_string(count) +
                     " CUDA device(s) visible)");
  const Policy pol = cfg.select.policy;
  if (pol != Policy::tactic && pol != Policy::dense)
    throw UnsupportedError(std::string("policy '") + policy_name(pol) +
                           "' runs on the CPU backend only; on CUDA use 'tactic' or 'dense'");
  if (pol == Policy::tactic && cfg.select.estimator != Estimator::centroid_prior)
    throw UnsupportedError("the CUDA backend implements the 'centroid_prior' estimator only");
  if (pol == Policy::tactic && cfg.select.stop_rule == StopRule::certified &&
      cfg.select.tail_samples > certify_max_samples())
    throw UnsupportedError("the CUDA backend draws at most " + std::to_string(certify_max_samples()) +
                           " tail samples per query head (stop_rule='certified'), got tail_samples=" +
                           std::to_string(cfg.select.tail_samples));
  if (pol == Policy::tactic && cfg.select.share_group)
    throw UnsupportedError("the CUDA backend selects each query head independently: set share_group=False");
  if (pol == Policy::tactic && cfg.select.group_head && cfg.select.stop_rule == StopRule::certified)
    throw UnsupportedError("group_head=True runs with stop_rule='prior' on the CUDA backend (the certified rule "
                           "with group_head is CPU only)");
  const int64_t d = cfg.head_dim;
  if (!(d == 64 || d == 80 || d == 96 || d == 128 || d == 256))
    throw UnsupportedError("the CUDA backend supports head_dim 64, 80, 96, 128 or 256, got " + std::to_string(d));
  if (cfg.num_q_heads / cfg.num_kv_heads > 16)
    throw UnsupportedError("the CUDA backend supports up to 16 query heads per KV head, got " +
                           std::to_string(cfg.num_q_heads / cfg.num_kv_heads));
  if (cfg.max_tokens >= (int64_t)1 << 31) throw UnsupportedError("max_tokens must be below 2^31 on CUDA");
  DeviceGuard guard(m.dev);
  warn_missing_features();
  m.L = cfg.num_layers;
  m.B = cfg.max_batch;
  m.H = cfg.num_kv_heads;
  m.Hq = cfg.num_q_heads;
  m.G = m.Hq / m.H;
  m.D = d;
  m.cap = cfg.max_tokens;
  m.cmax = (m.cap + cfg.cluster_size - 1) / cfg.cluster_size;
  m.es = dtype_size(cfg.dtype);
  if ((m.cmax + 63) / 64 > 65535)  // the scoring kernel's grid.y covers 64 clusters per block
    throw UnsupportedError("max_tokens / cluster_size must stay below 4194240 clusters on CUDA, got " +
                           std::to_string(m.cmax));
  if (mul_sat(m.B, m.Hq) >= ((uint64_t)1 << 31))  // the kernels' grids index (sequence, head) in int
    throw UnsupportedError("max_batch * num_q_heads must stay below 2^31 on CUDA");
  m.plan = make_step_plan(cfg, m.cmax);  // UnsupportedError for a kernel variant this GPU lacks
  m.z_conf = m.certified() ? normal_quantile(cfg.select.confidence) : 0.0;
  // Every buffer's size first, in saturating arithmetic (an absurd configuration must not wrap
  // around to a small number), so that a capacity that cannot fit is refused with the total it
  // needs before anything is allocated.
  struct Want { DeviceBuffer* buf; uint64_t bytes; const char* what; };
  std::vector<Want> want;
  auto need = [&](DeviceBuffer& b, uint64_t bytes, const char* what) { want.push_back({&b, bytes, what}); };
  const uint64_t heads = mul_sat(mul_sat(m.L, m.B), m.H), segs = (uint64_t)m.B * m.Hq,
                 items = (uint64_t)m.B * m.H, cap = m.cap, cmax = m.cmax, D = m.D, es = m.es;
  const uint64_t kv_bytes = mul_sat(mul_sat(heads, cap), D * es);
  need(m.k, kv_bytes, "keys");
  need(m.v, kv_bytes, "values");
  need(m.pos, mul_sat(mul_sat(heads, cap), 4), "positions");
  if (m.clusters()) {
    need(m.centroids, mul_sat(mul_sat(heads, cmax), D * 4), "centroids");
    // What the ranking reads: the centroids rounded to the storage dtype (see store.cpp).
    if (m.cfg.dtype != DType::f32) need(m.centroids_low, mul_sat(mul_sat(heads, cmax), D * es), "centroids");
    need(m.offsets, mul_sat(heads, (cmax + 1) * 4), "cluster offsets");
    need(m.spreads, mul_sat(heads, cmax * 4), "cluster spreads");
  }
  need(m.state, mul_sat(mul_sat(m.L, m.B), sizeof(SlotCounts)), "sequence counts");
  need(m.qf, segs * D * 4, "queries");
  if (m.clusters()) {
    need(m.scores, segs * cmax * 4, "cluster scores");
    need(m.seg_max, segs * 8, "best and worst scores");
    need(m.ids, segs * cmax * 4, "exact-head lists");
    if (!m.group_head()) need(m.tasks, mul_sat(segs * 8, head_tasks_stride(m.cmax, m.cap)), "exact-head tasks");
    need(m.sel_scratch, select_scratch_bytes((int64_t)segs), "selection scratch");
    need(m.kv_mark, items * cmax, "selection marks");
    if (cfg.record_selection) need(m.head_mark, mul_sat(m.L, segs * cmax), "selection marks");
    need(m.rows, mul_sat(mul_sat(m.L, items), cap * 4), "row lists");  // per layer: attend() reuses them
    need(m.chunk_sums, items * row_chunks(m.cmax) * 4, "row list chunks");
    if (m.certified()) need(m.cert_mark, segs * cmax, "selection marks");
    if (m.group_head()) {
      need(m.carry, segs * carry_record_floats(m.D) * 4, "union attention records");
      need(m.pass_counts, items * 2 * 4, "row counts");
    }
  }
  need(m.counts, mul_sat(m.L, items * 4), "row counts");
  need(m.head_tokens, mul_sat(m.L, segs * 8), "statistics");
  need(m.est_mass, mul_sat(m.L, segs * 8), "statistics");
  need(m.head_index, items * 4, "head indices");
  need(m.slots, (uint64_t)m.B * 4, "slots");
  need(m.lost, mul_sat(m.L, (uint64_t)m.B * 4), "replay overflow counts");
  need(m.attn_ws, attention_workspace_bytes(m.B, m.H, m.G, m.D, m.cap), "attention workspace");
  uint64_t total = 0;
  for (const Want& w : want) total = add_sat(total, w.bytes);
  std::size_t free_bytes = 0, device_bytes = 0;
  TACTIC_CUDA_CHECK(cudaMemGetInfo(&free_bytes, &device_bytes));
  if (total > free_bytes)
    throw CapacityError("the CUDA decoder needs " + std::to_string(total) + " bytes (" + gib(total) +
                        ") of GPU memory, keys and values " + std::to_string(add_sat(kv_bytes, kv_bytes)) + " of them; cuda:" +
                        std::to_string(m.dev) + " has " + std::to_string(free_bytes) + " bytes free (" +
                        gib(free_bytes) + " of " + gib(device_bytes) +
                        "); lower max_tokens, max_batch or num_layers");
  for (const Want& w : want) w.buf->allocate(w.bytes, w.what);
  TACTIC_CUDA_CHECK(cudaMemset(m.state.p, 0, m.state.n));
  TACTIC_CUDA_CHECK(cudaMemset(m.lost.p, 0, m.lost.n));
  if (m.clusters()) {
    // [segs] best, then [segs] worst: 0x80808080 orders below the int of every finite score,
    // 0x7f7f7f7f above it (see select.hpp).
    TACTIC_CUDA_CHECK(cudaMemset(m.seg_max.p, 0x80, segs * 4));
    TACTIC_CUDA_CHECK(cudaMemset(m.seg_max.as<int32_t>() + segs, 0x7f, segs * 4));
    TACTIC_CUDA_CHECK(cudaMemset(m.kv_mark.p, 0, m.kv_mark.n));
    if (m.cert_mark.p) TACTIC_CUDA_CHECK(cudaMemset(m.cert_mark.p, 0, m.cert_mark.n));
  }
  m.ensure_threshold_state(m.plan);
  TACTIC_CUDA_CHECK(cudaDeviceSynchronize());
  m.host_state.assign(m.L * m.B, SlotState{});
  m.graphed.assign(m.L * m.B, 0);
  m.last_slots.assign(m.L, {});
}

DeviceDecoder::~DeviceDecoder() {
  if (p_) {
    int prev = -1;
    cudaGetDevice(&prev);
    cudaSetDevice(p_->dev);
    p_.reset();  // buffers free on the decoder's device
    if (prev >= 0) cudaSetDevice(prev);
  }
}

std::size_t DeviceDecoder::bytes() const {
  const Impl& m = *p_;
  return m.k.n + m.v.n + m.pos.n + m.centroids.n + m.centroids_low.n + m.spreads.n + m.offsets.n;
}

const SlotState& DeviceDecoder::state(int64_t layer, int64_t slot, void* stream) const {
  DeviceGuard guard(p_->dev);
  p_->refresh(layer, slot, stream);
  return p_->host_state[p_->ls(layer, slot)];
}

void DeviceDecoder::prefill(int64_t layer, int64_t slot, const TensorView& keys,
                            const TensorView& values, void* stream) {
  Impl& m = *p_;
  DeviceGuard guard(m.dev);
  const int64_t n = keys.shape[0];
  const int64_t first = m.lsh(layer, slot, 0);
  if (keys.dtype != values.dtype)
    throw TypeError(std::string("`values` must have the dtype of `keys` on CUDA (") + dtype_name(keys.dtype) + ")");
  prefill_copy(keys.data, values.data, keys.dtype, keys.strides[0], keys.strides[1], values.strides[0],
               values.strides[1], n, m.H, m.D, m.k.p, m.v.p, m.pos.as<int32_t>(), m.cfg.dtype, m.cap, first, stream);
  m.forget_selection(layer, slot);
  SlotState& st = m.host_state[m.ls(layer, slot)];
  st.n_sink = std::min<int64_t>(m.cfg.num_sink, n);
  st.n_clustered = n - st.n_sink;
  st.n_recent = 0;
  m.cluster(layer, slot, stream);
  m.push_counts(layer, slot, stream);
  TACTIC_CUDA_CHECK(cudaMemsetAsync(m.lost.as<int32_t>() + m.ls(layer, slot), 0, sizeof(int32_t), as_stream(stream)));
}

void DeviceDecoder::recluster(int64_t layer, int64_t slot, void* stream) {
  Impl& m = *p_;
  DeviceGuard guard(m.dev);
  if (Impl::capturing(stream))
    throw UnsupportedError("recluster() cannot be captured in a CUDA graph (it reads the counts on the host); "
                           "call it between replays");
  m.refresh(layer, slot, stream);
  SlotState& st = m.host_state[m.ls(layer, slot)];
  if (!m.clusters() || st.n_recent == 0) return;
  m.forget_selection(layer, slot);
  st.n_clustered += st.n_recent;
  st.n_recent = 0;
  m.cluster(layer, slot, stream);
  m.push_counts(layer, slot, stream);
  // Replays of a captured append may be launched next on any stream (graph.replay() runs on
  // the caller's current stream, not the one this decoder last saw): they must find the new
  // counts, so the re-clustering is finished before this returns.
  if (m.graphed[m.ls(layer, slot)]) TACTIC_CUDA_CHECK(cudaStreamSynchronize(as_stream(stream)));
}

void DeviceDecoder::reset(int64_t slot) {
  Impl& m = *p_;
  DeviceGuard guard(m.dev);
  // Replays still running on another stream would advance the counts after they are cleared.
  if (m.graphs_seen) TACTIC_CUDA_CHECK(cudaDeviceSynchronize());
  for (int64_t l = 0; l < m.L; ++l) {
    m.host_state[m.ls(l, slot)] = SlotState{};
    m.forget_selection(l, slot);
    m.push_counts(l, slot, nullptr);
    TACTIC_CUDA_CHECK(cudaMemsetAsync(m.lost.as<int32_t>() + m.ls(l, slot), 0, sizeof(int32_t), nullptr));
  }
  TACTIC_CUDA_CHECK(cudaStreamSynchronize(nullptr));
}

void DeviceDecoder::decode(int64_t layer, const TensorView& q, const TensorView* k_new,
                           const TensorView* v_new, const TensorView* out,
                           const std::vector<int64_t>& slot_list, bool append, void* stream) {
  Impl& m = *p_;
  DeviceGuard guard(m.dev);
  StepGeometry geo = m.begin_step(layer, slot_list, stream);
  if (append) {
    // Captured in a CUDA graph, the append is recorded as is: each replay advances the device
    // counts (or counts the token as lost when the slot is full), re-clustering is left to the
    // caller's recluster() between replays, and the host mirror is re-read before its next use.
    const bool cap = Impl::capturing(stream);
    if (!cap)
      for (int64_t s : slot_list)
        if (m.clusters() && m.host_state[m.ls(layer, s)].n_recent >= m.cfg.recluster_interval)
          recluster(layer, s, stream);
    append_token(geo, k_new->data, v_new->data, k_new->dtype, k_new->strides[0], k_new->strides[1], m.k.p, m.v.p,
                 m.pos.as<int32_t>(), m.cfg.dtype, (int)m.cfg.num_sink, m.lost.as<int32_t>());
    for (int64_t s : slot_list) {
      if (cap) {
        m.graphed[m.ls(layer, s)] = 1;
        continue;
      }
      SlotState& st = m.host_state[m.ls(layer, s)];
      if (st.n_clustered == 0 && st.n_recent == 0 && st.n_sink < m.cfg.num_sink) ++st.n_sink;
      else ++st.n_recent;
    }
  }
  prepare_q(geo, q.data, q.dtype, q.strides[0], q.strides[1], (float)m.cfg.softmax_scale(), m.qf.as<float>(),
            m.head_index.as<int32_t>());
  const std::size_t segs = (std::size_t)(m.B * m.Hq), items = (std::size_t)(m.B * m.H);
  SelectArgs a{};
  a.k = m.k.p;
  a.dtype = m.cfg.dtype;
  a.centroids = m.centroids_low.p ? m.centroids_low.p : m.centroids.p;  // storage dtype
  a.offsets = m.offsets.as<int32_t>();
  a.spreads = m.spreads.as<float>();
  a.spread = m.cfg.select.spread;
  a.qf = m.qf.as<float>();
  a.scores = m.scores.as<float>();
  a.seg_max = m.seg_max.as<int32_t>();
  a.seg_min = m.seg_max.as<int32_t>() + segs;
  a.ids = m.ids.as<int32_t>();
  a.scratch = m.sel_scratch.p;
  a.tasks = m.tasks.as<int32_t>();
  a.tasks_stride = head_tasks_stride(m.cmax, m.cap);
  a.kv_mark = m.kv_mark.as<uint8_t>();
  a.head_mark = m.head_mark.p ? m.head_mark.as<uint8_t>() + (std::size_t)layer * segs * m.cmax : nullptr;
  a.head_tokens = m.head_tokens.as<int64_t>() + (std::size_t)layer * segs;
  a.est_mass = m.est_mass.as<double>() + (std::size_t)layer * segs;
  a.rows = m.rows.as<int32_t>() + (std::size_t)layer * items * m.cap;
  a.chunk_sums = m.chunk_sums.as<int32_t>();
  a.counts = m.counts.as<int32_t>() + (std::size_t)layer * items;
  a.target = m.cfg.select.target;
  a.margin = m.cfg.select.margin;
  a.head_fraction = m.cfg.select.head_fraction;
  a.min_clusters = m.cfg.select.min_clusters;
  a.dense = !m.clusters();
  a.head_split = m.plan.head_split[slot_list.size() - 1];
  a.sm_count = m.plan.sm_count;
  a.score_tensor_cores = m.plan.score == AttentionKernel::tensor_cores;
  a.certified = m.certified();
  a.z_conf = m.z_conf;
  a.tail_samples = (int)m.cfg.select.tail_samples;
  a.max_rounds = m.cfg.select.max_rounds;
  a.cert_mark = m.cert_mark.as<uint8_t>();
  a.group_head = m.group_head();
  if (a.group_head) {
    a.carry = m.carry.as<float>();
    a.union_counts = m.union_counts();
    a.rest_counts = m.rest_counts();
    m.fill_attention(layer, geo, a.union_attention);  // select_step sets the rows, counts and records
  }
  if (m.threshold()) {  // selection and attention in one sequence of kernels
    m.threshold(layer, geo, a, out, false);
    m.last_slots[layer] = slot_list;
    return;
  }
  select_step(geo, a);
  m.last_slots[layer] = slot_list;
  if (out) m.attention(layer, geo, *out, a.group_head);
}

void DeviceDecoder::Impl::threshold(int64_t layer, const StepGeometry& geo, const SelectArgs& a, const TensorView* out,
                                    bool reuse) {
  ThresholdArgs t;
  t.state = thr_state.p;
  t.max_heads = B * Hq;
  t.max_items = B * H;
  t.layer_mark = layer_mark.as<uint8_t>() + (std::size_t)layer * (std::size_t)(B * H) * (std::size_t)cmax;
  t.layer_work = reinterpret_cast<int64_t*>(layer_mark.as<uint8_t>() + mark_bytes()) + (std::size_t)layer * (std::size_t)(B * H);
  t.reuse = reuse;
  fill_attention(layer, geo, t.attention);
  if (out) {
    t.attention.out = out->data;
    t.attention.out_dtype = out->dtype;
    t.attention.out_stride_b = out->strides[0];
    t.attention.out_stride_h = out->strides[1];
  }
  threshold_step(geo, a, t);
}

void DeviceDecoder::Impl::attention(int64_t layer, const StepGeometry& geo, const TensorView& out, bool rest) {
  AttentionArgs at{};
  fill_attention(layer, geo, at);
  if (rest) {  // the union pass ran inside select_step; its records join here
    at.row_start = union_counts();
    at.counts = rest_counts();
    at.carry_in = carry.as<float>();
  }
  at.out = out.data;
  at.out_dtype = out.dtype;
  at.out_stride_b = out.strides[0];
  at.out_stride_h = out.strides[1];
  decode_attention(at);
}

void DeviceDecoder::Impl::fill_attention(int64_t layer, const StepGeometry& geo, AttentionArgs& at) const {
  const std::size_t items = (std::size_t)(B * H);
  at = AttentionArgs{};  // head_index: written by this call's prepare_q (decode, attend)
  at.k = k.p;
  at.v = v.p;
  at.kv_dtype = cfg.dtype;
  at.cap = cap;
  at.d = D;
  at.batch = geo.batch;
  at.hkv = H;
  at.g = G;
  at.head_index = head_index.as<int32_t>();
  at.q = qf.as<float>();
  at.rows = clusters() ? rows.as<int32_t>() + (std::size_t)layer * items * cap : nullptr;
  at.rows_stride = cap;
  at.counts = counts.as<int32_t>() + (std::size_t)layer * items;
  at.max_count = cap;
  at.workspace = attn_ws.as<float>();
  at.stream = geo.stream;
  at.kernel = plan.attention;
  at.pdl = plan.pdl;
}

void DeviceDecoder::attend(int64_t layer, const TensorView& q, const TensorView& out,
                           const std::vector<int64_t>& slot_list, void* stream) {
  Impl& m = *p_;
  DeviceGuard guard(m.dev);
  StepGeometry geo = m.begin_step(layer, slot_list, stream);
  prepare_q(geo, q.data, q.dtype, q.strides[0], q.strides[1], (float)m.cfg.softmax_scale(), m.qf.as<float>(),
            m.head_index.as<int32_t>());
  if (m.threshold()) {  // the marks of the layer's last selection
    SelectArgs a{};
    a.dtype = m.cfg.dtype;
    a.offsets = m.offsets.as<int32_t>();
    a.sm_count = m.plan.sm_count;  // the rest pass's blocks, as the state was sized
    m.threshold(layer, geo, a, &out, true);
    return;
  }
  m.attention(layer, geo, out);
}

const std::vector<int64_t>& DeviceDecoder::last_slots(int64_t layer) const { return p_->last_slots[layer]; }

void DeviceDecoder::set_target(double target) {
  Impl& m = *p_;
  DeviceGuard guard(m.dev);
  DecoderConfig c = m.cfg;
  c.select.target = target;
  m.plan = make_step_plan(c, m.cmax);  // nothing in today's plan depends on P; re-planned all the same
  m.cfg = c;
}

const StepPlan& DeviceDecoder::plan() const { return p_->plan; }

void DeviceDecoder::set_kernels(const KernelOptions& kernels) {
  Impl& m = *p_;
  DeviceGuard guard(m.dev);
  DecoderConfig c = m.cfg;
  c.kernels = kernels;
  StepPlan plan = make_step_plan(c, m.cmax);  // throws before anything changes
  m.ensure_threshold_state(plan);              // so does a failed allocation
  if (plan.selection != m.plan.selection)  // the two keep their selections differently
    for (auto& ls : m.last_slots) ls.clear();
  m.plan = plan;
  m.cfg = c;
}

void DeviceDecoder::stats(int64_t layer, LayerStats& st) {
  Impl& m = *p_;
  DeviceGuard guard(m.dev);
  const std::vector<int64_t>& slots = m.last_slots[layer];
  const int64_t batch = (int64_t)slots.size(), H = m.H, Hq = m.Hq, G = m.G;
  const std::size_t segs = (std::size_t)(m.B * Hq), items = (std::size_t)(m.B * H);
  TACTIC_CUDA_CHECK(cudaDeviceSynchronize());
  for (int64_t s : slots) m.refresh(layer, s, nullptr);  // the contexts, after replayed appends
  std::vector<int32_t> counts(batch * H);
  st.batch = batch;
  st.slots = slots;
  st.context.assign(batch, 0);
  st.kv_tokens.assign(batch * H, 0);
  st.head_tokens.assign(batch * Hq, 0);
  st.est_mass.assign(batch * Hq, 0);
  if (batch == 0) return;
  TACTIC_CUDA_CHECK(cudaMemcpy(counts.data(), m.counts.as<int32_t>() + layer * items, counts.size() * 4, cudaMemcpyDeviceToHost));
  TACTIC_CUDA_CHECK(cudaMemcpy(st.head_tokens.data(), m.head_tokens.as<int64_t>() + layer * segs, batch * Hq * 8, cudaMemcpyDeviceToHost));
  TACTIC_CUDA_CHECK(cudaMemcpy(st.est_mass.data(), m.est_mass.as<double>() + layer * segs, batch * Hq * 8, cudaMemcpyDeviceToHost));
  for (int64_t b = 0; b < batch; ++b) st.context[b] = m.host_state[m.ls(layer, slots[b])].total();
  for (int64_t i = 0; i < batch * H; ++i) st.kv_tokens[i] = counts[i];
  st.kv_mask.clear();
  st.head_mask.clear();
  st.mask_len = 0;
  if (!m.cfg.record_selection) return;
  // Masks over token positions (evaluation only): rows -> positions through the store.
  const int64_t cap = m.cap;
  st.mask_len = cap;
  st.kv_mask.assign(batch * H * cap, 0);
  st.head_mask.assign(batch * Hq * cap, 0);
  std::vector<int32_t> rows(cap), pos(cap), off(m.cmax + 1);
  std::vector<uint8_t> hmark(m.cmax);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t hi = m.lsh(layer, slots[b], h), item = b * H + h;
      const SlotState& ss = m.host_state[m.ls(layer, slots[b])];
      const int64_t total = ss.total();
      TACTIC_CUDA_CHECK(cudaMemcpy(pos.data(), m.pos.as<int32_t>() + hi * cap, total * 4, cudaMemcpyDeviceToHost));
      if (!m.clusters()) {
        for (int64_t r = 0; r < total; ++r) st.kv_mask[item * cap + pos[r]] = 1;
        for (int64_t g = 0; g < G; ++g)
          for (int64_t r = 0; r < total; ++r) st.head_mask[(b * Hq + h * G + g) * cap + pos[r]] = 1;
        continue;
      }
      // The row lists are shared by all layers: rebuild the masks from the per-layer marks.
      const int64_t c = m.clusters_for(ss.n_clustered);
      TACTIC_CUDA_CHECK(cudaMemcpy(off.data(), m.offsets.as<int32_t>() + hi * (m.cmax + 1), (c + 1) * 4, cudaMemcpyDeviceToHost));
      for (int64_t g = 0; g < G; ++g) {
        const int64_t qh = b * Hq + h * G + g;
        TACTIC_CUDA_CHECK(cudaMemcpy(hmark.data(), m.head_mark.as<uint8_t>() + ((std::size_t)layer * segs + qh) * m.cmax, c, cudaMemcpyDeviceToHost));
        uint8_t* hm = &st.head_mask[qh * cap];
        uint8_t* km = &st.kv_mask[item * cap];
        auto put = [&](int64_t r) { hm[pos[r]] = 1; km[pos[r]] = 1; };
        for (int64_t r = 0; r < ss.n_sink; ++r) put(r);
        for (int64_t r = ss.n_sink + ss.n_clustered; r < total; ++r) put(r);
        for (int64_t j = 0; j < c; ++j)
          if (hmark[j])
            for (int64_t r = ss.n_sink + off[j]; r < ss.n_sink + off[j + 1]; ++r) put(r);
      }
    }
}

}  // namespace cuda
}  // namespace tactic
