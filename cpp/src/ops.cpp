#include "tactic/ops.hpp"

#include <cmath>
#include <string>
#include <vector>

#include "parallel.hpp"
#include "tactic/attention.hpp"
#include "tactic/convert.hpp"

namespace tactic {

namespace {
constexpr int64_t kChunkRows = 512;

void check_input(const TensorView& t, const char* name) {
  check_float(t, name);
  check_device(t, name, Device{});
  check_aligned(t, name);
  check_last_dim_contiguous(t, name);
}

// scale <= 0 asks for 1/sqrt(D); NaN or Inf would make every output NaN.
void check_scale(double scale) {
  if (!std::isfinite(scale))
    throw ValueError("`scale` must be a finite number (<= 0: 1/sqrt(head_dim)), got " + std::to_string(scale));
}

// q rows [G, D] of KV head h (query heads h*G .. h*G+G-1) to fp32, scaled.
std::vector<float> load_group(const TensorView& q, int64_t q_off, int64_t h, int64_t g, int64_t d,
                              float scale) {
  std::vector<float> qf(g * d);
  const std::size_t es = dtype_size(q.dtype);
  const int64_t hs = q.strides[q.ndim - 2];
  for (int64_t j = 0; j < g; ++j) {
    load_floats(static_cast<const uint8_t*>(q.data) + (q_off + (h * g + j) * hs) * (int64_t)es, q.dtype, d,
                &qf[j * d]);
    for (int64_t k = 0; k < d; ++k) qf[j * d + k] *= scale;
  }
  return qf;
}

// Attention of every (row set, KV head) item, split into chunks run in parallel.
struct Job {
  const uint8_t* k;
  const uint8_t* v;
  int64_t ldk, ldv;
  std::vector<RowRange> rows;
  std::vector<float> q;
  uint8_t* out;
  int64_t ld_out;
};

void run_jobs(std::vector<Job>& jobs, DType kv_dtype, int64_t g, int64_t d, DType out_dtype,
              int threads) {
  struct Item { int64_t job; std::vector<RowRange> rows; };
  std::vector<Item> items;
  std::vector<int64_t> first(jobs.size() + 1);
  for (std::size_t j = 0; j < jobs.size(); ++j) {
    first[j] = (int64_t)items.size();
    for (auto& ch : split_ranges(jobs[j].rows, kChunkRows)) items.push_back({(int64_t)j, std::move(ch)});
  }
  first[jobs.size()] = (int64_t)items.size();
  std::vector<AttentionPartial> part(items.size());
  parallel_for((int64_t)items.size(), threads, [&](int64_t t) {
    const Job& jb = jobs[items[t].job];
    part[t].init(g, d);
    attention_accumulate(jb.k, jb.ldk, jb.v, jb.ldv, kv_dtype, d, items[t].rows.data(),
                         (int64_t)items[t].rows.size(), jb.q.data(), g, part[t]);
  });
  parallel_for((int64_t)jobs.size(), threads, [&](int64_t j) {
    AttentionPartial total;
    total.init(g, d);
    for (int64_t t = first[j]; t < first[j + 1]; ++t) attention_merge(total, part[t]);
    attention_finish(total, d, jobs[j].out, jobs[j].ld_out, out_dtype);
  });
}
}  // namespace

void dense_decode(const TensorView& q, const TensorView& keys, const TensorView& values,
                  const TensorView* lengths, const TensorView& out, double scale, int num_threads) {
  check_ndim(q, "q", {3});
  const int64_t B = q.shape[0], Hq = q.shape[1], D = q.shape[2];
  check_kv_layout(keys, "keys", true, 0, Hq, D);
  const int64_t N = keys.shape[1], H = keys.shape[2];
  check_kv_layout(values, "values", true, H, Hq, D);
  check_shape(keys, "keys", {B, N, H, D});
  check_shape(values, "values", {B, N, H, D});
  check_shape(out, "out", {B, Hq, D});
  for (auto* t : {&q, &keys, &values, &out}) check_input(*t, t == &q ? "q" : t == &keys ? "keys" : t == &values ? "values" : "out");
  if (keys.dtype != values.dtype) throw TypeError("`values` must have the dtype of `keys`");
  check_no_overlap(out, "out");
  std::vector<int64_t> len(B, N);
  if (lengths) {
    check_shape(*lengths, "lengths", {B});
    check_dtype(*lengths, "lengths", DType::i32);
    check_device(*lengths, "lengths", Device{});
    check_aligned(*lengths, "lengths");
    for (int64_t b = 0; b < B; ++b) {
      len[b] = lengths->ptr<int32_t>()[b * lengths->strides[0]];
      if (len[b] < 0 || len[b] > N)
        throw ValueError("`lengths` must be in [0, " + std::to_string(N) + "], got " + std::to_string(len[b]));
    }
  }
  // NaN/Inf would silently poison whole heads: refuse them, in the valid rows only (rows past
  // lengths[b] are padding and never read).
  check_finite(q, "q");
  for (int64_t b = 0; b < B; ++b)
    for (const TensorView* t : {&keys, &values}) {
      TensorView rows = *t;
      rows.data = static_cast<uint8_t*>(t->data) + b * t->strides[0] * (int64_t)dtype_size(t->dtype);
      rows.ndim = 3;
      for (int i = 0; i < 3; ++i) {
        rows.shape[i] = i == 0 ? len[b] : t->shape[i + 1];
        rows.strides[i] = t->strides[i + 1];
      }
      check_finite(rows, t == &keys ? "keys" : "values");
    }
  check_scale(scale);
  if (!(scale > 0)) scale = 1.0 / std::sqrt((double)D);
  const int64_t G = Hq / H;
  const std::size_t ek = dtype_size(keys.dtype), eo = dtype_size(out.dtype);
  std::vector<Job> jobs;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      Job j;
      j.k = static_cast<const uint8_t*>(keys.data) + (b * keys.strides[0] + h * keys.strides[2]) * ek;
      j.v = static_cast<const uint8_t*>(values.data) + (b * values.strides[0] + h * values.strides[2]) * ek;
      j.ldk = keys.strides[1];
      j.ldv = values.strides[1];
      if (len[b] > 0) j.rows = {{0, (int32_t)len[b]}};
      j.q = load_group(q, b * q.strides[0], h, G, D, (float)scale);
      j.out = static_cast<uint8_t*>(out.data) + (b * out.strides[0] + h * G * out.strides[1]) * eo;
      j.ld_out = out.strides[1];
      jobs.push_back(std::move(j));
    }
  run_jobs(jobs, keys.dtype, G, D, out.dtype, resolve_threads(num_threads));
}

