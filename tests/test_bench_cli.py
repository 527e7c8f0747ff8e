"""The benchmark CLI and its parts on the CPU, at tiny sizes (seconds).

The peers are checked against an independent float64 NumPy attention over the same tokens;
the byte model against hand arithmetic; the CLI's JSON against the schema the lead reads.
"""
import json
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from conftest import bench_inputs as _inputs, ref_attention  # noqa: E402
from tactic.bench import peers, sweep, timing, traffic  # noqa: E402
from tactic.bench.__main__ import main  # noqa: E402




@pytest.mark.parametrize("builder", [peers.gather_sdpa, peers.gather_sdpa_padded])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float16, 2e-3)])
def test_gather_peer_matches_float64_attention_over_the_same_tokens(builder, dtype, tol):
    b, hkv, g, n, d = 2, 2, 3, 257, 64
    k, v, q = _inputs(b, hkv, g, n, d, dtype, 1)
    rng = np.random.default_rng(2)
    mask = rng.random((b, hkv, n)) < 0.2
    mask[0, 1] = False
    mask[0, 1, 17] = True          # a KV head with a single token
    mask[1, 0] = True              # and one with all of them
    sel = peers.selection_from_mask(mask, "cpu")
    assert sel.counts.tolist() == mask.sum(axis=2).tolist()
    m = builder([k], [v], [q], [sel])
    m.calls[0]()
    out = m.outputs[0].double().numpy()
    for i in range(b):
        ref, _ = ref_attention(q[i].double().numpy(), k[i].double().numpy().transpose(1, 0, 2),
                               v[i].double().numpy().transpose(1, 0, 2), d ** -0.5, mask=mask[i])
        np.testing.assert_allclose(out[i], ref, atol=tol, rtol=tol)


def test_sdpa_peers_say_why_they_cannot_run_on_cpu():
    k, v, q = _inputs(1, 2, 2, 16, 64, torch.float16, 0)
    for backend in peers.SDPA_BACKENDS:
        with pytest.raises(peers.Unavailable, match="CUDA"):
            peers.sdpa(backend, "folded", [k], [v], [q])


def test_step_floor_byte_model():
    # 2 KV heads read 100 and 50 tokens of a 1004-token context (4 sinks, 1000 clustered):
    # K+V 150 * 2 * 64 * 2 = 38400; centroids ceil(1000/16) = 63 per KV head, fp32:
    # 63 * 2 * 64 * 4 = 32256; exact head keys 4 heads * 2% * 1000 * 64 * 2 = 10240; q+out 1024.
    f = traffic.step_floor(np.array([[100, 50]]), np.array([1004]), num_q_heads=4, head_dim=64,
                           elem_bytes=2, copy_gbps=1000.0)
    assert f["parts"] == {"selected_kv": 38400, "centroids": 32256, "exact_head_keys": 10240, "q_out": 1024}
    assert f["bytes"] == 81920
    assert f["us"] == pytest.approx(81920 / 1e6 + 5.0)
    assert traffic.dense_bytes(2, 8, 1000, 128, 2) == 2 * 8 * 1000 * 2 * 128 * 2


def test_timing_percentiles_and_rotation():
    calls_made = []
    calls = [lambda i=i: (calls_made.append(i), time.sleep(0.002)) for i in range(3)]
    t = timing.time_calls(calls, "cpu", timing.RunPolicy(warmup=2, min_runs=6, max_runs=6, budget_s=0.01))
    assert t.runs == 6 and t.mode == "eager"
    assert 2000 <= t.p10_us <= t.median_us <= t.p90_us < 200000
    assert calls_made[-6:] == [0, 1, 2, 0, 1, 2]  # timed runs rotate through the slots
    with pytest.raises(RuntimeError):
        timing.capture_graphs(calls, "cpu")


def test_speedups_pick_the_faster_sdpa_per_mode():
    methods = {"sdpa_cudnn_gqa": {"median_us": 30.0}, "sdpa_flash_folded": {"median_us": 20.0},
               "sdpa_flash_folded_graph": {"median_us": 10.0}, "sdpa_cudnn_folded": {"unavailable": "x"},
               "tactic_step": {"median_us": 5.0}, "tactic_step_graph": {"median_us": 4.0},
               "tactic_attention": {"unavailable": "y"}}
    best, sp = sweep.speedups(methods)
    assert best["eager"]["name"] == "sdpa_flash_folded" and best["graph"]["name"] == "sdpa_flash_folded_graph"
    assert sp == {"tactic_step": 4.0, "tactic_step_graph": 2.5}


