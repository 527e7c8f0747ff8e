"""Arrays from numpy and torch are read in place (no copy) and results come back in the
caller's framework; `out=` arrays are written in place."""
import numpy as np
import pytest

import tactic
from conftest import ref_attention, to64

torch = pytest.importorskip("torch")


def _data(fw, dtype="float32", n=200, hkv=2, hq=4, d=64):
    rng = np.random.default_rng(0)
    k = rng.standard_normal((n, hkv, d)).astype(np.float32)
    v = rng.standard_normal((n, hkv, d)).astype(np.float32)
    q = rng.standard_normal((hq, d)).astype(np.float32)
    if fw == "torch":
        tdt = getattr(torch, dtype)
        return torch.from_numpy(q).to(tdt), torch.from_numpy(k).to(tdt), torch.from_numpy(v).to(tdt)
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


@pytest.mark.parametrize("fw", ["numpy", "torch"])
def test_out_is_written_in_place(fw):
    q, k, v = _data(fw)
    mask = np.ones((2, 200), bool)
    out = torch.empty(4, 64) if fw == "torch" else np.empty((4, 64), np.float32)
    ptr = out.data_ptr() if fw == "torch" else out.ctypes.data
    res = tactic.ops.sparse_decode(q, k, v, mask, out=out)
    assert res is out
    assert (out.data_ptr() if fw == "torch" else out.ctypes.data) == ptr
    ref, _ = ref_attention(to64(q), to64(k), to64(v), 1 / 8)
    np.testing.assert_allclose(to64(out), ref, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("fw", ["numpy", "torch"])
def test_strided_views_are_read_without_copy(fw):
    """A non-contiguous view (every other token, a slice of heads) is read through its
    strides: the result equals the reference on the same view. A silent copy of the whole
    base array would not be visible, so also check writes to the base show up."""
    q, k, v = _data(fw, n=400, hkv=4)
    kv_view, vv_view = k[::2, 1:3], v[::2, 1:3]
    mask = np.ones((2, 200), bool)
    out1 = tactic.ops.sparse_decode(q, kv_view, vv_view, mask)
    ref, _ = ref_attention(to64(q), to64(kv_view), to64(vv_view), 1 / 8)
    np.testing.assert_allclose(to64(out1), ref, rtol=1e-4, atol=2e-5)
    v[::2, 1:3] = 0 * v[::2, 1:3] + 1.0  # write through the base array
    out2 = tactic.ops.sparse_decode(q, kv_view, vv_view, mask)
    np.testing.assert_allclose(to64(out2), np.ones((4, 64)), rtol=1e-6)
    assert type(out1) is type(q)


def test_decoder_round_trip_torch_bf16_and_fp16():
    for dtype in (torch.bfloat16, torch.float16):
        q, k, v = _data("torch", dtype=str(dtype).split(".")[1])
        dec = tactic.SparseDecoder(1, 4, 2, 64, max_tokens=201, dtype=dtype, target=1.0)
        dec.prefill(0, k[:199], v[:199])
        out = dec.decode(0, q[None], k[199:], v[199:])
        assert isinstance(out, torch.Tensor) and out.dtype == dtype and out.shape == (1, 4, 64)
        ref, _ = ref_attention(to64(q), to64(k), to64(v), 1 / 8)
        tol = 1.6e-2 if dtype == torch.bfloat16 else 2e-3
        np.testing.assert_allclose(to64(out[0]), ref, rtol=tol, atol=tol)


def test_decode_out_torch_in_place_and_requires_grad():
    q, k, v = _data("torch")
    q = q.clone().requires_grad_(True)
    dec = tactic.SparseDecoder(1, 4, 2, 64, max_tokens=201, dtype="float32", target=1.0)
    dec.prefill(0, k[:199], v[:199])
    out = torch.full((1, 4, 64), float("nan"))
    res = dec.decode(0, q[None], k[199:], v[199:], out=out)
    assert res is out and torch.isfinite(out).all()


def test_numpy_readonly_inputs_are_accepted():
    q, k, v = _data("numpy")
    for a in (q, k, v):
        a.setflags(write=False)
    out = tactic.ops.sparse_decode(q, k, v, np.ones((2, 200), bool))
    assert np.isfinite(out).all()


def test_dlpack_only_object():
    """Any object exposing __dlpack__ works through the same path."""
    q, k, v = _data("torch")

    class Capsule:
        def __init__(self, t):
            self.t = t

        def __dlpack__(self, **kw):
            return self.t.__dlpack__(**kw)

        def __dlpack_device__(self):
            return self.t.__dlpack_device__()

    out = torch.empty(4, 64)
    tactic.ops.sparse_decode(Capsule(q), Capsule(k), Capsule(v), np.ones((2, 200), bool), out=out)
    ref, _ = ref_attention(to64(q), to64(k), to64(v), 1 / 8)
    np.testing.assert_allclose(to64(out), ref, rtol=1e-4, atol=2e-5)


def test_import_order_with_torch():
    """`import tactic` before `import torch` must work in a fresh interpreter (the module once
    exported its static CUDA runtime's symbols, and torch's import crashed)."""
    import subprocess
    import sys
    pytest.importorskip("torch")
    r = subprocess.run([sys.executable, "-c", "import tactic, torch; print(tactic.__version__)"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
