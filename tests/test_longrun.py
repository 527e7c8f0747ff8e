"""Thousands of decode steps across several re-clusterings: at P = 1 the output still matches a
float64 dense reference at every step, and the store's layout stays a permutation of the
tokens decoded so far; a sparse decoder fed the same stream stays finite and in bounds."""
import numpy as np
import pytest

import tactic
from conftest import ref_attention

HQ, HKV, D = 4, 2, 16
PROMPT, STEPS, INTERVAL = 200, 3000, 500  # re-clusters after 500, 1000, ... decoded tokens


@pytest.mark.slow
def test_three_thousand_steps_match_dense():
    rng = np.random.default_rng(42)
    k = rng.standard_normal((PROMPT + STEPS, HKV, D)).astype(np.float32)
    v = rng.standard_normal((PROMPT + STEPS, HKV, D)).astype(np.float32)
    q = rng.standard_normal((STEPS, 1, HQ, D)).astype(np.float32)
    common = dict(max_tokens=PROMPT + STEPS, dtype="float32", cluster_size=16, num_sink=4,
                  recluster_interval=INTERVAL, num_threads=1)
    exact = tactic.SparseDecoder(1, HQ, HKV, D, target=1.0, **common)
    sparse = tactic.SparseDecoder(1, HQ, HKV, D, target=0.9, **common)
    for dec in (exact, sparse):
        dec.prefill(0, k[:PROMPT], v[:PROMPT])
    k64, v64 = k.astype(np.float64), v.astype(np.float64)
    scale = 1 / np.sqrt(D)
    worst = 0.0
    clustered_sizes = set()
    for s in range(STEPS):
        n = PROMPT + s + 1
        out = exact.decode(0, q[s], k[n - 1:n], v[n - 1:n])
        ref, _ = ref_attention(q[s, 0].astype(np.float64), k64[:n], v64[:n], scale)
        err = np.abs(out[0] - ref).max()
        worst = max(worst, err)
        assert err < 2e-5, (s, err)
        out_s = sparse.decode(0, q[s], k[n - 1:n], v[n - 1:n])
        assert np.isfinite(out_s).all(), s
        st = sparse.stats(0)
        assert st["context"][0] == n and (st["kv_tokens"] >= 1).all() and (st["kv_tokens"] <= n).all()
        if s % 250 == 249:
            lay = exact.layout(0, 0, s % HKV)
            clustered_sizes.add(lay["n_clustered"])
            assert lay["n_recent"] <= INTERVAL
            # every token is held exactly once, with its own key (rows may be permuted)
            np.testing.assert_array_equal(np.sort(lay["positions"]), np.arange(n))
            np.testing.assert_array_equal(lay["keys"], k[lay["positions"], s % HKV])
    assert exact.length(0, 0) == PROMPT + STEPS
    # the clustered region grew at each re-clustering: 6 distinct sizes were seen
    assert len(clustered_sizes) >= 6, sorted(clustered_sizes)
    print(f"3000 steps: worst |out - float64 dense| = {worst:.2e}")
