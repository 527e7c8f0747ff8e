"""Bad input raises a clear exception naming the argument, and leaves the decoder as it was.

Every row of BAD_CALLS is one distinct bad call: the test asserts the exact exception type,
that the message matches (pytest.raises(match=...), the argument's name or the reason), and
that a following valid call on the same decoder returns bitwise what a fresh decoder returns.
docs/CONTRACT.md lists the checks these cases exercise.
"""
import re

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


def overlapping(shape, dtype):
    """A writable array whose every row is the same memory (stride 0 in the leading axes)."""
    base = np.zeros(shape[-1], dtype)
    strides = (0,) * (len(shape) - 1) + (base.itemsize,)
    return np.lib.stride_tricks.as_strided(base, shape, strides, writeable=True)


def readonly(a):
    a = a.copy()
    a.flags.writeable = False
    return a


def _torch_meta(a):
    torch = pytest.importorskip("torch")
    return torch.empty(a.shape, dtype=torch.float16, device="meta")


def _torch_sparse(a):
    torch = pytest.importorskip("torch")
    return torch.from_numpy(a).to_sparse()


def misaligned(a):
    """A copy of `a` whose data starts one byte past an aligned address (DLPack allows it)."""
    raw = np.zeros(a.nbytes + 1, np.uint8)
    out = raw[1:].view(a.dtype).reshape(a.shape)
    out[...] = a
    assert out.ctypes.data % a.itemsize != 0
    return out


