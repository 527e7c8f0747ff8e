// How much host memory the machine has, so that a capacity that cannot fit is refused at
// construction with the bytes it needs, instead of failing (or being OOM-killed) later.
#pragma once
#include <cstdint>
#include <string>

namespace tactic {

// Physical RAM plus swap in bytes; UINT64_MAX where the platform does not say.
uint64_t host_memory_bytes();

// a * b, or UINT64_MAX when the product overflows (sizes of absurd configurations).
inline uint64_t mul_sat(uint64_t a, uint64_t b) {
  if (a != 0 && b > UINT64_MAX / a) return UINT64_MAX;
  return a * b;
}
inline uint64_t add_sat(uint64_t a, uint64_t b) { return a > UINT64_MAX - b ? UINT64_MAX : a + b; }

// "12.3 GiB", for messages.
std::string gib(uint64_t bytes);

// Throws CapacityError naming `need` bytes, what they are for (`what`) and the memory
// available, when `need` exceeds host_memory_bytes().
void require_host_bytes(uint64_t need, const std::string& what);

}  // namespace tactic
