// CPU parallelism: OpenMP when the build found it, serial otherwise. One level only (no
// nesting), so the core never runs more threads than cores.
#pragma once
#include <cstdint>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace tactic {

inline int resolve_threads(int requested) {
#ifdef _OPENMP
  return requested > 0 ? requested : omp_get_max_threads();
#else
  (void)requested;
  return 1;
#endif
}

inline int thread_index() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// Clone hot loops for AVX2+FMA and baseline x86-64; the loader picks one at run time, so a
// wheel built anywhere runs everywhere and still uses wide vectors where they exist.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(TACTIC_NO_CLONES)
#define TACTIC_HOT __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define TACTIC_HOT
#endif

}  // namespace tactic

#include <exception>
#include <mutex>

namespace tactic {

// Run fn(i) for i in [0, n) over `threads` threads (dynamic schedule: items differ in cost).
// An exception thrown by any item is rethrown on the calling thread after the loop.
template <class Fn>
void parallel_for(int64_t n, int threads, Fn&& fn) {
  std::exception_ptr error;
  std::mutex mu;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1 && n > 1)
  for (int64_t i = 0; i < n; ++i) {
    try {
      fn(i);
    } catch (...) {
      std::lock_guard<std::mutex> lock(mu);
      if (!error) error = std::current_exception();
    }
  }
  if (error) std::rethrow_exception(error);
}

}  // namespace tactic
