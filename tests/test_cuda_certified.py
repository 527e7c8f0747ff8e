"""The certified stop rule on CUDA (issue 20's port): P reached with probability >= `confidence`
per query head on the seeded workload families of test_stop_rule.py (same default options on
every family), judged against float64 NumPy truths; the attention reads exactly the selection
the statistics report (top-ups included); the CPU and the GPU read about as many tokens.

Skipped, with the reason, where this build has no CUDA backend or no GPU is visible.
"""
import numpy as np
import pytest

import tactic
from conftest import capture_graph, fixture_accuracy, ref_attention, require_cuda
from test_stop_rule import FAMILIES, lower_limit, probs64, workload

torch = require_cuda()


def decoder(fam_keys, hq, device, **opts):
    n, hkv, d = fam_keys.shape
    dec = tactic.SparseDecoder(1, hq, hkv, d, max_tokens=n + 8, dtype="float16", record_selection=True,
                               device=device, share_group=False, stop_rule="certified", **opts)
    k = torch.from_numpy(fam_keys).half()
    dec.prefill(0, k.to(device), k.to(device))
    return dec


def measure(fam, target, seeds=(0, 1), device="cuda", **opts):
    """Per query head: mass over its own selection; per KV head: union ok; tokens per union."""
    heads, unions, tokens = [], [], []
    for seed in seeds:
        k, qs = workload(seed, **fam)
        hkv, hq = k.shape[1], qs.shape[1]
        g = hq // hkv
        dec = decoder(k, hq, device, target=target, **opts)
        for q in qs:
            st = dec.select(0, torch.from_numpy(q[None]).half().to(device))
            p = probs64(q.astype(np.float16).astype(np.float64), k)
            heads += [float(p[h, st["head_mask"][0, h]].sum()) for h in range(hq)]
            for kv in range(hkv):
                um = p[kv * g:(kv + 1) * g][:, st["kv_mask"][0, kv]].sum(1)
                unions.append(bool((um >= target).all()))
            tokens += list(st["kv_tokens"][0])
            # the statistics count what the masks hold
            np.testing.assert_array_equal(st["kv_tokens"][0], st["kv_mask"][0].sum(1))
            np.testing.assert_array_equal(st["head_tokens"][0], st["head_mask"][0].sum(1))
            assert ((st["est_mass"] > 0) & (st["est_mass"] <= 1)).all()
    return np.array(heads), np.array(unions), np.array(tokens)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("target", [0.9, 0.95])
def test_certified_reaches_p_at_the_confidence_on_cuda(family, target):
    heads, unions, _ = measure(FAMILIES[family], target)
    share = float((heads >= target).mean())
    assert share >= lower_limit(0.95, len(heads)), (family, target, share, np.percentile(heads, [1, 5]))
    assert unions.mean() >= lower_limit(0.95, len(unions)), (family, target, unions.mean())


@pytest.mark.parametrize("family", ["d128 G4", "d64 G4 flat rms", "d128 G1 peaked"])
def test_cuda_reads_about_what_the_cpu_reads(family):
    """Same rule, same seeded draws: the GPU's heads certify in parallel over the group's first
    reads (the CPU's one after another, over earlier heads' top-ups too), so it may read a little
    more, never much more or less."""
    fam = FAMILIES[family]
    _, _, t_gpu = measure(fam, 0.9)
    _, _, t_cpu = measure(fam, 0.9, device="cpu")
    ratio = t_gpu.sum() / t_cpu.sum()
    assert 0.9 <= ratio <= 1.15, (family, ratio)


def test_certainty_walk_over_every_cluster_on_cuda():
    """Where a cluster outside the short list L (the unread clusters of the best score buckets,
    at most 512) could come first in the walk, the walk runs over every cluster: here 1200
    equal keys at a low score make one big certainty cluster among ~940 unread clusters (P 0.5).
    GPU and CPU, one head (no group order), read about the same, and the head reaches P."""
    rng = np.random.default_rng(5)
    n, d = 24000, 64
    k = rng.normal(size=(n, 1, d))
    q = rng.normal(size=(1, 1, d))
    q *= 2.0 / np.linalg.norm(q) * d ** 0.25
    k[5000:6200, 0] = -q[0, 0] / np.linalg.norm(q) * 3.0
    toks = {}
    for device in ("cuda", "cpu"):
        dec = decoder(k, 1, device, target=0.5)
        qt = torch.from_numpy(q).half()
        st = dec.select(0, qt.to(device) if device == "cuda" else qt)
        p = probs64(q[0].astype(np.float16).astype(np.float64), k)
        assert p[0, st["head_mask"][0, 0]].sum() >= 0.5
        toks[device] = int(st["kv_tokens"][0, 0])
    assert 0.95 <= toks["cuda"] / toks["cpu"] <= 1.05, toks


