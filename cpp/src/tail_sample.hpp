// The certified stop rule's pieces that the CPU (select.cpp) and CUDA (cuda/select_certify.cu)
// backends must compute alike: the seeded random numbers of the tail sample and the normal
// quantile of `confidence`. Header-only, host and device, so both draw the same clusters.
#pragma once
#include <cstdint>

#include "host_device.hpp"

namespace tactic {

// splitmix64: the sample's random numbers, a pure function of (layer, slot, KV head, query
// head, context length, draw index), so a step's selection is reproducible.
TACTIC_HD uint64_t mix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}
TACTIC_HD double unit_draw(uint64_t x) { return (double)(mix64(x) >> 11) * 0x1.0p-53; }  // [0, 1)

// The key of one query head's draws; draw i uses unit_draw(key + 2 i).
TACTIC_HD uint64_t draw_key(int64_t layer, int64_t slot, int64_t kv_head, int64_t q_in_group, int64_t len) {
  return mix64(mix64(mix64(mix64(mix64((uint64_t)layer) ^ (uint64_t)slot) ^ (uint64_t)kv_head) ^
                     (uint64_t)q_in_group) ^ (uint64_t)len);
}

// Phi^-1(c) for the standard normal (select.cpp; host only, once per decoder or selection).
double normal_quantile(double c);

}  // namespace tactic
