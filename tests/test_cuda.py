"""The CUDA backend against the float64 reference and against the CPU backend.

The CPU-vs-GPU selection comparisons use stop_rule="prior", whose choices are deterministic
sums that both backends must reproduce cluster for cluster; the certified rule's CUDA port is
judged on its guarantee in test_cuda_certified.py.

Skipped, with the reason, where this build has no CUDA backend or no GPU is visible.
"""
import numpy as np
import pytest

import tactic
from conftest import ATOL, RTOL, capture_graph, fixture_accuracy, ref_attention, require_cuda
from conftest import ranked_decoder as SparseDecoder

torch = require_cuda()

TORCH_DT = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def rand(shape, dtype, gen, scale=1.0):
    x = torch.randn(shape, generator=gen, dtype=torch.float32) * scale
    x = x.to(TORCH_DT[dtype])
    return x, x.double().numpy()


def mixture_keys(n, hkv, d, gen, centres=64):
    """Keys around a few centres, so attention is skewed as in real heads."""
    c = torch.randn(hkv, centres, d, generator=gen)
    c = 4 * c / c.norm(dim=2, keepdim=True)
    idx = torch.randint(0, centres, (hkv, n), generator=gen)
    k = torch.gather(c, 1, idx[:, :, None].expand(hkv, n, d)) + 0.5 * torch.randn(hkv, n, d, generator=gen)
    return k.permute(1, 0, 2).contiguous(), c


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("g", [1, 3, 4, 8, 16])
@pytest.mark.parametrize("d", [64, 80, 128])
@pytest.mark.parametrize("n", [1, 17, 1000, 4097])
def test_dense_matches_reference(dtype, g, d, n):
    gen = torch.Generator().manual_seed(n * 31 + g * 7 + d)
    hkv = 2
    k, k64 = rand((n, hkv, d), dtype, gen)
    v, v64 = rand((n, hkv, d), dtype, gen)
    q, q64 = rand((1, hkv * g, d), dtype, gen)
    kn, kn64 = rand((1, hkv, d), dtype, gen)
    vn, vn64 = rand((1, hkv, d), dtype, gen)
    dec = SparseDecoder(1, hkv * g, hkv, d, max_tokens=n + 1, device="cuda", dtype=dtype, policy="dense")
    dec.prefill(0, k.cuda(), v.cuda())
    out = dec.decode(0, q.cuda(), kn.cuda(), vn.cuda())
    assert out.is_cuda and out.dtype == TORCH_DT[dtype]
    ref, _ = ref_attention(q64[0], np.concatenate([k64, kn64]), np.concatenate([v64, vn64]), d ** -0.5)
    np.testing.assert_allclose(out[0].double().cpu().numpy(), ref, atol=ATOL[dtype], rtol=RTOL[dtype])


def _step_kernels(fn):
    """Launch counts of the kernels fn() runs, by name (torch profiler)."""
    from collections import Counter
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return Counter(e.name for e in prof.events() if e.device_type.name == "CUDA")


def _attention_kernels(fn):
    """Names of the attention chunk kernels that fn() launches."""
    return {n for n in _step_kernels(fn) if "attention_chunks" in n}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("kernel,g,d,mma", [("auto", 8, 128, True), ("auto", 5, 64, True), ("auto", 4, 128, True),
                                            ("auto", 3, 64, True), ("auto", 2, 128, False),
                                            ("tensor_cores", 2, 96, True), ("tensor_cores", 1, 80, True),
                                            ("cuda_cores", 8, 128, False), ("auto", 16, 64, False),
                                            ("auto", 8, 256, False)])
def test_tensor_core_attention_where_it_applies(dtype, kernel, g, d, mma):
    """The tensor-core chunk kernel runs for groups of 3-8 heads with 16-bit K/V and D <= 128
    (attention_kernel='tensor_cores': every group up to 8, also 1-2; 'cuda_cores': never), as
    the plan says, over gathered rows (P = 1 selects every cluster) of two sequences of
    different lengths, and matches float64 attention as tightly as the CUDA-core kernel is
    asked to."""
    gen = torch.Generator().manual_seed(g * 17 + d)
    hkv, lens = 2, (3000, 1234)
    dec = SparseDecoder(1, hkv * g, hkv, d, device="cuda", dtype=dtype, max_batch=2,
                               max_tokens=max(lens) + 1, target=1.0, share_group=False, attention_kernel=kernel)
    assert dec.plan["attention_kernel"] == ("tensor_cores" if mma else "cuda_cores")
    kv = []
    for s_, n in enumerate(lens):
        k, k64 = rand((n, hkv, d), dtype, gen, scale=2.0)
        v, v64 = rand((n, hkv, d), dtype, gen)
        dec.prefill(0, k.cuda(), v.cuda(), seq=s_)
        kv.append((k64, v64))
    q, q64 = rand((2, hkv * g, d), dtype, gen)
    out = {}
    names = _attention_kernels(lambda: out.setdefault("o", dec.decode(0, q.cuda(), None, None, seq=[0, 1])))
    assert any("mma" in n for n in names) == mma, names
    for b, (k64, v64) in enumerate(kv):
        ref, _ = ref_attention(q64[b], k64, v64, d ** -0.5)
        np.testing.assert_allclose(out["o"][b].double().cpu().numpy(), ref, atol=ATOL[dtype], rtol=RTOL[dtype])


