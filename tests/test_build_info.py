"""tactic.build_info(): what the build holds, and on a GPU that every kernel feature the step
uses is one the loaded kernels were compiled for (a build for an older architecture runs on a
newer GPU, slower, never with a kernel it lacks)."""
import os

import numpy as np
import pytest

import tactic
from conftest import ref_attention, ranked_decoder as SparseDecoder


def test_build_info_describes_this_build():
    info = tactic.build_info()
    assert info["version"] == tactic.__version__
    assert info["with_cuda"] == tactic.with_cuda and info["with_openmp"] == tactic.with_openmp
    if tactic.with_cuda:
        archs = info["cuda_archs"].split()
        assert archs and all(a.rstrip("-realvirtual").isdigit() for a in archs), info["cuda_archs"]
        assert info["cuda_compiler"]
    else:
        assert info["cuda_archs"] == "" and info["devices"] == []


def _gpu():
    torch = pytest.importorskip("torch")
    if not tactic.with_cuda:
        pytest.skip("this build of tactic has no CUDA backend")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible")
    return torch


def _device():
    return tactic.build_info()["devices"][0]


def test_features_follow_the_compiled_architecture():
    """A feature is on only where the kernels were compiled for it; the warning says when the
    GPU has a feature these kernels lack."""
    _gpu()
    dev = _device()
    arch, cc = dev["kernel_arch"], dev["compute_capability"]
    assert 50 <= arch <= cc, dev
    assert dev["programmatic_dependent_launch"] == (arch >= 90)
    assert dev["thread_block_clusters"] == (arch >= 90)
    assert dev["tensor_core_attention"] == (arch >= 80)
    assert bool(dev["warning"]) == (arch < min(cc, 90)), dev
    assert dev["sm_count"] > 0


def test_default_build_targets_this_gpu():
    """Run by bench/run_gpu.sh after the README's own install (TACTIC_EXPECT_NATIVE=1): the
    default build compiled this GPU's architecture."""
    _gpu()
    if os.environ.get("TACTIC_EXPECT_NATIVE") != "1":
        pytest.skip("set TACTIC_EXPECT_NATIVE=1 after a default build (bench/run_gpu.sh build)")
    dev, archs = _device(), tactic.build_info()["cuda_archs"].split()
    assert str(dev["compute_capability"]) in [a.split("-")[0] for a in archs], (dev, archs)
    assert dev["kernel_arch"] == dev["compute_capability"] and not dev["warning"]


def _kernels(torch, fn):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        out = fn()
        torch.cuda.synchronize()
    return out, {e.name for e in prof.events()}


@pytest.mark.parametrize("n", [8192, 131072])
def test_step_runs_only_kernels_it_was_compiled_for(n):
    """A step at 8K and 128K launches the thread-block-cluster kernels (asked for where the
    kernels have them) only on an sm_90+ build, the tensor-core attention and centroid-score
    kernels only on an sm_80+ one,
    and PDL only on sm_90+; its output matches the float64 reference over the tokens it
    selected (here P = 1: all)."""
    torch = _gpu()
    dev = _device()
    gen = torch.Generator().manual_seed(n)
    hkv, g, d = 2, 4, 128
    k = torch.randn(n + 1, hkv, d, generator=gen).half()
    v = torch.randn(n + 1, hkv, d, generator=gen).half()
    q = torch.randn(1, hkv * g, d, generator=gen).half()
    dec = SparseDecoder(1, hkv * g, hkv, d, max_tokens=n + 1, device="cuda", dtype="float16",
                               target=1.0, share_group=False,
                               head_split=2 if dev["thread_block_clusters"] else None)
    plan = dec.plan
    assert plan["pdl"] == dev["programmatic_dependent_launch"] and plan["kernel_arch"] == dev["kernel_arch"]
    assert plan["attention_kernel"] == ("tensor_cores" if dev["tensor_core_attention"] else "cuda_cores")
    assert plan["sm_count"] == dev["sm_count"]
    dec.prefill(0, k[:n].cuda(), v[:n].cuda())
    out, names = _kernels(torch, lambda: dec.decode(0, q.cuda(), k[n:].cuda(), v[n:].cuda()))
    split = any("split" in s and "select" in s for s in names)
    mma = any("attention_chunks_mma" in s for s in names)
    score_mma = any("score_mma" in s for s in names)  # sm_80 kernels too (mma.sync)
    assert score_mma == dev["tensor_core_attention"], (dev, sorted(names))
    assert plan["score_kernel"] == ("tensor_cores" if dev["tensor_core_attention"] else "cuda_cores")
    assert split == dev["thread_block_clusters"], (dev, sorted(names))
    assert mma == dev["tensor_core_attention"], (dev, sorted(names))
    ref, _ = ref_attention(q[0].double().numpy(), k.double().numpy(), v.double().numpy(), d ** -0.5)
    np.testing.assert_allclose(out[0].double().cpu().numpy(), ref, atol=2e-3, rtol=2e-3)


def test_variants_the_kernels_lack_are_refused():
    """Asking for a kernel variant the loaded kernels were not compiled for is an error at
    construction, naming it; the automatic plan never picks one."""
    _gpu()
    dev = _device()
    opts = dict(max_tokens=64, device="cuda", dtype="float16", share_group=False)
    if not dev["thread_block_clusters"]:
        with pytest.raises(RuntimeError, match="head_split=2"):
            SparseDecoder(1, 8, 2, 128, head_split=2, **opts)
    if not dev["programmatic_dependent_launch"]:
        with pytest.raises(RuntimeError, match="pdl"):
            SparseDecoder(1, 8, 2, 128, pdl=True, **opts)
    if not dev["tensor_core_attention"]:
        with pytest.raises(RuntimeError, match="tensor_cores"):
            SparseDecoder(1, 8, 2, 128, attention_kernel="tensor_cores", **opts)
    auto = SparseDecoder(1, 8, 2, 128, max_batch=4, **opts).plan
    assert auto["pdl"] == dev["programmatic_dependent_launch"]
    assert all(s == 1 for s in auto["head_split"]) or dev["thread_block_clusters"]
    with pytest.raises(RuntimeError, match="tensor_cores"):  # fp32 K/V: no tensor-core kernel
        SparseDecoder(1, 8, 2, 128, attention_kernel="tensor_cores", **{**opts, "dtype": "float32"})
