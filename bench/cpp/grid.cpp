#include "grid.hpp"

#include <algorithm>
#include <stdexcept>

namespace tactic_bench {

int64_t Shape::get(char letter) const {
  switch (letter) {
    case 'N': return N;
    case 'B': return B;
    case 'H': return H;
    case 'G': return G;
    case 'D': return D;
    case 'P': return P;
    case 'S': return S;
  }
  throw std::invalid_argument(std::string("unknown benchmark argument letter ") + letter);
}

static void set(Shape& s, char letter, int64_t v) {
  switch (letter) {
    case 'N': s.N = v; return;
    case 'B': s.B = v; return;
    case 'H': s.H = v; return;
    case 'G': s.G = v; return;
    case 'D': s.D = v; return;
    case 'P': s.P = v; return;
    case 'S': s.S = v; return;
  }
  throw std::invalid_argument(std::string("unknown benchmark argument letter ") + letter);
}

Sizes sizes_for(const std::string& set_name) {
  Sizes s;
  if (set_name == "default") {
    // CPU: two contexts, two KV heads (k-means of the prefill dominates set-up time).
    s.cpu = {{'N', {4096, 16384}}, {'B', {1}}, {'H', {2}}, {'G', {4}}, {'D', {128}},
             {'P', {90}}, {'S', {10}}};
    // CUDA: Llama-3.1-8B attention shape (32 query / 8 KV heads, D 128) at three contexts.
    s.cuda = {{'N', {8192, 32768, 131072}}, {'B', {1}}, {'H', {8}}, {'G', {4}}, {'D', {128}},
              {'P', {90}}, {'S', {5}}};
  } else if (set_name == "large") {
    // CPU prefill clusters with ~17 GFLOP/s a core: 32K x 8 heads is already ~1 min a decoder.
    s.cpu = {{'N', {4096, 16384, 32768}}, {'B', {1}}, {'H', {8}}, {'G', {4}}, {'D', {128}},
             {'P', {80, 90, 95}}, {'S', {5, 20}}};
    // Issue 4's sweep: N 8K..512K, B 1/8/32, Hq/Hkv 32/8 and 32/4; shapes that do not fit in
    // device memory report an error instead of a time.
    s.cuda = {{'N', {8192, 32768, 131072, 524288}}, {'B', {1, 8, 32}}, {'H', {8, 4}},
              {'G', {4, 8}}, {'D', {128}}, {'P', {80, 90, 95}}, {'S', {2, 5, 20}}};
  } else {
    throw std::invalid_argument("--tactic_sizes must be 'default' or 'large', got '" + set_name + "'");
  }
  return s;
}

std::vector<Shape> shapes(const std::string& letters, const Axes& axes) {
  std::vector<Shape> out{Shape{}};
  for (char l : letters) {
    auto it = axes.find(l);
    if (it == axes.end()) continue;
    std::vector<Shape> next;
    for (const Shape& s : out)
      for (int64_t v : it->second) {
        Shape t = s;
        set(t, l, v);
        next.push_back(t);
      }
    out = std::move(next);
  }
  if (axes.count('H') && axes.count('G') && letters.find('H') != std::string::npos &&
      letters.find('G') != std::string::npos) {
    // Keep Hq = H * G at the largest swept value (issue 4: 32/8 and 32/4), not every product.
    int64_t hq = 0;
    for (int64_t h : axes.at('H'))
      for (int64_t g : axes.at('G')) hq = std::max(hq, h * g);
    std::vector<Shape> keep;
    for (const Shape& s : out)
      if (s.H * s.G == hq) keep.push_back(s);
    out = std::move(keep);
  }
  return out;
}

benchmark::internal::Benchmark* register_shape(
    const std::string& name, const std::string& letters, const Shape& shape,
    std::function<void(benchmark::State&, const Shape&)> fn) {
  std::vector<std::string> names;
  std::vector<int64_t> args;
  for (char l : letters) {
    names.emplace_back(1, l);
    args.push_back(shape.get(l));
  }
  auto* b = benchmark::RegisterBenchmark(name.c_str(), [fn, shape](benchmark::State& st) { fn(st, shape); });
  b->ArgNames(names)->Args(args);
  return b;
}

}  // namespace tactic_bench
