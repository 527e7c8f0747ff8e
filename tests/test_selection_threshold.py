"""The threshold selection's CPU twin (selection_kernel='threshold' on a CPU decoder): the
prior rule with each head's exact head and stop taken as whole score buckets, query heads
independent, as CUDA's threshold selection (cuda/select_threshold.hpp). Judged against an
independent float64 NumPy model of that rule over the store's own clusters (layout()), against
float64 attention over exactly the tokens it reports, and against the ranked prior rule."""
import numpy as np
import pytest

import tactic
from conftest import ref_attention

KB = 2048  # score buckets (cpp/src/score_buckets.hpp)


def mixture_keys(n, hkv, d, rng, centres=64):
    """Keys around a few centres, so attention is skewed as in real heads: [n, hkv, d]."""
    c = rng.standard_normal((hkv, centres, d))
    c = 4 * c / np.linalg.norm(c, axis=2, keepdims=True)
    idx = rng.integers(0, centres, (hkv, n))
    k = np.take_along_axis(c, idx[:, :, None], 1) + 0.5 * rng.standard_normal((hkv, n, d))
    return np.ascontiguousarray(k.transpose(1, 0, 2)).astype(np.float32)


def model(q, lay, target, margin=0.35, head_fraction=0.02, spread=0.75):
    """The threshold rule in float64 for one query head q (already scaled) over one KV head's
    layout: its clusters' buckets, bh, bx, own-cluster mask and estimated mass, and each
    cluster's distance (in buckets) to the nearest bucket edge."""
    off = lay["offsets"].astype(np.int64)
    size = np.diff(off)
    ns, nclu = lay["n_sink"], lay["n_clustered"]
    keys = lay["keys"].astype(np.float64)
    score = lay["centroids"].astype(np.float64) @ q + 0.5 * spread * (q @ q) * lay["spreads"].astype(np.float64)
    mx, mn = score.max(), score.min()
    bpl = float(np.clip(2047.0 / (mx - mn), 64.0, 1e6)) if mx > mn else 64.0
    x = (mx - score) * bpl
    bucket = np.where(x < KB - 1, np.maximum(0, np.floor(x)), KB - 1).astype(np.int64)
    edge = np.abs(x - np.round(x))
    tok = np.cumsum(np.bincount(bucket, weights=size, minlength=KB))
    pri = np.cumsum(np.bincount(bucket, weights=size * np.exp(score - mx), minlength=KB))
    bh = int(np.argmax(tok >= max(1.0, head_fraction * nclu)))
    always = np.r_[np.arange(ns), np.arange(ns + nclu, len(keys))]
    exact = np.concatenate([np.arange(ns + off[j], ns + off[j + 1]) for j in np.flatnonzero(bucket <= bh)])
    la, le = keys[always] @ q, keys[exact] @ q
    m = max(la.max(initial=-np.inf), le.max())
    am, ex = np.exp(la - m).sum(), np.exp(le - m).sum()
    alpha = ex / pri[bh]
    z = am + ex + alpha * max(0.0, pri[-1] - pri[bh])
    p_eff = min(1.0, target + margin * (1 - target))
    reach = am + ex + alpha * (pri - pri[bh]) >= p_eff * z
    reach[:bh] = False
    bx = int(np.argmax(reach)) if reach.any() else KB - 1
    est = min(1.0, (am + ex + alpha * (pri[bx] - pri[bh])) / z) if reach.any() else 1.0
    return dict(bucket=bucket, bh=bh, bx=bx, own=bucket <= bx, est=est, edge=edge)