@pytest.mark.parametrize("kernel", ["cuda_cores", "tensor_cores"])
def test_large_batch_attention_matches_reference(kernel):
    """8 sequences x 8 KV heads of 3000-5100 rows: kSplits units per item would be far more than
    the GPU runs at once, so the plan lengthens the units (attention_common.cuh, max_units);
    every sequence, short and long, still matches float64 attention."""
    gen = torch.Generator().manual_seed(808)
    b, hkv, g, d = 8, 8, 4, 128
    lens = [3000 + 300 * i for i in range(b)]
    dec = SparseDecoder(1, hkv * g, hkv, d, device="cuda", dtype="float16", max_batch=b,
                               max_tokens=max(lens), policy="dense", attention_kernel=kernel)
    kv = []
    for s_, n in enumerate(lens):
        k, k64 = rand((n, hkv, d), "float16", gen, scale=2.0)
        v, v64 = rand((n, hkv, d), "float16", gen)
        dec.prefill(0, k.cuda(), v.cuda(), seq=s_)
        kv.append((k64, v64))
    q, q64 = rand((b, hkv * g, d), "float16", gen)
    out = dec.decode(0, q.cuda(), None, None, seq=list(range(b)))
    for s_, (k64, v64) in enumerate(kv):
        ref, _ = ref_attention(q64[s_], k64, v64, d ** -0.5)
        np.testing.assert_allclose(out[s_].double().cpu().numpy(), ref, atol=ATOL["float16"], rtol=RTOL["float16"])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("g", [1, 4, 5])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_target_one_matches_reference_across_reclustering(dtype, g, d):
    """P = 1 reads everything: equal to dense attention, also after re-clustering."""
    gen = torch.Generator().manual_seed(g * 13 + d)
    hkv, n, steps = 2, 700, 40
    k, k64 = rand((n + steps, hkv, d), dtype, gen)
    v, v64 = rand((n + steps, hkv, d), dtype, gen)
    dec = SparseDecoder(1, hkv * g, hkv, d, max_tokens=n + steps, device="cuda", dtype=dtype,
                               target=1.0, recluster_interval=16)
    dec.prefill(0, k[:n].cuda(), v[:n].cuda())
    for i in range(steps):
        q, q64 = rand((1, hkv * g, d), dtype, gen)
        out = dec.decode(0, q.cuda(), k[n + i][None].cuda(), v[n + i][None].cuda())
        if i % 9 == 0 or i == steps - 1:
            ref, _ = ref_attention(q64[0], k64[: n + i + 1], v64[: n + i + 1], d ** -0.5)
            np.testing.assert_allclose(out[0].double().cpu().numpy(), ref, atol=ATOL[dtype], rtol=RTOL[dtype])
    assert dec.length(0) == n + steps


