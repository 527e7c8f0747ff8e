"""C++ microbenchmarks (bench/cpp): configure and build tactic_bench with CMake (CPU only),
run every CPU benchmark at the smallest default context for a moment, and check its JSON:
named arguments, no errors, the byte and rate counters, and each byte model recomputed here
from the arguments (the formulas written next to each benchmark). Skips when Google Benchmark
is not installed (apt-get install libbenchmark-dev; or TACTIC_BENCHMARK_DIR=<its cmake dir>,
e.g. from bench/cpp/build.sh --debs)."""
import json
import math
import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
N = 4096  # the smaller CPU context of the default size set (bench/cpp/grid.cpp)
FAMILIES = ["BM_Copy", "BM_KMeansIter", "BM_Reindex", "BM_DenseAttention", "BM_SparseAttention",
            "BM_ScoreRank", "BM_Select", "BM_EstimateStopUnion", "BM_DecodeStep"]
TIME_UNIT = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}


def _run(cmd, timeout=300):
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout)
    return r.returncode, r.stdout, r.stderr


@pytest.fixture(scope="module")
def bench_json(tmp_path_factory, cmake_cxx):
    cmake, cxx = cmake_cxx
    build = tmp_path_factory.mktemp("bench") / "build"
    cfg = [cmake, "-S", ROOT, "-B", build, "-DTACTIC_CUDA=OFF", "-DTACTIC_BUILD_BENCH=ON",
           "-DCMAKE_BUILD_TYPE=Release", f"-DCMAKE_CXX_COMPILER={cxx}"]
    if os.environ.get("TACTIC_BENCHMARK_DIR"):
        cfg.append(f"-Dbenchmark_DIR={os.environ['TACTIC_BENCHMARK_DIR']}")
    rc, out, err = _run(cfg)
    if rc != 0 and "needs Google Benchmark" in out + err:
        pytest.skip("Google Benchmark is not installed as a CMake package (apt-get install "
                    "libbenchmark-dev, or TACTIC_BENCHMARK_DIR; see bench/cpp/README.md)")
    assert rc == 0, f"configure failed\n{out[-4000:]}\n{err[-4000:]}"
    rc, out, err = _run([cmake, "--build", build, "--target", "tactic_bench", "-j2"], timeout=600)
    assert rc == 0, f"build failed\n{out[-4000:]}\n{err[-4000:]}"
    exe = build / "bench" / "cpp" / "tactic_bench"
    result = build / "bench.json"
    rc, out, err = _run([exe, f"--benchmark_filter=BM_Copy/cpu|/cpu/N:{N}/",
                         "--benchmark_min_time=0.01", f"--benchmark_out={result}",
                         "--benchmark_out_format=json"], timeout=300)
    assert rc == 0, f"tactic_bench failed\n{out[-4000:]}\n{err[-4000:]}"
    return json.loads(result.read_text())


def _args(name):
    """Named arguments of a benchmark name: BM_X/cpu/N:4096/B:1/... -> {'N': 4096, ...}."""
    return {k: int(v) for k, v in re.findall(r"/([A-Z]):(\d+)", name)}


def _rows(data, family):
    return [b for b in data["benchmarks"] if b["name"].startswith(family + "/cpu")]


@pytest.mark.slow
def test_every_cpu_kernel_ran_with_named_arguments(bench_json):
    assert bench_json["context"]["tactic_sizes"] == "default"
    assert bench_json["context"]["tactic_cuda"].startswith("off")
    for fam in FAMILIES:
        rows = _rows(bench_json, fam)
        assert rows, f"{fam} did not run"
        for b in rows:
            assert not b.get("error_occurred"), (b["name"], b.get("error_message"))
            if fam != "BM_Copy":
                a = _args(b["name"])
                assert a["N"] == N and a["D"] == 128, b["name"]
    assert "P" in _args(_rows(bench_json, "BM_DecodeStep")[0]["name"])
    assert "S" in _args(_rows(bench_json, "BM_SparseAttention")[0]["name"])


