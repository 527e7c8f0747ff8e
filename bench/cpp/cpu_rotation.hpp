// How many copies of a benchmark's input to rotate through on the CPU so that consecutive
// iterations do not find it in the last-level cache (a 16K-token KV of a few heads fits in
// the development machine's 260 MiB L3, and would time the cache, not memory).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>

#include <unistd.h>

namespace tactic_bench {

inline int64_t cpu_rotation_copies(double bytes_per_copy) {
  long l3 = 0;
#ifdef _SC_LEVEL3_CACHE_SIZE
  l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
#endif
  if (l3 <= 0) l3 = 256l << 20;  // unknown: assume a large server L3
  const double want = 2.0 * (double)l3;  // twice the L3: evicted before it comes round again
  return std::clamp<int64_t>((int64_t)std::ceil(want / std::max(bytes_per_copy, 1.0)), 1, 64);
}

}  // namespace tactic_bench
