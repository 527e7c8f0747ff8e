"""Dense attention and P = 1 decoding equal a float64 NumPy reference."""
import numpy as np
import pytest

import tactic
from conftest import ATOL, DTYPES, RTOL, make, ref_attention, to64

GROUPS = [1, 2, 3, 4, 5, 8]
HEAD_DIMS = [64, 80, 128]
CONTEXTS = [1, 15, 17, 1000, 4097]


@pytest.mark.parametrize("n", CONTEXTS)
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("g", GROUPS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_decode_matches_float64(dtype, g, d, n):
    rng = np.random.default_rng(1000 * g + d + n)
    hkv, b = 2, 2
    q, q64 = make((b, hkv * g, d), dtype, rng)
    k, k64 = make((b, n, hkv, d), dtype, rng)
    v, v64 = make((b, n, hkv, d), dtype, rng)
    lengths = np.array([n, max(1, n // 2)], dtype=np.int32)
    out = tactic.ops.dense_decode(q, k, v, lengths)
    assert type(out) is type(q) and tuple(out.shape) == tuple(q.shape)
    scale = 1 / np.sqrt(d)
    for i in range(b):
        ref, _ = ref_attention(q64[i], k64[i, : lengths[i]], v64[i, : lengths[i]], scale)
        np.testing.assert_allclose(to64(out[i]), ref, rtol=RTOL[dtype], atol=ATOL[dtype])


@pytest.mark.parametrize("n", CONTEXTS)
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("g", GROUPS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_decoder_target_one_equals_dense(dtype, g, d, n):
    """Policy tactic at P = 1 (and policy dense) reproduce exact attention after prefill
    plus decode steps, for every group size, head dim and context length."""
    rng = np.random.default_rng(7 * g + d + 3 * n)
    hkv, steps = 2, 3
    k, k64 = make((n + steps, hkv, d), dtype, rng)
    v, v64 = make((n + steps, hkv, d), dtype, rng)
    q, q64 = make((steps, hkv * g, d), dtype, rng)
    decs = [tactic.SparseDecoder(1, hkv * g, hkv, d, max_tokens=n + steps, dtype=dtype,
                                 target=1.0, cluster_size=4, policy=p) for p in ("tactic", "dense")]
    for dec in decs:
        dec.prefill(0, k[:n], v[:n])
    for s in range(steps):
        pos = n + s
        ref, _ = ref_attention(q64[s], k64[: pos + 1], v64[: pos + 1], 1 / np.sqrt(d))
        for dec in decs:
            out = dec.decode(0, q[s : s + 1], k[pos : pos + 1], v[pos : pos + 1])
            np.testing.assert_allclose(to64(out[0]), ref, rtol=RTOL[dtype], atol=ATOL[dtype])
            st = dec.stats(0)
            assert st["context"][0] == pos + 1
            assert (st["kv_tokens"] == pos + 1).all()


def test_batched_sequences_of_different_lengths():
    """A batch of slots with different contexts decodes each against its own tokens."""
    rng = np.random.default_rng(3)
    hq, hkv, d = 6, 2, 64
    lens = [50, 300, 17]
    dec = tactic.SparseDecoder(2, hq, hkv, d, max_batch=3, max_tokens=400, dtype="float32",
                               target=1.0)
    data = []
    for s, n in enumerate(lens):
        k, k64 = make((n + 1, hkv, d), "float32", rng)
        v, v64 = make((n + 1, hkv, d), "float32", rng)
        dec.prefill(1, k[:n], v[:n], seq=s)
        data.append((k, k64, v, v64))
    q, q64 = make((3, hq, d), "float32", rng)
    order = [2, 0, 1]  # slots in any order
    out = dec.decode(1, q, np.stack([data[s][0][-1] for s in order]),
                     np.stack([data[s][2][-1] for s in order]), seq=order)
    for i, s in enumerate(order):
        ref, _ = ref_attention(q64[i], data[s][1], data[s][3], 1 / np.sqrt(d))
        np.testing.assert_allclose(out[i], ref, rtol=1e-4, atol=2e-5)
    assert dec.length(1, 0) == lens[0] + 1 and dec.length(0, 0) == 0


def test_batched_prefill_4d_with_lengths():
    rng = np.random.default_rng(4)
    b, hkv, n, d = 2, 2, 40, 64
    k, k64 = make((b, n, hkv, d), "float32", rng)  # token-major [B, N, Hkv, D]
    v, v64 = make((b, n, hkv, d), "float32", rng)
    dec = tactic.SparseDecoder(1, 4, hkv, d, max_batch=2, max_tokens=64, dtype="float32", target=1.0)
    dec.prefill(0, k, v, lengths=[40, 25])
    assert dec.length(0, 0) == 40 and dec.length(0, 1) == 25
    q, q64 = make((2, 4, d), "float32", rng)
    kn, kn64 = make((2, hkv, d), "float32", rng)
    vn, vn64 = make((2, hkv, d), "float32", rng)
    out = dec.decode(0, q, kn, vn)
    for i, n_i in enumerate([40, 25]):
        kk = np.concatenate([k64[i, :n_i], kn64[i][None]])
        vv = np.concatenate([v64[i, :n_i], vn64[i][None]])
        ref, _ = ref_attention(q64[i], kk, vv, 1 / np.sqrt(d))
        np.testing.assert_allclose(out[i], ref, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("d", [96, 256])
def test_other_head_dims(d):
    rng = np.random.default_rng(d)
    k, k64 = make((300, 1, d), "float16", rng)
    v, v64 = make((300, 1, d), "float16", rng)
    q, q64 = make((1, 4, d), "float16", rng)
    dec = tactic.SparseDecoder(1, 4, 1, d, max_tokens=301, target=1.0)
    dec.prefill(0, k[:299], v[:299])
    out = dec.decode(0, q, k[299:], v[299:])
    ref, _ = ref_attention(q64[0], k64, v64, 1 / np.sqrt(d))
    np.testing.assert_allclose(to64(out[0]), ref, rtol=2e-3, atol=2e-3)


def test_float16_output_is_the_float32_result_rounded_to_nearest_even():
    """The float16 output store (F16C where the CPU has it) rounds exactly as numpy's float32 ->
    float16 conversion: the same call with a float32 `out` gives the value before rounding.
    Values span half's subnormals, ordinary numbers and its largest finite values."""
    rng = np.random.default_rng(5)
    hkv, g, n, d = 3, 2, 50, 64
    q = rng.standard_normal((1, hkv * g, d)).astype(np.float32)
    k = rng.standard_normal((1, n, hkv, d)).astype(np.float32)
    v = rng.standard_normal((1, n, hkv, d)).astype(np.float32)
    v[..., 0, :] *= 3e-6      # outputs in half's subnormal range (< 6.1e-5)
    v[..., 2, :] *= 2.0e4     # outputs up to a few times 1e4, near half's largest (65504)
    o32 = tactic.ops.dense_decode(q, k, v, out=np.empty((1, hkv * g, d), np.float32))
    o16 = tactic.ops.dense_decode(q, k, v, out=np.empty((1, hkv * g, d), np.float16))
    assert np.abs(o32[0, :g]).max() < 6.1e-5 and np.abs(o32[0, -g:]).max() > 1e4
    np.testing.assert_array_equal(o16.view(np.uint16), o32.astype(np.float16).view(np.uint16))
