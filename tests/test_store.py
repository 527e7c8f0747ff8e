"""The KV store's layout: re-indexing keeps every row exactly once; decode appends to the
recent segment; re-clustering folds it in; P = 1 stays exact across re-clusterings."""
import numpy as np
import pytest

import tactic
from conftest import make, ref_attention, to64


def _check_layout(dec, layer, seq, head, k64, v64, n, dtype):
    lay = dec.layout(layer, seq, head)
    pos = lay["positions"]
    assert sorted(pos.tolist()) == list(range(n)), "every token exactly once"
    # each stored row is the token's own (k, v), rounded to the storage dtype
    np.testing.assert_array_equal(lay["keys"], k64[pos, head].astype(np.float32))
    np.testing.assert_array_equal(lay["values"], v64[pos, head].astype(np.float32))
    ns, nc = lay["n_sink"], lay["n_clustered"]
    assert (pos[:ns] == np.arange(ns)).all(), "sinks are the first tokens, in order"
    if nc:
        off = lay["offsets"]
        assert off[0] == 0 and off[-1] == nc and (np.diff(off) >= 0).all()
        # each cluster is one contiguous block; its centroid is the mean of its keys, rounded
        # to the storage dtype (what the ranking reads on both backends)
        keys = lay["keys"][ns : ns + nc].astype(np.float64)
        rtol = {"float32": 1e-4, "float16": 1e-3, "bfloat16": 8e-3}[dtype]
        for c in range(len(off) - 1):
            if off[c + 1] > off[c]:
                np.testing.assert_allclose(lay["centroids"][c], keys[off[c] : off[c + 1]].mean(0),
                                           rtol=rtol, atol=10 * rtol * 1e-1)
        # each cluster's spread: mean squared distance of its stored keys to its stored
        # centroid, per dimension (float64 here)
        cent = lay["centroids"].astype(np.float64)
        d = keys.shape[1]
        want = np.array([((keys[off[c] : off[c + 1]] - cent[c]) ** 2).sum() / max(off[c + 1] - off[c], 1) / d
                         for c in range(len(off) - 1)])
        np.testing.assert_allclose(lay["spreads"], want, rtol=1e-5, atol=1e-7)
    return lay


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("n", [1, 15, 17, 1000])
def test_reindex_keeps_every_row_once(dtype, n):
    rng = np.random.default_rng(n)
    hkv, d = 2, 64
    k, k64 = make((n, hkv, d), dtype, rng)
    v, v64 = make((n, hkv, d), dtype, rng)
    dec = tactic.SparseDecoder(1, 4, hkv, d, max_tokens=n + 8, dtype=dtype)
    dec.prefill(0, k, v)
    for h in range(hkv):
        lay = _check_layout(dec, 0, 0, h, k64, v64, n, dtype)
        assert lay["n_sink"] == min(4, n) and lay["n_recent"] == 0
        if n > 4:
            assert len(lay["offsets"]) - 1 == -(-(n - 4) // 16)


def test_recent_segment_and_reclustering():
    rng = np.random.default_rng(9)
    n0, steps, hkv, hq, d, interval = 200, 23, 2, 6, 64, 8
    k, k64 = make((n0 + steps, hkv, d), "float32", rng)
    v, v64 = make((n0 + steps, hkv, d), "float32", rng)
    q, q64 = make((steps, hq, d), "float32", rng)
    dec = tactic.SparseDecoder(1, hq, hkv, d, max_tokens=n0 + steps, dtype="float32", target=1.0,
                               recluster_interval=interval)
    dec.prefill(0, k[:n0], v[:n0])
    for s in range(steps):
        pos = n0 + s
        out = dec.decode(0, q[s : s + 1], k[pos : pos + 1], v[pos : pos + 1])
        ref, _ = ref_attention(q64[s], k64[: pos + 1], v64[: pos + 1], 1 / np.sqrt(d))
        np.testing.assert_allclose(out[0], ref, rtol=1e-4, atol=2e-5)
        lay = _check_layout(dec, 0, 0, 0, k64, v64, pos + 1, "float32")
        # the recent segment holds the tokens decoded since the last re-clustering, in order
        nr = lay["n_recent"]
        assert 1 <= nr <= interval
        assert (lay["positions"][-nr:] == np.arange(pos + 1 - nr, pos + 1)).all()
    assert dec.layout(0)["n_clustered"] > n0 - 4, "recent tokens were folded into the clusters"


def test_long_decode_across_reclusterings_matches_dense_at_p1():
    rng = np.random.default_rng(10)
    n0, steps, hkv, hq, d = 64, 300, 1, 3, 64
    k, k64 = make((n0 + steps, hkv, d), "float16", rng)
    v, v64 = make((n0 + steps, hkv, d), "float16", rng)
    q, q64 = make((steps, hq, d), "float16", rng)
    dec = tactic.SparseDecoder(1, hq, hkv, d, max_tokens=n0 + steps, target=1.0, recluster_interval=50)
    dec.prefill(0, k[:n0], v[:n0])
    for s in range(steps):
        pos = n0 + s
        out = dec.decode(0, q[s : s + 1], k[pos : pos + 1], v[pos : pos + 1])
    ref, _ = ref_attention(q64[-1], k64, v64, 1 / np.sqrt(d))
    np.testing.assert_allclose(to64(out[0]), ref, rtol=2e-3, atol=2e-3)
    assert dec.layout(0)["n_recent"] <= 50


def test_reset_forgets_a_sequence_only():
    rng = np.random.default_rng(11)
    k, _ = make((100, 1, 64), "float16", rng)
    dec = tactic.SparseDecoder(2, 2, 1, 64, max_batch=2, max_tokens=128)
    for layer in range(2):
        dec.prefill(layer, k, k, seq=0)
        dec.prefill(layer, k[:50], k[:50], seq=1)
    dec.reset(0)
    assert dec.length(0, 0) == 0 and dec.length(1, 0) == 0 and dec.length(1, 1) == 50
    dec.reset()
    assert dec.length(1, 1) == 0
    q, _ = make((1, 2, 64), "float16", rng)
    out = dec.decode(0, q, k[:1], k[:1])  # a sequence may start from an empty context
    np.testing.assert_allclose(to64(out[0]), np.repeat(to64(k[0]), 2, axis=0), atol=1e-3)


def test_store_owns_its_data():
    """The caller may free or overwrite its arrays after prefill."""
    rng = np.random.default_rng(12)
    k, k64 = make((300, 1, 64), "float32", rng)
    dec = tactic.SparseDecoder(1, 1, 1, 64, max_tokens=301, dtype="float32", target=1.0)
    dec.prefill(0, k, k)
    k[:] = 0.0
    del k
    q, q64 = make((1, 1, 64), "float32", rng)
    kn = np.zeros((1, 1, 64), np.float32)
    out = dec.decode(0, q, kn, kn)
    ref, _ = ref_attention(q64[0], np.concatenate([k64, np.zeros((1, 1, 64))]),
                           np.concatenate([k64, np.zeros((1, 1, 64))]), 1 / 8)
    np.testing.assert_allclose(out[0], ref, rtol=1e-4, atol=2e-5)
