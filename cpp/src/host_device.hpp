// TACTIC_HD: a function for both backends (host and device under nvcc, inline elsewhere), for
// the headers whose arithmetic the CPU and CUDA must do alike.
#pragma once

#if defined(__CUDACC__)
#define TACTIC_HD __host__ __device__ __forceinline__
#else
#define TACTIC_HD inline
#endif
