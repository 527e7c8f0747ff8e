#include "tactic/decoder.hpp"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <mutex>
#include <new>
#include <string>
#include <thread>
#include <utility>

#include "device_decoder.hpp"
#include "host_memory.hpp"
#include "parallel.hpp"
#include "tactic/attention.hpp"
#include "tactic/convert.hpp"

namespace tactic {

namespace {
constexpr int64_t kChunkRows = 512;  // split-KV chunk: balances heads with large selections
}

namespace {

// A CPU decoder's plan: only the selection. 'threshold' (the CUDA threshold selection's twin)
// fits what that selection's rule fits (threshold_rule_fit); refused with the reason otherwise
// (UnsupportedError, as on CUDA).
StepPlan cpu_plan(const DecoderConfig& cfg) {
  StepPlan p;
  if (cfg.kernels.selection == SelectionKernel::threshold && cfg.select.policy == Policy::tactic) {  // (dense: no selection)
    const std::string why = threshold_rule_fit(cfg);
    if (!why.empty()) throw UnsupportedError("selection_kernel='threshold' " + why);
    p.selection = SelectionKernel::threshold;
  }
  return p;
}

}  // namespace

Decoder::Decoder(const DecoderConfig& cfg) : cfg_(cfg) {
  cfg_.validate();
  if (!on_cuda()) cpu_plan_ = cpu_plan(cfg_);
  // record_selection keeps [max_batch, Hkv + Hq, max_tokens] masks per layer, filled by
  // decode: count them now, so that decode never fails for want of memory halfway.
  const uint64_t masks = cfg_.record_selection
      ? mul_sat(mul_sat(mul_sat(cfg_.num_layers, cfg_.max_batch), cfg_.num_kv_heads + cfg_.num_q_heads), cfg_.max_tokens)
      : 0;
  // Host bookkeeping per layer counts too (statistics; on CUDA the slot mirror and the last
  // selections): billions of tiny layers are refused here, not by std::bad_alloc below.
  const uint64_t layers = cfg_.num_layers;
  uint64_t book = mul_sat(layers, sizeof(LayerStats));
  if (on_cuda())
    book = add_sat(book, add_sat(mul_sat(mul_sat(layers, cfg_.max_batch), sizeof(SlotState)),
                                 mul_sat(layers, sizeof(std::vector<int64_t>))));
  if (!on_cuda()) require_host_bytes(add_sat(add_sat(KVStore::bytes_needed(cfg_), masks), book), "the decoder (its KV store first)");
  else require_host_bytes(add_sat(masks, book), "the decoder's host bookkeeping and record_selection's masks");
  try {
    if (on_cuda()) device_ = std::make_unique<cuda::DeviceDecoder>(cfg_);
    else store_ = std::make_unique<KVStore>(cfg_);
    stats_.resize(cfg_.num_layers);
    scratch_.resize(resolve_threads(cfg_.num_threads));
  } catch (const std::bad_alloc&) {  // fits RAM + swap on paper, not in what is free now
    throw CapacityError("cannot allocate the decoder's host memory (" + std::to_string(layers) +
                        " layers; the KV store alone needs " +
                        std::to_string(on_cuda() ? 0 : KVStore::bytes_needed(cfg_)) +
                        " bytes); lower max_tokens, max_batch or num_layers");
  }
}

Decoder::~Decoder() = default;

const KVStore& Decoder::store() const {
  if (!store_) throw UnsupportedError("the host KV store layout is only available for CPU decoders");
  return *store_;
}

std::size_t Decoder::store_bytes() const { return store_ ? store_->bytes() : device_->bytes(); }

void Decoder::check_layer(int64_t layer) const {
  if (layer < 0 || layer >= cfg_.num_layers)
    throw ValueError("`layer` must be in [0, " + std::to_string(cfg_.num_layers) + "), got " +
                     std::to_string(layer));
}

void Decoder::check_slot(int64_t slot, const char* name) const {
  if (slot < 0 || slot >= cfg_.max_batch)
    throw ValueError(std::string("`") + name + "` must be a sequence slot in [0, " +
                     std::to_string(cfg_.max_batch) + ") (max_batch), got " + std::to_string(slot));
}

static void check_kv_input(const TensorView& t, const char* name, const DecoderConfig& cfg) {
  check_float(t, name);
  check_device(t, name, cfg.device);
  check_aligned(t, name);
  check_last_dim_contiguous(t, name);
}

void Decoder::prefill(int64_t layer, int64_t slot, const TensorView& keys,
                      const TensorView& values) {
  check_prefill(layer, slot, keys, values);
  if (device_) device_->prefill(layer, slot, keys, values, stream_);
  else store_->prefill(layer, slot, keys, values);
}

void Decoder::check_prefill(int64_t layer, int64_t slot, const TensorView& keys,
                            const TensorView& values) const {
  check_layer(layer);
  check_slot(slot, "seq");
  check_kv_layout(keys, "keys", false, cfg_.num_kv_heads, cfg_.num_q_heads, cfg_.head_dim);
  check_kv_layout(values, "values", false, cfg_.num_kv_heads, cfg_.num_q_heads, cfg_.head_dim);
  check_shape(values, "values", {keys.shape[0], cfg_.num_kv_heads, cfg_.head_dim});
  check_kv_input(keys, "keys", cfg_);
  check_kv_input(values, "values", cfg_);
  if (keys.shape[0] > cfg_.max_tokens)
    throw CapacityError("prefill of " + std::to_string(keys.shape[0]) +
                        " tokens exceeds `max_tokens`=" + std::to_string(cfg_.max_tokens));
  if (!on_cuda()) {  // reading device memory here would synchronise: docs/CONTRACT.md (NaN/Inf)
    check_storable(keys, "keys", cfg_.dtype);
    check_storable(values, "values", cfg_.dtype);
  }
}

void Decoder::decode(int64_t layer, const TensorView& q, const TensorView* k_new,
                     const TensorView* v_new, const TensorView* out,
                     const std::vector<int64_t>& slots, const int64_t* budgets, bool append) {
  // ---- validate everything before touching any state ----
  check_layer(layer);
  const int64_t H = cfg_.num_kv_heads, Hq = cfg_.num_q_heads, D = cfg_.head_dim, G = Hq / H;
  check_ndim(q, "q", {3});
  const int64_t B = q.shape[0];
  check_shape(q, "q", {B, Hq, D});
  check_kv_input(q, "q", cfg_);
  if ((int64_t)slots.size() != B)
    throw ValueError("`seq` must name " + std::to_string(B) + " sequence slots (one per row of q), got " +
                     std::to_string(slots.size()));
  if (B < 1) throw ValueError("`q` must hold at least one sequence, got shape " + q.shape_str());
  std::vector<uint8_t> seen(cfg_.max_batch, 0);
  for (int64_t s : slots) {
    check_slot(s, "seq");
    if (seen[s]++) throw ValueError("`seq` must not repeat a slot, got slot " + std::to_string(s) + " twice");
  }
  if (append) {
    if (!k_new || !v_new) throw ValueError("`k_new` and `v_new` are required to append a token");
    check_shape(*k_new, "k_new", {B, H, D});
    check_shape(*v_new, "v_new", {B, H, D});
    check_kv_input(*k_new, "k_new", cfg_);
    check_kv_input(*v_new, "v_new", cfg_);
    if (k_new->dtype != v_new->dtype)
      throw TypeError(std::string("`v_new` must have the dtype of `k_new` (") + dtype_name(k_new->dtype) +
                      "), got " + dtype_name(v_new->dtype));
    for (int64_t s : slots)
      if (length(layer, s) + 1 > cfg_.max_tokens)
        throw CapacityError("sequence slot " + std::to_string(s) + " of layer " + std::to_string(layer) +
                            " is full: decoding one more token exceeds `max_tokens`=" +
                            std::to_string(cfg_.max_tokens));
  } else {
    // Attention over no tokens has no value: refuse rather than write zeros.
    for (int64_t s : slots)
      if (length(layer, s) == 0)
        throw ValueError("sequence slot " + std::to_string(s) + " of layer " + std::to_string(layer) +
                         " is empty: prefill it, or pass `k_new`/`v_new` to append a token, first");
  }
  if (out) {
    check_shape(*out, "out", {B, Hq, D});
    check_kv_input(*out, "out", cfg_);
    check_no_overlap(*out, "out");
  }
  const Policy pol = cfg_.select.policy;
  if (pol == Policy::quest || pol == Policy::topk) {
    for (int64_t i = 0; i < B * H; ++i) {
      const int64_t b = budgets ? budgets[i] : cfg_.select.budget;
      if (b <= 0)
        throw ValueError(std::string("`budget` must be a positive token count for policy '") +
                         policy_name(pol) + "' (set it at construction or pass it per call)");
    }
  }
  if (device_) {
    if (pol != Policy::tactic && pol != Policy::dense)
      throw UnsupportedError("CUDA decoders run policies 'tactic' and 'dense' only");
    device_->decode(layer, q, k_new, v_new, out, slots, append, stream_);
    LayerStats& st = stats_[layer];
    st = LayerStats{};
    st.batch = -1;  // filled from the device on the first stats() call
    return;
  }
  check_finite(q, "q");  // q is converted to float32, which holds every finite input
  if (append) {
    check_storable(*k_new, "k_new", cfg_.dtype);
    check_storable(*v_new, "v_new", cfg_.dtype);
  }

  // ---- append ----
  const std::size_t eq = dtype_size(q.dtype);
  if (append) {
    const std::size_t ek = dtype_size(k_new->dtype);
    for (int64_t b = 0; b < B; ++b)
      store_->append(layer, slots[b], static_cast<const uint8_t*>(k_new->data) + b * k_new->strides[0] * ek,
                     static_cast<const uint8_t*>(v_new->data) + b * v_new->strides[0] * ek,
                     k_new->dtype, k_new->strides[1], v_new->strides[1]);
  }

  // ---- q to fp32, pre-scaled ----
  const float scale = (float)cfg_.softmax_scale();
  std::vector<float> qf(B * Hq * D);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hq; ++h) {
      float* dst = &qf[(b * Hq + h) * D];
      load_floats(static_cast<const uint8_t*>(q.data) + (b * q.strides[0] + h * q.strides[1]) * eq, q.dtype, D, dst);
      for (int64_t k = 0; k < D; ++k) dst[k] *= scale;
    }

