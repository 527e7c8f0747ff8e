#include "cuda_decoder_fixture.cuh"

#include "workload.hpp"

namespace tactic_bench {

namespace {
CudaDecoder cache;  // the last decoder built
}  // namespace

void release_cuda_decoder() { cache = CudaDecoder{}; }

CudaDecoder& cuda_decoder(const Shape& s, DecoderMode mode) {
  const std::string key = std::to_string((int)mode) + "/" + std::to_string(s.N) + "/" + std::to_string(s.B) + "/" +
                          std::to_string(s.H) + "/" + std::to_string(s.G) + "/" + std::to_string(s.D) + "/" +
                          (mode == DecoderMode::tactic ? std::to_string(s.P) : "-");
  if (cache.key == key) return cache;
  cache = CudaDecoder{};
  TB_CUDA_OK(cudaDeviceSynchronize());

  int dev = 0;
  TB_CUDA_OK(cudaGetDevice(&dev));
  const tactic::Device device{tactic::DeviceKind::cuda, dev};
  tactic::DecoderConfig cfg;
  cfg.num_kv_heads = s.H;
  cfg.num_q_heads = s.H * s.G;
  cfg.head_dim = s.D;
  cfg.max_batch = s.B;
  cfg.max_tokens = s.N;
  cfg.dtype = tactic::DType::f16;
  cfg.device = device;
  cfg.select.policy = mode == DecoderMode::dense ? tactic::Policy::dense : tactic::Policy::tactic;
  if (mode == DecoderMode::score_rank) {
    cfg.select.target = 1e-6;
    cfg.select.margin = 0;
    cfg.select.head_fraction = 0;
  } else {
    cfg.select.target = s.P / 100.0;
  }
  cfg.num_layers = l2_rotation_copies(2.0 * s.B * s.H * s.N * s.D * 2);
  CudaDecoder d;
  d.dec = std::make_unique<tactic::Decoder>(cfg);
  d.layers = cfg.num_layers;

  {
    std::vector<uint16_t> keys(s.N * s.H * s.D), values(keys.size());
    Mixture mix(s.H, s.D);
    mix.fill_kv(s.N, keys.data(), values.data());
    DeviceBuffer k = to_device(keys), v = to_device(values);
    const auto kv = tactic::make_view(k.get(), tactic::DType::f16, {s.N, s.H, s.D}, device);
    const auto vv = tactic::make_view(v.get(), tactic::DType::f16, {s.N, s.H, s.D}, device);
    for (int64_t l = 0; l < d.layers; ++l)
      for (int64_t b = 0; b < s.B; ++b) d.dec->prefill(l, b, kv, vv);  // legacy stream
    std::vector<uint16_t> q(s.B * s.H * s.G * s.D);
    mix.fill_q(s.B, s.G, q.data());
    d.q = to_device(q);
    d.out = DeviceBuffer(q.size() * 2);
    TB_CUDA_OK(cudaDeviceSynchronize());  // benchmarks run on their own non-blocking stream
  }
  d.q_view = tactic::make_view(d.q.get(), tactic::DType::f16, {s.B, s.H * s.G, s.D}, device);
  d.out_view = tactic::make_view(d.out.get(), tactic::DType::f16, {s.B, s.H * s.G, s.D}, device);
  for (int64_t b = 0; b < s.B; ++b) d.slots.push_back(b);
  d.key = key;
  cache = std::move(d);
  return cache;
}

}  // namespace tactic_bench
