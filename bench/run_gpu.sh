#!/usr/bin/env bash
# Everything the CUDA backend is checked with, in one command on a GPU machine (results under
# ${OUT:-/tmp/tactic-gpu}): build, the kernels' standalone self-tests, pytest's CUDA tests,
# compute-sanitizer on small runs, and the benchmarks (python -m tactic.bench; results, JSON +
# PNG + log, land in $OUT; copy them into bench/results/ to commit them).
#   bash bench/run_gpu.sh [build|selftest|pytest|sanitize|bench|quick|fixture|profile|ncu|e2e]...
# Default: build selftest pytest sanitize quick. `bench` (the full sweep, ~8 min) and `e2e`
# (~2 min) each need a call of their own under a 10-minute limit per command.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/tactic-gpu}
mkdir -p "$OUT"
ARCH=${TACTIC_CUDA_ARCH:-90}
steps=${*:-build selftest pytest sanitize quick}
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
    bench)    # full default sweep: N 8K-512K, B 1/8/32, 32/8 and 32/4 heads, fp16/bf16, P .8/.9/.95
      python3 -m tactic.bench --out "$OUT" 2>&1 | tee "$OUT/bench.log"; [ "${PIPESTATUS[0]}" = 0 ] || rc=1 ;;
    quick)    # ~1 min: 8K-128K, B=1, 32/8, fp16, P=0.9
      python3 -m tactic.bench --quick --out "$OUT" 2>&1 | tee "$OUT/quick.log"; [ "${PIPESTATUS[0]}" = 0 ] || rc=1 ;;
    fixture)  # real SmolLM2 KV tiled (9/3 heads, D 64)
      python3 -m tactic.bench --workload fixture --n 32K 128K 512K --batch 1 8 --dtype float16 \
        --target 0.9 --budget-s 240 --out "$OUT" 2>&1 | tee "$OUT/fixture.log"; [ "${PIPESTATUS[0]}" = 0 ] || rc=1 ;;
    profile)  # per-kernel time of one step (torch profiler) at 32K / 128K / 512K
      for n in 32768 131072 524288; do python3 bench/profile_step.py --context $n 2>&1 | head -16; done ;;
    ncu)      # hardware counters of the selection and attention kernels at 128K (one launch each)
      ncu --clock-control none -k regex:"select_head|select_stop|select_exact|attention_chunks|score_kernel|build_rows" \
        -s 40 -c 6 --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
        --section SchedulerStats --section MemoryWorkloadAnalysis \
        python3 bench/profile_step.py --context 131072 > "$OUT/ncu.txt" 2>&1 || rc=1
      grep -E "^  [a-z_]+.*\(|Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Registers Per|Stall|Warp Cycles Per Issued|Issue Slots Busy|No Eligible" "$OUT/ncu.txt" | head -120 ;;
    e2e)      # Llama-3.1-8B-shaped decode loop at 32K and 128K, tokens/s
      python3 -m tactic.bench e2e --out "$OUT" 2>&1 | tee "$OUT/e2e.log"; [ "${PIPESTATUS[0]}" = 0 ] || rc=1 ;;
  esac
done
exit $rc
