// Selection stage 5, union: the per-(sequence, KV head) union of its query heads' marked
// clusters turned into the row list the attention reads (sinks, marked clusters in physical
// order, recent rows), clearing the marks for the next step; and the dense policy's counts.
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "select_common.cuh"

namespace tactic {
namespace cuda {

namespace {

// Row list of each (sequence, KV head): sinks, the marked clusters in physical order, recent.
// Two passes over chunks of kRowChunk clusters, so every (item, chunk) is its own block: the
// sizes of each chunk's marked clusters, then each chunk's rows at the sum of earlier chunks.
constexpr int64_t kRowChunk = 256;  // one scan batch per block: more blocks, shorter serial work

// Which marked clusters a pass lists and where (see RowsPass in select_stages.hpp).
struct PassArgs {
  uint8_t want;           // 0: every nonzero mark; 1 / 2: that mark only
  bool always;            // sinks and recent rows too
  bool clear;             // clear every mark read (the step's last pass)
  const int32_t* start;   // [items] or null: the list begins at this offset of the item's rows
  int32_t* count;         // [items] rows listed
  int32_t* total;         // [items] or null: start + count
  bool unite;             // group_head's union pass: each head's prior over the union (below)
};

__device__ __forceinline__ bool wanted(uint8_t mk, uint8_t want) { return want ? mk == want : mk != 0; }

__global__ void __launch_bounds__(kThreads) chunk_sums_kernel(StepGeometry s, SelectArgs a, PassArgs pa) {
  pdl_begin();  // first: wait for the previous kernel (programmatic dependent launch)
  typedef cub::BlockReduce<int64_t, kThreads> ReduceI;
  __shared__ typename ReduceI::TempStorage tmp;
  const int64_t item = blockIdx.x, b = item / s.hkv, h = item % s.hkv, chunk = blockIdx.y;
  const int32_t slot = s.slots[b];
  const SlotCounts st = s.state[s.layer * s.max_batch + slot];
  const int32_t* off = a.offsets + head_index(s, slot, h) * (s.cmax + 1);
  const uint8_t* kmark = a.kv_mark + item * s.cmax;
  int64_t v = 0;
  static_assert(kRowChunk == kThreads, "a thread per cluster of the chunk");
  const int64_t j = chunk * kRowChunk + threadIdx.x;
  const bool marked = j < st.n_clusters && wanted(kmark[j], pa.want);
  const int32_t n = marked ? off[j + 1] - off[j] : 0;
  v = ReduceI(tmp).Sum((int64_t)n);
  if (threadIdx.x == 0) a.chunk_sums[item * gridDim.y + chunk] = (int32_t)v;
  if (!pa.unite) return;
  // group_head: the union's clusters, for each query head of the group, leave that head's
  // score histogram (float atomics; select_stop clamps at zero) and add to its prior over the
  // union (block sums, then one double atomic per head and block), so select_stop walks the rest
  // without another pass over the clusters.
  __shared__ double s_pu[16];
  if (threadIdx.x < 16) s_pu[threadIdx.x] = 0.0;
  __syncthreads();
  for (int64_t g = 0; g < s.g; ++g) {
    const int64_t i = item * s.g + g;
    const SelInfo& in = a.info[i];
    double pu = 0.0;
    if (marked && !in.all) {
      const float x = a.scores[i * s.cmax + j], mx = in.mx;
      atomicAdd(&a.hist_pri[i * kBuckets + bucket_of(x, mx, in.bpl)], -(float)n * __expf(x - mx));
      pu = (double)n * exp((double)x - (double)mx);
      if (a.head_mark) a.head_mark[i * s.cmax + j] = 1;
    }
    for (int o = 16; o > 0; o >>= 1) pu += __shfl_xor_sync(0xffffffffu, pu, o);
    if ((threadIdx.x & 31) == 0 && pu != 0.0) atomicAdd(&s_pu[g], pu);
  }
  __syncthreads();
  if (threadIdx.x < s.g && s_pu[threadIdx.x] != 0.0) atomicAdd(&a.info[item * s.g + threadIdx.x].prior_union, s_pu[threadIdx.x]);
}

__global__ void __launch_bounds__(kThreads) build_rows_kernel(StepGeometry s, SelectArgs a, PassArgs pa) {
  pdl_begin();  // first: wait for the previous kernel (programmatic dependent launch)
  typedef cub::BlockScan<int64_t, kThreads> ScanI;
  __shared__ typename ScanI::TempStorage tmp;
  const int64_t item = blockIdx.x, b = item / s.hkv, h = item % s.hkv, chunk = blockIdx.y;
  const int32_t slot = s.slots[b];
  const SlotCounts st = s.state[s.layer * s.max_batch + slot];
  const int32_t* off = a.offsets + head_index(s, slot, h) * (s.cmax + 1);
  uint8_t* kmark = a.kv_mark + item * s.cmax;
  const int32_t first = pa.start ? pa.start[item] : 0;
  int32_t* out = a.rows + item * s.cap + first;
  const int64_t nsink = st.n_sink, nclu = st.n_clustered, nrec = st.n_recent, C = st.n_clusters;
  const int32_t* sums = a.chunk_sums + item * gridDim.y;
  // Rows before this chunk and rows of all chunks, summed by the whole block (a serial loop
  // over up to 128 earlier chunks' sums was a chain of dependent loads in the last blocks).
  __shared__ int64_t s_red[2][kThreads / 32];
  int64_t before = 0, every = 0;
  for (int64_t c = threadIdx.x; c < gridDim.y; c += kThreads) {
    const int64_t v = sums[c];
    every += v;
    if (c < chunk) before += v;
  }
  for (int o = 16; o > 0; o >>= 1) {
    before += __shfl_xor_sync(0xffffffffu, before, o);
    every += __shfl_xor_sync(0xffffffffu, every, o);
  }
  if ((threadIdx.x & 31) == 0) {
    s_red[0][threadIdx.x >> 5] = before;
    s_red[1][threadIdx.x >> 5] = every;
  }
  __syncthreads();
  const int64_t lead = pa.always ? nsink : 0;
  int64_t carry = lead, all = lead;
  for (int w = 0; w < kThreads / 32; ++w) {
    carry += s_red[0][w];
    all += s_red[1][w];
  }
  if (chunk == 0) {
    if (pa.always) {
      for (int64_t t = threadIdx.x; t < nsink; t += kThreads) out[t] = (int32_t)t;
      for (int64_t t = threadIdx.x; t < nrec; t += kThreads) out[all + t] = (int32_t)(nsink + nclu + t);
    }
    const int32_t n = (int32_t)(all + (pa.always ? nrec : 0));
    if (threadIdx.x == 0) {
      pa.count[item] = n;
      if (pa.total) pa.total[item] = first + n;
    }
  }
  // Each batch of kThreads clusters: a scan gives each marked cluster its offset, then the
  // threads write the batch's rows together (consecutive threads, consecutive rows: coalesced;
  // a thread per cluster writing its own rows left each store instruction scattered).
  __shared__ int32_t s_ex[kThreads], s_start[kThreads];
  const int64_t end = min((chunk + 1) * kRowChunk, C);
  for (int64_t base = chunk * kRowChunk; base < end; base += kThreads) {
    const int64_t j = base + threadIdx.x;
    const uint8_t mk = j < end ? kmark[j] : 0;
    const bool marked = wanted(mk, pa.want);
    if (pa.clear && mk) kmark[j] = 0;  // read for the last time: ready for the next step
    const int64_t v = marked ? (int64_t)off[j + 1] - off[j] : 0;
    int64_t ex, agg;
    ScanI(tmp).ExclusiveSum(v, ex, agg);
    s_ex[threadIdx.x] = (int32_t)ex;
    s_start[threadIdx.x] = marked ? (int32_t)(nsink + off[j]) : 0;
    __syncthreads();
    for (int64_t r = threadIdx.x; r < agg; r += kThreads) {
      int lo = 0, hi = kThreads;  // last entry with s_ex <= r: the cluster holding row r
      while (hi - lo > 1) {
        const int mid = (lo + hi) >> 1;
        if (s_ex[mid] <= r) lo = mid;
        else hi = mid;
      }
      out[carry + r] = s_start[lo] + (int32_t)(r - s_ex[lo]);
    }
    carry += agg;
    __syncthreads();  // s_ex / s_start / tmp are reused by the next batch
  }
}

// Dense: every row of every item, and trivial statistics.
__global__ void dense_counts_kernel(StepGeometry s, SelectArgs a) {
  pdl_begin();  // first: wait for the previous kernel (programmatic dependent launch)
  const int64_t item = blockIdx.x * blockDim.x + threadIdx.x, hq = s.hkv * s.g;
  if (item >= s.batch * s.hkv) return;
  const int64_t b = item / s.hkv, h = item % s.hkv;
  const SlotCounts st = s.state[s.layer * s.max_batch + s.slots[b]];
  const int64_t total = (int64_t)st.n_sink + st.n_clustered + st.n_recent;
  a.counts[item] = (int32_t)total;
  for (int64_t j = 0; j < s.g; ++j) {
    a.head_tokens[b * hq + h * s.g + j] = total;
    a.est_mass[b * hq + h * s.g + j] = 1.0;
  }
}

}  // namespace

int64_t row_chunks(int64_t cmax) { return (cmax + kRowChunk - 1) / kRowChunk; }

void launch_build_rows(const StepGeometry& s, const SelectArgs& a, RowsPass pass) {
  cudaStream_t st = as_stream(s.stream);
  const int64_t items = s.batch * s.hkv;
  const dim3 rows_grid((unsigned)items, (unsigned)row_chunks(s.cmax));
  PassArgs pa{0, true, true, nullptr, a.counts, nullptr, false};
  if (pass == RowsPass::group_union) pa = PassArgs{1, false, false, nullptr, a.union_counts, nullptr, true};
  if (pass == RowsPass::group_rest) pa = PassArgs{2, true, true, a.union_counts, a.rest_counts, a.counts, false};
  launch<chunk_sums_kernel>(s.pdl, rows_grid, kThreads, 0, st, s, a, pa);
  TACTIC_CUDA_LAUNCH_CHECK("chunk_sums");
  launch<build_rows_kernel>(s.pdl, rows_grid, kThreads, 0, st, s, a, pa);
  TACTIC_CUDA_LAUNCH_CHECK("build_rows");
}

void launch_dense_counts(const StepGeometry& s, const SelectArgs& a) {
  cudaStream_t st = as_stream(s.stream);
  const int64_t items = s.batch * s.hkv;
  launch<dense_counts_kernel>(s.pdl, (unsigned)((items + 127) / 128), 128, 0, st, s, a);
  TACTIC_CUDA_LAUNCH_CHECK("dense_counts");
}

}  // namespace cuda
}  // namespace tactic
