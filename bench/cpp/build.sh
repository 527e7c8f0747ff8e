#!/usr/bin/env bash
# Configure and build tactic_bench (bench/cpp) with CMake alone; no Python, no root, and with
# --debs no internet either.
#
#   bash bench/cpp/build.sh [--debs DIR] [--build DIR] [--cuda AUTO|ON|OFF] [--arch SM] [-- CMAKE_ARGS...]
#
#   --debs DIR   DIR holds libbenchmark-dev_*.deb and libbenchmark1*.deb, fetched on a connected
#                machine with `apt-get download libbenchmark-dev libbenchmark1debian`. Both
#                are unpacked into DIR/root (dpkg -x; ar + tar where dpkg is missing) and CMake
#                is pointed at DIR/root/usr/lib/<arch>/cmake/benchmark; the binary finds
#                libbenchmark.so through its RUNPATH. Without --debs: the installed package
#                (apt-get install libbenchmark-dev).
#   --build DIR  build directory (default: build/bench in the repository)
#   --cuda       TACTIC_CUDA (default AUTO: CUDA benchmarks when nvcc is found)
#   --arch SM    CMAKE_CUDA_ARCHITECTURES (e.g. 90 for H100; default: the project's 80;90)
# The last line printed is the path of the built binary.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
debs="" build="$repo/build/bench" cuda=AUTO arch="" extra=()
while [ $# -gt 0 ]; do
  case $1 in
    --debs) debs=$(cd "$2" && pwd); shift 2 ;;
    --build) build=$2; shift 2 ;;
    --cuda) cuda=$2; shift 2 ;;
    --arch) arch=$2; shift 2 ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "build.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

cmake_args=(-DTACTIC_BUILD_BENCH=ON -DTACTIC_CUDA="$cuda" -DCMAKE_BUILD_TYPE=Release)
[ -n "$arch" ] && cmake_args+=(-DCMAKE_CUDA_ARCHITECTURES="$arch")

unpack() {  # unpack .deb $1 into directory $2
  if command -v dpkg-deb >/dev/null; then
    dpkg-deb -x "$1" "$2"
  else
    local tmp; tmp=$(mktemp -d)
    (cd "$tmp" && ar x "$1" && tar -xf data.tar.* -C "$2")
    rm -rf "$tmp"
  fi
}

if [ -n "$debs" ]; then
  shopt -s nullglob
  dev=("$debs"/libbenchmark-dev_*.deb) lib=("$debs"/libbenchmark1*.deb)
  shopt -u nullglob
  if [ ${#dev[@]} -ne 1 ] || [ ${#lib[@]} -ne 1 ]; then
    echo "build.sh: $debs must hold exactly one libbenchmark-dev_*.deb and one libbenchmark1*.deb" \
         "(found ${#dev[@]} and ${#lib[@]}); fetch them with" \
         "'apt-get download libbenchmark-dev libbenchmark1debian'" >&2
    exit 1
  fi
  root="$debs/root"
  rm -rf "$root" && mkdir -p "$root"
  unpack "${dev[0]}" "$root"
  unpack "${lib[0]}" "$root"
  cfg=("$root"/usr/lib/*/cmake/benchmark)
  if [ ! -f "${cfg[0]}/benchmarkConfig.cmake" ]; then
    echo "build.sh: no benchmarkConfig.cmake under $root/usr/lib/*/cmake/benchmark" >&2
    exit 1
  fi
  # Debian 12's libbenchmark 1.7.1 needs glibc >= 2.32 and libstdc++ of GCC >= 12.
  need=$(dpkg-deb -f "${lib[0]}" Depends 2>/dev/null || true)
  echo "build.sh: Google Benchmark from ${dev[0]##*/} (${need:-Depends unknown}); config ${cfg[0]}"
  # benchmark_DIR names the package's directory exactly: no other installation is consulted.
  cmake_args+=(-Dbenchmark_DIR="${cfg[0]}")
fi

# Ninja where present (the GPU image has no guarantee of make); an existing build folder keeps
# the generator it was configured with (CMake refuses a change).
if [ ! -f "$build/CMakeCache.txt" ] && ninja --version >/dev/null 2>&1; then
  cmake_args+=(-G Ninja)
fi
cmake -S "$repo" -B "$build" "${cmake_args[@]}" "${extra[@]}"
cmake --build "$build" --target tactic_bench -j "$(nproc 2>/dev/null || echo 2)"
bin="$build/bench/cpp/tactic_bench"
if ldd "$bin" | grep -q "not found"; then
  ldd "$bin" >&2
  echo "build.sh: $bin cannot find a shared library (above)" >&2
  exit 1
fi
ldd "$bin" | grep -E "libbenchmark" || true
echo "$bin"