void sparse_decode(const TensorView& q, const TensorView& keys, const TensorView& values,
                   const TensorView& mask, const TensorView& out, double scale, int num_threads) {
  check_ndim(q, "q", {2});
  const int64_t Hq = q.shape[0], D = q.shape[1];
  check_kv_layout(keys, "keys", false, 0, Hq, D);
  const int64_t N = keys.shape[0], H = keys.shape[1];
  check_kv_layout(values, "values", false, H, Hq, D);
  check_shape(keys, "keys", {N, H, D});
  check_shape(values, "values", {N, H, D});
  check_shape(mask, "mask", {H, N});
  check_shape(out, "out", {Hq, D});
  for (auto* t : {&q, &keys, &values, &out}) check_input(*t, t == &q ? "q" : t == &keys ? "keys" : t == &values ? "values" : "out");
  if (keys.dtype != values.dtype) throw TypeError("`values` must have the dtype of `keys`");
  check_no_overlap(out, "out");
  if (mask.dtype != DType::u8)
    throw TypeError(std::string("`mask` must be bool or uint8, got ") + dtype_name(mask.dtype));
  check_device(mask, "mask", Device{});
  check_finite(q, "q");
  check_finite(keys, "keys");
  check_finite(values, "values");
  check_scale(scale);
  if (!(scale > 0)) scale = 1.0 / std::sqrt((double)D);
  const int64_t G = Hq / H;
  const std::size_t ek = dtype_size(keys.dtype), eo = dtype_size(out.dtype);
  std::vector<Job> jobs;
  for (int64_t h = 0; h < H; ++h) {
    Job j;
    j.k = static_cast<const uint8_t*>(keys.data) + h * keys.strides[1] * ek;
    j.v = static_cast<const uint8_t*>(values.data) + h * values.strides[1] * ek;
    j.ldk = keys.strides[0];
    j.ldv = values.strides[0];
    const uint8_t* m = mask.ptr<uint8_t>() + h * mask.strides[0];
    for (int64_t t = 0; t < N; ++t) {
      if (!m[t * mask.strides[1]]) continue;
      if (!j.rows.empty() && j.rows.back().end == t) ++j.rows.back().end;
      else j.rows.push_back({(int32_t)t, (int32_t)(t + 1)});
    }
    j.q = load_group(q, 0, h, G, D, (float)scale);
    j.out = static_cast<uint8_t*>(out.data) + h * G * out.strides[0] * eo;
    j.ld_out = out.strides[0];
    jobs.push_back(std::move(j));
  }
  run_jobs(jobs, keys.dtype, G, D, out.dtype, resolve_threads(num_threads));
}

}  // namespace tactic