BIG = np.float32(1e5)  # finite in float32, beyond float16's range (65504)
KN32 = KN.astype(np.float32)
K4, V4 = K[None], V[None]  # [1, N, Hkv, D]


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
    ("out-readonly", lambda d: d.decode(0, Q, KN, KN, out=np.broadcast_to(np.zeros((1, 1, D), np.float16), (1, HQ, D))), ValueError, "`out` must be a writable"),
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
    ("prefill-4d-lengths", lambda d: d.prefill(0, K4, V4, lengths=[N + 1]), ValueError, "`lengths`"),
    ("prefill-4d-nan-second", lambda d: d.prefill(0, np.stack([K, nan(K)]), np.stack([V] * 2)), ValueError, "`keys`"),
    ("stats-layer", lambda d: d.stats(9), ValueError, "`layer`"),
    ("length-seq", lambda d: d.length(0, 5), ValueError, "`seq`"),
    ("reset-seq", lambda d: d.reset(9), ValueError, "`seq`"),
    ("select-rank", lambda d: d.select(0, Q[0]), ValueError, "`q`"),
    # added with docs/CONTRACT.md
    ("out-readonly-copy", lambda d: d.decode(0, Q, KN, KN, out=readonly(np.empty((1, HQ, D), np.float16))), ValueError, "`out` must be a writable"),
    ("out-overlapping", lambda d: d.decode(0, Q, KN, KN, out=overlapping((1, HQ, D), np.float16)), ValueError, "`out` has overlapping"),
    ("out-stride", lambda d: d.decode(0, Q, KN, KN, out=strided_last(np.empty((1, HQ, D), np.float16))), ValueError, "`out` must have a unit stride"),
    ("out-batch", lambda d: d.decode(0, Q, KN, KN, out=np.empty((2, HQ, D), np.float16)), ValueError, "`out` must have shape"),
    ("out-list", lambda d: d.decode(0, Q, KN, KN, out=[0.0]), TypeError, "`out` must be an array"),
    ("q-4d", lambda d: d.decode(0, Q[None], KN, KN), ValueError, "`q` must be [B"),
    ("q-empty-batch", lambda d: d.decode(0, Q[:0], KN[:0], KN[:0]), ValueError, "at least one"),
    ("q-bool", lambda d: d.decode(0, Q > 0, KN, KN), TypeError, "`q` must be float16"),
    ("q-negative-stride", lambda d: d.decode(0, Q[:, ::-1], KN, KN), ValueError, "`q` must not have negative strides"),
    ("k-inf", lambda d: d.decode(0, Q, KN * np.float16(np.inf), KN), ValueError, "`k_new` contains NaN or Inf"),
    ("k-beyond-float16", lambda d: d.decode(0, Q, KN32 * BIG, KN32), ValueError, "`k_new` holds values beyond the range of the float16"),
    ("v-beyond-float16", lambda d: d.decode(0, Q, KN32, KN32 * BIG), ValueError, "`v_new` holds values beyond"),
    ("k-without-v", lambda d: d.decode(0, Q, KN, None), TypeError, "`v_new` must be an array"),
    ("v-without-k", lambda d: d.decode(0, Q, None, KN), TypeError, "`k_new` must be an array"),
    ("k-list", lambda d: d.decode(0, Q, KN.tolist(), KN), TypeError, "`k_new` must be an array"),
    ("k-rank", lambda d: d.decode(0, Q, KN[0], KN[0]), ValueError, "`k_new` must have shape"),
    ("select-empty-seq", lambda d: d.select(0, Q, seq=1), ValueError, "slot 1 of layer 0 is empty"),
    ("attend-empty-seq", lambda d: d.decode(1, Q, None, None, seq=1), ValueError, "slot 1 of layer 1 is empty"),
    ("seq-huge", lambda d: d.decode(0, Q, KN, KN, seq=2**70), ValueError, "`seq` must be <="),
    ("seq-float", lambda d: d.decode(0, Q, KN, KN, seq=0.0), TypeError, "`seq`"),
    ("layer-huge", lambda d: d.decode(2**80, Q, KN, KN), ValueError, "`layer` must be <="),
    ("layer-str", lambda d: d.decode("0", Q, KN, KN), TypeError, "`layer` must be an int"),
    ("budget-float-array", lambda d: d.decode(0, Q, KN, KN, budget=np.ones((1, HKV))), ValueError, "`budget` must be an int or an integer array"),
    ("budget-zero-entry", lambda d: d.decode(0, Q, KN, KN, budget=np.array([[4, 0]])), ValueError, "`budget` entries must be positive"),
    ("prefill-inf-values", lambda d: d.prefill(0, K, V * np.float16(np.inf)), ValueError, "`values` contains NaN or Inf"),
    ("prefill-beyond-float16", lambda d: d.prefill(0, K.astype(np.float32) * BIG, V), ValueError, "`keys` holds values beyond the range of the float16"),
    ("prefill-negative-stride", lambda d: d.prefill(0, K[::-1], V), ValueError, "`keys` must not have negative strides"),
    ("prefill-last-stride", lambda d: d.prefill(0, strided_last(K), V), ValueError, "`keys` must have a unit stride"),
    ("prefill-values-dtype", lambda d: d.prefill(0, K, V.astype(np.int32)), TypeError, "`values` must be float16"),
    ("prefill-values-list", lambda d: d.prefill(0, K, V.tolist()), TypeError, "`values` must be an array"),
    ("prefill-head-dim", lambda d: d.prefill(0, K[..., :32], V[..., :32]), ValueError, "`keys` must be [N, Hkv=2, D=64]"),
    ("prefill-4d-values-shape", lambda d: d.prefill(0, K4, V4[:, :, :-1]), ValueError, "`values` must have the shape of `keys`"),
    ("prefill-4d-seq-repeat", lambda d: d.prefill(0, np.concatenate([K4, K4]), np.concatenate([V4, V4]), seq=[1, 1]), ValueError, "must not repeat"),
    ("prefill-4d-lengths-negative", lambda d: d.prefill(0, K4, V4, lengths=[-1]), ValueError, "`lengths` must be >= 0"),
    ("prefill-4d-lengths-count", lambda d: d.prefill(0, K4, V4, lengths=[3, 3]), ValueError, "`lengths` must hold 1"),
    ("prefill-4d-over-capacity", lambda d: d.prefill(0, np.zeros((1, CAP + 1, HKV, D), np.float16), np.zeros((1, CAP + 1, HKV, D), np.float16)), tactic.CapacityError, "exceeds `max_tokens`=40"),
    ("prefill-seq-huge", lambda d: d.prefill(0, K, V, seq=2**64), ValueError, "`seq` must be <="),
    ("recluster-layer", lambda d: d.recluster(L, 0), ValueError, "`layer` must be in [0, 2)"),
    ("recluster-seq", lambda d: d.recluster(0, 2), ValueError, "`seq` must be a sequence slot in [0, 2)"),
    ("layout-head", lambda d: d.layout(0, 0, HKV), ValueError, "`head` must be in [0, 2)"),
    ("length-layer", lambda d: d.length(-1, 0), ValueError, "`layer` must be in"),
    ("stats-layer-float", lambda d: d.stats(0.5), TypeError, "`layer` must be an int"),
    ("reset-seq-float", lambda d: d.reset(1.0), TypeError, "`seq` must be an int"),
    # arrays DLPack cannot describe: refused by name, not by an anonymous overload error
    ("k-big-endian", lambda d: d.decode(0, Q, KN.astype(">f2"), KN), TypeError, "`k_new` must be a numeric array in native byte order"),
    ("prefill-big-endian", lambda d: d.prefill(0, K, V.astype(">f2")), TypeError, "`values` must be a numeric array in native byte order"),
    ("out-object", lambda d: d.decode(0, Q, KN, KN, out=np.empty((1, HQ, D), object)), TypeError, "`out` must be a numeric array"),
    ("q-structured", lambda d: d.decode(0, np.zeros((1, HQ, D), [("a", "f2")]), KN, KN), TypeError, "`q` must be a numeric array"),
    ("k-torch-meta", lambda d: d.decode(0, Q, _torch_meta(KN), KN), ValueError, "`k_new` must be on a cpu or cuda device, got meta"),
    ("prefill-torch-sparse", lambda d: d.prefill(0, _torch_sparse(K), V), TypeError, "`keys` must be a dense (strided) tensor"),
    # misaligned data: typed reads of it are undefined behaviour (UBSan), refused by name
    ("q-misaligned", lambda d: d.decode(0, misaligned(Q), KN, KN), ValueError, "`q` must be aligned to its 2-byte elements"),
    ("v-misaligned", lambda d: d.decode(0, Q, KN, misaligned(KN)), ValueError, "`v_new` must be aligned"),
    ("out-misaligned", lambda d: d.decode(0, Q, KN, KN, out=misaligned(np.empty((1, HQ, D), np.float32))), ValueError, "`out` must be aligned to its 4-byte elements"),
    ("prefill-misaligned", lambda d: d.prefill(0, misaligned(K), V), ValueError, "`keys` must be aligned"),
    # reuse_selection and the target setter (main's additions)
    ("reuse-selection-on-cpu", lambda d: d.decode(0, Q, None, None, reuse_selection=True), RuntimeError, "CUDA decoders only"),
    ("reuse-selection-with-append", lambda d: d.decode(0, Q, KN, KN, reuse_selection=True), ValueError, "pass k_new=v_new=None"),
    ("reuse-selection-not-bool", lambda d: d.decode(0, Q, KN, KN, reuse_selection="yes"), TypeError, "`reuse_selection` must be a bool"),
    ("target-set-zero", lambda d: setattr(d, "target", 0.0), ValueError, "`target` must be in (0, 1]"),
    ("target-set-above-one", lambda d: setattr(d, "target", 1.01), ValueError, "`target` must be in (0, 1]"),
    ("target-set-nan", lambda d: setattr(d, "target", float("nan")), ValueError, "`target` must be in (0, 1]"),
    ("target-set-str", lambda d: setattr(d, "target", "0.5"), TypeError, "`target` must be a number"),
]


