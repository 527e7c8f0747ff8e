#!/usr/bin/env bash
# Everything the CUDA backend is checked with, in one command on a GPU machine (results under
# ${OUT:-/tmp/tactic-gpu}): build, the kernels' standalone self-tests, pytest's CUDA tests,
# compute-sanitizer on small runs, and the benchmarks (python -m tactic.bench; results, JSON +
# PNG + log, land in $OUT; copy them into bench/results/ to commit them).
#   bash bench/run_gpu.sh [build|arch75|flashinfer|selftest|pytest|integration|sanitize|bench|quick|batch|fixture|profile|threshold-ab|profile-batch|phases|ncu|ncu-certify|e2e|e2e-graphs|mma|gbench]...
# Default: build selftest pytest quick. `sanitize` (three tools, ~6 min: racecheck 5.5), `bench` (the full
# sweep, ~8 min) and `e2e` (~2 min) each need a call of their own under a 10-minute limit. `gbench`
# (the Google Benchmark microbenchmarks, bench/cpp; needs the .debs in bench/cpp/third_party,
# carried along) builds its own binary and needs no `build` step: ~1-2 min build + <4 min runs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/tactic-gpu}
mkdir -p "$OUT"
ARCH=${TACTIC_CUDA_ARCH:-90}  # the standalone self-tests' architecture
steps=${*:-build selftest pytest quick}
FLAGS=${BENCH_FLAGS:-}  # extra options for the batch / profile / profile-batch runs, e.g. --group-head
NVCC="nvcc -std=c++17 -O2 --expt-relaxed-constexpr -lineinfo -arch=sm_$ARCH -DTACTIC_VERSION=\"selftest\" -Icpp/include -Icpp/src -Icuda -Xcompiler -fopenmp"
rc=0
summary=()  # one line per step, printed last (a long run's first lines fall out of a log's tail)
for s in $steps; do
  rc_before=$rc; rc=0  # this step's status, then or-ed into the run's
  echo "=== $s ==="
  case $s in
    build)    # the README's install (default architectures: this machine's GPU), unless TACTIC_CUDA_ARCH is set
      archflag=${TACTIC_CUDA_ARCH:+-Ccmake.define.CMAKE_CUDA_ARCHITECTURES=$TACTIC_CUDA_ARCH}
      python3 -m pip install --no-build-isolation --no-deps -v . -Ccmake.define.TACTIC_CUDA=ON $archflag \
        > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
      grep -E "Tactic:" "$OUT/build.log"
      python3 -c "import tactic, json; print(json.dumps(tactic.build_info()))"
      [ -n "${TACTIC_CUDA_ARCH:-}" ] || TACTIC_EXPECT_NATIVE=1 python3 -m pytest -q tests/test_build_info.py 2>&1 | tail -5 ;;
    arch75)   # a build for sm_75 alone (PTX JIT-compiled on newer GPUs) runs correctly, without the newer kernels
      python3 -m pip install --no-build-isolation --no-deps . --target /tmp/tactic-sm75 -Ccmake.define.TACTIC_CUDA=ON \
        -Ccmake.define.CMAKE_CUDA_ARCHITECTURES=75 -Cbuild-dir=/tmp/tactic-sm75-build > "$OUT/build-sm75.log" 2>&1 \
        || { tail -40 "$OUT/build-sm75.log"; exit 1; }
      PYTHONPATH=/tmp/tactic-sm75 python3 -c "import tactic, json; print(json.dumps(tactic.build_info()))"
      PYTHONPATH=/tmp/tactic-sm75 python3 -m pytest -q -p no:cacheprovider tests/test_build_info.py \
        "tests/test_cuda.py::test_selection_matches_cpu_long_context" "tests/test_cuda.py::test_pdl_launches_match_plain_launches" \
        "tests/test_cuda.py::test_dense_matches_reference" 2>&1 | tail -8
      [ "${PIPESTATUS[0]}" = 0 ] || rc=1 ;;
    selftest) # the attention (cuda/attention*.cu) calls kernel_arch (capabilities.cu), which needs the selection;
              # one object per source, compiled in parallel (one nvcc over them all ran past 5 minutes)
      st=/tmp/tactic-selftest; mkdir -p $st
      srcs=$(ls tests/cuda/kmeans_check.cu tests/cuda/attention_check.cu cuda/kmeans.cu cuda/attention*.cu \
        cuda/capabilities.cu cuda/select*.cu cpp/src/*.cpp)
      export NVCC st  # expanded unparsed inside sh -c, so TACTIC_VERSION keeps its quotes
      printf '%s\n' $srcs | xargs -P "$(nproc)" -n 1 sh -c '$NVCC -c "$1" -o "$st/$(echo "$1" | tr / _).o"' _ || rc=1
      cpp_objs=$(ls $st/cpp_src_*.o)
      nvcc -arch=sm_$ARCH -Xcompiler -fopenmp $st/tests_cuda_kmeans_check.cu.o $st/cuda_kmeans.cu.o $cpp_objs \
        -o /tmp/kmeans_check && /tmp/kmeans_check || rc=1
      nvcc -arch=sm_$ARCH -Xcompiler -fopenmp $st/tests_cuda_attention_check.cu.o $st/cuda_attention*.o \
        $st/cuda_capabilities.cu.o $st/cuda_select*.o $cpp_objs -o /tmp/attention_check && /tmp/attention_check || rc=1 ;;
    pytest)   # the whole log in $OUT/pytest.log; here the failures and the count only
      python3 -m pytest -q -rf tests/test_cuda.py tests/test_cuda_threshold.py tests/test_cuda_certified.py tests/test_cuda_hardening.py tests/test_build_info.py \
        tests/test_layout.py > "$OUT/pytest.log" 2>&1
      st=$?; grep -E "^FAILED|^ERROR" "$OUT/pytest.log" | cut -c1-200 | head -20; tail -1 "$OUT/pytest.log"
      [ "$st" = 0 ] || rc=1 ;;
    integration)  # the transformers integration on the GPU (tiny random models; SmolLM2 if installed)
      python3 -m pytest -q -m gpu tests/test_transformers.py 2>&1 | tail -20
      [ "${PIPESTATUS[0]}" = 0 ] || rc=1 ;;
    sanitize) # memcheck, racecheck, initcheck over a subset of the CUDA tests (~6 min in all)
      SKIP_BUILD=1 OUT="$OUT" .ci/compute-sanitizer || rc=1 ;;
    bench)    # full default sweep: N 8K-512K, B 1/8/32, 32/8 and 32/4 heads, fp16/bf16, P .8/.9/.95
      python3 -m tactic.bench --out "$OUT" 2>&1 | tee "$OUT/bench.log"; [ "${PIPESTATUS[0]}" = 0 ] || rc=1 ;;
    flashinfer)  # FlashInfer for the peers: .whl/fi.tar.xz (its wheel and apache-tvm-ffi's, unpacked, without
                 # flashinfer/data/csrc's subfolders) onto PYTHONPATH; JIT builds land in /tmp
      if [ -f .whl/fi.tar.xz ]; then
        mkdir -p /tmp/fi && tar xJf .whl/fi.tar.xz -C /tmp/fi
        export PYTHONPATH=/tmp/fi${PYTHONPATH:+:$PYTHONPATH} FLASHINFER_WORKSPACE_BASE=/tmp
        python3 -c "import flashinfer; print('flashinfer', flashinfer.__version__)" || rc=1
      else
        echo "no .whl/fi.tar.xz: the FlashInfer peers will be skipped"
      fi ;;
    quick)    # ~2 min: 8K-128K, B=1, 32/8, fp16, P=0.9, workloads (b) and its sparse layer
      python3 -m tactic.bench --quick --out "$OUT" 2>&1 | tee "$OUT/quick.log"; [ "${PIPESTATUS[0]}" = 0 ] || rc=1 ;;
    batch)    # issue 19's batch rows: B = 8 at 128K and B = 32 at 32K, both workloads, with the peers (~3 min)
      python3 -m tactic.bench --workload sparse synthetic --n 128K --batch 8 --heads 32/8 --dtype float16 \
        --target 0.9 --no-padded-gather --budget-s 120 --tag b8 --out "$OUT" $FLAGS 2>&1 | tail -6 || rc=1
      python3 -m tactic.bench --workload sparse synthetic --n 32K --batch 32 --heads 32/8 --dtype float16 \
        --target 0.9 --no-padded-gather --budget-s 120 --tag b32 --out "$OUT" $FLAGS 2>&1 | tail -6 || rc=1 ;;
    fixture)  # real SmolLM2 KV tiled (9/3 heads, D 64)
      python3 -m tactic.bench --workload fixture --n 32K 128K 512K --batch 1 8 --dtype float16 \
        --target 0.9 --budget-s 240 --out "$OUT" 2>&1 | tee "$OUT/fixture.log"; [ "${PIPESTATUS[0]}" = 0 ] || rc=1 ;;
    profile)  # per-kernel time of one step (torch profiler) at 32K / 128K / 512K
      for r in ${STOP_RULES:-certified prior}; do for w in sparse synthetic; do
        python3 bench/profile_step.py --stop-rule $r --workload $w --context 32768 131072 524288 $FLAGS > "$OUT/profile-$r-$w.txt" 2>&1 || rc=1
        echo "--- $r $w"; grep -E "^N=|total GPU|certify|select_|score|attention_chunks" "$OUT/profile-$r-$w.txt" \
          | sed -E 's/ plan=.*//; s/void tactic::cuda::\(anonymous namespace\):://' | cut -c1-100
      done; done ;;
    threshold-ab)  # the threshold selection's tests, then its per-kernel time against the ranked one
                   # (prior rule, both workloads, 32K / 128K / 512K), in one call
      python3 -m pytest -q -rf tests/test_cuda_threshold.py > "$OUT/pytest-threshold.log" 2>&1 || rc=1
      grep -E "^FAILED|passed|failed" "$OUT/pytest-threshold.log" | cut -c1-200
      for w in sparse synthetic; do for sk in ranked threshold; do
        python3 bench/profile_step.py --workload $w --selection-kernel $sk --context 32768 131072 524288 $FLAGS \
          > "$OUT/profile-$sk-$w.txt" 2>&1 || rc=1
        echo "--- $sk $w"; grep -E "^N=|total GPU|thresh_|select_|attention_chunks" "$OUT/profile-$sk-$w.txt" \
          | sed -E 's/ plan=.*//; s/void tactic::cuda::\(anonymous namespace\):://; s/tactic::cuda::\(anonymous namespace\):://' | cut -c1-90
      done; done ;;
    profile-batch)  # per-kernel time of one step at B 8 x 128K and B 32 x 32K (prior rule, both workloads)
      for w in sparse synthetic; do for bn in "8 131072" "32 32768"; do set -- $bn
        python3 bench/profile_step.py --workload $w --batch $1 --context $2 $FLAGS > "$OUT/profile-b$1-$w.txt" 2>&1 || rc=1
        echo "--- B $1 $w"; grep -E "^N=|total GPU|select_|score|attention_chunks|chunk_sums|build_rows|merge|prepare" "$OUT/profile-b$1-$w.txt" \
          | sed -E 's/ plan=.*//; s/void tactic::cuda::\(anonymous namespace\):://' | cut -c1-100
      done; done ;;
    phases)   # the certified rule's per-head kernel timed by phase (a build with -DTACTIC_CERTIFY_PHASES
              # replaces the installed one: run it last, or `build` again after it)
      python3 -m pip install --no-build-isolation --no-deps . -Ccmake.define.TACTIC_CUDA=ON \
        "-Ccmake.define.CMAKE_CUDA_FLAGS=-DTACTIC_CERTIFY_PHASES" > "$OUT/build-phases.log" 2>&1 \
        || { grep -m5 error "$OUT/build-phases.log"; exit 1; }
      for w in sparse synthetic; do
        python3 bench/profile_step.py --stop-rule certified --workload $w --context 32768 131072 524288 \
          > "$OUT/phases-$w.txt" 2>&1 || rc=1
        echo "--- $w"; python3 bench/certify_phases.py "$OUT/phases-$w.txt" || rc=1
      done ;;
    ncu)      # hardware counters of the selection and attention kernels at 128K (one launch each)
      ncu --clock-control none -k regex:"select_head|select_stop|select_exact|attention_chunks|score_|build_rows" \
        -s 40 -c 6 --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
        --section SchedulerStats --section MemoryWorkloadAnalysis \
        python3 bench/profile_step.py --context 131072 > "$OUT/ncu.txt" 2>&1 || rc=1
      grep -E "^  [a-z_]+.*\(|Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Registers Per|Stall|Warp Cycles Per Issued|Issue Slots Busy|No Eligible" "$OUT/ncu.txt" | head -120 ;;
    ncu-certify)  # the certified rule's two kernels at 128K and 512K, workload (b) (one launch each)
      for n in 131072 524288; do
        ncu --clock-control none -k regex:"certify" -s 10 -c 2 --section SpeedOfLight --section Occupancy \
          --section WarpStateStats --section MemoryWorkloadAnalysis \
          python3 bench/profile_step.py --stop-rule certified --workload synthetic --context $n > "$OUT/ncu-certify-$n.txt" 2>&1 || rc=1
        echo "--- $n"; grep -E "^  [a-z_]+.*\(|Duration|DRAM Throughput|Memory Throughput|L1/TEX Hit|L2 Hit|Achieved Occupancy|Stall" \
          "$OUT/ncu-certify-$n.txt" | cut -c1-110 | head -40
      done ;;
    e2e)      # Llama-3.1-8B-shaped decode loop at 32K and 128K, tokens/s
      python3 -m tactic.bench e2e ${E2E_FLAGS:-} --out "$OUT" 2>&1 | tee "$OUT/e2e.log"; [ "${PIPESTATUS[0]}" = 0 ] || rc=1 ;;
    e2e-graphs)  # the same with piecewise CUDA graphs (everything but attention replayed as graphs);
                 # E2E_FLAGS for Tactic's options, e.g. E2E_FLAGS="--selection-kernel threshold"
      python3 -m tactic.bench e2e --mode graphs --tag graphs${E2E_FLAGS:+-opts} ${E2E_FLAGS:-} --out "$OUT" 2>&1 | tee "$OUT/e2e-graphs.log"
      [ "${PIPESTATUS[0]}" = 0 ] || rc=1 ;;
    mma)      # tensor-core chunk kernel against the CUDA-core one (SparseDecoder's attention_kernel), step at 32/4 and 32/8
      for m in cuda_cores tensor_cores; do
        python3 -m tactic.bench --n 32K 128K 512K --batch 1 --heads 32/4 32/8 --dtype float16 \
          --target 0.9 --attention-kernel $m --tag $m --out "$OUT" 2>&1 | grep -E "^ +[0-9]+ +1 " || rc=1
      done ;;
    gbench)   # tactic_bench: build with CUDA, then every CUDA benchmark at the default sizes
      bash bench/cpp/build.sh --debs bench/cpp/third_party --build /tmp/tactic-gbench --cuda ON \
        --arch "$ARCH" > "$OUT/gbench-build.log" 2>&1 || { tail -40 "$OUT/gbench-build.log"; rc=1; continue; }
      exe=$(tail -1 "$OUT/gbench-build.log")
      tag=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '_')-$(date +%F)
      # Two runs, each under its own time limit, so a slow half cannot cost the other its
      # results; the console log (tee) keeps every finished row even when a limit cuts the JSON.
      for part in "kernels:BM_(Copy|KMeansIter|Reindex|SparseAttention)/cuda" \
                  "decoder:BM_(DenseAttention|ScoreRank|Select|EstimateStopUnion|DecodeStep|StepAttention|DecodeStepGraph)/cuda"; do
        name=${part%%:*}
        timeout "${GBENCH_LIMIT_S:-110}" "$exe" --benchmark_filter="${part#*:}" --benchmark_min_time=0.1 \
          --benchmark_repetitions=3 --benchmark_report_aggregates_only=true \
          --benchmark_out="$OUT/$tag-gbench-cuda-$name.json" --benchmark_out_format=json 2>&1 \
          | tee "$OUT/$tag-gbench-cuda-$name.log"
        st=${PIPESTATUS[0]}
        [ "$st" = 0 ] || { echo "gbench $name: exit $st (124: time limit)"; rc=1; }
      done ;;
    *) echo "unknown step: $s"; rc=1 ;;
  esac
  summary+=("$s: $([ "$rc" = 0 ] && echo ok || echo FAILED)$([ "$s" = pytest ] && echo " ($(tail -1 "$OUT/pytest.log"))")")
  rc=$((rc | rc_before))
done
echo "=== summary"; printf '%s\n' "${summary[@]}"
exit $rc