def test_rotation_and_plan_cover_the_l2():
    c = sweep.Case(8192, 1, 32, 8, 128, "float16", "synthetic")
    layers = sweep.rotation_layers(c, 4 * sweep.L2_BYTES, 64)
    assert layers * sweep.tactic_read_estimate(c) >= 4 * sweep.L2_BYTES
    big = sweep.Case(524288, 1, 32, 8, 128, "float16", "synthetic")
    assert sweep.rotation_layers(big, 4 * sweep.L2_BYTES, 64) == 1
    assert sweep.memory_estimate(big, 1) > 3 * big.kv_bytes
    order = sweep.cases(sweep.Options())
    assert (order[0].dtype, order[0].hq, order[0].hkv, order[0].batch) == ("float16", 32, 8, 1)


def _layer_mix(slots, batch, seed, n_layers):
    # the layer of every (slot, sequence) pair, written out here from the two rules (run_case
    # makes slot l with seed + 1000 l; tiled_fixture gives sequence b layer (that + b) mod n);
    # test_fixture_layer_matches_the_workload_generator checks the rules against the workloads
    counts = [0] * n_layers
    for l in range(slots):
        for b in range(batch):
            counts[(seed + 1000 * l + b) % n_layers] += 1
    return counts


@pytest.mark.parametrize("layers,batch,seed", [(1, 1, 0), (4, 1, 0), (4, 1, 5), (2, 2, 0), (59, 1, 0),
                                                (15, 1, 0), (1, 8, 0), (1, 3, 0), (7, 4, 2)])
def test_fixture_slots_weigh_every_captured_layer_the_same(layers, batch, seed):
    got = sweep.balanced_fixture_slots(layers, batch, 3, seed, lambda L: True, 64)
    mix = _layer_mix(got, batch, seed, 3)
    assert min(mix) == max(mix), (got, mix)
    assert abs(got - layers) <= 2  # the nearest balanced count, not an arbitrary one
    if batch % 3 == 0 or layers % 3 == 0:
        assert got == layers


def test_fixture_slots_round_down_when_more_do_not_fit():
    # 4 slots do not balance 3 layers with B = 1; 6 would, but only 4 fit: 3 (balanced) is taken
    got = sweep.balanced_fixture_slots(4, 1, 3, 0, lambda L: L <= 4, 64)
    assert got == 3 and min(_layer_mix(3, 1, 0, 3)) == max(_layer_mix(3, 1, 0, 3))
    # nothing balanced fits below either: keep what rotation asked for
    assert sweep.balanced_fixture_slots(1, 1, 3, 0, lambda L: L <= 1, 64) == 1


def test_sweep_balances_fixture_slots_only_where_the_case_still_runs():
    opt = sweep.Options(device="cpu", workload="fixture", ns=[524288], batches=[8], dtypes=["float16"])
    c = sweep.cases(opt)[0]
    sw = sweep.Sweep(opt, 1.0)
    free = 1 << 40
    base = sweep.rotation_layers(c, opt.rotate_bytes, opt.max_layers)
    assert base == 1
    # 3 slots balance B = 8, but their k-means would overrun max_prefill_s: keep the 1 slot
    sw.kmeans_flops = 2 * sweep.prefill_estimate_s(c, 1, 1.0) / opt.max_prefill_s  # 1 slot: half the limit
    assert sw._skip_reason(c, 3, free, 0.0) is not None and sw._skip_reason(c, 1, free, 0.0) is None
    assert sw.slots(c, free) == 1
    sw.kmeans_flops = 1e15  # fast enough: the balanced count
    got = sw.slots(c, free)
    assert got == 3 and len(set(sweep.fixture_layer_mix(got, 8, opt.seed, 3))) == 1


def test_fixture_layer_matches_the_workload_generator():
    from tactic.bench import workloads
    from tactic.fixtures import load_fixture
    fx = load_fixture()
    caps = sorted(fx.layers)
    for slot, seed in ((0, 0), (1, 0), (2, 7)):
        wl = workloads.make("fixture", 3100, 2, 9, 3, 64, "float32", "cpu", seed + 1000 * slot)
        for b in range(2):
            want = fx.layers[caps[sweep.fixture_layer(seed, slot, b, len(caps))]]
            q = want.queries[b % want.queries.shape[0]]
            np.testing.assert_array_equal(wl.queries[b].numpy(), q.astype(np.float32))


