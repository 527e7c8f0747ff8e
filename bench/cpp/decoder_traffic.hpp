// Byte models of the benchmarks that run a whole tactic::Decoder step (CPU and CUDA alike),
// computed from the decoder's configuration and the statistics of the timed step. fp16 KV.
//
// Per (sequence, KV head), with C = ceil((N - num_sink) / cluster_size) clusters:
//   index    = C * D * ce (centroids) + (C + 1) * 4 (offsets); ce = 4 on the CPU (fp32
//              centroids, rounded to the storage dtype's values), the storage dtype's size
//              on CUDA (the selection scores a storage-dtype copy: half the bytes at fp16)
//   q_out    = 2 * G * D * 2 (the group's q in, out out)
//   union    = tokens the KV head reads (stats.kv_tokens: sinks + chosen clusters + recent)
//   exact    = keys the selection scores exactly: sinks + recent + each query head's exact
//              head (head_fraction of the clustered tokens, at least one cluster), at most
//              the union (a row scored for several heads counts once)
//   score+rank : index + q_out/2 + union keys (at a vanishing target the union is the rows
//                scored exactly: the sinks and the first-ranked cluster of each query head)
//   select     : index + q_out/2 + exact keys
//   step       : index + q_out + union keys and values (exact keys are among them)
//   attend     : q_out + union keys and values + the row list (union * 4): attention alone
//                over the step's selection (Decoder::attend)
//   dense      : q_out + every key and value
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "tactic/decoder.hpp"

namespace tactic_bench {

struct DecoderTraffic {
  double score_rank = 0, select = 0, step = 0, attend = 0, dense = 0;
  double read = 0;  // mean union tokens / context over (sequence, KV head)
};

inline DecoderTraffic decoder_traffic(const tactic::DecoderConfig& cfg, const tactic::LayerStats& st) {
  const int64_t H = cfg.num_kv_heads, G = cfg.num_q_heads / H, D = cfg.head_dim;
  const double es = 2.0;  // fp16
  const double ce = cfg.device.kind == tactic::DeviceKind::cuda ? es : 4.0;
  DecoderTraffic t;
  double ctx_sum = 0, union_sum = 0;
  for (int64_t b = 0; b < st.batch; ++b) {
    const int64_t n = st.context[b];
    const int64_t nc = std::max<int64_t>(0, n - cfg.num_sink);
    const int64_t c = (nc + cfg.cluster_size - 1) / cfg.cluster_size;
    const double index = c * D * ce + (c + 1) * 4.0, q_out = 2.0 * G * D * es;
    const double head = std::max<double>((double)cfg.cluster_size, std::ceil(cfg.select.head_fraction * nc));
    for (int64_t h = 0; h < H; ++h) {
      const double uni = (double)st.kv_tokens[b * H + h];
      const double exact = std::min(uni, (double)(n - nc) + G * head);
      t.score_rank += index + q_out / 2 + uni * D * es;
      t.select += index + q_out / 2 + exact * D * es;
      t.step += index + q_out + uni * D * es * 2;
      t.attend += q_out + uni * D * es * 2 + uni * 4.0;
      t.dense += q_out + (double)n * D * es * 2;
      ctx_sum += (double)n;
      union_sum += uni;
    }
  }
  t.read = ctx_sum > 0 ? union_sum / ctx_sum : 0;
  return t;
}

}  // namespace tactic_bench
