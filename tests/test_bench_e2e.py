"""The end-to-end decode loop (tactic.bench.e2e) on the CPU at a tiny model shape.

With P = 1 Tactic reads every token, so the model's logits must match the same loop with
torch SDPA over a plain KV cache (stock library behaviour), token for token.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
from tactic.bench import e2e  # noqa: E402

SHAPE = e2e.ModelShape(layers=2, hidden=128, hq=4, hkv=2, head_dim=64, ffn=256, vocab=512)


@pytest.fixture(scope="module")
def model():
    return e2e.RandomModel(SHAPE, "float32", "cpu", seed=1)


def test_tactic_at_p1_matches_dense_sdpa(model):
    runs = {m: e2e.run_method(m, model, 600, 2, "float32", 1.0, warmup=1, steps=2, log=lambda s: None)
            for m in ("dense", "tactic")}
    a, b = runs["tactic"]["logits"], runs["dense"]["logits"]
    assert a.shape == (2, SHAPE.vocab)
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=2e-3, rtol=2e-3)
    assert torch.equal(runs["tactic"]["tokens"], runs["dense"]["tokens"])
    assert runs["tactic"]["read_fraction"] == pytest.approx(1.0)
    assert runs["dense"]["tokens_per_s"] > 0


def test_sparse_run_reads_less_and_reports(model):
    res = e2e.run([2048], 1, "float32", 0.9, "cpu", SHAPE, ("dense", "tactic"), warmup=1, steps=1, log=lambda s: None)
    row = res["rows"][0]
    assert 0 < row["tactic_read_fraction"] < 0.6
    assert row["speedup_vs_faster_dense"] > 0
    assert res["weight_bytes"] == 4 * (2 * (128 * 8 * 64 + 256 * 128 + 3 * 128 * 256 + 2 * 128) + 2 * 512 * 128 + 128)


@pytest.mark.parametrize("method", ["none", "dense", "tactic"])
def test_static_pieces_equal_the_eager_step(model, method):
    """The step split at attention over fixed buffers (what --mode graphs captures) computes what
    RandomModel.step computes: same logits and tokens over several steps, Tactic at P = 1."""
    runs = {mode: e2e.run_method(method, model, 600, 2, "float32", 1.0, warmup=1, steps=2, log=lambda s: None,
                                 reps=1, mode=mode)
            for mode in ("eager", "static")}
    a, b = runs["static"]["logits"], runs["eager"]["logits"]
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5, rtol=1e-5)
    assert torch.equal(runs["static"]["tokens"], runs["eager"]["tokens"])
    if method == "none":  # run_method's own check of the pieces against the eager step
        assert runs["static"]["pieces_vs_eager_max_abs"] <= 1e-5
    assert runs["static"]["mode"] == "static"


def test_modes_are_checked(model):
    with pytest.raises(ValueError, match="mode"):
        e2e.run_method("none", model, 100, 1, "float32", 1.0, warmup=0, steps=1, log=lambda s: None, mode="fast")
    with pytest.raises(ValueError, match="CUDA"):
        e2e.StaticStep(model, None, 1, graphs=True)


def test_model_shaped_mix_and_its_read_fractions():
    shape = e2e.ModelShape(layers=3, hidden=128, hq=8, hkv=2, head_dim=64, ffn=256, vocab=512)
    model = e2e.RandomModel(shape, "float32", "cpu", seed=2)
    res = e2e.run([2048], 1, "float32", 0.9, "cpu", shape, ("dense", "tactic"), warmup=1, steps=1,
                  log=lambda s: None, reps=1)
    assert res["workload"] == "model" and res["peers"] == {"dense": [], "tactic": []}
    t = res["rows"][0]["methods"]["tactic"]
    # first two layers: a quarter of the 8 query heads flat; the third none
    assert t["flat_head_fraction_per_layer"] == [0.25, 0.25, 0.0]
    reads = res["rows"][0]["tactic_read_fraction_per_layer"]
    assert len(reads) == 3 and reads[2] < min(reads[:2]), reads   # flat heads read most of the context
    assert res["rows"][0]["tactic_read_fraction"] == pytest.approx(np.mean(reads))
    assert res["rows"][0]["faster_dense"] == "dense" and res["rows"][0]["methods"]["dense"]["read_fraction"] == 1.0
    sparse = e2e.run_method("tactic", model, 2048, 1, "float32", 0.9, warmup=1, steps=1, log=lambda s: None,
                            reps=1, workload="sparse")
    assert sparse["flat_head_fraction_per_layer"] == [0.0] * 3
    assert max(sparse["read_fraction_per_layer"]) < min(reads[:2])
    with pytest.raises(ValueError, match="workload"):
        e2e.WorkloadInputs(shape, 100, 1, "float32", "cpu", workload="llama")


def test_tactic_options_reach_the_decoder_and_the_report(model):
    """--stop-rule / --selection-kernel as run_method's options: the threshold selection's twin
    at P = 1 still gives dense SDPA's logits, and the result names the resolved plan."""
    opts = dict(stop_rule="prior", selection_kernel="threshold")
    thr = e2e.run_method("tactic", model, 600, 2, "float32", 1.0, warmup=1, steps=2, log=lambda s: None, reps=1,
                         options=opts)
    dense = e2e.run_method("dense", model, 600, 2, "float32", 1.0, warmup=1, steps=2, log=lambda s: None, reps=1)
    np.testing.assert_allclose(thr["logits"].numpy(), dense["logits"].numpy(), atol=2e-3, rtol=2e-3)
    assert thr["plan"]["selection_kernel"] == "threshold"
    ranked = e2e.run_method("tactic", model, 600, 2, "float32", 1.0, warmup=1, steps=2, log=lambda s: None, reps=1)
    assert ranked["plan"]["selection_kernel"] == "ranked"
    with pytest.raises(ValueError, match="selection_kernel"):
        e2e.run_method("tactic", model, 600, 2, "float32", 1.0, warmup=0, steps=1, log=lambda s: None, reps=1,
                       options=dict(selection_kernel="fastest"))
