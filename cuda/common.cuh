// Shared by the CUDA kernels: error checks that become tactic::Error, and dtype loads.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>

#include "tactic/error.hpp"
#include "tactic/tensor.hpp"

namespace tactic {
namespace cuda {

// Every CUDA runtime call goes through this: a failure becomes a tactic::Error (a Python
// RuntimeError through the bindings) naming the call site, never an abort.
inline void check(cudaError_t e, const char* what, const char* file, int line) {
  if (e != cudaSuccess)
    throw Error(std::string("CUDA error in ") + what + " (" + file + ":" + std::to_string(line) +
                "): " + cudaGetErrorString(e));
}
#define TACTIC_CUDA_CHECK(call) ::tactic::cuda::check((call), #call, __FILE__, __LINE__)
// After a kernel launch: catches bad configurations without synchronising.
#define TACTIC_CUDA_LAUNCH_CHECK(name) ::tactic::cuda::check(cudaGetLastError(), name, __FILE__, __LINE__)

inline cudaStream_t as_stream(void* s) { return static_cast<cudaStream_t>(s); }

// ---- Programmatic dependent launch (PDL, sm_90+) ----
// A decode step is ~10 short kernels in a row on one stream; between two plain launches the GPU
// drains the first grid before it schedules the second. launch() below adds
// cudaLaunchAttributeProgrammaticStreamSerialization, so the next kernel's blocks are scheduled
// while the previous one drains, and every kernel launched so calls pdl_begin() as its first
// statement: it waits for the previous grid's completion and memory (griddepcontrol.wait).
// Effects therefore keep plain-launch order (each kernel waits for its predecessor, which
// waited for its own), and a kernel that calls pdl_begin() behaves as before under a plain
// launch (the wait returns at once).
// Hand-written because the CUDA runtime offers only the attribute and the two PTX
// instructions; CUTLASS wraps the same two instructions for its own kernels.
// An early griddepcontrol.launch_dependents after the wait (the next grid's blocks resident
// while this one runs) measured slower on the H100 (+6% / +3% of the graphed step at 128K /
// 512K, bench/NOTES.md, seventh session): the trigger stays implicit (as this grid's blocks exit).
__device__ __forceinline__ void pdl_begin() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// The architecture Kernel's code was compiled for, as __CUDA_ARCH__ / 10 saw it (90 for
// sm_90; 0 when the query fails), cached per kernel and device. A kernel whose body needs an
// architecture (PDL's griddepcontrol, thread-block clusters, mma.sync) is launched only where
// this says so. It is the PTX version, not the binary's: a build for sm_75 run on an H200 is
// JIT-compiled from compute_75 PTX, reports binaryVersion 90, and holds none of the sm_90 code.
template <auto Kernel>
int compiled_arch() {
  static std::atomic<int> cached[64];  // [device]: 1 + the version, 0 unknown
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  const int c = dev >= 0 && dev < 64 ? cached[dev].load(std::memory_order_relaxed) : 0;
  if (c) return c - 1;
  cudaFuncAttributes fa{};
  int v = 0;
  if (cudaFuncGetAttributes(&fa, Kernel) == cudaSuccess)
    v = fa.ptxVersion > 0 && fa.binaryVersion > 0 ? std::min(fa.ptxVersion, fa.binaryVersion)
                                                  : std::max(fa.ptxVersion, fa.binaryVersion);
  else
    (void)cudaGetLastError();
  if (dev >= 0 && dev < 64) cached[dev].store(v + 1, std::memory_order_relaxed);
  return v;
}

// Appends the PDL attribute to cfg's attributes (room for one more) where the plan asks for it
// (`pdl`, StepPlan::pdl) and Kernel's code has the griddepcontrol wait (sm_90+: an sm_80 build
// run on an H100 has no wait and must not start early).
template <auto Kernel>
void add_pdl(cudaLaunchConfig_t& cfg, cudaLaunchAttribute* attrs, bool pdl) {
  cfg.attrs = attrs;
  if (!pdl || compiled_arch<Kernel>() < 90) return;
  cudaLaunchAttribute& a = attrs[cfg.numAttrs++];
  a.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  a.val.programmaticStreamSerializationAllowed = 1;
}

// A kernel launch, with PDL where `pdl` (the plan's choice) and the kernel allow it.
template <auto Kernel, class... A>
void launch(bool pdl, dim3 grid, dim3 block, std::size_t smem, cudaStream_t stream, A&&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  add_pdl<Kernel>(cfg, attr, pdl);
  TACTIC_CUDA_CHECK(cudaLaunchKernelEx(&cfg, Kernel, std::forward<A>(args)...));
}

template <class T> __device__ __forceinline__ float to_float(T x);
template <> __device__ __forceinline__ float to_float<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <class T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// 16 bytes of T (one vector load) -> 16 / sizeof(T) floats.
template <class T> __device__ __forceinline__ void unpack16(const uint4& r, float* f);
template <> __device__ __forceinline__ void unpack16<float>(const uint4& r, float* f) {
  f[0] = __uint_as_float(r.x);
  f[1] = __uint_as_float(r.y);
  f[2] = __uint_as_float(r.z);
  f[3] = __uint_as_float(r.w);
}
template <> __device__ __forceinline__ void unpack16<__half>(const uint4& r, float* f) {
  const __half2* h = reinterpret_cast<const __half2*>(&r);
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const float2 x = __half22float2(h[k]);
    f[2 * k] = x.x;
    f[2 * k + 1] = x.y;
  }
}
template <> __device__ __forceinline__ void unpack16<__nv_bfloat16>(const uint4& r, float* f) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&r);
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const float2 x = __bfloat1622float2(h[k]);
    f[2 * k] = x.x;
    f[2 * k + 1] = x.y;
  }
}

// Calls f.template operator()<T>() with T the CUDA element type of `dt` (f32, f16, bf16).
template <class F>
void dispatch_float(DType dt, F&& f) {
  switch (dt) {
    case DType::f32: f(float{}); break;
    case DType::f16: f(__half{}); break;
    case DType::bf16: f(__nv_bfloat16{}); break;
    default: throw TypeError(std::string("CUDA kernels take float32, float16 or bfloat16, got ") + dtype_name(dt));
  }
}

}  // namespace cuda
}  // namespace tactic