  // ---- select per (sequence, KV head); attention over balanced (sequence, KV head, chunk)
  // work items, LSE merge. One pool of threads takes selections first, and each finished
  // selection queues its chunks, which a thread without a selection left attends at once:
  // with fewer KV heads than a multiple of the threads (3 over 2 on the demo) the threads
  // left idle by the selections' split attend instead of waiting for the last one.
  const int threads = resolve_threads(cfg_.num_threads);
  if ((int)scratch_.size() < threads) scratch_.resize(threads);
  std::vector<KVSelection> sel(B * H);
  const bool record = cfg_.record_selection;
  auto select_one = [&](int64_t i) {
    const int64_t b = i / H, h = i % H;
    const int64_t budget = budgets ? budgets[i] : 0;
    select_kv_head(*store_, layer, slots[b], h, &qf[(b * Hq + h * G) * D], G, cfg_.select, budget,
                   record, scratch_[thread_index()], sel[i], cpu_plan_.selection);
  };
  if (!out) {
    parallel_for(B * H, threads, select_one);
  } else {
    std::vector<std::vector<std::vector<RowRange>>> chunks(B * H);
    std::vector<std::vector<AttentionPartial>> part(B * H);
    std::vector<std::pair<int64_t, int64_t>> queue;  // (item, chunk), filled as selections end
    queue.reserve(64);
    std::mutex mu;
    std::size_t taken = 0;
    std::atomic<int64_t> next_sel{0}, selected{0};
    std::atomic<bool> failed{false};  // an item threw: the others stop (parallel_for rethrows it)
    auto attend_one = [&](int64_t i, int64_t c) {
      const int64_t b = i / H, h = i % H;
      AttentionPartial& pt = part[i][c];
      pt.init(G, D);
      attention_accumulate(store_->k_row(layer, slots[b], h, 0), D, store_->v_row(layer, slots[b], h, 0), D,
                           cfg_.dtype, D, chunks[i][c].data(), (int64_t)chunks[i][c].size(),
                           &qf[(b * Hq + h * G) * D], G, pt);
    };
    // One worker per thread (parallel_for over the threads; a thread that gets a second one
    // finds nothing left and returns).
    parallel_for(threads, threads, [&](int64_t) {
      try {
        while (!failed.load(std::memory_order_relaxed)) {
          const int64_t i = next_sel.fetch_add(1);
          if (i < B * H) {
            select_one(i);
            auto ch = split_ranges(sel[i].rows, kChunkRows);
            part[i].resize(ch.size());
            chunks[i] = std::move(ch);
            {
              std::lock_guard<std::mutex> lock(mu);
              for (std::size_t c = 0; c < chunks[i].size(); ++c) queue.emplace_back(i, (int64_t)c);
            }
            selected.fetch_add(1);
            continue;
          }
          std::pair<int64_t, int64_t> task{-1, -1};
          {
            std::lock_guard<std::mutex> lock(mu);
            if (taken < queue.size()) task = queue[taken++];
            else if (selected.load() == B * H) break;  // every chunk is queued and taken
          }
          if (task.first >= 0) attend_one(task.first, task.second);
          else std::this_thread::yield();  // a selection is still running elsewhere
        }
      } catch (...) {
        failed.store(true);
        throw;
      }
    });
    const std::size_t eo = dtype_size(out->dtype);
    parallel_for(B * H, threads, [&](int64_t i) {
      const int64_t b = i / H, h = i % H;
      AttentionPartial total;
      total.init(G, D);
      for (const AttentionPartial& pt : part[i]) attention_merge(total, pt);
      attention_finish(total, D, static_cast<uint8_t*>(out->data) + (b * out->strides[0] + h * G * out->strides[1]) * eo,
                       out->strides[1], out->dtype);
    });
  }

