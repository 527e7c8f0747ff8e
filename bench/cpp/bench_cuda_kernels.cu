// CUDA kernel benchmarks outside the decode step's selection: one k-means iteration (the
// public tactic::kmeans on device arrays), the re-index of the KV store (internal launcher
// cuda/kmeans.hpp) and split-KV sparse attention over a given selection (internal launcher
// cuda/attention.hpp). fp16 KV; inputs rotate over copies together >= 4x the L2.
#include <algorithm>
#include <cmath>
#include <vector>

#include "attention.hpp"
#include "cuda_support.cuh"
#include "grid.hpp"
#include "kmeans.hpp"
#include "selection.hpp"
#include "tactic/convert.hpp"
#include "tactic/kmeans.hpp"
#include "traffic.hpp"
#include "workload.hpp"

namespace tactic_bench {

void register_copy_cuda();

namespace {

using tactic::DType;

constexpr int64_t kClusterSize = 16;  // DecoderConfig::cluster_size's default

tactic::Device current_device() {
  int dev = 0;
  TB_CUDA_OK(cudaGetDevice(&dev));
  return tactic::Device{tactic::DeviceKind::cuda, dev};
}

// Head-major fp16 keys and values [H, N, D] of the mixture workload. google-benchmark calls
// a benchmark function once per iteration-count trial and per repetition; the arrays of the
// last shape are kept so that the host (two hashes and a log per element, 268M elements at
// 128K x 8 heads x 128) generates them once instead of at every call.
struct HostKV {
  int64_t h = 0, n = 0, d = 0;
  std::vector<uint16_t> keys, values;
};

const HostKV& host_kv(const Shape& s) {
  static HostKV last;
  if (last.h != s.H || last.n != s.N || last.d != s.D) {
    last = HostKV{};  // free the old arrays first
    last.keys.resize(s.H * s.N * s.D);
    last.values.resize(last.keys.size());
    Mixture(s.H, s.D).fill_kv_heads(s.N, last.keys.data(), last.values.data());
    last.h = s.H, last.n = s.N, last.d = s.D;
  }
  return last;
}

// `copies` device copies of head-major keys and values [heads, N, D] (every group of H heads
// the same tokens).
struct DeviceKV {
  std::vector<DeviceBuffer> k, v;
  DeviceKV(int64_t heads, const Shape& s, int64_t copies) {
    const HostKV& host = host_kv(s);
    const std::vector<uint16_t>& keys = host.keys;
    const std::vector<uint16_t>& values = host.values;
    const std::size_t bytes = keys.size() * 2;
    for (int64_t r = 0; r < copies; ++r) {
      k.emplace_back(heads / s.H * bytes);
      v.emplace_back(heads / s.H * bytes);
      for (int64_t g = 0; g < heads / s.H; ++g) {
        TB_CUDA_OK(cudaMemcpy(k.back().get<char>() + g * bytes, keys.data(), bytes, cudaMemcpyHostToDevice));
        TB_CUDA_OK(cudaMemcpy(v.back().get<char>() + g * bytes, values.data(), bytes, cudaMemcpyHostToDevice));
      }
    }
  }
};

// One Lloyd iteration of each of the H heads: the public tactic::kmeans on a device view
// [N, D] with max_iters = 1, which is seeding, one assignment (tiled GEMM with fused argmin),
// one update with empty-cluster re-seeding, and the inertia copy that synchronises the call.
// Byte model per head, as on the CPU: keys read by the assignment and by the update
// (2 * N * D * 2), centroids read and written (2 * C * D * 4), assignment written (N * 4).
// FLOP model: 2 N C D for the assignment.
void kmeans_iter(benchmark::State& st, const Shape& s) {
  try {
    const int64_t n = s.N, d = s.D, c = (n + kClusterSize - 1) / kClusterSize;
    const int64_t copies = l2_rotation_copies(2.0 * s.H * n * d);
    DeviceKV kv(s.H, s, copies);
    DeviceBuffer cent(c * d * 4), assign(n * 4);
    const tactic::Device dev = current_device();
    const auto cv = tactic::make_view(cent.get(), DType::f32, {c, d}, dev);
    const auto av = tactic::make_view(assign.get(), DType::i32, {n}, dev);
    tactic::KMeansOptions opt;
    opt.num_clusters = c;
    opt.max_iters = 1;
    GpuTimer t(/*legacy*/ true);  // the op takes no stream: it runs on the legacy stream
    auto run = [&](int64_t r) {
      for (int64_t p = 0; p < s.H; ++p) {
        opt.seed = (uint64_t)p;
        tactic::kmeans(tactic::make_view(kv.k[r].get<uint16_t>() + p * n * d, DType::f16, {n, d}, dev), opt, cv, av);
      }
    };
    run(0);  // warm-up
    int64_t it = 0;
    for (auto _ : st) {
      const int64_t r = it++ % copies;
      t.start();
      run(r);
      st.SetIterationTime(t.stop());
    }
    report_traffic(st, s.H * (2.0 * n * d * 2 + 2.0 * c * d * 4 + n * 4.0));
    report_flops(st, s.H * 2.0 * n * c * d);
  } catch (const std::exception& e) {
    skip_with(st, e);
  }
}

// Re-index of B * H store heads of N rows: the internal cuda::kmeans_reindex, which always
// clusters before it re-indexes. Each iteration times two calls on two cold copies: k-means
// alone (iters 1, reindex off, no offsets), then k-means + offsets + re-index (stable radix
// sort by (head, cluster), then the K, V and position rows permuted through a temporary);
// the iteration time is the difference. 64 clusters per head keep the subtracted k-means
// small and steady (the assignment's cost grows with C, the re-index's does not; a real C
// only adds a radix-sort pass), while still scattering rows like a real clustering.
// Counter kmeans_us: the mean subtracted time.
// Byte model per head (compulsory): K and V rows read and written once (2 * 2 * N * D * 2),
// positions read and written (2 * N * 4), assignment read (N * 4), offsets written (65 * 4).
// The implementation moves the rows twice (to the temporary and back).
void reindex(benchmark::State& st, const Shape& s) {
  try {
    const int64_t n = s.N, d = s.D, heads = s.B * s.H, c = 64;
    const double copy_bytes = heads * (2.0 * n * d * 2 + n * 4.0);
    const int64_t copies = l2_rotation_copies(copy_bytes, 2);
    DeviceKV kv(heads, s, copies);
    std::vector<DeviceBuffer> pos;
    std::vector<int32_t> pos_host(heads * n);
    for (int64_t i = 0; i < heads * n; ++i) pos_host[i] = (int32_t)(i % n);
    for (int64_t r = 0; r < copies; ++r) pos.push_back(to_device(pos_host));
    DeviceBuffer offsets(heads * (c + 1) * 4);
    std::vector<uint64_t> seeds(heads);
    for (int64_t p = 0; p < heads; ++p) seeds[p] = (uint64_t)p;
    GpuTimer t;
    auto args = [&](int64_t r, bool full) {
      tactic::cuda::KMeansReindexArgs a{};
      a.k = kv.k[r].get();
      a.v = kv.v[r].get();
      a.pos = pos[r].get<int32_t>();
      a.dtype = DType::f16;
      a.d = d;
      a.cap = n;
      a.nprob = heads;
      a.n = n;
      a.c = c;
      a.iters = 1;
      a.seeds = seeds.data();
      a.offsets = full ? offsets.get<int32_t>() : nullptr;
      a.off_stride = c + 1;
      a.reindex = full;
      a.stream = t.stream();
      return a;
    };
    tactic::cuda::kmeans_reindex(args(0, true));  // warm-up (and the memory pool)
    TB_CUDA_OK(cudaStreamSynchronize(t.stream()));
    int64_t it = 0;
    double base_sum = 0;
    for (auto _ : st) {
      const int64_t r0 = (2 * it) % copies, r1 = (2 * it + 1) % copies;
      ++it;
      t.start();
      tactic::cuda::kmeans_reindex(args(r0, false));
      const double base = t.stop();
      t.start();
      tactic::cuda::kmeans_reindex(args(r1, true));
      const double full = t.stop();
      base_sum += base;
      st.SetIterationTime(std::max(full - base, 1e-9));
    }
    report_traffic(st, heads * (2.0 * 2 * n * d * 2 + 2.0 * n * 4 + n * 4.0 + (c + 1) * 4.0));
    st.counters["kmeans_us"] = benchmark::Counter(it ? base_sum / it * 1e6 : 0);
  } catch (const std::exception& e) {
    skip_with(st, e);
  }
}

// Split-KV sparse attention (internal cuda::decode_attention) of B sequences x H KV heads x
// G query heads over a given selection: per (sequence, KV head), S percent of the N rows as
// random 16-row blocks (selection.hpp), as a device row list like the selection writes.
// Byte model: the selected K and V rows once (2 * rows * D * 2), the row list and counts
// (rows * 4 + 4 per item), q in fp32 (B * Hq * D * 4) and out in fp16 (B * Hq * D * 2).
void sparse_attention(benchmark::State& st, const Shape& s) {
  try {
    const int64_t n = s.N, d = s.D, items = s.B * s.H, hq = s.H * s.G;
    const int64_t copies = l2_rotation_copies(2.0 * items * n * d * 2);
    DeviceKV kv(items, s, copies);
    std::vector<int32_t> rows(items * n, 0), counts(items), head_index(items);
    int64_t max_count = 0;
    double total = 0;
    for (int64_t i = 0; i < items; ++i) {
      const std::vector<int32_t> sel = block_selection(n, s.S, (uint64_t)i);
      std::copy(sel.begin(), sel.end(), rows.begin() + i * n);
      counts[i] = (int32_t)sel.size();
      head_index[i] = (int32_t)i;
      max_count = std::max<int64_t>(max_count, counts[i]);
      total += (double)sel.size();
    }
    std::vector<uint16_t> qh(s.B * hq * d);
    Mixture(s.H, d).fill_q(s.B, s.G, qh.data());
    std::vector<float> qf(qh.size());
    const float scale = 1.0f / std::sqrt((float)d);
    for (std::size_t i = 0; i < qh.size(); ++i) qf[i] = tactic::half_to_float(qh[i]) * scale;
    DeviceBuffer rows_d = to_device(rows), counts_d = to_device(counts), index_d = to_device(head_index);
    DeviceBuffer q_d = to_device(qf), out_d(s.B * hq * d * 2);
    DeviceBuffer ws(tactic::cuda::attention_workspace_bytes(s.B, s.H, s.G, d, max_count));
    GpuTimer t;
    tactic::cuda::AttentionArgs a{};
    a.kv_dtype = DType::f16;
    a.cap = n;
    a.d = d;
    a.batch = s.B;
    a.hkv = s.H;
    a.g = s.G;
    a.head_index = index_d.get<int32_t>();
    a.q = q_d.get<float>();
    a.rows = rows_d.get<int32_t>();
    a.rows_stride = n;
    a.counts = counts_d.get<int32_t>();
    a.max_count = max_count;
    a.workspace = ws.get<float>();
    a.out = out_d.get();
    a.out_dtype = DType::f16;
    a.out_stride_b = hq * d;
    a.out_stride_h = d;
    a.stream = t.stream();
    a.k = kv.k[0].get();
    a.v = kv.v[0].get();
    tactic::cuda::decode_attention(a);  // warm-up
    int64_t it = 0;
    for (auto _ : st) {
      const int64_t r = it++ % copies;
      a.k = kv.k[r].get();
      a.v = kv.v[r].get();
      t.start();
      tactic::cuda::decode_attention(a);
      st.SetIterationTime(t.stop());
    }
    report_traffic(st, total * d * 2 * 2 + total * 4 + items * 4.0 + s.B * hq * d * (4.0 + 2.0));
    report_read(st, total / ((double)items * n));
  } catch (const std::exception& e) {
    skip_with(st, e);
  }
}

}  // namespace

void register_cuda_kernels(const Axes& axes) {
  register_copy_cuda();
  for (const Shape& s : shapes("NHD", axes))
    register_shape("BM_KMeansIter/cuda", "NHD", s, kmeans_iter)->UseManualTime()->Unit(benchmark::kMicrosecond);
  for (const Shape& s : shapes("NBHD", axes))
    register_shape("BM_Reindex/cuda", "NBHD", s, reindex)->UseManualTime()->Unit(benchmark::kMicrosecond);
  for (const Shape& s : shapes("NBHGDS", axes))
    register_shape("BM_SparseAttention/cuda", "NBHGDS", s, sparse_attention)
        ->UseManualTime()->Unit(benchmark::kMicrosecond);
}

}  // namespace tactic_bench
