"""Options changed after construction (target) and CUDA-only calls refused clearly on the CPU."""
import numpy as np
import pytest

import tactic
from conftest import ref_attention


def _decoder(target):
    rng = np.random.default_rng(3)
    hkv, g, d, n = 2, 3, 64, 3000
    centres = rng.standard_normal((40, d)) * 0.6
    k = (centres[rng.integers(0, 40, (n, hkv))] + 0.5 * rng.standard_normal((n, hkv, d))).astype(np.float32)
    v = rng.standard_normal((n, hkv, d)).astype(np.float32)
    dec = tactic.SparseDecoder(1, hkv * g, hkv, d, max_tokens=n, dtype="float32", target=target)
    dec.prefill(0, k, v)
    q = (np.repeat(k[-1], g, axis=0)[None] * 0.8).astype(np.float32)
    return dec, q, k, v


def test_target_setter_takes_effect_and_validates():
    dec, q, k, v = _decoder(0.5)
    low = dec.select(0, q)["head_tokens"].sum()
    dec.target = 0.95
    assert dec.target == 0.95
    high = dec.select(0, q)["head_tokens"].sum()
    assert high > low, (low, high)
    dec.target = 1.0
    out = dec.decode(0, q, None, None)
    ref, _ = ref_attention(q[0].astype(np.float64), k.astype(np.float64), v.astype(np.float64), 64 ** -0.5)
    np.testing.assert_allclose(out[0], ref, atol=2e-5, rtol=2e-5)
    for bad, err in ((0.0, ValueError), (1.01, ValueError), (float("nan"), ValueError), ("0.9", TypeError)):
        with pytest.raises(err, match="target"):
            dec.target = bad
        assert dec.target == 1.0


def test_reuse_selection_is_cuda_only():
    dec, q, _, _ = _decoder(0.9)
    dec.decode(0, q, None, None)
    with pytest.raises(RuntimeError, match="CUDA decoders only"):
        dec.decode(0, q, None, None, reuse_selection=True)
    with pytest.raises(ValueError, match="k_new=v_new=None"):
        dec.decode(0, q, q[:, :2], q[:, :2], reuse_selection=True)


def test_selection_kernel_option_is_checked_everywhere():
    """selection_kernel: a str among 'auto', 'ranked', 'threshold' (ValueError / TypeError
    naming it, at construction and in set_kernels, the plan unchanged on failure). On the CPU
    only the selection is planned: 'auto' and 'ranked' select as before, 'threshold' runs the
    threshold selection's twin (tests/test_selection_threshold.py) and, like CUDA's, needs the
    prior rule (RuntimeError naming it for the certified default)."""
    dec, q, _, _ = _decoder(0.9)
    before = dec.select(0, q)["head_tokens"]
    for name in ("auto", "ranked"):
        d2 = tactic.SparseDecoder(1, 6, 2, 64, max_tokens=16, selection_kernel=name)
        assert d2.plan["selection_kernel"] == "ranked" and d2.plan["device"] == -1
        dec.set_kernels(selection_kernel=name)
        np.testing.assert_array_equal(dec.select(0, q)["head_tokens"], before)
    with pytest.raises(RuntimeError, match="stop_rule='prior'"):
        tactic.SparseDecoder(1, 6, 2, 64, max_tokens=16, stop_rule="certified", selection_kernel="threshold")
    d3 = tactic.SparseDecoder(1, 6, 2, 64, max_tokens=16, stop_rule="prior", selection_kernel="threshold")
    assert d3.plan["selection_kernel"] == "threshold" and d3.plan["device"] == -1
    with pytest.raises(ValueError, match="`selection_kernel` must be 'auto', 'ranked' or 'threshold', got 'sorted'"):
        tactic.SparseDecoder(1, 6, 2, 64, max_tokens=16, selection_kernel="sorted")
    with pytest.raises(TypeError, match="`selection_kernel` must be a str"):
        tactic.SparseDecoder(1, 6, 2, 64, max_tokens=16, selection_kernel=2)
    with pytest.raises(ValueError, match="selection_kernel"):
        dec.set_kernels(selection_kernel="sorted")
    assert dec.plan["selection_kernel"] == "ranked"
