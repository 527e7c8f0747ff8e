#include "host_memory.hpp"

#include <cstdio>

#include "tactic/error.hpp"

#if defined(__linux__)
#include <sys/sysinfo.h>
#elif defined(__unix__) || defined(__APPLE__)
#include <unistd.h>
#endif

namespace tactic {

uint64_t host_memory_bytes() {
#if defined(__linux__)
  struct sysinfo si;
  if (sysinfo(&si) != 0) return UINT64_MAX;
  // Swap counts: the store is committed lazily and a store that pages is slow, not wrong.
  return add_sat(mul_sat(si.totalram, si.mem_unit), mul_sat(si.totalswap, si.mem_unit));
#elif defined(_SC_PHYS_PAGES) && defined(_SC_PAGESIZE)
  const long pages = sysconf(_SC_PHYS_PAGES), size = sysconf(_SC_PAGESIZE);
  if (pages <= 0 || size <= 0) return UINT64_MAX;
  return mul_sat((uint64_t)pages, (uint64_t)size);
#else
  return UINT64_MAX;
#endif
}

std::string gib(uint64_t bytes) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f GiB", (double)bytes / (1024.0 * 1024.0 * 1024.0));
  return buf;
}

void require_host_bytes(uint64_t need, const std::string& what) {
  const uint64_t have = host_memory_bytes();
  if (need <= have) return;
  throw CapacityError(what + " needs " + std::to_string(need) + " bytes (" + gib(need) +
                      ") of host memory, more than this machine has (" + std::to_string(have) +
                      " bytes, " + gib(have) + ", RAM + swap); lower max_tokens, max_batch or num_layers");
}

}  // namespace tactic
