// What the CUDA benchmarks share: error checks, owned device buffers, CUDA-event timing and
// the number of input copies to rotate through so that the KV is not L2-resident.
//
// Timing: each iteration is bracketed by two events on the benchmark's stream and reported
// with state.SetIterationTime (the benchmarks use UseManualTime), so the figures are GPU time
// from the first queued kernel to the last, including any gap the host leaves between
// launches (that is the cost of an un-captured step; the *Graph variants remove it).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include <benchmark/benchmark.h>

#define TB_CUDA_OK(expr)                                                                      \
  do {                                                                                        \
    cudaError_t e_ = (expr);                                                                  \
    if (e_ != cudaSuccess)                                                                    \
      throw std::runtime_error(std::string(#expr) + ": " + cudaGetErrorString(e_));          \
  } while (0)

namespace tactic_bench {

// cudaMalloc'd bytes, freed with the object.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(std::size_t bytes) { TB_CUDA_OK(cudaMalloc(&p_, bytes ? bytes : 16)); }
  ~DeviceBuffer() { if (p_) cudaFree(p_); }
  DeviceBuffer(DeviceBuffer&& o) noexcept : p_(o.p_) { o.p_ = nullptr; }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    std::swap(p_, o.p_);
    return *this;
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  template <class T = void>
  T* get() const { return static_cast<T*>(p_); }

 private:
  void* p_ = nullptr;
};

// Host vector to a new device buffer.
template <class T>
DeviceBuffer to_device(const std::vector<T>& v) {
  DeviceBuffer b(v.size() * sizeof(T));
  TB_CUDA_OK(cudaMemcpy(b.get(), v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
  return b;
}

// A stream and a pair of events for one benchmark. By default a new non-blocking stream;
// `legacy` times work queued on the legacy default stream (calls that take no stream).
class GpuTimer {
 public:
  explicit GpuTimer(bool legacy = false);
  ~GpuTimer();
  GpuTimer(const GpuTimer&) = delete;
  GpuTimer& operator=(const GpuTimer&) = delete;
  cudaStream_t stream() const { return s_; }
  void start();
  double stop();  // seconds since start(); waits for the stream to reach the stop event

 private:
  cudaStream_t s_ = nullptr;
  bool own_ = false;
  cudaEvent_t a_ = nullptr, b_ = nullptr;
};

// Copies of an input of `bytes_per_copy` to rotate through: together at least 4x the L2
// (H100: 4 x 50 MB), each evicted before it comes round again; at least `min_copies`.
int64_t l2_rotation_copies(double bytes_per_copy, int64_t min_copies = 1);

// True when a CUDA device can run work; else `why` says what is missing (no device, a driver
// older than the runtime, ...).
bool cuda_usable(std::string& why);

// A CUDA failure or a shape that does not fit: the benchmark reports the message instead
// of a time (google-benchmark's SkipWithError) and the run goes on.
void skip_with(benchmark::State& st, const std::exception& e);

}  // namespace tactic_bench
