"""JAX arrays on the CPU: float32, float16 and bfloat16 read in place through DLPack, results
back as JAX arrays, compared with float64 NumPy references; what cannot work (writing into a
JAX array, traced values, 64-bit floats, arrays sharded over devices) raises a TypeError that
names the argument."""
import os
import subprocess
import sys

import numpy as np
import pytest

import tactic
from conftest import ATOL, RTOL, ref_attention

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
ml_dtypes = pytest.importorskip("ml_dtypes")

DTYPES = ["float32", "float16", "bfloat16"]
HQ, HKV, D = 6, 2, 64


def jmake(shape, dtype, rng, scale=1.0):
    """A JAX CPU array of `dtype` and its exact float64 values after rounding to that dtype."""
    x = jnp.asarray(rng.standard_normal(shape).astype(np.float32) * scale, dtype=dtype)
    return x, np.asarray(x).astype(np.float64)


def to64(x):
    return np.asarray(x).astype(np.float64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_inputs_are_read_in_place(dtype):
    """The core sees the JAX buffer itself (same address), with the right element type."""
    x, _ = jmake((50, HKV, D), dtype, np.random.default_rng(0))
    info = tactic._core.view_info(x)
    assert info["data"] == x.unsafe_buffer_pointer()
    assert info["dtype"] == dtype and info["device"] == "cpu" and info["shape"] == (50, HKV, D)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 17, 300])
