"""Bad input raises a clear exception naming the argument, and leaves the decoder as it was."""
import numpy as np
import pytest

import tactic

L, HQ, HKV, D, CAP, N = 2, 4, 2, 64, 40, 30
rng = np.random.default_rng(0)
K = rng.standard_normal((N, HKV, D)).astype(np.float16)
V = rng.standard_normal((N, HKV, D)).astype(np.float16)
Q = rng.standard_normal((1, HQ, D)).astype(np.float16)
KN = rng.standard_normal((1, HKV, D)).astype(np.float16)


def fresh(**kw):
    dec = tactic.SparseDecoder(L, HQ, HKV, D, max_batch=2, max_tokens=CAP, cluster_size=4, **kw)
    for layer in range(L):
        dec.prefill(layer, K, V)
    return dec


def nan(a):
    a = a.copy()
    a.flat[3] = np.nan
    return a


def strided_last(a):
    wide = np.repeat(a, 2, axis=-1)
    return wide[..., ::2]


BAD_CALLS = [
    # (id, call, exception, words the message must contain)
    ("layer-high", lambda d: d.decode(L, Q, KN, KN), ValueError, "`layer`"),
    ("layer-negative", lambda d: d.decode(-1, Q, KN, KN), ValueError, "`layer`"),
    ("layer-float", lambda d: d.decode(0.0, Q, KN, KN), TypeError, "`layer`"),
    ("q-rank", lambda d: d.decode(0, Q[0], KN, KN), ValueError, "`q`"),
    ("q-heads", lambda d: d.decode(0, Q[:, :3], KN, KN), ValueError, "`q`"),
    ("q-dim", lambda d: d.decode(0, Q[..., :32], KN, KN), ValueError, "`q`"),
    ("q-int", lambda d: d.decode(0, Q.astype(np.int32), KN, KN), TypeError, "`q`"),
    ("q-float64", lambda d: d.decode(0, Q.astype(np.float64), KN, KN), TypeError, "`q`"),
    ("q-list", lambda d: d.decode(0, Q.tolist(), KN, KN), TypeError, "`q`"),
    ("q-none", lambda d: d.decode(0, None, KN, KN), TypeError, "`q`"),
    ("q-nan", lambda d: d.decode(0, nan(Q), KN, KN), ValueError, "NaN"),
    ("q-inf", lambda d: d.decode(0, Q * np.float16(np.inf), KN, KN), ValueError, "NaN or Inf"),
    ("q-stride", lambda d: d.decode(0, strided_last(Q), KN, KN), ValueError, "unit stride"),
    ("k-shape", lambda d: d.decode(0, Q, KN[:, :1], KN), ValueError, "`k_new`"),
    ("v-shape", lambda d: d.decode(0, Q, KN, KN[..., :8]), ValueError, "`v_new`"),
    ("k-batch", lambda d: d.decode(0, Q, np.concatenate([KN, KN]), KN), ValueError, "`k_new`"),
    ("k-int", lambda d: d.decode(0, Q, KN.astype(np.int16), KN), TypeError, "`k_new`"),
    ("k-v-dtypes", lambda d: d.decode(0, Q, KN, KN.astype(np.float32)), TypeError, "`v_new`"),
    ("k-nan", lambda d: d.decode(0, Q, nan(KN), KN), ValueError, "`k_new`"),
    ("v-nan", lambda d: d.decode(0, Q, KN, nan(KN)), ValueError, "`v_new`"),
    ("out-shape", lambda d: d.decode(0, Q, KN, KN, out=np.empty((1, HQ, 8), np.float16)), ValueError, "`out`"),
    ("out-dtype", lambda d: d.decode(0, Q, KN, KN, out=np.empty((1, HQ, D), np.int32)), TypeError, "`out`"),
    ("out-readonly", lambda d: d.decode(0, Q, KN, KN, out=np.broadcast_to(np.zeros((1, 1, D), np.float16), (1, HQ, D))), (ValueError, TypeError), ""),
    ("seq-high", lambda d: d.decode(0, Q, KN, KN, seq=2), ValueError, "`seq`"),
    ("seq-negative", lambda d: d.decode(0, Q, KN, KN, seq=-1), ValueError, "`seq`"),
    ("seq-count", lambda d: d.decode(0, Q, KN, KN, seq=[0, 1]), ValueError, "`seq`"),
    ("seq-repeat", lambda d: d.decode(0, np.concatenate([Q, Q]), np.concatenate([KN, KN]), np.concatenate([KN, KN]), seq=[1, 1]), ValueError, "repeat"),
    ("seq-str", lambda d: d.decode(0, Q, KN, KN, seq="0"), TypeError, "`seq`"),
    ("batch-over-max", lambda d: d.decode(0, np.repeat(Q, 3, 0), np.repeat(KN, 3, 0), np.repeat(KN, 3, 0)), ValueError, "max_batch"),
    ("budget-negative", lambda d: d.decode(0, Q, KN, KN, budget=-3), ValueError, "`budget`"),
    ("budget-shape", lambda d: d.decode(0, Q, KN, KN, budget=np.ones((1, 5), np.int64)), ValueError, "`budget`"),
    ("prefill-over-capacity", lambda d: d.prefill(0, np.zeros((CAP + 1, HKV, D), np.float16), np.zeros((CAP + 1, HKV, D), np.float16)), tactic.CapacityError, "max_tokens"),
    ("prefill-shape", lambda d: d.prefill(0, K[:, :1], V[:, :1]), ValueError, "`keys`"),
    ("prefill-values-shape", lambda d: d.prefill(0, K, V[:-1]), ValueError, "`values`"),
    ("prefill-rank", lambda d: d.prefill(0, K[0], V[0]), ValueError, "`keys`"),
    ("prefill-dtype", lambda d: d.prefill(0, K.astype(np.int8), V), TypeError, "`keys`"),
    ("prefill-nan", lambda d: d.prefill(0, nan(K), V), ValueError, "`keys`"),
    ("prefill-layer", lambda d: d.prefill(5, K, V), ValueError, "`layer`"),
    ("prefill-seq", lambda d: d.prefill(0, K, V, seq=7), ValueError, "`seq`"),
    ("prefill-4d-lengths", lambda d: d.prefill(0, K.transpose(1, 0, 2)[None], V.transpose(1, 0, 2)[None], lengths=[N + 1]), ValueError, "`lengths`"),
    ("prefill-4d-nan-second", lambda d: d.prefill(0, np.stack([K.transpose(1, 0, 2), nan(K).transpose(1, 0, 2)]), np.stack([V.transpose(1, 0, 2)] * 2)), ValueError, "`keys`"),
    ("stats-layer", lambda d: d.stats(9), ValueError, "`layer`"),
    ("length-seq", lambda d: d.length(0, 5), ValueError, "`seq`"),
    ("reset-seq", lambda d: d.reset(9), ValueError, "`seq`"),
    ("select-rank", lambda d: d.select(0, Q[0]), ValueError, "`q`"),
]