@pytest.mark.slow
def test_rate_counters_match_bytes_and_time(bench_json):
    for b in bench_json["benchmarks"]:
        assert b["bytes"] > 0 and b["GB/s"] > 0 and b["bytes_per_second"] > 0, b["name"]
        seconds = b["real_time"] * TIME_UNIT[b["time_unit"]]  # per iteration
        assert math.isclose(b["GB/s"], b["bytes"] * 1e-9 / seconds, rel_tol=1e-3), b["name"]
        assert math.isclose(b["bytes_per_second"], b["GB/s"] * 1e9, rel_tol=1e-3), b["name"]


@pytest.mark.slow
def test_byte_models(bench_json):
    es = 2  # fp16
    [copy] = _rows(bench_json, "BM_Copy")
    assert copy["bytes"] == 2 * 512 * 2**20
    for b in _rows(bench_json, "BM_KMeansIter"):
        a = _args(b["name"])
        n, h, d, c = a["N"], a["H"], a["D"], -(-a["N"] // 16)
        assert b["bytes"] == pytest.approx(h * (2 * n * d * es + 2 * c * d * 4 + 4 * n), rel=1e-6)
        assert b["GFLOP/s"] > 0
    for b in _rows(bench_json, "BM_Reindex"):
        a = _args(b["name"])
        n, h, d, c = a["N"], a["H"], a["D"], -(-a["N"] // 16)
        assert b["bytes"] == pytest.approx(h * (4 * n * d * es + 8 * n + 4 * (c + 1)), rel=1e-6)
    for b in _rows(bench_json, "BM_DenseAttention"):
        a = _args(b["name"])
        hq = a["H"] * a["G"]
        want = 2 * a["B"] * a["N"] * a["H"] * a["D"] * es + 2 * a["B"] * hq * a["D"] * es
        assert b["bytes"] == pytest.approx(want, rel=1e-6)
    for b in _rows(bench_json, "BM_SparseAttention"):
        a = _args(b["name"])
        hq, heads = a["H"] * a["G"], a["B"] * a["H"]
        # Whole 16-row blocks: S percent of the blocks, rounded.
        blocks = -(-a["N"] // 16)
        rows = heads * round(blocks * a["S"] / 100) * 16
        assert b["read"] == pytest.approx(rows / (heads * a["N"]), rel=1e-9)
        want = 2 * rows * a["D"] * es + heads * a["N"] + 2 * a["B"] * hq * a["D"] * es
        assert b["bytes"] == pytest.approx(want, rel=1e-6)
    # Decoder steps: per (sequence, KV head) the centroids and offsets of C clusters, the
    # group's q (and out), and the union's keys (and values); the union is `read` x context.
    for fam in ("BM_ScoreRank", "BM_DecodeStep"):
        for b in _rows(bench_json, fam):
            a = _args(b["name"])
            heads, g, d, n = a["B"] * a["H"], a["G"], a["D"], a["N"]
            c = -(-(n - 4) // 16)  # num_sink = 4 tokens stay out of the clustering
            index = c * d * 4 + (c + 1) * 4
            union = b["read"] * n
            if fam == "BM_ScoreRank":
                want = heads * (index + g * d * es + union * d * es)
            else:
                want = heads * (index + 2 * g * d * es + 2 * union * d * es)
            assert b["bytes"] == pytest.approx(want, rel=1e-6), b["name"]
            assert 0 < b["read"] <= 1
    [score] = _rows(bench_json, "BM_ScoreRank")
    [select] = _rows(bench_json, "BM_Select")
    # At a vanishing target the selection reads the sinks and about one cluster per query head.
    a = _args(score["name"])
    assert score["read"] * a["N"] <= 4 + a["G"] * 64, score["read"]
    assert select["read"] > score["read"]
    # Estimate/stop/union: each iteration times a score-rank step and a selection step and
    # reports their difference, so its time is the difference of the two means.
    [esu] = _rows(bench_json, "BM_EstimateStopUnion")
    assert esu["select_us"] > esu["score_rank_us"] > 0
    assert esu["real_time"] * TIME_UNIT[esu["time_unit"]] * 1e6 == pytest.approx(
        esu["select_us"] - esu["score_rank_us"], rel=1e-6, abs=1e-3)
    assert esu["read"] == pytest.approx(select["read"], rel=1e-9)
