// The counters every benchmark reports: the bytes one iteration must move under the byte
// model written next to each benchmark, and the rate that implies over the measured time.
//
// The byte models count compulsory traffic: each byte the operation has to read or write
// once (KV rows, centroids, indexes, q and out), not the implementation's extra passes
// (a re-read from a temporary, the split-KV partials). GB/s is therefore an efficiency
// against the floor: compare it with BM_Copy (the measured copy bandwidth) of the same run.
#pragma once
#include <cstdint>

#include <benchmark/benchmark.h>

namespace tactic_bench {

// bytes: per iteration. Sets counters "bytes" (per iteration), "GB/s" (1e9 bytes per second
// of the benchmark's time: real time on the CPU, CUDA-event time on the GPU) and
// bytes_per_second (google-benchmark's own field, same rate).
inline void report_traffic(benchmark::State& st, double bytes) {
  st.counters["bytes"] = benchmark::Counter(bytes);
  st.counters["GB/s"] = benchmark::Counter(bytes * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  st.SetBytesProcessed((int64_t)(bytes * (double)st.iterations()));
}

// flops: per iteration, for compute-bound kernels (k-means assignment).
inline void report_flops(benchmark::State& st, double flops) {
  st.counters["GFLOP/s"] = benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

// The share of the context a selection reads (union tokens per KV head / context).
inline void report_read(benchmark::State& st, double fraction) {
  st.counters["read"] = benchmark::Counter(fraction);
}

}  // namespace tactic_bench