@pytest.mark.parametrize("case", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_call_raises_and_changes_nothing(case):
    _, call, exc, words = case
    dec, ref = fresh(), fresh()
    with pytest.raises(exc) as info:
        call(dec)
    assert words in str(info.value), str(info.value)
    # a following valid call returns exactly what a fresh decoder returns
    for layer in range(L):
        a = dec.decode(layer, Q, KN, KN)
        b = ref.decode(layer, Q, KN, KN)
        np.testing.assert_array_equal(a, b)
        assert dec.length(layer, 0) == ref.length(layer, 0) == N + 1
        assert dec.length(layer, 1) == ref.length(layer, 1)


def test_decode_past_capacity():
    dec = fresh()
    for _ in range(CAP - N):
        dec.decode(1, Q, KN, KN)
    before = dec.decode(0, Q, KN, KN)
    with pytest.raises(tactic.CapacityError, match="max_tokens"):
        dec.decode(1, Q, KN, KN)
    assert dec.length(1, 0) == CAP
    assert isinstance(tactic.CapacityError("x"), ValueError)
    assert before.shape == (1, HQ, D)


def _gpu_usable():
    if not tactic.with_cuda:
        return False
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


BAD_OPTIONS = [
    ({"target": 0.0}, ValueError, "`target`"),
    ({"target": 1.5}, ValueError, "`target`"),
    ({"target": float("nan")}, ValueError, "`target`"),
    ({"target": "0.9"}, TypeError, "`target`"),
    ({"margin": -0.1}, ValueError, "`margin`"),
    ({"cluster_size": 0}, ValueError, "`cluster_size`"),
    ({"policy": "fast"}, ValueError, "`policy`"),
    ({"estimator": "magic"}, ValueError, "`estimator`"),
    ({"metric": "manhattan"}, ValueError, "`metric`"),
    ({"dtype": "int8"}, TypeError, "`dtype`"),
    ({"device": "tpu"}, ValueError, "`device`"),
    # no CUDA backend, or no GPU: refused with a reason (on a GPU machine this config is valid)
    pytest.param({"device": "cuda"}, RuntimeError, "not available",
                 marks=pytest.mark.skipif(_gpu_usable(), reason="a CUDA GPU is usable here")),
    ({"num_sink": -1}, ValueError, "`num_sink`"),
    ({"recluster_interval": 0}, ValueError, "`recluster_interval`"),
    ({"kmeans_iters": 0}, ValueError, "`kmeans_iters`"),
    ({"page_size": 0}, ValueError, "`page_size`"),
    ({"scale": -1.0}, ValueError, "`scale`"),
    ({"sample_segments": 1, "estimator": "two_segment"}, ValueError, "`sample_segments`"),
    ({"num_q_heads": 5}, ValueError, "`num_q_heads`"),
    ({"max_tokens": 0}, ValueError, "`max_tokens`"),
    ({"max_batch": 0}, ValueError, "`max_batch`"),
    ({"head_dim": 2.5}, TypeError, "`head_dim`"),
    ({"max_tokens": 2**40}, ValueError, "`max_tokens`"),
]


@pytest.mark.parametrize("opts,exc,words", BAD_OPTIONS,
                         ids=[str((o.values if hasattr(o, "values") else o)[0]) for o in BAD_OPTIONS])
def test_bad_options(opts, exc, words):
    args = dict(num_layers=1, num_q_heads=4, num_kv_heads=2, head_dim=64, max_tokens=64)
    args.update(opts)
    with pytest.raises(exc) as info:
        tactic.SparseDecoder(**args)
    assert words in str(info.value), str(info.value)


def test_quest_without_budget_is_rejected_before_appending():
    dec = tactic.SparseDecoder(1, HQ, HKV, D, max_tokens=CAP, policy="quest")
    dec.prefill(0, K, V)
    with pytest.raises(ValueError, match="`budget`"):
        dec.decode(0, Q, KN, KN)
    assert dec.length(0, 0) == N
    dec.decode(0, Q, KN, KN, budget=16)
    assert dec.length(0, 0) == N + 1


def test_op_argument_errors():
    with pytest.raises(ValueError, match="`x`"):
        tactic.ops.kmeans(np.zeros(5, np.float32), 2)
    with pytest.raises(ValueError, match="`num_clusters`"):
        tactic.ops.kmeans(np.zeros((5, 2), np.float32), 0)
    with pytest.raises(ValueError, match="`mask`"):
        tactic.ops.sparse_decode(Q[0], K, V, np.ones((HKV, N + 1), bool))
    with pytest.raises(ValueError, match="`lengths`"):
        tactic.ops.dense_decode(Q, K[None], V[None], lengths=[N + 5])
    with pytest.raises(ValueError, match="multiple"):
        tactic.ops.dense_decode(Q[:, :3], K[None], V[None])