@pytest.mark.parametrize("g,d,target,seed", [(4, 64, 0.9, 1), (1, 64, 0.8, 2), (8, 32, 0.95, 3), (3, 96, 0.9, 4)])
def test_threshold_cpu_matches_a_float64_model_of_the_rule(g, d, target, seed):
    """Each head's own clusters and estimated mass equal the float64 model's, wherever no
    cluster score lies within 1e-3 of a bucket edge at bh or bx (float rounding may put it on
    either side there); the union is the heads' own sets; the output is float64 attention over
    exactly the reported union."""
    rng = np.random.default_rng(seed)
    hkv, n = 2, 5000
    k = mixture_keys(n, hkv, d, rng)
    v = rng.standard_normal((n, hkv, d)).astype(np.float32)
    dec = tactic.SparseDecoder(1, hkv * g, hkv, d, max_tokens=n, dtype="float32", target=target,
                               stop_rule="prior", selection_kernel="threshold", record_selection=True)
    assert dec.plan["selection_kernel"] == "threshold" and dec.plan["device"] == -1
    dec.prefill(0, k, v)
    scale = d ** -0.5
    checked = heads = 0
    for step in range(4):
        q = (np.repeat(k[rng.integers(n)], g, axis=0) * 2 + rng.standard_normal((hkv * g, d))).astype(np.float32)
        out = np.asarray(dec.decode(0, q[None], None, None))[0].astype(np.float64)
        st = dec.stats(0)
        for h in range(hkv):
            lay = dec.layout(0, 0, h)
            pos = lay["positions"]
            union = st["kv_mask"][0, h][:n]
            own_any = np.zeros(n, bool)
            for j in range(g):
                hq = h * g + j
                mdl = model(q[hq].astype(np.float64) * scale, lay, target)
                own_tok = st["head_mask"][0, hq][:n]
                own_any |= own_tok
                heads += 1
                near = mdl["edge"] < 1e-3
                touchy = near & np.isin(mdl["bucket"], [mdl["bh"], mdl["bh"] + 1, mdl["bx"], mdl["bx"] + 1])
                if touchy.any():
                    continue
                checked += 1
                want = np.zeros(n, bool)
                off = lay["offsets"]
                ns, nclu = lay["n_sink"], lay["n_clustered"]
                rows = [np.arange(ns), np.arange(ns + nclu, n)]
                rows += [np.arange(ns + off[c], ns + off[c + 1]) for c in np.flatnonzero(mdl["own"])]
                want[pos[np.concatenate(rows)]] = True
                np.testing.assert_array_equal(own_tok, want, err_msg=f"step {step} head {hq}")
                assert st["head_tokens"][0, hq] == want.sum()
                np.testing.assert_allclose(st["est_mass"][0, hq], mdl["est"], rtol=1e-4)
            np.testing.assert_array_equal(union, own_any)
            assert st["kv_tokens"][0, h] == union.sum() < n, "the test must exercise a real selection"
            ref, _ = ref_attention(q[h * g:(h + 1) * g].astype(np.float64), k[union][:, h:h + 1].astype(np.float64),
                                   v[union][:, h:h + 1].astype(np.float64), scale)
            np.testing.assert_allclose(out[h * g:(h + 1) * g], ref, atol=2e-5, rtol=1e-4)
    assert checked >= 0.8 * heads, (checked, heads)