@pytest.mark.parametrize("case", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_call_raises_and_changes_nothing(case):
    _, call, exc, words = case
    dec, ref = fresh(), fresh()
    with pytest.raises(exc, match=re.escape(words)) as info:
        call(dec)
    # exactly the documented type (CapacityError is a ValueError, but not the other way round)
    assert type(info.value) is exc, type(info.value)
    # a following valid call returns exactly what a fresh decoder returns
    assert dec.target == ref.target
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
    ({"spread": -0.5}, ValueError, "`spread`"),
    ({"spread": float("inf")}, ValueError, "`spread`"),
    ({"spread": 4.5}, ValueError, "`spread`"),
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
    ({"num_layers": 2**70}, ValueError, "`num_layers` must be <="),
    ({"seed": -1}, ValueError, "`seed` must be >= 0"),
    ({"kmeans_iters": 2**40}, ValueError, "`kmeans_iters` must be <="),
    ({"target": 10**400}, ValueError, "`target` must be a finite number"),
    ({"record_selection": 1}, TypeError, "`record_selection` must be a bool"),
    ({"share_group": "yes"}, TypeError, "`share_group` must be a bool"),
    ({"dtype": "float64"}, TypeError, "`dtype`"),
    ({"head_dim": 2048}, ValueError, "`head_dim` must be in [1, 1024]"),
    ({"num_kv_heads": 0}, ValueError, "`num_kv_heads`"),
    # a store that cannot fit: refused at construction, naming the bytes it needs
    ({"max_tokens": 10**9, "num_kv_heads": 8, "num_q_heads": 8}, tactic.CapacityError, "bytes ("),
    # the store fits, record_selection's masks (1 TiB here) do not
    ({"num_q_heads": 2**22, "num_kv_heads": 1, "max_tokens": 4096, "max_batch": 64, "record_selection": True},
     tactic.CapacityError, "needs "),
]


@pytest.mark.parametrize("opts,exc,words", BAD_OPTIONS,
                         ids=[str((o.values if hasattr(o, "values") else o)[0]) for o in BAD_OPTIONS])
