"""Hypothesis: invariants over random shapes, dtypes, group sizes, targets and contexts."""
import numpy as np
from hypothesis import HealthCheck, given, settings, strategies as st

import tactic
from conftest import ATOL, RTOL, ref_attention, to64

shapes = st.fixed_dictionaries({
    "n": st.integers(1, 600),
    "hkv": st.integers(1, 3),
    "g": st.integers(1, 8),
    "d": st.sampled_from([16, 64, 80, 96, 128]),
    "dtype": st.sampled_from(["float32", "float16"]),
    "target": st.floats(0.05, 1.0),
    "cluster_size": st.integers(1, 40),
    "num_sink": st.integers(0, 8),
    "seed": st.integers(0, 2**31),
    "spread": st.floats(0.1, 4.0),
})


def _arrays(p):
    rng = np.random.default_rng(p["seed"])
    n, hkv, hq, d = p["n"], p["hkv"], p["hkv"] * p["g"], p["d"]
    k = (rng.standard_normal((n, hkv, d)) * p["spread"]).astype(p["dtype"])
    v = rng.standard_normal((n, hkv, d)).astype(p["dtype"])
    q = (rng.standard_normal((hq, d)) * p["spread"]).astype(p["dtype"])
    return q, k, v


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(p=shapes, policy=st.sampled_from(["tactic", "oracle", "quest", "topk"]))
def test_selection_invariants(p, policy):
    q, k, v = _arrays(p)
    n, hkv, g = p["n"], p["hkv"], p["g"]
    sel = tactic.ops.select(q, k, v, target=p["target"], policy=policy, budget=max(1, n // 3),
                            cluster_size=p["cluster_size"], num_sink=p["num_sink"])
    kv, head = sel["kv_mask"], sel["head_mask"]
    assert kv.shape == (hkv, n) and head.shape == (hkv * g, n)
    assert (sel["kv_tokens"] == kv.sum(1)).all() and (sel["kv_tokens"] >= 1).all()
    for h in range(hkv * g):
        assert not (head[h] & ~kv[h // g]).any()
    _, probs = ref_attention(to64(q), to64(k), to64(v), 1 / np.sqrt(p["d"]))
    if policy == "oracle":
        own = (probs * head).sum(1)
        assert (own >= p["target"] - 1e-5).all(), own
    if policy == "tactic":
        est = sel["est_mass"]
        assert np.isfinite(est).all() and (est > 0).all() and (est <= 1 + 1e-9).all()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(p=shapes, steps=st.integers(1, 4), interval=st.integers(1, 5))
def test_target_one_is_dense_and_outputs_finite(p, steps, interval):
    q, k, v = _arrays(p)
    n, hkv, g, d = p["n"], p["hkv"], p["g"], p["d"]
    rng = np.random.default_rng(p["seed"] + 1)
    kn = rng.standard_normal((steps, 1, hkv, d)).astype(p["dtype"])
    vn = rng.standard_normal((steps, 1, hkv, d)).astype(p["dtype"])
    exact = tactic.SparseDecoder(1, hkv * g, hkv, d, max_tokens=n + steps, dtype=p["dtype"], target=1.0,
                                 cluster_size=p["cluster_size"], num_sink=p["num_sink"],
                                 recluster_interval=interval)
    sparse = tactic.SparseDecoder(1, hkv * g, hkv, d, max_tokens=n + steps, dtype=p["dtype"],
                                  target=p["target"], cluster_size=p["cluster_size"],
                                  num_sink=p["num_sink"], recluster_interval=interval)
    for dec in (exact, sparse):
        dec.prefill(0, k, v)
    kk, vv = to64(k), to64(v)
    for s in range(steps):
        kk = np.concatenate([kk, to64(kn[s])])
        vv = np.concatenate([vv, to64(vn[s])])
        out = exact.decode(0, q[None], kn[s], vn[s])
        ref, _ = ref_attention(to64(q), kk, vv, 1 / np.sqrt(d))
        np.testing.assert_allclose(to64(out[0]), ref, rtol=RTOL[p["dtype"]], atol=ATOL[p["dtype"]])
        out_s = sparse.decode(0, q[None], kn[s], vn[s])
        assert np.isfinite(to64(out_s)).all()
        st_ = sparse.stats(0)
        assert (st_["kv_tokens"] <= n + s + 1).all() and (st_["kv_tokens"] >= 1).all()
