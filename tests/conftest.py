"""Shared helpers: an independent float64 NumPy reference and input factories."""
import numpy as np
import pytest

try:
    import torch
except ImportError:  # torch is in the `test` extra; tests needing it skip without it
    torch = None

DTYPES = ["float32", "float16", "bfloat16"]
# Output tolerance per storage dtype: inputs are rounded to the dtype first, so the error
# is the fp32 accumulation plus the final rounding of the output to q's dtype.
ATOL = {"float32": 2e-5, "float16": 2e-3, "bfloat16": 1.6e-2}
RTOL = {"float32": 1e-4, "float16": 2e-3, "bfloat16": 1.6e-2}


def require_cuda():
    """For a CUDA test module, at import: skip the whole module unless torch is installed, tactic
    was built with its CUDA backend and a GPU is visible. Returns torch."""
    torch = pytest.importorskip("torch")
    import tactic
    if not tactic.with_cuda:
        pytest.skip("this build of tactic has no CUDA backend (no nvcc at build time)", allow_module_level=True)
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible", allow_module_level=True)
    return torch


def ranked_decoder(*args, **kwargs):
    """tactic.SparseDecoder with the ranked selection unless the call names one: the modules
    that test the ranked selection's machinery (row lists, split selection, its kernels) keep
    testing it where 'auto' would take the threshold selection (test_cuda_threshold's own)."""
    import tactic

    kwargs.setdefault("selection_kernel", "ranked")
    return tactic.SparseDecoder(*args, **kwargs)


def capture_graph(fn):
    """fn() captured once as a CUDA graph on a side stream, after one eager warm-up call whose
    results stay in fn's outputs (capture runs nothing). Returns the graph."""
    import torch
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    return graph


def make(shape, dtype, rng, scale=1.0):
    """A random array of `dtype` (torch for bfloat16, numpy otherwise) and its exact float64
    values after rounding to that dtype."""
    x = rng.standard_normal(shape).astype(np.float32) * scale
    if dtype == "bfloat16":
        if torch is None:
            pytest.skip("bfloat16 inputs need torch")
        t = torch.from_numpy(x).to(torch.bfloat16)
        return t, t.float().double().numpy()
    a = x.astype(dtype)
    return a, a.astype(np.float64)


def to64(x):
    if torch is not None and isinstance(x, torch.Tensor):
        return x.detach().float().double().numpy()
    return np.asarray(x, dtype=np.float64)


def ref_attention(q, k, v, scale, mask=None):
    """float64 attention of q [Hq, D] over k, v [N, Hkv, D]; mask [Hkv, N] optional.
    Returns (out [Hq, D], probs [Hq, N])."""
    hq = q.shape[0]
    hkv = k.shape[1]
    g = hq // hkv
    kk = np.repeat(k.transpose(1, 0, 2), g, axis=0)
    vv = np.repeat(v.transpose(1, 0, 2), g, axis=0)
    logits = np.einsum("hd,hnd->hn", q, kk) * scale
    if mask is not None:
        logits = np.where(np.repeat(mask, g, axis=0), logits, -np.inf)
    m = logits.max(axis=1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    p = np.exp(logits - m)
    z = p.sum(axis=1, keepdims=True)
    p = np.divide(p, z, out=np.zeros_like(p), where=z > 0)
    return np.einsum("hn,hnd->hd", p, vv), p


@pytest.fixture(scope="session")
def fixture_data():
    from tactic.fixtures import load_fixture
    return load_fixture()


def fixture_accuracy(fx, stop_rule, devices=("cpu", "cuda"), target=0.9):
    """The tactic policy over every layer of the SmolLM2 fixture `fx`, per device: (mean read
    fraction, share of KV-head unions reaching `target`, number of unions), against float64
    attention (tactic.evaluate; share_group=False, which CUDA requires)."""
    from tactic.evaluate import accuracy, fixture_layers, kv_union_success, reference, run_policy

    figures = {}
    for device in devices:
        read, union = [], []
        for cap in fixture_layers(fx):
            ref = reference(cap, fx.n_prefill, fx.scale)
            run = run_policy(cap, fx.n_prefill, fx.scale, "tactic", target=target, device=device, share_group=False,
                             stop_rule=stop_rule)
            acc = accuracy(run, ref)
            read.append(acc.read_fraction.ravel())
            union.append(kv_union_success(acc, target, 3).ravel())  # the fixture's 9 / 3 heads
        union = np.concatenate(union)
        figures[device] = (float(np.concatenate(read).mean()), float(union.mean()), len(union))
    return figures


@pytest.fixture(scope="session")
def cmake_cxx():
    """(cmake, C++ compiler) for the tests that build C++ with CMake; skips when either is
    missing. The compiler is $CXX when set, else the first of c++, g++, clang++ on PATH."""
    import os
    import shutil
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not on PATH")
    cxx = os.environ.get("CXX")
    cxx = shutil.which(cxx.split()[0]) if cxx else next(
        (p for p in map(shutil.which, ("c++", "g++", "clang++")) if p), None)
    if cxx is None:
        pytest.skip("no C++ compiler (c++, g++, clang++ or $CXX) on PATH")
    return cmake, cxx


def bench_inputs(b, hkv, g, n, d, dtype, seed):
    """Seeded torch K/V [B, Hkv, N, D] and queries [B, Hq, D] for the bench peers' tests."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(b, hkv, n, d, generator=gen).to(dtype)
    v = torch.randn(b, hkv, n, d, generator=gen).to(dtype)
    q = (2 * torch.randn(b, hkv * g, d, generator=gen)).to(dtype)
    return k, v, q
