"""Hypothesis: invariants over random shapes, dtypes, group sizes, targets and contexts."""
import numpy as np
from hypothesis import HealthCheck, given, settings, strategies as st

import tactic
from conftest import ATOL, DTYPES, RTOL, make, ref_attention, to64, torch

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
    # each selected token is counted once (selections are sets of in-range positions) and
    # a KV head reads exactly the union of its query heads' selections
    assert (sel["head_tokens"] == head.sum(1)).all()
    for h in range(hkv * g):
        assert not (head[h] & ~kv[h // g]).any()
    np.testing.assert_array_equal(head.reshape(hkv, g, n).any(1), kv)
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


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(p=shapes, dtype=st.sampled_from(DTYPES if torch is not None else ["float32", "float16"]),
       lengths=st.lists(st.integers(0, 300), min_size=1, max_size=3),
       policy=st.sampled_from(["tactic", "oracle", "quest", "dense"]))
def test_batched_sequences_of_any_length(p, dtype, lengths, policy):
    """A batch of sequences of different lengths (4-D prefill), any storage dtype: P = 1 is
    the float64 dense attention of each sequence; at the drawn P every selection lies within
    its own sequence, counts each token once, and the outputs are finite."""
    rng = np.random.default_rng(p["seed"])
    b, hkv, g, d = len(lengths), p["hkv"], p["g"], p["d"]
    n_max = max(lengths)
    k, k64 = make((b, n_max, hkv, d), dtype, rng, p["spread"])  # token-major
    v, v64 = make((b, n_max, hkv, d), dtype, rng)
    q, q64 = make((b, hkv * g, d), dtype, rng, p["spread"])
    kn, kn64 = make((b, hkv, d), dtype, rng)
    vn, vn64 = make((b, hkv, d), dtype, rng)
    common = dict(max_batch=b, max_tokens=n_max + 1, dtype=dtype, cluster_size=p["cluster_size"],
                  num_sink=p["num_sink"], budget=max(1, n_max // 3), record_selection=True)
    exact = tactic.SparseDecoder(1, hkv * g, hkv, d, target=1.0, **common)
    sparse = tactic.SparseDecoder(1, hkv * g, hkv, d, target=p["target"], policy=policy, **common)
    for dec in (exact, sparse):
        dec.prefill(0, k, v, lengths=lengths)
    out = to64(exact.decode(0, q, kn, vn))
    out_s = to64(sparse.decode(0, q, kn, vn))
    st_ = sparse.stats(0)
    assert np.isfinite(out_s).all()
    for i, n in enumerate(lengths):
        kk = np.concatenate([k64[i, :n], kn64[i][None]])
        vv = np.concatenate([v64[i, :n], vn64[i][None]])
        ref, _ = ref_attention(q64[i], kk, vv, 1 / np.sqrt(d))
        np.testing.assert_allclose(out[i], ref, rtol=RTOL[dtype], atol=ATOL[dtype])
        assert st_["context"][i] == n + 1
        kv_mask, head_mask = st_["kv_mask"][i], st_["head_mask"][i]
        assert not kv_mask[:, n + 1:].any() and not head_mask[:, n + 1:].any()
        assert (st_["kv_tokens"][i] == kv_mask.sum(1)).all()
        assert (st_["head_tokens"][i] == head_mask.sum(1)).all()
        assert (st_["kv_tokens"][i] >= 1).all() and (st_["kv_tokens"][i] <= n + 1).all()
