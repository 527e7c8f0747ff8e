#include "tactic/attention.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

#include "parallel.hpp"
#include "simd.hpp"
#include "tactic/convert.hpp"

namespace tactic {

void AttentionPartial::init(int64_t g, int64_t d) {
  m.assign(g, -std::numeric_limits<float>::infinity());
  l.assign(g, 0.f);
  acc.assign(g * d, 0.f);
}

namespace {
constexpr int64_t kBlock = 32;  // rows per block: one max/rescale per block, not per row

// acc[0:d] = acc * corr + sum_j e[j] * V[j], up to 8 vectors of the row held in registers.
template <int NV>
inline void weighted_sum(const float* e, const float* vb, int64_t nb, int64_t nv_rt, float corr,
                         float* ah) {
  const int64_t nv = NV > 0 ? NV : nv_rt, d = nv * 8;
  for (int64_t c0 = 0; c0 < nv; c0 += 8) {
    const int64_t w = std::min<int64_t>(8, nv - c0);
    v8 a[8];
    for (int64_t c = 0; c < w; ++c) a[c] = ld(ah + 8 * (c0 + c)) * corr;
    for (int64_t j = 0; j < nb; ++j) {
      const float p = e[j];
      const float* vr = vb + j * d + 8 * c0;
      for (int64_t c = 0; c < w; ++c) a[c] += p * ld(vr + 8 * c);
    }
    for (int64_t c = 0; c < w; ++c) st(ah + 8 * (c0 + c), a[c]);
  }
}

// One block of nb <= kBlock rows for G heads. Vector path for D % 8 == 0 (NV = D / 8 fixed
// at compile time for the common head dims, NV == 0 reads it at run time); scalar otherwise.
template <int NV>
TACTIC_HOT void block_update(const float* kb, const float* vb, int64_t nb, int64_t d,
                             const float* q, int64_t g, float* m, float* l, float* acc) {
  const bool vec = NV > 0 || d % 8 == 0;
  float e[kBlock];
  for (int64_t h = 0; h < g; ++h) {
    const float* qh = q + h * d;
    float* ah = acc + h * d;
    if (vec) {
      dot_rows<NV>(qh, kb, nb, d / 8, e);
    } else {
      for (int64_t j = 0; j < nb; ++j) {
        float s = 0.f;
        for (int64_t k = 0; k < d; ++k) s += qh[k] * kb[j * d + k];
        e[j] = s;
      }
    }
    float bm = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < nb; ++j) bm = std::max(bm, e[j]);
    const float nm = std::max(m[h], bm);
    const float corr = std::exp(m[h] - nm);  // 0 when m[h] was -inf
    // The whole block runs (fixed trip count vectorises); its unused tail holds -inf, not
    // uninitialised floats, and contributes exp(-inf) = 0.
    for (int64_t j = nb; j < kBlock; ++j) e[j] = -std::numeric_limits<float>::infinity();
#pragma omp simd
    for (int64_t j = 0; j < kBlock; ++j) e[j] = exp_nonpos(e[j] - nm);
    float lsum = 0.f;
    for (int64_t j = 0; j < nb; ++j) lsum += e[j];
    if (vec) {
      weighted_sum<NV>(e, vb, nb, d / 8, corr, ah);
    } else {
      for (int64_t k = 0; k < d; ++k) ah[k] *= corr;
      for (int64_t j = 0; j < nb; ++j)
        for (int64_t k = 0; k < d; ++k) ah[k] += e[j] * vb[j * d + k];
    }
    m[h] = nm;
    l[h] = l[h] * corr + lsum;
  }
}

using BlockFn = void (*)(const float*, const float*, int64_t, int64_t, const float*, int64_t,
                         float*, float*, float*);

BlockFn pick_block(int64_t d) {
  switch (d) {
    case 64: return &block_update<8>;
    case 80: return &block_update<10>;
    case 96: return &block_update<12>;
    case 128: return &block_update<16>;
    default: return &block_update<0>;
  }
}
}  // namespace

void attention_accumulate(const void* k_base, int64_t ld_k, const void* v_base, int64_t ld_v,
                          DType dtype, int64_t d, const RowRange* ranges, int64_t nranges,
                          const float* q, int64_t g, AttentionPartial& p) {
  thread_local std::vector<float> kb, vb;
  kb.resize(kBlock * d);
  vb.resize(kBlock * d);
  const std::size_t es = dtype_size(dtype);
  const uint8_t* kp = static_cast<const uint8_t*>(k_base);
  const uint8_t* vp = static_cast<const uint8_t*>(v_base);
  const BlockFn block_update = pick_block(d);
  for (int64_t r = 0; r < nranges; ++r) {
    for (int64_t r0 = ranges[r].begin; r0 < ranges[r].end; r0 += kBlock) {
      const int64_t nb = std::min<int64_t>(kBlock, ranges[r].end - r0);
      for (int64_t j = 0; j < nb; ++j) {
        load_floats(kp + (r0 + j) * ld_k * (int64_t)es, dtype, d, kb.data() + j * d);
        load_floats(vp + (r0 + j) * ld_v * (int64_t)es, dtype, d, vb.data() + j * d);
      }
      block_update(kb.data(), vb.data(), nb, d, q, g, p.m.data(), p.l.data(), p.acc.data());
    }
  }
}

void attention_merge(AttentionPartial& dst, const AttentionPartial& src) {
  const int64_t g = (int64_t)dst.m.size(), d = g ? (int64_t)dst.acc.size() / g : 0;
  for (int64_t h = 0; h < g; ++h) {
    if (src.l[h] == 0.f) continue;
    const float nm = std::max(dst.m[h], src.m[h]);
    const float a = std::exp(dst.m[h] - nm), b = std::exp(src.m[h] - nm);
    for (int64_t k = 0; k < d; ++k) dst.acc[h * d + k] = dst.acc[h * d + k] * a + src.acc[h * d + k] * b;
    dst.l[h] = dst.l[h] * a + src.l[h] * b;
    dst.m[h] = nm;
  }
}

void attention_finish(const AttentionPartial& p, int64_t d, void* out, int64_t ld_out,
                      DType out_dtype) {
  const int64_t g = (int64_t)p.m.size();
  std::vector<float> row(d);
  const std::size_t es = dtype_size(out_dtype);
  for (int64_t h = 0; h < g; ++h) {
    const float inv = p.l[h] > 0.f ? 1.f / p.l[h] : 0.f;
    for (int64_t k = 0; k < d; ++k) row[k] = p.acc[h * d + k] * inv;
    store_floats(row.data(), d, out_dtype, static_cast<uint8_t*>(out) + h * ld_out * (int64_t)es);
  }
}

std::vector<std::vector<RowRange>> split_ranges(const std::vector<RowRange>& ranges,
                                                int64_t chunk_rows) {
  std::vector<std::vector<RowRange>> chunks;
  std::vector<RowRange> cur;
  int64_t fill = 0;
  for (RowRange r : ranges) {
    while (r.size() > 0) {
      const int64_t take = std::min<int64_t>(r.size(), chunk_rows - fill);
      cur.push_back({r.begin, (int32_t)(r.begin + take)});
      r.begin += (int32_t)take;
      fill += take;
      if (fill == chunk_rows) {
        chunks.push_back(std::move(cur));
        cur.clear();
        fill = 0;
      }
    }
  }
  if (!cur.empty()) chunks.push_back(std::move(cur));
  return chunks;
}

}  // namespace tactic