def test_cli_on_cpu_writes_the_json(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TACTIC_GIT_COMMIT", "abc1234")
    rc = main(["--device", "cpu", "--n", "1K", "--batch", "2", "--heads", "4/2", "--head-dim", "64",
               "--target", "0.8", "0.95", "--series-s", "0.01", "--min-runs", "3", "--max-runs", "4",
               "--out", str(tmp_path), "--tag", "test", "--pdl", "off", "--attention-kernel", "cuda_cores"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "floor" in printed and "sel" in printed and "n/a" in printed
    files = sorted(p.name for p in tmp_path.iterdir())
    # the default sweep runs workload (b) and its sparse layer
    assert len(files) == 2 and files[0].startswith("cpu-bench-synthetic-sparse-test-") and files[1].endswith(".png")
    d = json.loads((tmp_path / files[0]).read_text())
    for key in ("device", "date", "git_commit", "torch", "tactic", "copy_bandwidth", "rows", "skipped", "options"):
        assert key in d, key
    assert d["copy_bandwidth"]["median_gbps"] > 0
    assert d["git_commit"] == "abc1234" and d["build"]["version"] == d["tactic"]
    assert d["options"]["kernels"] == {"head_split": None, "attention_kernel": "cuda_cores", "pdl": False,
                                      "selection_kernel": "auto"}
    assert all(r["plan"]["device"] == -1 for r in d["rows"])  # the CPU plans nothing
    assert d["workloads"] == ["synthetic", "sparse"]
    assert [(r["workload"], r["P"]) for r in d["rows"]] == [("synthetic", 0.8), ("synthetic", 0.95),
                                                            ("sparse", 0.8), ("sparse", 0.95)]
    # which peers ran and why the others did not, per row and over the run
    for name in ("flashinfer_dense", "flashinfer_selection"):
        why = d["peers"][name]["skipped"][0]
        assert "flashinfer not installed: pip install flashinfer-python" in why or "CUDA only" in why, why
    for name in ("flashinfer_dense", "flashinfer_selection", "sdpa_flash_folded"):
        assert d["peers"][name]["ran_rows"] == 0 and d["peers"][name]["skipped"], name
    assert d["peers"]["tactic_step"]["ran_rows"] == 4 and d["peers"]["tactic_step"]["skipped"] == []
    for r in d["rows"]:
        assert set(r["peers"]["skipped"]) >= {"flashinfer_dense", "flashinfer_selection", "sdpa_cudnn_gqa"}
        assert "tactic_step" in r["peers"]["ran"] and "gather_sdpa" in r["peers"]["ran"]
        assert r["check_failures"] == []
        # every figure states the fraction of the context it read
        for name, m in r["methods"].items():
            if "median_us" in m:
                want = 1.0 if name == "dense" else r["selected_fraction"]
                assert m["read_fraction"] == pytest.approx(want), name
        assert (r["N"], r["B"], r["Hq"], r["Hkv"], r["D"], r["dtype"]) == (1024, 2, 4, 2, 64, "float16")
        assert 0 < r["selected_fraction"] <= 1
        m = r["methods"]
        for name in ("tactic_step", "dense", "gather_sdpa"):
            assert m[name]["median_us"] > 0 and m[name]["p10_us"] <= m[name]["median_us"] <= m[name]["p90_us"]
            assert m[name]["gbps"] > 0
        assert "unavailable" in m["sdpa_flash_folded"] and "unavailable" in m["sdpa_cudnn_gqa"]
        assert "median_us" in m["tactic_attention"] or "unavailable" in m["tactic_attention"]
        assert r["floor"]["bytes"] > 0 and r["floor"]["ratio_eager"] > 0
        # the gather peer attends over the step's own selection: same output up to fp16 rounding
        assert r["checks"]["step_vs_gather_sdpa_max_abs"] < 2e-2
    assert d["rows"][0]["selected_fraction"] <= d["rows"][1]["selected_fraction"]
    assert not any(r["group_head"] for r in d["rows"])


def test_cli_group_head_reaches_the_decoder(tmp_path, capsys):
    """--group-head builds Tactic with group_head=True (the rows say so) and its output still
    matches the gather peer over the same tokens."""
    rc = main(["--device", "cpu", "--n", "1K", "--batch", "1", "--heads", "8/2", "--head-dim", "64",
               "--target", "0.9", "--workload", "sparse", "--series-s", "0.01", "--min-runs", "3",
               "--max-runs", "4", "--stop-rule", "prior", "--group-head", "--no-plot", "--out", str(tmp_path)])
    assert rc == 0
    d = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert [r["group_head"] for r in d["rows"]] == [True]
    assert d["rows"][0]["checks"]["step_vs_gather_sdpa_max_abs"] < 2e-2