  // ---- statistics ----
  LayerStats& st = stats_[layer];
  st.batch = B;
  st.slots = slots;
  st.context.assign(B, 0);
  st.kv_tokens.assign(B * H, 0);
  st.head_tokens.assign(B * Hq, 0);
  st.est_mass.assign(B * Hq, 0);
  for (int64_t b = 0; b < B; ++b) {
    st.context[b] = store_->length(layer, slots[b]);
    for (int64_t h = 0; h < H; ++h) {
      const KVSelection& s = sel[b * H + h];
      st.kv_tokens[b * H + h] = s.union_tokens;
      for (int64_t g = 0; g < G; ++g) {
        st.head_tokens[b * Hq + h * G + g] = s.head_tokens[g];
        st.est_mass[b * Hq + h * G + g] = s.est_mass[g];
      }
    }
  }
  if (record) {
    const int64_t cap = cfg_.max_tokens;
    st.mask_len = cap;
    st.kv_mask.assign(B * H * cap, 0);
    st.head_mask.assign(B * Hq * cap, 0);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h) {
        const KVSelection& s = sel[b * H + h];
        const int32_t* pos = store_->positions(layer, slots[b], h);
        for (const RowRange& r : s.rows)
          for (int32_t row = r.begin; row < r.end; ++row) st.kv_mask[(b * H + h) * cap + pos[row]] = 1;
        for (int64_t g = 0; g < G; ++g)
          for (const RowRange& r : s.head_rows[g])
            for (int32_t row = r.begin; row < r.end; ++row)
              st.head_mask[(b * Hq + h * G + g) * cap + pos[row]] = 1;
      }
  }
}

