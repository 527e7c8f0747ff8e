// Shared by the CUDA kernels: error checks that become tactic::Error, and dtype loads.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <string>

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

// Element loads/stores in fp32 for the three storage dtypes.
template <class T> __device__ __forceinline__ float to_float(T x);
template <> __device__ __forceinline__ float to_float<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <class T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

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