def test_decoder_round_trip(dtype, n):
    """prefill + decode at P = 1 with JAX arrays: a JAX output of q's dtype equal to float64
    attention over the prompt and the appended token."""
    rng = np.random.default_rng(n)
    k, k64 = jmake((n + 1, HKV, D), dtype, rng)
    v, v64 = jmake((n + 1, HKV, D), dtype, rng)
    q, q64 = jmake((1, HQ, D), dtype, rng)
    dec = tactic.SparseDecoder(1, HQ, HKV, D, max_tokens=n + 1, dtype=dtype, target=1.0)
    dec.prefill(0, k[:n], v[:n])
    out = dec.decode(0, q, k[n:], v[n:])
    assert isinstance(out, jax.Array) and out.dtype == jnp.dtype(dtype) and out.shape == (1, HQ, D)
    ref, _ = ref_attention(q64[0], k64, v64, D ** -0.5)
    np.testing.assert_allclose(to64(out[0]), ref, rtol=RTOL[dtype], atol=ATOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_batched_prefill_with_lengths(dtype):
    rng = np.random.default_rng(1)
    lens = [40, 9]
    k, k64 = jmake((2, 40, HKV, D), dtype, rng)
    v, v64 = jmake((2, 40, HKV, D), dtype, rng)
    q, q64 = jmake((2, HQ, D), dtype, rng)
    dec = tactic.SparseDecoder(1, HQ, HKV, D, max_batch=2, max_tokens=40, dtype=dtype, target=1.0)
    dec.prefill(0, k, v, lengths=lens)
    out = dec.decode(0, q, None, None)
    assert isinstance(out, jax.Array)
    for b, n in enumerate(lens):
        ref, _ = ref_attention(q64[b], k64[b, :n], v64[b, :n], D ** -0.5)
        np.testing.assert_allclose(to64(out[b]), ref, rtol=RTOL[dtype], atol=ATOL[dtype])


def test_sparse_decoding_reads_a_fraction():
    """At P = 0.9 on clustered keys the JAX path selects (reads less than everything) and the
    output stays near the float64 dense attention."""
    rng = np.random.default_rng(2)
    centres = rng.standard_normal((8, HKV, D)) * 3
    k64 = centres[rng.integers(0, 8, 2000)] + 0.3 * rng.standard_normal((2000, HKV, D))
    k = jnp.asarray(k64, dtype=jnp.float32)
    v, v64 = jmake((2000, HKV, D), "float32", rng)
    k64 = to64(k)
    q = jnp.asarray(np.repeat(to64(k[1234]), HQ // HKV, 0)[None], dtype=jnp.float32)
    dec = tactic.SparseDecoder(1, HQ, HKV, D, max_tokens=2000, dtype="float32", target=0.9)
    dec.prefill(0, k, v)
    out = dec.decode(0, q, None, None)
    st = dec.stats(0)
    assert (st["read_fraction"] < 1).all()
    ref, _ = ref_attention(to64(q[0]), k64, v64, D ** -0.5)
    err = np.linalg.norm(to64(out[0]) - ref, axis=1) / np.linalg.norm(ref, axis=1)
    assert err.max() < 0.5


@pytest.mark.parametrize("dtype", DTYPES)
def test_ops(dtype):
    rng = np.random.default_rng(3)
    n = 120
    k, k64 = jmake((n, HKV, D), dtype, rng)
    v, v64 = jmake((n, HKV, D), dtype, rng)
    q, q64 = jmake((HQ, D), dtype, rng)
    mask_np = rng.random((HKV, n)) < 0.4
    out = tactic.ops.sparse_decode(q, k, v, jnp.asarray(mask_np))
    assert isinstance(out, jax.Array) and out.dtype == jnp.dtype(dtype)
    ref, _ = ref_attention(q64, k64, v64, D ** -0.5, mask=mask_np)
    np.testing.assert_allclose(to64(out), ref, rtol=RTOL[dtype], atol=ATOL[dtype])

    out = tactic.ops.dense_decode(q[None], k[None], v[None], lengths=jnp.asarray([77], dtype=jnp.int32))
    ref, _ = ref_attention(q64, k64[:77], v64[:77], D ** -0.5)
    np.testing.assert_allclose(to64(out[0]), ref, rtol=RTOL[dtype], atol=ATOL[dtype])

    sel = tactic.ops.select(q, k, target=1.0)
    assert sel["kv_mask"].all()


def test_kmeans_returns_jax_and_assigns_to_nearest_centroid():
    rng = np.random.default_rng(4)
    x, x64 = jmake((300, 16), "float32", rng)
    r = tactic.ops.kmeans(x, 10, seed=1)
    assert isinstance(r.centroids, jax.Array) and isinstance(r.assign, jax.Array)
    c64 = to64(r.centroids)
    d2 = ((x64[:, None, :] - c64[None]) ** 2).sum(-1)
    assign = np.asarray(r.assign)
    np.testing.assert_allclose(d2[np.arange(300), assign], d2.min(1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(r.inertia[-1], d2.min(1).sum(), rtol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_out_numpy_with_jax_inputs_is_written_in_place(dtype):
    rng = np.random.default_rng(5)
    k, k64 = jmake((64, HKV, D), dtype, rng)
    q, q64 = jmake((HQ, D), dtype, rng)
    out = np.full((HQ, D), np.nan, np.float32)
    res = tactic.ops.sparse_decode(q, k, k, np.ones((HKV, 64), bool), out=out)
    assert res is out
    ref, _ = ref_attention(q64, k64, k64, D ** -0.5)
    np.testing.assert_allclose(out, ref, rtol=RTOL[dtype], atol=ATOL[dtype])


def test_out_jax_is_refused_and_decoder_unchanged():
    rng = np.random.default_rng(6)
    k, _ = jmake((10, HKV, D), "float32", rng)
    q, _ = jmake((1, HQ, D), "float32", rng)
    dec = tactic.SparseDecoder(1, HQ, HKV, D, max_tokens=16, dtype="float32", target=1.0)
    dec.prefill(0, k, k)
    with pytest.raises(TypeError, match="`out` cannot be a JAX array"):
        dec.decode(0, q, k[:1], k[:1], out=jnp.zeros((1, HQ, D)))
    assert dec.length(0) == 10
    with pytest.raises(TypeError, match="`out` cannot be a JAX array"):
        tactic.ops.sparse_decode(q[0], k, k, np.ones((HKV, 10), bool), out=jnp.zeros((HQ, D)))


def test_read_only_buffers_are_accepted():
    """JAX buffers, and numpy views of them (read-only), are inputs like any other."""
    rng = np.random.default_rng(7)
    k, k64 = jmake((30, HKV, D), "float32", rng)
    q, q64 = jmake((HQ, D), "float32", rng)
    kn = np.asarray(k)
    assert not kn.flags.writeable
    assert tactic._core.view_info(kn)["data"] == k.unsafe_buffer_pointer()
    out = tactic.ops.sparse_decode(np.asarray(q), kn, kn, np.ones((HKV, 30), bool))
    ref, _ = ref_attention(q64, k64, k64, D ** -0.5)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=2e-5)


def test_numpy_bfloat16_from_ml_dtypes():
    """numpy's bfloat16 stand-in (ml_dtypes, as JAX hands it out) is read in place as
    bfloat16, and a bfloat16 result comes back in it."""
    rng = np.random.default_rng(8)
    k = rng.standard_normal((40, HKV, D)).astype(ml_dtypes.bfloat16)
    q = rng.standard_normal((HQ, D)).astype(ml_dtypes.bfloat16)
    info = tactic._core.view_info(k)
    assert info["dtype"] == "bfloat16" and info["data"] == k.ctypes.data
    out = tactic.ops.sparse_decode(q, k, k, np.ones((HKV, 40), bool))
    assert isinstance(out, np.ndarray) and out.dtype == ml_dtypes.bfloat16
    ref, _ = ref_attention(q.astype(np.float64), k.astype(np.float64), k.astype(np.float64), D ** -0.5)
    np.testing.assert_allclose(out.astype(np.float64), ref, rtol=RTOL["bfloat16"], atol=ATOL["bfloat16"])


def test_traced_values_are_refused_by_name():
    rng = np.random.default_rng(9)
    k, _ = jmake((10, HKV, D), "float32", rng)

    @jax.jit
    def f(q):
        return tactic.ops.sparse_decode(q, k, k, np.ones((HKV, 10), bool))

    with pytest.raises(TypeError, match="`q` is a traced JAX value.*jax.pure_callback"):
        f(jnp.zeros((HQ, D)))


def test_float64_and_int_inputs_are_refused_by_name():
    rng = np.random.default_rng(10)
    k, _ = jmake((10, HKV, D), "float32", rng)
    mask = np.ones((HKV, 10), bool)
    with pytest.raises(TypeError, match="`q` must be float16, bfloat16 or float32, got int32"):
        tactic.ops.sparse_decode(jnp.zeros((HQ, D), jnp.int32), k, k, mask)
    jax.config.update("jax_enable_x64", True)
    try:
        k64 = jnp.zeros((10, HKV, D), jnp.float64)
        assert k64.dtype == jnp.float64
        with pytest.raises(TypeError, match="`keys` must be float16, bfloat16 or float32, got float64"):
            tactic.ops.sparse_decode(jnp.zeros((HQ, D), jnp.float32), k64, k64, mask)
    finally:
        jax.config.update("jax_enable_x64", False)


def test_objects_without_a_copy_free_import_are_refused_by_name():
    """An exporter that refuses DLPack gets a TypeError naming the argument and its reason,
    not nanobind's anonymous 'incompatible function arguments'."""
    class Refuses:
        dtype = np.dtype("float32")
        shape = (10, HKV, D)

        def __dlpack__(self, **kw):
            raise BufferError("exporter says no")

        def __dlpack_device__(self):
            return (1, 0)

    k, _ = jmake((10, HKV, D), "float32", np.random.default_rng(11))
    with pytest.raises(TypeError, match="`values` cannot be read without a copy.*BufferError: exporter says no"):
        tactic.ops.sparse_decode(jnp.zeros((HQ, D)), k, Refuses(), np.ones((HKV, 10), bool))


def test_array_sharded_over_devices_is_refused_by_name():
    """A JAX array split over two (virtual CPU) devices has no single buffer to read."""
    code = """
import numpy as np, jax, jax.numpy as jnp, tactic
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
mesh = Mesh(np.array(jax.devices()[:2]), ("x",))
k = jax.device_put(jnp.ones((10, 2, 64)), NamedSharding(mesh, P(None, "x")))
try:
    tactic.ops.sparse_decode(jnp.ones((6, 64)), k, k, np.ones((2, 10), bool))
except TypeError as e:
    print("TypeError:", e)
"""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "TypeError: `keys` cannot be read without a copy" in r.stdout
    assert "BufferError" in r.stdout  # the exporter's own reason is passed on
