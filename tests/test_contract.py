"""The behaviours docs/CONTRACT.md promises for valid but unusual calls: the store owns its
data, strided inputs are read correctly (never misread), tiny and empty contexts, use after
reset. References are float64 NumPy, or a fresh decoder fed contiguous copies."""
import gc

import numpy as np
import pytest

import tactic
from conftest import ATOL, RTOL, ref_attention, to64

HQ, HKV, D = 4, 2, 64


def _data(n, seed=0, dtype=np.float16):
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((n, HKV, D)).astype(dtype)
    v = rng.standard_normal((n, HKV, D)).astype(dtype)
    q = rng.standard_normal((1, HQ, D)).astype(dtype)
    kn = rng.standard_normal((1, HKV, D)).astype(dtype)
    vn = rng.standard_normal((1, HKV, D)).astype(dtype)
    return k, v, q, kn, vn


def _decoder(**kw):
    args = dict(max_batch=2, max_tokens=256, cluster_size=8, target=1.0)
    args.update(kw)
    return tactic.SparseDecoder(2, HQ, HKV, D, **args)


def _reference(q, k, v):
    out, _ = ref_attention(to64(q[0]), to64(k), to64(v), 1 / np.sqrt(D))
    return out


def test_store_owns_its_data_numpy():
    k, v, q, kn, vn = _data(100)
    saved = [a.copy() for a in (k, v, kn, vn)]
    dec, ref = _decoder(), _decoder()
    dec.prefill(0, k, v)
    ref.prefill(0, saved[0].copy(), saved[1].copy())
    # overwrite and free the caller's arrays: the decoder must not have kept pointers to them
    k[...] = np.nan
    v[...] = np.inf
    del k, v
    gc.collect()
    garbage = [np.full((100, HKV, D), np.nan, np.float16) for _ in range(8)]  # reuse freed memory
    a = dec.decode(0, q, kn, vn)
    kn[...] = np.nan
    vn[...] = np.nan
    a2 = dec.decode(0, q, saved[2], saved[3])
    b = ref.decode(0, q, saved[2], saved[3])
    b2 = ref.decode(0, q, saved[2], saved[3])
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a2, b2)
    k_all = np.concatenate([saved[0], saved[2], saved[2]])
    v_all = np.concatenate([saved[1], saved[3], saved[3]])
    np.testing.assert_allclose(to64(a2[0]), _reference(q, k_all, v_all), rtol=RTOL["float16"],
                               atol=ATOL["float16"])
    assert len(garbage) == 8


def test_store_owns_its_data_torch():
    torch = pytest.importorskip("torch")
    k, v, q, kn, vn = _data(60, seed=3)
    tk, tv = torch.from_numpy(k.copy()), torch.from_numpy(v.copy())
    dec, ref = _decoder(), _decoder()
    dec.prefill(0, tk, tv)
    ref.prefill(0, k, v)
    tk.fill_(float("nan"))
    del tk, tv
    gc.collect()
    np.testing.assert_array_equal(dec.decode(0, q, kn, vn), ref.decode(0, q, kn, vn))


def test_strided_inputs_are_read_not_misread():
    """Any strides but a unit last one are accepted and read element by element: transposed
    keys ([Hkv, N, D] memory seen as [N, Hkv, D]), sliced queries, a strided `out`."""
    k, v, q, kn, vn = _data(90, seed=5)
    k_t = np.ascontiguousarray(k.transpose(1, 0, 2)).transpose(1, 0, 2)  # non-row-major view
    v_t = np.ascontiguousarray(v.transpose(1, 0, 2)).transpose(1, 0, 2)
    assert not k_t.flags.c_contiguous
    q_wide = np.zeros((1, 2 * HQ, D), np.float16)
    q_wide[:, ::2] = q
    q_s = q_wide[:, ::2]  # head stride 2 * D
    kn_s = np.repeat(kn, 3, axis=1)[:, ::3]
    out_big = np.full((1, 2 * HQ, D), 7, np.float16)
    out_s = out_big[:, 1::2]  # writable, strided, no overlap
    dec, ref = _decoder(), _decoder()
    dec.prefill(0, k_t, v_t)
    ref.prefill(0, k, v)
    res = dec.decode(0, q_s, kn_s, vn, out=out_s)
    want = ref.decode(0, q, kn, vn)
    assert res is out_s
    np.testing.assert_array_equal(out_s, want)
    assert (out_big[:, ::2] == 7).all()  # elements outside the view are untouched
    np.testing.assert_allclose(to64(want[0]), _reference(q, np.concatenate([k, kn]), np.concatenate([v, vn])),
                               rtol=RTOL["float16"], atol=ATOL["float16"])


