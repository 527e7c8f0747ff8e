#!/usr/bin/env bash
# Everything the CUDA backend is checked with, in one command on a GPU machine (results under
# ${OUT:-/tmp/tactic-gpu}): build, the kernels' standalone self-tests, pytest's CUDA tests,
# compute-sanitizer on small runs and the first timing against torch SDPA.
#   bash bench/run_gpu.sh [build|selftest|pytest|sanitize|bench]...   (default: all)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/tactic-gpu}
mkdir -p "$OUT"
ARCH=${TACTIC_CUDA_ARCH:-90}
steps=${*:-build selftest pytest sanitize bench}
NVCC="nvcc -std=c++17 -O2 -lineinfo -arch=sm_$ARCH -Icpp/include -Icpp/src -Icuda -Xcompiler -fopenmp"
rc=0
for s in $steps; do
  echo "=== $s ==="
  case $s in
    build)
      python3 -m pip install --no-build-isolation --no-deps -v . -Ccmake.define.TACTIC_CUDA=ON \
        -Ccmake.define.CMAKE_CUDA_ARCHITECTURES=$ARCH > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
      grep -E "Tactic:" "$OUT/build.log"
      python3 -c "import tactic; print('tactic', tactic.__version__, 'cuda', tactic.with_cuda)" ;;
    selftest)
      $NVCC tests/cuda/kmeans_check.cu cuda/kmeans.cu cpp/src/*.cpp -o /tmp/kmeans_check && /tmp/kmeans_check || rc=1
      $NVCC tests/cuda/attention_check.cu cuda/attention.cu cpp/src/*.cpp -o /tmp/attention_check && /tmp/attention_check || rc=1 ;;
    pytest)
      python3 -m pytest -q -x tests/test_cuda.py 2>&1 | tail -30 || rc=1 ;;
    sanitize)
      for tool in memcheck racecheck; do
        compute-sanitizer --tool $tool --error-exitcode 9 python3 -m pytest -q -x tests/test_cuda.py \
          -k "dense_matches_reference and 17 and 64 and float16 or selection_matches_cpu and 0.9-4" 2>&1 | tail -6 || rc=1
      done ;;
    bench)
      python3 bench/gpu_step.py --json "$OUT/gpu_step.json" || rc=1 ;;
  esac
done
exit $rc