@pytest.mark.parametrize("group_head", [False, True])
@pytest.mark.parametrize("g", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("target", [0.5, 0.9, 0.97])
def test_selection_matches_cpu(g, target, group_head):
    """Same keys, same seed: the GPU picks the clusters the CPU picks (share_group off on both),
    also with group_head (the GPU's exact masses then come from the attention pass over the
    group's union, the CPU's from its own float64 sums)."""
    gen = torch.Generator().manual_seed(int(target * 100) + g)
    hkv, d, n, steps = 2, 128, 6000, 6
    k, _ = mixture_keys(n + steps, hkv, d, gen)
    k = k.half()
    v = torch.randn(n + steps, hkv, d, generator=gen).half()
    opts = dict(max_tokens=n + steps, dtype="float16", target=target, share_group=False, stop_rule="prior",
                group_head=group_head)
    cpu = SparseDecoder(1, hkv * g, hkv, d, **opts)
    gpu = SparseDecoder(1, hkv * g, hkv, d, device="cuda", **opts)
    cpu.prefill(0, k[:n], v[:n])
    gpu.prefill(0, k[:n].cuda(), v[:n].cuda())
    same = total = 0
    for i in range(steps):
        q = (k[n + i].repeat_interleave(g, 0)[None].float() * 3 + torch.randn(1, hkv * g, d, generator=gen)).half()
        oc = cpu.decode(0, q, k[n + i][None], v[n + i][None])
        og = gpu.decode(0, q.cuda(), k[n + i][None].cuda(), v[n + i][None].cuda())
        sc, sg = cpu.stats(0), gpu.stats(0)
        same += int((sc["head_tokens"] == sg["head_tokens"]).sum())
        total += sc["head_tokens"].size
        np.testing.assert_allclose(sg["context"], sc["context"])
        if (sc["kv_tokens"] == sg["kv_tokens"]).all():
            np.testing.assert_allclose(og.float().cpu().numpy(), oc.float().numpy(), atol=3e-3, rtol=3e-3)
    # Float sums in another order may move a stop point by one cluster, rarely.
    assert same >= 0.95 * total, f"{same}/{total} heads selected the same token count"


@pytest.mark.parametrize("group_head", [False, True])
def test_batch_selection_matches_cpu(group_head):
    """5 sequences x 8 KV heads x 8 query heads: 320 query heads, more than the one-block
    selection kernels hold at once on a GPU of up to 160 SMs (two per SM), so they run in
    waves; every sequence's heads still pick the CPU's clusters."""
    gen = torch.Generator().manual_seed(515)
    b, hkv, g, d, n = 5, 8, 8, 128, 2500
    opts = dict(max_tokens=n + 1, max_batch=b, dtype="float16", target=0.9, share_group=False, stop_rule="prior",
                group_head=group_head)
    cpu = SparseDecoder(1, hkv * g, hkv, d, **opts)
    gpu = SparseDecoder(1, hkv * g, hkv, d, device="cuda", **opts)
    qs = []
    for s_ in range(b):
        k, _ = mixture_keys(n + 1, hkv, d, gen)
        k = k.half()
        v = torch.randn(n, hkv, d, generator=gen).half()
        cpu.prefill(0, k[:n], v, seq=s_)
        gpu.prefill(0, k[:n].cuda(), v.cuda(), seq=s_)
        qs.append((k[n].repeat_interleave(g, 0).float() * 3 + torch.randn(hkv * g, d, generator=gen)).half())
    q = torch.stack(qs)
    oc = cpu.decode(0, q, None, None, seq=list(range(b)))
    og = gpu.decode(0, q.cuda(), None, None, seq=list(range(b)))
    sc, sg = cpu.stats(0), gpu.stats(0)
    assert sg["head_tokens"].shape == (b, hkv * g)
    same = int((sc["head_tokens"] == sg["head_tokens"]).sum())
    # Float sums in another order may move a stop point by one cluster, rarely.
    assert same >= 0.95 * sc["head_tokens"].size, f"{same}/{sc['head_tokens'].size} heads selected the same token count"
    for s_ in range(b):
        if (sc["kv_tokens"][s_] == sg["kv_tokens"][s_]).all():
            np.testing.assert_allclose(og[s_].float().cpu().numpy(), oc[s_].float().numpy(), atol=3e-3, rtol=3e-3)


def test_real_fixture_accuracy_matches_cpu(fixture_data):
    """Decode of the real SmolLM2 capture: the GPU reaches the CPU's accuracy figures."""
    figures = fixture_accuracy(fixture_data, "prior")
    (rc, uc, _), (rg, ug, _) = figures["cpu"], figures["cuda"]
    assert ug >= 0.9, figures
    assert abs(rg - rc) <= 0.01 and abs(ug - uc) <= 0.02, figures


def test_cupy_and_torch_inputs_are_not_copied():
    cupy = pytest.importorskip("cupy")
    d, hkv, g, n = 64, 2, 2, 300
    dec = SparseDecoder(1, hkv * g, hkv, d, max_tokens=n + 2, device="cuda", dtype="float16", target=1.0)
    k = cupy.random.standard_normal((n, hkv, d)).astype(cupy.float16)
    v = cupy.random.standard_normal((n, hkv, d)).astype(cupy.float16)
    dec.prefill(0, k, v)
    q = cupy.random.standard_normal((1, hkv * g, d)).astype(cupy.float16)
    out = cupy.empty((1, hkv * g, d), dtype=cupy.float16)
    res = dec.decode(0, q, k[:1], v[:1], out=out)
    assert res is out and int(out.data.ptr) == int(res.data.ptr)
    res2 = dec.decode(0, q, k[:1], v[:1])
    assert isinstance(res2, cupy.ndarray)
    tq = torch.randn(1, hkv * g, d, device="cuda", dtype=torch.float16)
    tout = torch.empty_like(tq)
    assert dec.decode(0, tq, None, None, out=tout) is tout
    ref, _ = ref_attention(tq[0].double().cpu().numpy(),
                           np.concatenate([cupy.asnumpy(k), cupy.asnumpy(k[:1]), cupy.asnumpy(k[:1])]).astype(np.float64),
                           np.concatenate([cupy.asnumpy(v), cupy.asnumpy(v[:1]), cupy.asnumpy(v[:1])]).astype(np.float64),
                           d ** -0.5)
    np.testing.assert_allclose(tout[0].double().cpu().numpy(), ref, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("group_head", [False, True])
def test_cuda_graph_replays_the_step(group_head):
    gen = torch.Generator().manual_seed(5)
    hkv, g, d, n = 8, 4, 128, 20000
    k, _ = mixture_keys(n, hkv, d, gen)
    v = torch.randn(n, hkv, d, generator=gen)
    dec = SparseDecoder(1, hkv * g, hkv, d, max_tokens=n + 8, device="cuda", dtype="float16", target=0.9,
                               group_head=group_head)
    dec.prefill(0, k.half().cuda(), v.half().cuda())
    q = (torch.randn(1, hkv * g, d, generator=gen) * 2).half().cuda()
    out = torch.empty_like(q)
    graph = capture_graph(lambda: dec.decode(0, q, None, None, out=out))  # the warm-up uploads the slot list
    eager = out.clone()
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, eager, atol=0, rtol=0)
    q.copy_(q * 0.5)  # new inputs in the same buffer: the replay follows them
    graph.replay()
    torch.cuda.synchronize()
    fresh = dec.decode(0, q, None, None)
    torch.testing.assert_close(out, fresh, atol=0, rtol=0)


def _graph_decoder(n, hkv, g, d, gen, target, **opts):
    k, _ = mixture_keys(n, hkv, d, gen)
    v = torch.randn(n, hkv, d, generator=gen)
    dec = SparseDecoder(1, hkv * g, hkv, d, device="cuda", dtype="float16", target=target, **opts)
    dec.prefill(0, k.half().cuda(), v.half().cuda())
    return dec, k.half(), v.half()


def test_captured_append_replays_like_eager_decodes():
    """decode with k_new / v_new captured once and replayed: each replay appends its token and
    selects as an eager decode of a twin decoder does, the host sees the lengths the replays
    made, and eager decodes after the replays carry on from there."""
    gen = torch.Generator().manual_seed(41)
    hkv, g, d, n, steps = 2, 4, 128, 6000, 10
    opts = dict(max_tokens=n + steps + 8, recluster_interval=64, share_group=False)
    dec, k, v = _graph_decoder(n, hkv, g, d, gen, 0.9, **opts)
    twin = SparseDecoder(1, hkv * g, hkv, d, device="cuda", dtype="float16", target=0.9, **opts)
    twin.prefill(0, k.cuda(), v.cuda())
    inputs = [((k[n // 2 + i].repeat_interleave(g, 0)[None].float() * 2 + torch.randn(1, hkv * g, d, generator=gen))
               .half().cuda(), torch.randn(1, hkv, d, generator=gen).half().cuda(),
               torch.randn(1, hkv, d, generator=gen).half().cuda()) for i in range(steps + 2)]
    q, kn, vn = (x.clone() for x in inputs[0])
    out = torch.empty_like(q)
    graph = capture_graph(lambda: dec.decode(0, q, kn, vn, out=out))  # the warm-up call appends once
    twin.decode(0, *inputs[0])
    assert dec.length(0) == twin.length(0) == n + 1
    for i in range(1, steps + 1):
        for buf, x in zip((q, kn, vn), inputs[i]):
            buf.copy_(x)
        graph.replay()
        expect = twin.decode(0, *inputs[i])
        torch.cuda.synchronize()
        torch.testing.assert_close(out, expect, atol=2e-3, rtol=2e-3)
    assert dec.length(0) == twin.length(0) == n + 1 + steps
    sd, st = dec.stats(0), twin.stats(0)
    np.testing.assert_array_equal(sd["context"], st["context"])
    assert (sd["head_tokens"] < sd["context"][:, None]).any(), "the test must select"
    last = dec.decode(0, *inputs[-1])  # eager after the replays
    torch.testing.assert_close(last, twin.decode(0, *inputs[-1]), atol=2e-3, rtol=2e-3)
    assert dec.length(0) == n + 2 + steps


def test_replayed_append_into_a_full_slot_is_reported():
    """Replays that append past max_tokens store nothing more: the next host call about the
    slot raises CapacityError once, the slot keeps its first max_tokens tokens, and attention
    over them (P = 1) equals the float64 reference."""
    gen = torch.Generator().manual_seed(43)
    hkv, g, d, n = 2, 2, 64, 300
    dec, k, v = _graph_decoder(n, hkv, g, d, gen, 1.0, max_tokens=n + 3, share_group=False)
    news = [(torch.randn(1, hkv, d, generator=gen).half().cuda(), torch.randn(1, hkv, d, generator=gen).half().cuda())
            for _ in range(5)]
    q = torch.randn(1, hkv * g, d, generator=gen).half().cuda()
    kn, vn = (x.clone() for x in news[0])
    out = torch.empty_like(q)
    graph = capture_graph(lambda: dec.decode(0, q, kn, vn, out=out))  # warm-up: token n + 1
    for i in range(1, 5):  # tokens n + 2, n + 3 fit; two more do not
        kn.copy_(news[i][0])
        vn.copy_(news[i][1])
        graph.replay()
    torch.cuda.synchronize()
    with pytest.raises(tactic.CapacityError, match="2 appended token"):
        dec.length(0)
    assert dec.length(0) == n + 3  # reported once; the slot holds its first max_tokens tokens
    with pytest.raises(tactic.CapacityError):
        dec.decode(0, q, *news[0])  # eager: refused on the host
    got = dec.decode(0, q, None, None).double().cpu().numpy()
    kk = torch.cat([k.cuda(), news[0][0], news[1][0], news[2][0]]).double().cpu().numpy()
    vv = torch.cat([v.cuda(), news[0][1], news[1][1], news[2][1]]).double().cpu().numpy()
    ref, _ = ref_attention(q[0].double().cpu().numpy(), kk, vv, d ** -0.5)
    np.testing.assert_allclose(got[0], ref, atol=2e-3, rtol=2e-3)


def test_recluster_between_replays():
    """Replays never re-cluster (the host does not see them); recluster() between replays folds
    the recent tokens the replays appended into the clusters, and the step stays exact at P = 1."""
    gen = torch.Generator().manual_seed(47)
    hkv, g, d, n, steps = 2, 4, 128, 3000, 12
    dec, k, v = _graph_decoder(n, hkv, g, d, gen, 1.0, max_tokens=n + steps + 2, recluster_interval=4,
                               share_group=False)
    q = torch.randn(1, hkv * g, d, generator=gen).half().cuda()
    kn, vn = torch.zeros(1, hkv, d).half().cuda(), torch.zeros(1, hkv, d).half().cuda()
    out = torch.empty_like(q)
    graph = capture_graph(lambda: dec.decode(0, q, kn, vn, out=out))
    ks, vs = [kn.clone()], [vn.clone()]
    for i in range(steps):
        if i == 6:
            dec.recluster(0)
        kn.copy_(torch.randn(1, hkv, d, generator=gen).half())
        vn.copy_(torch.randn(1, hkv, d, generator=gen).half())
        ks.append(kn.clone())
        vs.append(vn.clone())
        graph.replay()
    torch.cuda.synchronize()
    assert dec.length(0) == n + 1 + steps
    kk = torch.cat([k.cuda(), *ks]).double().cpu().numpy()
    vv = torch.cat([v.cuda(), *vs]).double().cpu().numpy()
    ref, _ = ref_attention(q[0].double().cpu().numpy(), kk, vv, d ** -0.5)
    np.testing.assert_allclose(out[0].double().cpu().numpy(), ref, atol=2e-3, rtol=2e-3)


def test_recluster_refuses_capture():
    """recluster() reads the counts on the host, so it cannot be recorded in a graph: it says so
    instead of recording a re-clustering of the counts at capture time."""
    gen = torch.Generator().manual_seed(59)
    hkv, g, d, n = 2, 4, 64, 1000
    dec, _, _ = _graph_decoder(n, hkv, g, d, gen, 0.9, max_tokens=n + 4, share_group=False)
    q = torch.randn(1, hkv * g, d, generator=gen).half().cuda()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        dec.decode(0, q, None, None)
        graph = torch.cuda.CUDAGraph()
        with pytest.raises(RuntimeError, match="between replays"):
            with torch.cuda.graph(graph, stream=stream):
                dec.decode(0, q, None, None)
                dec.recluster(0)
    torch.cuda.synchronize()
    assert dec.length(0) == n


def test_a_captured_step_keeps_its_slots_across_eager_calls():
    """A graph captured for slot 0 replays for slot 0 even after eager steps for slot 1 (the
    device's slot list is part of what the graph records)."""
    gen = torch.Generator().manual_seed(53)
    hkv, g, d, n = 2, 4, 64, 2000
    dec = SparseDecoder(1, hkv * g, hkv, d, device="cuda", dtype="float16", max_batch=2,
                               max_tokens=n + 4, target=0.9, share_group=False)
    for s in (0, 1):
        kk, _ = mixture_keys(n, hkv, d, gen)
        dec.prefill(0, kk.half().cuda(), torch.randn(n, hkv, d, generator=gen).half().cuda(), seq=s)
    q = torch.randn(1, hkv * g, d, generator=gen).half().cuda()
    out = torch.empty_like(q)
    graph = capture_graph(lambda: dec.decode(0, q, None, None, seq=[0], out=out))
    slot0 = dec.decode(0, q, None, None, seq=[0])
    slot1 = dec.decode(0, q, None, None, seq=[1])
    assert not torch.equal(slot0, slot1)
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, slot0, atol=1e-3, rtol=1e-3)


def test_errors_are_clear():
    with pytest.raises(RuntimeError, match="head_dim"):
        SparseDecoder(1, 2, 1, 72, device="cuda")
    dec = SparseDecoder(1, 2, 1, 64, max_tokens=10, device="cuda")
    with pytest.raises((ValueError, TypeError), match="keys"):
        dec.prefill(0, np.zeros((4, 1, 64), np.float16), np.zeros((4, 1, 64), np.float16))
    with pytest.raises(tactic.CapacityError):
        dec.prefill(0, torch.zeros(11, 1, 64, device="cuda", dtype=torch.float16),
                    torch.zeros(11, 1, 64, device="cuda", dtype=torch.float16))
    assert dec.length(0) == 0


def test_no_leak_across_create_destroy():
    torch.cuda.synchronize()
    free0 = torch.cuda.mem_get_info()[0]
    for _ in range(30):
        dec = SparseDecoder(2, 8, 2, 128, max_tokens=4096, device="cuda")
        dec.prefill(0, torch.randn(1000, 2, 128, device="cuda", dtype=torch.float16),
                    torch.randn(1000, 2, 128, device="cuda", dtype=torch.float16))
        del dec
    torch.cuda.synchronize()
    assert torch.cuda.mem_get_info()[0] >= free0 - (8 << 20)


def test_no_decoder_outlives_the_interpreter():
    """The CUDA bad-call cases (decoders held by pytest's tracebacks) in a process of their own
    must end without nanobind's 'leaked instances' report: a reference the bindings never
    release would keep a decoder alive past the extension's teardown and show up there."""
    import os
    import subprocess
    import sys
    here = os.path.dirname(os.path.abspath(__file__))
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          os.path.join(here, "test_cuda_hardening.py"), "-k", "bad_call"],
                         capture_output=True, text=True, timeout=300, cwd=here)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "leaked" not in run.stderr + run.stdout, (run.stdout + run.stderr)[-2000:]


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("n,d", [(17, 64), (4097, 128), (32768, 128)])
def test_ops_kmeans_inertia_matches_cpu(dtype, n, d):
    """GPU k-means from the same seed ends within 1% of the CPU's inertia."""
    gen = torch.Generator().manual_seed(n + d)
    x, _ = mixture_keys(n, 1, d, gen)
    x = x[:, 0].to(TORCH_DT[dtype]).contiguous()
    c = max(1, n // 16)
    cpu = tactic.ops.kmeans(x, c, max_iters=10, seed=3)
    gpu = tactic.ops.kmeans(x.cuda(), c, max_iters=10, seed=3)
    assert gpu.centroids.is_cuda and gpu.assign.is_cuda
    assert gpu.centroids.shape == (c, d) and gpu.assign.shape == (n,)
    assert int(gpu.assign.min()) >= 0 and int(gpu.assign.max()) < c
    # inertia recomputed here in float64 from what the GPU returned
    x64 = x.double()
    cent = gpu.centroids.double().cpu()
    mine = float(((x64 - cent[gpu.assign.long().cpu()]) ** 2).sum())
    assert abs(mine - gpu.inertia[-1]) <= 1e-3 * mine + 1e-6
    assert abs(gpu.inertia[-1] - cpu.inertia[-1]) <= 0.01 * cpu.inertia[-1] + 1e-6


def test_batch_of_different_lengths():
    gen = torch.Generator().manual_seed(11)
    hkv, g, d, lens = 2, 4, 128, [3000, 517, 1]
    B, N = len(lens), max(lens)
    k, _ = mixture_keys(B * N, hkv, d, gen)
    k = k.reshape(B, N, hkv, d).permute(0, 2, 1, 3).half()  # [B, Hkv, N, D]
    v = torch.randn(B, hkv, N, d, generator=gen).half()
    for target in (1.0, 0.9):
        dec = SparseDecoder(1, hkv * g, hkv, d, max_batch=4, max_tokens=N + 4, device="cuda",
                                   dtype="float16", target=target)
        dec.prefill(0, k.cuda().transpose(1, 2), v.cuda().transpose(1, 2), seq=[2, 0, 1], lengths=lens)
        q = torch.randn(B, hkv * g, d, generator=gen).half()
        kn = torch.randn(B, hkv, d, generator=gen).half()
        vn = torch.randn(B, hkv, d, generator=gen).half()
        out = dec.decode(0, q.cuda(), kn.cuda(), vn.cuda(), seq=[2, 0, 1]).double().cpu().numpy()
        st = dec.stats(0)
        assert list(st["context"]) == [n + 1 for n in lens]
        for b, n in enumerate(lens):
            kk = torch.cat([k[b, :, :n].permute(1, 0, 2), kn[b][None]]).double().numpy()
            vv = torch.cat([v[b, :, :n].permute(1, 0, 2), vn[b][None]]).double().numpy()
            ref, p = ref_attention(q[b].double().numpy(), kk, vv, d ** -0.5)
            if target == 1.0:
                np.testing.assert_allclose(out[b], ref, atol=2e-3, rtol=2e-3)
            else:
                err = np.linalg.norm(out[b] - ref, axis=1) / np.linalg.norm(ref, axis=1)
                assert np.median(err) < 0.2, err


@pytest.mark.parametrize("n", [40000, 120000])
def test_selection_matches_cpu_long_context(n):
    """Thousands of clusters (the histogram selection's buckets hold many): GPU picks = CPU picks."""
    gen = torch.Generator().manual_seed(n)
    hkv, g, d, steps = 1, 8, 128, 3
    k, _ = mixture_keys(n + steps, hkv, d, gen, centres=256)
    k = k.half()
    v = torch.randn(n + steps, hkv, d, generator=gen).half()
    opts = dict(max_tokens=n + steps, dtype="float16", target=0.9, share_group=False, stop_rule="prior")
    cpu = SparseDecoder(1, hkv * g, hkv, d, **opts)
    gpu = SparseDecoder(1, hkv * g, hkv, d, device="cuda", **opts)
    cpu.prefill(0, k[:n], v[:n])
    gpu.prefill(0, k[:n].cuda(), v[:n].cuda())
    same = total = 0
    for i in range(steps):
        q = (k[n + i].repeat_interleave(g, 0)[None].float() * 2 + torch.randn(1, hkv * g, d, generator=gen)).half()
        oc = cpu.decode(0, q, k[n + i][None], v[n + i][None])
        og = gpu.decode(0, q.cuda(), k[n + i][None].cuda(), v[n + i][None].cuda())
        sc, sg = cpu.stats(0), gpu.stats(0)
        assert (sg["head_tokens"] < sg["context"][:, None]).any(), "the test must exercise a real selection"
        same += int((sc["head_tokens"] == sg["head_tokens"]).sum())
        total += sc["head_tokens"].size
        if (sc["kv_tokens"] == sg["kv_tokens"]).all():
            np.testing.assert_allclose(og.float().cpu().numpy(), oc.float().numpy(), atol=3e-3, rtol=3e-3)
    assert same >= 0.9 * total, f"{same}/{total} heads selected the same token count"


def _selection_kernels(fn):
    """Names of the select_head / select_stop kernels that fn() launches."""
    return {n for n in _step_kernels(fn) if "select_head" in n or "select_stop" in n}


@pytest.mark.parametrize("split,group_head", [(None, False), (2, False), (None, True), (2, True)])
def test_pdl_launches_match_plain_launches(split, group_head):
    """The step's kernels launched with programmatic dependent launch (the default on sm_90:
    each kernel waits for its predecessor in its first instruction) give bit for bit what plain
    launches give (pdl=False), on a batch of two contexts of different lengths, with and
    without the split selection kernels, across appends. Where the kernels lack sm_90 code,
    asking for PDL or the split is refused and the automatic plan has neither."""
    gen = torch.Generator().manual_seed(61)
    hkv, g, d, lens = 2, 4, 128, (20000, 9000)
    opts = dict(device="cuda", dtype="float16", max_batch=2, max_tokens=max(lens) + 8, target=0.9, share_group=False,
                group_head=group_head)
    sm90 = tactic.build_info()["devices"][0]["kernel_arch"] >= 90
    if not sm90:
        with pytest.raises(RuntimeError, match="sm_90"):
            SparseDecoder(1, hkv * g, hkv, d, pdl=True, **opts)
        if split:
            with pytest.raises(RuntimeError, match="sm_90"):
                SparseDecoder(1, hkv * g, hkv, d, head_split=split, **opts)
            return
    dec = SparseDecoder(1, hkv * g, hkv, d, head_split=split, **opts)
    assert dec.plan["pdl"] == sm90
    if split:
        assert dec.plan["head_split"] == [split, split]
    pdl = [False, True] if sm90 else [False, False]
    for s_, n in enumerate(lens):
        kk, _ = mixture_keys(n, hkv, d, gen)
        dec.prefill(0, kk.half().cuda(), torch.randn(n, hkv, d, generator=gen).half().cuda(), seq=s_)
    for step in range(4):
        q = torch.randn(2, hkv * g, d, generator=gen).half().cuda()
        dec.set_kernels(head_split=split, pdl=pdl[0])
        plain = dec.decode(0, q, None, None, seq=[0, 1])
        dec.set_kernels(head_split=split, pdl=pdl[1])
        early = dec.decode(0, q, None, None, seq=[0, 1])
        assert torch.equal(plain, early), f"step {step}"
        assert torch.isfinite(early).all()
        kn = torch.randn(2, hkv, d, generator=gen).half().cuda()
        dec.set_kernels(head_split=split, pdl=pdl[step % 2])
        dec.decode(0, q, kn, kn, seq=[0, 1])
    assert dec.length(0, 0) == lens[0] + 4 and dec.length(0, 1) == lens[1] + 4


@pytest.mark.parametrize("kwargs,err", [(dict(head_split=3), ValueError), (dict(head_split=0), ValueError),
                                        (dict(pdl="yes"), TypeError), (dict(attention_kernel="mma"), ValueError)])
def test_bad_kernel_option_fails_before_anything_changes(kwargs, err):
    """A bad kernel option is refused at construction and by set_kernels, whose failure keeps
    the plan as it was; the next step sees the context it would have seen."""
    gen = torch.Generator().manual_seed(3)
    with pytest.raises(err):
        SparseDecoder(1, 4, 2, 64, device="cuda", max_tokens=400, dtype="float16", **kwargs)
    k = torch.randn(1, 300, 2, 64, generator=gen).half().cuda()
    dec = SparseDecoder(1, 4, 2, 64, device="cuda", max_batch=1, max_tokens=400, dtype="float16")
    dec.prefill(0, k, k)
    before = dec.plan
    with pytest.raises(err):
        dec.set_kernels(**kwargs)
    assert dec.plan == before
    q = torch.randn(1, 4, 64, generator=gen).half().cuda()
    kn = torch.randn(1, 2, 64, generator=gen).half().cuda()
    dec.decode(0, q, kn, kn)
    assert dec.length(0) == 301
    assert (dec.stats(0)["context"] == 301).all()


@pytest.fixture(scope="module")
def split_case():
    """Inputs of the split-selection test and what every parametrization compares with,
    computed once (the CPU decoder's k-means over 136K tokens dominated the test's time): the
    CPU backend's output and stats at P = 0.9 and the float64 reference at P = 1."""
    gen = torch.Generator().manual_seed(29)
    hkv, g, d, lens = 2, 4, 128, [70000, 66000, 5]
    B, N = len(lens), max(lens)
    k, _ = mixture_keys(B * N, hkv, d, gen, centres=256)
    k = k.reshape(B, N, hkv, d).permute(0, 2, 1, 3).half()  # [B, Hkv, N, D]
    v = torch.randn(B, hkv, N, d, generator=gen).half()
    q = (k[:, :, N // 3].repeat_interleave(g, 1).float() * 2 + torch.randn(B, hkv * g, d, generator=gen)).half()
    kn = torch.randn(B, hkv, d, generator=gen).half()
    vn = torch.randn(B, hkv, d, generator=gen).half()
    case = dict(hkv=hkv, g=g, d=d, lens=lens, N=N, k=k, v=v, q=q, kn=kn, vn=vn, seq=[1, 2, 0])
    cpu = SparseDecoder(1, hkv * g, hkv, d, max_batch=3, max_tokens=N + 4, dtype="float16", target=0.9,
                               share_group=False, stop_rule="prior")
    cpu.prefill(0, k.transpose(1, 2), v.transpose(1, 2), seq=case["seq"], lengths=lens)  # token-major views
    case["cpu_out"] = cpu.decode(0, q, kn, vn, seq=case["seq"])
    case["cpu_stats"] = cpu.stats(0)
    cpu = SparseDecoder(1, hkv * g, hkv, d, max_batch=3, max_tokens=N + 4, dtype="float16", target=0.9,
                               share_group=False, stop_rule="prior", group_head=True)
    cpu.prefill(0, k.transpose(1, 2), v.transpose(1, 2), seq=case["seq"], lengths=lens)
    case["cpu_group_out"] = cpu.decode(0, q, kn, vn, seq=case["seq"])
    case["cpu_group_stats"] = cpu.stats(0)
    case["ref"] = []
    for b, n in enumerate(lens):
        kk = torch.cat([k[b, :, :n].permute(1, 0, 2), kn[b][None]]).double().numpy()
        vv = torch.cat([v[b, :, :n].permute(1, 0, 2), vn[b][None]]).double().numpy()
        case["ref"].append(ref_attention(q[b].double().numpy(), kk, vv, d ** -0.5)[0])
    return case


@pytest.mark.parametrize("group_head", [False, True])
@pytest.mark.parametrize("split", [1, 2, 4, None])
def test_split_selection_over_a_batch_matches_cpu(split, group_head, split_case):
    """Heads with thousands of clusters run select_head / select_stop as thread-block clusters
    of 2 or 4 blocks (sm_90, cmax >= 16384; head_split= forces the size, None lets the plan
    choose): a batch of different lengths, including one too short to select, picks what the
    CPU picks, and P = 1 on the same path equals the float64 reference."""
    if split in (2, 4) and not tactic.build_info()["devices"][0]["thread_block_clusters"]:
        pytest.skip("thread-block clusters need sm_90 kernels")
    c = split_case
    hkv, g, d, lens, N, seq = c["hkv"], c["g"], c["d"], c["lens"], c["N"], c["seq"]
    k, v, q, kn, vn = (c[x].cuda() for x in ("k", "v", "q", "kn", "vn"))
    B = len(lens)
    for target in (0.9, 1.0):
        opts = dict(max_batch=3, max_tokens=N + 4, dtype="float16", target=target, share_group=False,
                    stop_rule="prior", group_head=group_head)
        gpu = SparseDecoder(1, hkv * g, hkv, d, device="cuda", head_split=split, **opts)
        if split is not None:
            assert gpu.plan["head_split"][B - 1] == split
        gpu.prefill(0, k.transpose(1, 2), v.transpose(1, 2), seq=seq, lengths=lens)
        out = []
        names = _selection_kernels(lambda: out.append(gpu.decode(0, q, kn, vn, seq=seq)))
        og = out[0]
        if split is not None:  # the forced path is the one that ran
            split_ran = any("split" in n for n in names)
            assert split_ran == (split != 1) and len(names) == 2, names
        sg = gpu.stats(0)
        np.testing.assert_allclose(sg["context"], [n + 1 for n in lens])
        if target == 1.0:
            out = og.double().cpu().numpy()
            for b in range(B):
                np.testing.assert_allclose(out[b], c["ref"][b], atol=2e-3, rtol=2e-3)
            assert (sg["head_tokens"] == sg["context"][:, None]).all()
            continue
        oc, sc = (c["cpu_group_out"], c["cpu_group_stats"]) if group_head else (c["cpu_out"], c["cpu_stats"])
        long = sg["head_tokens"][:2]
        assert (long < sg["context"][:2, None]).any(), "the test must exercise a real selection"
        assert (sg["head_tokens"][2] == lens[2] + 1).all()  # too short to select: everything
        same = int((sc["head_tokens"] == sg["head_tokens"]).sum())
        assert same >= 0.9 * sc["head_tokens"].size, f"{same}/{sc['head_tokens'].size} heads agree"
        for b in range(B):
            if (sc["kv_tokens"][b] == sg["kv_tokens"][b]).all():
                np.testing.assert_allclose(og[b].float().cpu().numpy(), oc[b].float().numpy(), atol=3e-3, rtol=3e-3)


@pytest.mark.parametrize("split", [1, 2])
@pytest.mark.parametrize("case", ["head", "stop"])
def test_an_overflowing_crossing_bucket_is_taken_whole(case, split):
    """Over kCand (512) clusters share one score (their keys are 0 along the only direction the
    query has, and spread 0 leaves the ranking those dot products), so they fall in one
    histogram bucket. Where the exact head's ("head") or the
    stop point's ("stop") crossing bucket is that one, the GPU takes it whole: every token,
    never fewer than the CPU's exact ranking takes (a strict prefix of the bucket there), and the
    output is float64 attention over the whole context."""
    if split == 2 and not tactic.build_info()["devices"][0]["thread_block_clusters"]:
        pytest.skip("thread-block clusters need sm_90 kernels")
    gen = torch.Generator().manual_seed(41)
    hkv, g, d, n = 1, 2, 64, 16000
    # "head": 1% of the tokens hold ~97% of the mass, so the head (2% of tokens) crosses into the
    # flat bucket. "stop": 5% hold ~28%, so the head stays among them and the stop crosses there.
    share, logit = (0.01, 8.0) if case == "head" else (0.05, 2.0)
    c = 32.0  # far from the flat keys: k-means keeps the two kinds in clusters of their own
    k = torch.randn(n, hkv, d, generator=gen)
    k[:, :, 0] = 0.0
    k[torch.rand(n, generator=gen) < share, :, 0] = c
    k = k.half()
    v = torch.randn(n, hkv, d, generator=gen).half()
    q = torch.zeros(1, hkv * g, d)
    q[:, :, 0] = logit * d ** 0.5 / c
    q = q.half()
    opts = dict(max_tokens=n, dtype="float16", target=0.9, share_group=False, stop_rule="prior",
                record_selection=True, spread=0.0)
    cpu = SparseDecoder(1, hkv * g, hkv, d, **opts)
    gpu = SparseDecoder(1, hkv * g, hkv, d, device="cuda", head_split=split, **opts)
    cpu.prefill(0, k, v)
    gpu.prefill(0, k.cuda(), v.cuda())
    cpu.decode(0, q, None, None)
    og = gpu.decode(0, q.cuda(), None, None)
    sc, sg = cpu.stats(0), gpu.stats(0)
    assert (sc["head_tokens"] < n).all(), "the CPU must stop inside the flat bucket"
    assert (sg["head_mask"][0] >= sc["head_mask"][0]).all()
    assert (sg["head_tokens"] == n).all(), sg["head_tokens"]
    ref, _ = ref_attention(q[0].double().numpy(), k.double().numpy(), v.double().numpy(), d ** -0.5)
    np.testing.assert_allclose(og[0].double().cpu().numpy(), ref, atol=ATOL["float16"], rtol=RTOL["float16"])


@pytest.mark.parametrize("g,group_head", [(1, False), (4, False), (8, False), (4, True), (8, True)])
def test_reuse_selection_attends_over_the_last_selection(g, group_head):
    """decode(reuse_selection=True) = float64 attention of a new query over the kept union
    (with group_head: the union pass's rows and the rest's, in one list)."""
    gen = torch.Generator().manual_seed(70 + g)
    hkv, d, n, dtype = 2, 128, 5000, "float16"
    k, _ = mixture_keys(n + 1, hkv, d, gen)
    k = k.half()
    v = torch.randn(n + 1, hkv, d, generator=gen).half()
    dec = SparseDecoder(1, hkv * g, hkv, d, max_tokens=n + 1, device="cuda", dtype=dtype,
                               target=0.8, share_group=False, record_selection=True, group_head=group_head)
    dec.prefill(0, k[:n].cuda(), v[:n].cuda())
    q1 = (k[n].repeat_interleave(g, 0)[None].float() * 3).half().cuda()
    out1 = dec.decode(0, q1, k[n][None].cuda(), v[n][None].cuda())
    again = dec.decode(0, q1, None, None, reuse_selection=True)
    if group_head:  # one pass over the whole list against the step's two merged passes
        torch.testing.assert_close(again, out1, atol=2e-3, rtol=2e-3)
    else:
        assert torch.equal(again, out1)
    st = dec.stats(0)
    assert st["read_fraction"].max() < 0.9, st["read_fraction"]
    q2, q2_64 = rand((1, hkv * g, d), dtype, gen)
    out2 = dec.decode(0, q2.cuda(), None, None, reuse_selection=True).double().cpu().numpy()
    k64, v64 = k.double().numpy(), v.double().numpy()
    for hq in range(hkv * g):
        keep = st["kv_mask"][0, hq // g]
        ref, _ = ref_attention(q2_64[0, hq:hq + 1], k64[keep][:, hq // g:hq // g + 1], v64[keep][:, hq // g:hq // g + 1],
                               d ** -0.5)
        np.testing.assert_allclose(out2[0, hq], ref[0], atol=ATOL[dtype], rtol=RTOL[dtype])
    dec.prefill(0, k[:n].cuda(), v[:n].cuda())  # the slot's rows change: the selection is gone
    with pytest.raises(ValueError, match="reuse_selection needs a selection"):
        dec.decode(0, q2.cuda(), None, None, reuse_selection=True)


def test_target_setter_changes_later_steps():
    gen = torch.Generator().manual_seed(5)
    hkv, g, d, n = 2, 4, 128, 8000
    k, _ = mixture_keys(n, hkv, d, gen)
    dec = SparseDecoder(1, hkv * g, hkv, d, max_tokens=n, device="cuda", dtype="float16",
                               target=0.5, share_group=False)
    dec.prefill(0, k.half().cuda(), k.half().cuda())
    q = (k[n - 1].repeat_interleave(g, 0)[None] * 3).half().cuda()
    low = dec.select(0, q)["head_tokens"].sum()
    dec.target = 0.95
    high = dec.select(0, q)["head_tokens"].sum()
    assert dec.target == 0.95 and high > low, (low, high)
    with pytest.raises(ValueError, match="target"):
        dec.target = 1.5
    assert dec.target == 0.95


@pytest.mark.parametrize("spread", [0.0, 1.0])
def test_ranking_spread_term_matches_cpu(spread):
    """The spread term ranks a wide cluster above a narrow one with a larger q.c on both
    backends (see test_selection.py::test_ranking_adds_the_spread_term for the float64 model)."""
    rng = np.random.default_rng(7)
    d, m = 64, 16
    narrow, wide = np.zeros(d), np.zeros(d)
    narrow[:2], wide[:2] = (1.0, 10.0), (0.5, -10.0)
    keys = np.concatenate([narrow + 0.01 * rng.standard_normal((m, d)),
                           wide + 1.5 * rng.standard_normal((m, d))]).astype(np.float32)[:, None]
    q = np.zeros((1, 1, d), np.float32)
    q[0, 0, 0] = 16.0  # scaled by 1/8: q.c is 2 for the narrow group, about 1 for the wide one
    chosen = {}
    for device in ("cpu", "cuda"):
        dec = SparseDecoder(1, 1, 1, d, max_tokens=2 * m, dtype="float32", device=device,
                                   num_sink=0, min_clusters=1, head_fraction=0.0, target=0.01,
                                   margin=0.0, spread=spread, share_group=False, record_selection=True,
                                   stop_rule="prior")
        kk, qq = torch.from_numpy(keys), torch.from_numpy(q)
        if device == "cuda":
            kk, qq = kk.cuda(), qq.cuda()
        dec.prefill(0, kk, kk)
        chosen[device] = np.flatnonzero(np.asarray(dec.select(0, qq)["head_mask"][0, 0])).tolist()
    want = list(range(m)) if spread == 0 else list(range(m, 2 * m))
    assert chosen["cpu"] == want and chosen["cuda"] == want, chosen


@pytest.mark.parametrize("dtype,g,d", [("float16", 4, 128), ("bfloat16", 8, 64), ("float32", 2, 256),
                                       ("float16", 3, 80), ("bfloat16", 16, 96)])
def test_group_head_attends_exactly_the_tokens_it_reports(dtype, g, d):
    """group_head on CUDA (the exact read is an attention pass over the union of each group's
    exact heads, a second pass reads the rest): across appends
    and a re-clustering the output equals float64 attention over exactly the tokens kv_mask
    reports, each head's tokens include its group's union, and the token counts agree with
    the CPU's group_head selection."""
    gen = torch.Generator().manual_seed(g * 31 + d)
    hkv, n, steps = 2, 5000, 24
    k, _ = mixture_keys(n + steps, hkv, d, gen)
    k = k.to(TORCH_DT[dtype])
    v = torch.randn(n + steps, hkv, d, generator=gen).to(TORCH_DT[dtype])
    opts = dict(max_tokens=n + steps, dtype=dtype, target=0.9, share_group=False, stop_rule="prior",
                group_head=True, recluster_interval=16, record_selection=True)
    gpu = SparseDecoder(1, hkv * g, hkv, d, device="cuda", **opts)
    cpu = SparseDecoder(1, hkv * g, hkv, d, **opts)
    gpu.prefill(0, k[:n].cuda(), v[:n].cuda())
    cpu.prefill(0, k[:n], v[:n])
    k64, v64 = k.double().numpy(), v.double().numpy()
    same = total = 0
    for i in range(steps):
        q = (k[n + i].repeat_interleave(g, 0)[None].float() * 3 + torch.randn(1, hkv * g, d, generator=gen))
        q = q.to(TORCH_DT[dtype])
        og = gpu.decode(0, q.cuda(), k[n + i][None].cuda(), v[n + i][None].cuda())
        cpu.decode(0, q, k[n + i][None], v[n + i][None])
        sg, sc = gpu.stats(0), cpu.stats(0)
        same += int((sg["head_tokens"] == sc["head_tokens"]).sum())
        total += sg["head_tokens"].size
        if i % 6 and i != steps - 1:
            continue
        out = og[0].double().cpu().numpy()
        ctx = n + i + 1
        assert (sg["head_tokens"][0] < ctx).any(), "the test must exercise a real selection"
        np.testing.assert_array_equal(sg["kv_tokens"][0], sg["kv_mask"][0].sum(1))
        q64 = q[0].double().numpy()
        for h in range(hkv):
            keep = sg["kv_mask"][0, h][:ctx]
            heads = sg["head_mask"][0, h * g:(h + 1) * g][:, :ctx]
            assert (heads <= keep).all() and (heads.any(0) == keep).all()
            ref, _ = ref_attention(q64[h * g:(h + 1) * g], k64[:ctx][keep][:, h:h + 1], v64[:ctx][keep][:, h:h + 1],
                                   d ** -0.5)
            np.testing.assert_allclose(out[h * g:(h + 1) * g], ref, atol=ATOL[dtype], rtol=RTOL[dtype])
    assert same >= 0.9 * total, f"{same}/{total} heads selected the CPU's token count"


@pytest.mark.parametrize("group_head", [False, True])
def test_group_head_runs_two_attention_passes(group_head):
    """With group_head the step runs the attention twice (the union, then the rest) and merges
    twice; without it once. (The torch profiler: not under compute-sanitizer.)"""
    gen = torch.Generator().manual_seed(12)
    hkv, g, d, n = 2, 4, 128, 5000
    dec, k, _ = _graph_decoder(n, hkv, g, d, gen, 0.9, max_tokens=n + 1, share_group=False, group_head=group_head)
    q = (k[n - 1].repeat_interleave(g, 0)[None].float() * 3).half().cuda()
    names = _step_kernels(lambda: dec.decode(0, q, None, None))
    passes = 2 if group_head else 1
    assert sum(c for x, c in names.items() if "attention_chunks" in x) == passes, names
    assert sum(c for x, c in names.items() if "attention_merge" in x) == passes, names


def test_group_head_refuses_the_certified_rule_on_cuda():
    with pytest.raises(RuntimeError, match="group_head"):
        SparseDecoder(1, 8, 2, 64, device="cuda", max_tokens=100, dtype="float16", share_group=False,
                             stop_rule="certified", group_head=True)