def test_broadcast_inputs_are_accepted():
    # a zero stride is a valid read-only input (every token the same row); as output it is refused
    k, v, q, kn, vn = _data(40, seed=6)
    kb = np.broadcast_to(k[:1], k.shape)
    dec, ref = _decoder(), _decoder()
    dec.prefill(0, kb, v)
    ref.prefill(0, np.ascontiguousarray(kb), v)
    np.testing.assert_array_equal(dec.decode(0, q, kn, vn), ref.decode(0, q, kn, vn))


def test_out_may_alias_q():
    # q is converted to float32 before anything is written, so in-place decode is safe
    k, v, q, kn, vn = _data(50, seed=7)
    dec, ref = _decoder(), _decoder()
    dec.prefill(0, k, v)
    ref.prefill(0, k, v)
    q2 = q.copy()
    dec.decode(0, q2, kn, vn, out=q2)
    np.testing.assert_array_equal(q2, ref.decode(0, q, kn, vn))


@pytest.mark.parametrize("n", [1, 3, 7, 15])
@pytest.mark.parametrize("num_sink", [0, 4])
@pytest.mark.parametrize("target", [0.3, 0.9, 1.0])
def test_context_shorter_than_one_cluster(n, num_sink, target):
    k, v, q, kn, vn = _data(n, seed=n, dtype=np.float32)
    dec = _decoder(cluster_size=16, num_sink=num_sink, target=target, dtype="float32")
    dec.prefill(0, k, v)
    out = dec.decode(0, q, kn, vn)
    st = dec.stats(0)
    assert st["context"][0] == n + 1
    assert (st["kv_tokens"] >= 1).all() and (st["kv_tokens"] <= n + 1).all()
    assert np.isfinite(out).all()
    if target == 1.0:
        np.testing.assert_allclose(out[0], _reference(q, np.concatenate([k, kn]), np.concatenate([v, vn])),
                                   rtol=RTOL["float32"], atol=ATOL["float32"])


def test_empty_context_then_append():
    # prefill of 0 tokens is valid; the first decode then attends to its own token only,
    # so the output is exactly that token's value, per query head of the group
    k, v, q, kn, vn = _data(0, seed=8)
    dec = _decoder()
    dec.prefill(0, k, v)
    assert dec.length(0, 0) == 0
    with pytest.raises(ValueError, match="is empty"):
        dec.decode(0, q, None, None)
    out = dec.decode(0, q, kn, vn)
    np.testing.assert_array_equal(out[0], np.repeat(vn[0], HQ // HKV, axis=0))


def test_use_after_reset():
    k, v, q, kn, vn = _data(80, seed=9)
    k2, v2, *_ = _data(50, seed=10)
    dec = _decoder()
    for layer in range(2):
        dec.prefill(layer, k, v, seq=1)
        dec.decode(layer, q, kn, vn, seq=1)
    dec.reset(1)
    assert [dec.length(layer, 1) for layer in range(2)] == [0, 0]
    with pytest.raises(ValueError, match="is empty"):
        dec.select(0, q, seq=1)
    # a reset slot behaves exactly like one of a fresh decoder
    fresh = _decoder()
    dec.prefill(0, k2, v2, seq=1)
    fresh.prefill(0, k2, v2, seq=1)
    np.testing.assert_array_equal(dec.decode(0, q, kn, vn, seq=1), fresh.decode(0, q, kn, vn, seq=1))
    np.testing.assert_array_equal(dec.decode(1, q, kn, vn, seq=1), fresh.decode(1, q, kn, vn, seq=1))
    dec.reset()
    assert dec.length(0, 1) == 0 and dec.stats(0)["seq"].shape == (0,)
    dec.prefill(0, k, v)
    fresh.reset()
    fresh.prefill(0, k, v)
    np.testing.assert_array_equal(dec.decode(0, q, kn, vn), fresh.decode(0, q, kn, vn))


def test_failed_batch_prefill_changes_no_slot():
    k, v, q, kn, vn = _data(30, seed=11)
    dec, ref = _decoder(), _decoder()
    for d in (dec, ref):
        d.prefill(0, k, v, seq=0)
    bad = np.stack([k] * 2)  # [B, N, Hkv, D]
    bad[1, 5, 0, 0] = np.nan
    with pytest.raises(ValueError, match="`keys` contains NaN"):
        dec.prefill(0, bad, np.stack([v] * 2), seq=[1, 0])
    assert dec.length(0, 1) == 0
    np.testing.assert_array_equal(dec.decode(0, q, kn, vn), ref.decode(0, q, kn, vn))