const LayerStats& Decoder::stats(int64_t layer) const {
  check_layer(layer);
  if (device_ && stats_[layer].batch < 0) device_->stats(layer, stats_[layer]);
  return stats_[layer];
}

int64_t Decoder::length(int64_t layer, int64_t slot) const {
  check_layer(layer);
  check_slot(slot, "seq");
  return device_ ? device_->state(layer, slot, stream_).total() : store_->length(layer, slot);
}

void Decoder::reset(int64_t slot) {
  check_slot(slot, "seq");
  if (device_) device_->reset(slot);
  else store_->reset(slot);
}

void Decoder::reset_all() {
  for (int64_t s = 0; s < cfg_.max_batch; ++s) {
    if (device_) device_->reset(s);
    else store_->reset(s);
  }
  for (auto& s : stats_) s = LayerStats{};
}

void Decoder::recluster(int64_t layer, int64_t slot) {
  check_layer(layer);
  check_slot(slot, "seq");
  if (device_) device_->recluster(layer, slot, stream_);
  else store_->recluster(layer, slot);
}

void Decoder::attend(int64_t layer, const TensorView& q, const TensorView& out,
                     const std::vector<int64_t>& slots) {
  check_layer(layer);
  if (!device_)
    throw UnsupportedError("attend (decode with reuse_selection) is implemented for CUDA decoders only");
  const int64_t Hq = cfg_.num_q_heads, D = cfg_.head_dim;
  check_ndim(q, "q", {3});
  const int64_t B = q.shape[0];
  check_shape(q, "q", {B, Hq, D});
  check_kv_input(q, "q", cfg_);
  check_shape(out, "out", {B, Hq, D});
  check_kv_input(out, "out", cfg_);
  check_no_overlap(out, "out");  // as decode(): aliased elements would be written twice
  if (slots != device_->last_slots(layer))
    throw ValueError("reuse_selection needs a selection of layer " + std::to_string(layer) +
                     " for these `seq` slots: call decode() or select() with the same slots first (a "
                     "prefill, recluster or reset of those slots discards it)");
  device_->attend(layer, q, out, slots, stream_);
}

void Decoder::set_target(double target) {
  SelectOptions o = cfg_.select;
  o.target = target;
  validate(o);
  cfg_.select.target = target;
  if (device_) device_->set_target(target);
}

const StepPlan& Decoder::plan() const {
  return device_ ? device_->plan() : cpu_plan_;
}

void Decoder::set_kernels(const KernelOptions& kernels) {
  validate(kernels);
  DecoderConfig c = cfg_;
  c.kernels = kernels;
  if (device_) device_->set_kernels(kernels);
  else cpu_plan_ = cpu_plan(c);  // throws before anything changes
  cfg_ = c;
}

}  // namespace tactic
