// Named benchmark arguments and the size sets they are swept over.
//
// Every benchmark takes a subset of these one-letter arguments, always in this order, and
// shows them in its name (BM_DecodeStep/N:32768/B:1/H:8/G:4/D:128/P:90):
//   N  context tokens per sequence          B  batch (sequences per step)
//   H  KV heads                             G  query heads per KV head (GQA group)
//   D  head dim                             P  target attention mass, percent
//   S  selected share of the context, percent (sparse attention over a given selection)
// Benchmarks are registered one shape at a time (the shape is captured by the benchmark
// function; the arguments only name it), so benchmarks that share a prefilled decoder can be
// registered next to each other and build it once.
#pragma once
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include <benchmark/benchmark.h>

namespace tactic_bench {

struct Shape {
  int64_t N = 0, B = 1, H = 1, G = 1, D = 128, P = 90, S = 10;
  int64_t get(char letter) const;
};

// Values swept per letter.
using Axes = std::map<char, std::vector<int64_t>>;

// The argument sets of one run: "default" keeps the CPU suite to a minute or two on two
// cores; "large" adds the long contexts, batches and targets of issue 4.
struct Sizes {
  Axes cpu, cuda;
};
Sizes sizes_for(const std::string& set);  // throws std::invalid_argument for an unknown set

// Cartesian product of `axes` over `letters` (in the order of `letters`; a letter missing
// from `axes` keeps Shape's default).
std::vector<Shape> shapes(const std::string& letters, const Axes& axes);

// Registers `fn(state, shape)` as `name` with named arguments `letters` for this shape.
benchmark::internal::Benchmark* register_shape(
    const std::string& name, const std::string& letters, const Shape& shape,
    std::function<void(benchmark::State&, const Shape&)> fn);

}  // namespace tactic_bench