def test_top_ups_run_and_only_add_on_cuda():
    """max_rounds=0 stops after the first read at P; the default rounds add clusters where the
    bound is not met, never remove any, and bring more heads to P."""
    k, qs = workload(2, d=128, g=4, sharp=(3.0, 6.0))  # peaked heads: the first read falls short here
    masks, heads = {}, {}
    for rounds in (0, 4):
        dec = decoder(k, 8, "cuda", target=0.95, max_rounds=rounds)
        masks[rounds] = np.stack([dec.select(0, torch.from_numpy(q[None]).half().cuda())["head_mask"][0]
                                  for q in qs])
        heads[rounds] = np.concatenate([
            [probs64(q.astype(np.float16).astype(np.float64), k)[h, masks[rounds][t, h]].sum() for h in range(8)]
            for t, q in enumerate(qs)])
    assert not (masks[0] & ~masks[4]).any()
    assert masks[4].sum() > masks[0].sum(), "no head was topped up: the rounds did not run"
    assert (heads[4] >= 0.95).mean() >= (heads[0] >= 0.95).mean()


def test_certified_attention_reads_the_topped_up_union():
    """decode's output equals float64 attention over exactly the tokens kv_mask reports (the
    union of the first reads and every head's top-ups)."""
    k, qs = workload(7, d=128, g=4, sharp=(0.5, 2.0), n=3000)
    n, hkv, d = k.shape
    v = np.random.default_rng(0).normal(size=k.shape).astype(np.float16).astype(np.float64)
    dec = tactic.SparseDecoder(1, 4 * hkv, hkv, d, max_tokens=n + 8, dtype="float16", record_selection=True,
                               device="cuda", share_group=False, target=0.95, stop_rule="certified")
    dec.prefill(0, torch.from_numpy(k).half().cuda(), torch.from_numpy(v).half().cuda())
    for q in qs[:3]:
        out = dec.decode(0, torch.from_numpy(q[None]).half().cuda(), None, None)
        mask = dec.stats(0)["kv_mask"][0]
        ref, _ = ref_attention(q.astype(np.float16).astype(np.float64), k.astype(np.float64), v, d ** -0.5,
                               mask=mask)
        np.testing.assert_allclose(out[0].double().cpu().numpy(), ref, atol=3e-3, rtol=3e-3)


def test_certified_selection_is_reproducible_and_graph_capturable():
    k, qs = workload(11, d=64, g=4)
    hq = 8
    runs = []
    for _ in range(2):
        dec = decoder(k, hq, "cuda")
        runs.append([dec.select(0, torch.from_numpy(q[None]).half().cuda())["head_mask"].copy() for q in qs])
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)
    # captured and replayed: the replay attends what an eager step attends
    dec = decoder(k, hq, "cuda")
    q = torch.from_numpy(qs[0][None]).half().cuda()
    out = torch.empty_like(q)
    graph = capture_graph(lambda: dec.decode(0, q, None, None, out=out))  # the warm-up uploads the slot list
    eager = out.clone()
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, eager, atol=0, rtol=0)


def test_too_many_tail_samples_are_refused_on_cuda():
    with pytest.raises(RuntimeError, match="tail_samples"):
        tactic.SparseDecoder(1, 4, 1, 64, max_tokens=64, device="cuda", dtype="float16", stop_rule="certified",
                             tail_samples=512)


def test_real_fixture_certified_on_cuda(fixture_data):
    """The SmolLM2 capture (30 layers, real text): the certified rule on CUDA brings KV-head
    unions to P at the confidence and reads about what the CPU's certified rule reads."""
    figures = fixture_accuracy(fixture_data, "certified")
    print("certified on the fixture (read fraction, unions reaching P, unions):", figures)
    (rc, uc, _), (rg, ug, nu) = figures["cpu"], figures["cuda"]
    assert ug >= lower_limit(0.95, nu), figures
    assert abs(rg - rc) <= 0.1 * rc, figures
