#include "cuda_support.cuh"

#include <algorithm>
#include <cmath>

#include "grid.hpp"
#include "traffic.hpp"

namespace tactic_bench {

GpuTimer::GpuTimer(bool legacy) {
  if (legacy) s_ = cudaStreamLegacy;
  else TB_CUDA_OK(cudaStreamCreateWithFlags(&s_, cudaStreamNonBlocking));
  own_ = !legacy;
  TB_CUDA_OK(cudaEventCreate(&a_));
  TB_CUDA_OK(cudaEventCreate(&b_));
}

GpuTimer::~GpuTimer() {
  cudaEventDestroy(a_);
  cudaEventDestroy(b_);
  if (own_) cudaStreamDestroy(s_);
}

void GpuTimer::start() { TB_CUDA_OK(cudaEventRecord(a_, s_)); }

double GpuTimer::stop() {
  TB_CUDA_OK(cudaEventRecord(b_, s_));
  TB_CUDA_OK(cudaEventSynchronize(b_));
  float ms = 0;
  TB_CUDA_OK(cudaEventElapsedTime(&ms, a_, b_));
  return ms * 1e-3;
}

int64_t l2_rotation_copies(double bytes_per_copy, int64_t min_copies) {
  int dev = 0, l2 = 0;
  TB_CUDA_OK(cudaGetDevice(&dev));
  TB_CUDA_OK(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, dev));
  const double want = 4.0 * std::max(l2, 1 << 20);
  const int64_t n = (int64_t)std::ceil(want / std::max(bytes_per_copy, 1.0));
  return std::clamp<int64_t>(n, std::max<int64_t>(min_copies, 1), 64);
}

bool cuda_usable(std::string& why) {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    why = cudaGetErrorString(e);
    cudaGetLastError();
    return false;
  }
  if (n == 0) {
    why = "no CUDA device";
    return false;
  }
  return true;
}

void skip_with(benchmark::State& st, const std::exception& e) {
  cudaGetLastError();  // clear a sticky launch error so later benchmarks can run
  st.SkipWithError(e.what());
}

// BM_Copy/cuda: device-to-device copy of 1 GiB, the measured bandwidth the other CUDA
// benchmarks' GB/s compare with. Byte model: read + write, 2 * 1 GiB.
static void copy_cuda(benchmark::State& st) {
  try {
    const std::size_t size = std::size_t(1) << 30;
    DeviceBuffer src(size), dst(size);
    TB_CUDA_OK(cudaMemset(src.get(), 1, size));
    GpuTimer t;
    TB_CUDA_OK(cudaMemcpyAsync(dst.get(), src.get(), size, cudaMemcpyDeviceToDevice, t.stream()));  // warm-up
    for (auto _ : st) {
      t.start();
      TB_CUDA_OK(cudaMemcpyAsync(dst.get(), src.get(), size, cudaMemcpyDeviceToDevice, t.stream()));
      st.SetIterationTime(t.stop());
    }
    report_traffic(st, 2.0 * (double)size);
  } catch (const std::exception& e) {
    skip_with(st, e);
  }
}

void register_copy_cuda() {
  benchmark::RegisterBenchmark("BM_Copy/cuda", copy_cuda)->UseManualTime()->Unit(benchmark::kMicrosecond);
}

}  // namespace tactic_bench