def test_bad_options(opts, exc, words):
    args = dict(num_layers=1, num_q_heads=4, num_kv_heads=2, head_dim=64, max_tokens=64)
    args.update(opts)
    with pytest.raises(exc, match=re.escape(words)) as info:
        tactic.SparseDecoder(**args)
    assert type(info.value) is exc, type(info.value)


def test_capacity_error_names_the_bytes_needed():
    # 1 layer x 1 slot x 8 KV heads x 10**9 tokens (2.2 TB): K and V in float16 (2 * 64 * 2 bytes a
    # row), int32 positions, and (tactic) centroids, spreads and offsets of ceil(10**9 / 16) + 1
    # clusters, an int64 cluster count per head and three int64 counts per slot: computed here
    # independently of the library. On top: the layer's statistics record (a few vectors).
    heads, cap, d = 8, 10**9, 64
    clusters = -(-cap // 16) + 1
    store = heads * (2 * cap * d * 2 + 4 * cap + 4 * (clusters + 1 + clusters * d + clusters) + 8) + 3 * 8
    with pytest.raises(tactic.CapacityError) as info:
        tactic.SparseDecoder(1, heads, heads, d, max_tokens=cap)
    msg = str(info.value)
    need = int(re.search(r"needs (\d+) bytes", msg).group(1))
    assert store <= need <= store + 1024, (store, msg)
    assert "lower max_tokens" in msg


def test_billions_of_tiny_layers_are_refused_by_capacity():
    # 40 bytes of store and ~160 of bookkeeping a layer, 2^34 layers: 3.4 TB, refused up front
    # with a CapacityError (it used to pass the store check and die in std::bad_alloc)
    with pytest.raises(tactic.CapacityError, match=r"needs \d+ bytes"):
        tactic.SparseDecoder(2**34, 1, 1, 1, max_tokens=1, policy="dense")


def test_quest_without_budget_is_rejected_before_appending():
    dec = tactic.SparseDecoder(1, HQ, HKV, D, max_tokens=CAP, policy="quest")
    dec.prefill(0, K, V)
    with pytest.raises(ValueError, match="`budget`"):
        dec.decode(0, Q, KN, KN)
    assert dec.length(0, 0) == N
    dec.decode(0, Q, KN, KN, budget=16)
    assert dec.length(0, 0) == N + 1


OP_CALLS = [
    ("kmeans-rank", lambda: tactic.ops.kmeans(np.zeros(5, np.float32), 2), ValueError, "`x`"),
    ("kmeans-clusters", lambda: tactic.ops.kmeans(np.zeros((5, 2), np.float32), 0), ValueError, "`num_clusters`"),
    ("kmeans-nan", lambda: tactic.ops.kmeans(nan(np.ones((5, 2), np.float32)), 2), ValueError, "`x` contains NaN"),
    ("kmeans-metric", lambda: tactic.ops.kmeans(np.ones((5, 2), np.float32), 2, metric=3), TypeError, "`metric`"),
    ("kmeans-iters", lambda: tactic.ops.kmeans(np.ones((5, 2), np.float32), 2, max_iters=2**40), ValueError, "`max_iters`"),
    ("sparse-mask-shape", lambda: tactic.ops.sparse_decode(Q[0], K, V, np.ones((HKV, N + 1), bool)), ValueError, "`mask`"),
    ("sparse-mask-dtype", lambda: tactic.ops.sparse_decode(Q[0], K, V, np.ones((HKV, N), np.float32)), TypeError, "`mask` must be bool"),
    ("sparse-nan", lambda: tactic.ops.sparse_decode(Q[0], nan(K), V, np.ones((HKV, N), bool)), ValueError, "`keys` contains NaN"),
    ("sparse-out-overlap", lambda: tactic.ops.sparse_decode(Q[0], K, V, np.ones((HKV, N), bool), out=overlapping((HQ, D), np.float16)), ValueError, "`out` has overlapping"),
    ("dense-lengths", lambda: tactic.ops.dense_decode(Q, K[None], V[None], lengths=[N + 5]), ValueError, "`lengths`"),
    ("dense-lengths-float", lambda: tactic.ops.dense_decode(Q, K[None], V[None], lengths=[2.5]), TypeError, "`lengths`"),
    ("dense-heads", lambda: tactic.ops.dense_decode(Q[:, :3], K[None], V[None]), ValueError, "Hkv dividing the 3 query heads"),
    ("dense-scale-inf", lambda: tactic.ops.dense_decode(Q, K[None], V[None], scale=float("inf")), ValueError, "`scale` must be a finite"),
    ("dense-q-nan", lambda: tactic.ops.dense_decode(nan(Q), K[None], V[None]), ValueError, "`q` contains NaN"),
    ("dense-lengths-big-endian", lambda: tactic.ops.dense_decode(Q, K[None], V[None], lengths=np.array([N], ">i4")), TypeError, "`lengths` must be a numeric array in native byte order"),
    ("kmeans-big-endian", lambda: tactic.ops.kmeans(np.ones((5, 2), ">f4"), 2), TypeError, "`x` must be a numeric array in native byte order"),
    ("dense-lengths-misaligned", lambda: tactic.ops.dense_decode(Q, K[None], V[None], lengths=misaligned(np.array([N], np.int32))), ValueError, "`lengths` must be aligned"),
    ("kmeans-misaligned", lambda: tactic.ops.kmeans(misaligned(np.ones((5, 2), np.float32)), 2), ValueError, "`x` must be aligned"),
    ("sparse-values-misaligned", lambda: tactic.ops.sparse_decode(Q[0], K, misaligned(V), np.ones((HKV, N), bool)), ValueError, "`values` must be aligned"),
    ("dense-out-readonly", lambda: tactic.ops.dense_decode(Q, K[None], V[None], out=readonly(np.empty((1, HQ, D), np.float16))), ValueError, "`out` must be a writable"),
    ("select-rank", lambda: tactic.ops.select(Q, K), ValueError, "`q` must be [Hq, D]"),
]


@pytest.mark.parametrize("case", OP_CALLS, ids=[c[0] for c in OP_CALLS])
def test_op_bad_calls(case):
    _, call, exc, words = case
    with pytest.raises(exc, match=re.escape(words)) as info:
        call()
    assert type(info.value) is exc, type(info.value)


def test_dense_decode_ignores_nan_padding_past_lengths():
    # rows past lengths[b] are padding the op never reads: NaN there is not an error
    k = np.concatenate([K, nan(K)])[None]
    v = np.concatenate([V, nan(V)])[None]
    out = tactic.ops.dense_decode(Q, k, v, lengths=[N])
    np.testing.assert_array_equal(out, tactic.ops.dense_decode(Q, K[None], V[None]))


def test_op_argument_errors():
    with pytest.raises(ValueError, match="`x`"):
        tactic.ops.kmeans(np.zeros(5, np.float32), 2)
    with pytest.raises(ValueError, match="`num_clusters`"):
        tactic.ops.kmeans(np.zeros((5, 2), np.float32), 0)
    with pytest.raises(ValueError, match="`mask`"):
        tactic.ops.sparse_decode(Q[0], K, V, np.ones((HKV, N + 1), bool))
    with pytest.raises(ValueError, match="`lengths`"):
        tactic.ops.dense_decode(Q, K[None], V[None], lengths=[N + 5])
    with pytest.raises(ValueError, match="Hkv dividing the 3 query heads"):
        tactic.ops.dense_decode(Q[:, :3], K[None], V[None])


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "strided"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_found_in_any_layout_and_dtype(dtype, layout, bad):
    """check_finite tests the raw exponent bits of each storage type, row by row: a single NaN
    or Inf anywhere (last element included) is found whatever the strides, and the extreme
    finite values of each type (largest, smallest subnormal) are not mistaken for one."""
    torch = pytest.importorskip("torch")
    tdt = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    fin = torch.finfo(tdt)
    rng = np.random.default_rng(3)
    n, hkv, d = 37, 2, 64

    def keys():
        k = torch.from_numpy(rng.standard_normal((n, hkv, d)).astype(np.float32)).to(tdt)
        k[0, 0, 0], k[1, 1, 5], k[2, 0, 7] = fin.max, fin.tiny * fin.eps, -fin.max  # finite extremes
        if layout == "transposed":  # same values, the leading dimensions' strides swapped
            return k.permute(1, 0, 2).contiguous().permute(1, 0, 2)
        if layout == "strided":  # every other row of a larger array
            big = torch.zeros(2 * n, hkv, d, dtype=tdt)
            big[::2] = k
            return big[::2]
        return k

    q = torch.from_numpy(rng.standard_normal((1, 4, d)).astype(np.float32)).to(tdt)
    v = torch.from_numpy(rng.standard_normal((1, n, hkv, d)).astype(np.float32)).to(tdt)
    k = keys()
    out = tactic.ops.dense_decode(q, k[None], v)  # finite extremes pass
    assert out.shape == q.shape
    for pos in [(0, 0, 1), (n - 1, hkv - 1, d - 1), (n // 2, 1, d // 3)]:
        k = keys()
        k[pos] = bad
        with pytest.raises(ValueError, match="`keys` contains NaN or Inf"):
            tactic.ops.dense_decode(q, k[None], v)
