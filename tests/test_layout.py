"""One K/V layout everywhere: token-major, [N, Hkv, D] and [B, N, Hkv, D] (docs/CONTRACT.md,
rule 8). Head-major arrays (torch SDPA's and Hugging Face's [B, Hkv, N, D]) are refused with a
message that names the expected layout and the view to pass; that view then works, read in
place, and matches the float64 reference."""
import re

import numpy as np
import pytest

import tactic
from conftest import ref_attention, to64

HQ, HKV, D, N = 8, 2, 64, 500


def _kv(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def _decoder(**kw):
    return tactic.SparseDecoder(1, HQ, HKV, D, max_batch=2, max_tokens=N + 4, dtype="float32",
                                target=1.0, **kw)


def test_prefill_batched_head_major_is_refused_with_the_fix():
    rng = np.random.default_rng(0)
    k = _kv(rng, 1, HKV, N, D)  # [B, Hkv, N, D]
    dec = _decoder()
    with pytest.raises(ValueError) as e:
        dec.prefill(0, k, k)
    msg = str(e.value)
    assert "`keys` must be [B, N, Hkv=2, D=64]" in msg
    assert f"got [1, {HKV}, {N}, {D}], which looks like [B, Hkv, N, D]" in msg
    assert "keys.transpose(1, 2)" in msg
    assert dec.length(0, 0) == 0  # nothing stored


def test_prefill_one_sequence_head_major_is_refused_with_the_fix():
    rng = np.random.default_rng(1)
    k = _kv(rng, HKV, N, D)  # [Hkv, N, D]
    dec = _decoder()
    with pytest.raises(ValueError, match=re.escape("which looks like [Hkv, N, D]")) as e:
        dec.prefill(0, k, k)
    assert "`keys` must be [N, Hkv=2, D=64]" in str(e.value)
    assert "keys.transpose(1, 0, 2) in NumPy" in str(e.value)
    with pytest.raises(ValueError, match=re.escape("`values` must be [N, Hkv=2, D=64]")):
        dec.prefill(0, k.transpose(1, 0, 2), k)
    assert dec.length(0, 0) == 0


def test_dense_decode_head_major_names_the_layout():
    """The issue's case: q has 8 heads, keys [1, 8, 500, 64] in SDPA's layout; the message was
    "q heads (8) must be a multiple of the KV heads of keys (500)"."""
    rng = np.random.default_rng(2)
    q = _kv(rng, 1, 8, D)
    k = _kv(rng, 1, 8, N, D)
    with pytest.raises(ValueError) as e:
        tactic.ops.dense_decode(q, k, k)
    msg = str(e.value)
    assert "`keys` must be [B, N, Hkv, D=64]" in msg and "got [1, 8, 500, 64]" in msg
    assert "looks like [B, Hkv, N, D]" in msg and "transpose(1, 2)" in msg


def test_sparse_decode_and_select_head_major_name_the_layout():
    rng = np.random.default_rng(3)
    q = _kv(rng, HQ, D)
    k = _kv(rng, HKV, N, D)
    with pytest.raises(ValueError, match=re.escape("got [2, 500, 64], which looks like [Hkv, N, D]")):
        tactic.ops.sparse_decode(q, k, k, np.ones((HKV, N), bool))
    with pytest.raises(ValueError, match=re.escape("got [2, 500, 64], which looks like [Hkv, N, D]")):
        tactic.ops.select(q, k)


def test_wrong_heads_without_a_layout_mixup_says_what_is_expected():
    rng = np.random.default_rng(4)
    k = _kv(rng, N, 3, D)  # 3 KV heads: neither axis fits
    with pytest.raises(ValueError) as e:
        _decoder().prefill(0, k, k)
    assert "`keys` must be [N, Hkv=2, D=64]" in str(e.value) and "looks like" not in str(e.value)
    with pytest.raises(ValueError, match="Hkv dividing the 8 query heads; got \\[1, 500, 3, 64\\]$"):
        tactic.ops.dense_decode(_kv(rng, 1, HQ, D), k[None], k[None])


def test_transposed_sdpa_view_prefills_in_place_and_matches_reference():
    """HF/SDPA K/V [B, Hkv, N, D] passed as the view .transpose(1, 2): read through its
    strides (no copy), with lengths; P = 1 decode equals float64 attention per sequence."""
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(5)
    lens = [N, 137]
    k = torch.randn(2, HKV, N, D, generator=gen)
    v = torch.randn(2, HKV, N, D, generator=gen)
    dec = _decoder()
    kt, vt = k.transpose(1, 2), v.transpose(1, 2)
    assert not kt.is_contiguous()
    info = tactic._core.view_info(kt)
    assert info["data"] == kt.data_ptr() and info["shape"] == (2, N, HKV, D)
    dec.prefill(0, kt, vt, lengths=lens)
    assert [dec.length(0, s) for s in (0, 1)] == lens
    q = torch.randn(2, HQ, D, generator=gen)
    kn = torch.randn(2, HKV, D, generator=gen)
    vn = torch.randn(2, HKV, D, generator=gen)
    out = to64(dec.decode(0, q, kn, vn))
    for b, n in enumerate(lens):
        kk = np.concatenate([to64(kt[b, :n]), to64(kn[b])[None]])
        vv = np.concatenate([to64(vt[b, :n]), to64(vn[b])[None]])
        ref, _ = ref_attention(to64(q[b]), kk, vv, D ** -0.5)
        np.testing.assert_allclose(out[b], ref, rtol=1e-4, atol=2e-5)


def test_token_major_batch_equals_one_sequence_prefills():
    """[B, N, Hkv, D] stores exactly what B one-sequence prefills of [N, Hkv, D] store."""
    rng = np.random.default_rng(6)
    k = _kv(rng, 2, 40, HKV, D)
    v = _kv(rng, 2, 40, HKV, D)
    a, b = _decoder(), _decoder()
    a.prefill(0, k, v, lengths=[40, 23])
    b.prefill(0, k[0], v[0], seq=0)
    b.prefill(0, k[1, :23], v[1, :23], seq=1)
    q = _kv(rng, 2, HQ, D)
    np.testing.assert_array_equal(a.decode(0, q, None, None), b.decode(0, q, None, None))


def test_n_equal_to_heads_is_read_token_major():
    """When N == Hkv the layouts cannot be told apart: the array is read as [N, Hkv, D]."""
    rng = np.random.default_rng(7)
    k, v, q = _kv(rng, HKV, HKV, D), _kv(rng, HKV, HKV, D), _kv(rng, HQ, D)
    out = tactic.ops.sparse_decode(q, k, v, np.ones((HKV, HKV), bool))
    ref, _ = ref_attention(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), D ** -0.5)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=2e-5)