def test_threshold_cpu_reaches_p_as_the_ranked_rule_does():
    """Against the ranked prior rule (heads independent, as on CUDA) on the same steps: the
    share of heads whose own tokens hold P of the true mass is no lower (within 2 of 100) and at
    least 90%, at no more than 1.5x its tokens (crossing buckets are taken whole)."""
    rng = np.random.default_rng(7)
    hkv, g, d, n, target = 4, 4, 64, 8000, 0.9
    k = mixture_keys(n, hkv, d, rng)
    v = rng.standard_normal((n, hkv, d)).astype(np.float32)
    opts = dict(max_tokens=n, dtype="float32", target=target, stop_rule="prior", share_group=False,
                record_selection=True)
    decs = {s: tactic.SparseDecoder(1, hkv * g, hkv, d, selection_kernel=s, **opts) for s in ("threshold", "ranked")}
    reach = {s: 0 for s in decs}
    tokens = {s: 0 for s in decs}
    heads = 0
    k64 = k.astype(np.float64)
    for dec in decs.values():
        dec.prefill(0, k, v)
    for step in range(6):
        q = (np.repeat(k[rng.integers(n)], g, axis=0) * 2 + rng.standard_normal((hkv * g, d))).astype(np.float32)
        for s, dec in decs.items():
            dec.decode(0, q[None], None, None)
            st = dec.stats(0)
            for hq in range(hkv * g):
                logit = k64[:, hq // g] @ q[hq].astype(np.float64) * d ** -0.5
                p = np.exp(logit - logit.max())
                mask = st["head_mask"][0, hq][:n]
                reach[s] += p[mask].sum() / p.sum() >= target
                tokens[s] += int(mask.sum())
        heads += hkv * g
    assert reach["threshold"] >= reach["ranked"] - 0.02 * heads, (reach, heads)
    assert reach["threshold"] >= 0.9 * heads, (reach, heads)
    assert tokens["threshold"] <= 1.5 * tokens["ranked"], tokens


def test_threshold_cpu_reads_everything_where_the_rule_says():
    """Fewer clusters than min_clusters, or P = 1: every token."""
    rng = np.random.default_rng(0)
    for n, target in ((60, 0.9), (3000, 1.0)):
        k = mixture_keys(n, 2, 32, rng)
        v = rng.standard_normal((n, 2, 32)).astype(np.float32)
        dec = tactic.SparseDecoder(1, 4, 2, 32, max_tokens=n, dtype="float32", target=target, stop_rule="prior",
                                   selection_kernel="threshold", cluster_size=16)
        dec.prefill(0, k, v)
        dec.decode(0, rng.standard_normal((1, 4, 32)).astype(np.float32), None, None)
        st = dec.stats(0)
        assert (st["head_tokens"] == n).all() and (st["kv_tokens"] == n).all(), (n, st["head_tokens"])


@pytest.mark.parametrize("opts,match", [(dict(stop_rule="certified"), "stop_rule='prior'"),
                                        (dict(share_group=True), "share_group=False"),
                                        (dict(group_head=True, share_group=False), "group_head"),
                                        (dict(estimator="two_segment", share_group=False), "centroid_prior")])
def test_threshold_cpu_refuses_what_the_rule_is_not(opts, match):
    cfg = dict(num_layers=1, num_q_heads=8, num_kv_heads=2, head_dim=32, max_tokens=64, stop_rule="prior")
    cfg.update(opts)
    with pytest.raises(RuntimeError, match=match):
        tactic.SparseDecoder(selection_kernel="threshold", **cfg)
    dec = tactic.SparseDecoder(**cfg)  # the ranked selection takes these
    with pytest.raises(RuntimeError, match=match):
        dec.set_kernels(selection_kernel="threshold")
    assert dec.plan["selection_kernel"] == "ranked"  # unchanged by the refused call


def test_threshold_cpu_switch_and_defaults():
    """share_group defaults to False with the threshold selection (heads are independent), the
    plan follows set_kernels, and a decoder of one query head per KV head takes group_head."""
    dec = tactic.SparseDecoder(1, 8, 2, 32, max_tokens=64, stop_rule="prior", selection_kernel="threshold")
    assert dec.plan["selection_kernel"] == "threshold"
    dec.set_kernels(selection_kernel="ranked")
    assert dec.plan["selection_kernel"] == "ranked"
    dec.set_kernels(selection_kernel="auto")
    assert dec.plan["selection_kernel"] == "ranked"
    one = tactic.SparseDecoder(1, 2, 2, 32, max_tokens=64, stop_rule="prior", group_head=True,
                               selection_kernel="threshold")
    assert one.plan["selection_kernel"] == "threshold"
    dense = tactic.SparseDecoder(1, 8, 2, 32, max_tokens=64, policy="dense", selection_kernel="threshold")
    assert dense.plan["selection_kernel"] == "ranked"  # no selection to plan
