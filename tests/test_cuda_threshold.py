"""The threshold selection on CUDA (selection_kernel='threshold'; cuda/select_threshold.hpp):
the prior stop rule with whole crossing buckets, the attention reading the chosen clusters in
two passes with no row list. Judged against float64 attention over exactly the tokens it
reports, against the true softmax mass of what each head took, and against the ranked
selection on the same data (it may read more tokens, never fewer on purpose).

Skipped, with the reason, where this build has no CUDA backend or no GPU is visible.
"""
import numpy as np
import pytest

import tactic
from conftest import ATOL, RTOL, capture_graph, ref_attention, require_cuda

torch = require_cuda()

TORCH_DT = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def mixture_keys(n, hkv, d, gen, centres=64):
    """Keys around a few centres, so attention is skewed as in real heads."""
    c = torch.randn(hkv, centres, d, generator=gen)
    c = 4 * c / c.norm(dim=2, keepdim=True)
    idx = torch.randint(0, centres, (hkv, n), generator=gen)
    k = torch.gather(c, 1, idx[:, :, None].expand(hkv, n, d)) + 0.5 * torch.randn(hkv, n, d, generator=gen)
    return k.permute(1, 0, 2).contiguous()


def true_mass(q64, k64, mask, scale):
    """float64 softmax mass of the masked tokens for one query head."""
    logits = k64 @ q64 * scale
    p = np.exp(logits - logits.max())
    return p[mask].sum() / p.sum()


def _kernels(fn):
    from collections import Counter
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return Counter(e.name for e in prof.events() if e.device_type.name == "CUDA")


def assert_attends_unions(data, lens, st, runs, dtype):
    """Each (name, q, out) of `runs` is float64 attention over the union kv_mask reports for
    each sequence b (its first lens[b] tokens of data[b]'s K/V) and KV head."""
    hkv = st["kv_mask"].shape[1]
    for b, ((k, v), n) in enumerate(zip(data, lens)):
        k64, v64 = k[:n].double().numpy(), v[:n].double().numpy()
        d = k64.shape[2]
        for which, qq, oo in runs:
            g = qq.shape[1] // hkv
            for h in range(hkv):
                keep = st["kv_mask"][b, h][:n]
                assert keep.sum() == st["kv_tokens"][b, h]
                ref, _ = ref_attention(qq[b, h * g:(h + 1) * g].double().numpy(), k64[keep][:, h:h + 1],
                                       v64[keep][:, h:h + 1], d ** -0.5)
                np.testing.assert_allclose(oo[b, h * g:(h + 1) * g].double().cpu().numpy(), ref,
                                           atol=ATOL[dtype], rtol=RTOL[dtype], err_msg=f"{which} seq {b} head {h}")


@pytest.mark.parametrize("dtype,g,d", [("float16", 4, 128), ("bfloat16", 8, 64), ("float16", 1, 80),
                                       ("float16", 3, 96), ("bfloat16", 2, 128)])
def test_threshold_attends_exactly_the_tokens_it_reports(dtype, g, d):
    """Across appends and re-clusterings: the output is float64 attention over exactly the
    union kv_mask reports; each head's own tokens (head_mask, head_tokens) lie in the union and
    together make it; the share of heads whose own tokens hold P of the true mass is no lower
    than the ranked selection's on the same steps, at no fewer tokens."""
    gen = torch.Generator().manual_seed(g * 131 + d)
    hkv, n, steps, target = 2, 6000, 20, 0.9
    k = mixture_keys(n + steps, hkv, d, gen).to(TORCH_DT[dtype])
    v = torch.randn(n + steps, hkv, d, generator=gen).to(TORCH_DT[dtype])
    opts = dict(max_tokens=n + steps, dtype=dtype, target=target, stop_rule="prior", recluster_interval=8,
                record_selection=True, device="cuda")
    thr = tactic.SparseDecoder(1, hkv * g, hkv, d, selection_kernel="threshold", **opts)
    ranked = tactic.SparseDecoder(1, hkv * g, hkv, d, selection_kernel="ranked", **opts)
    assert thr.plan["selection_kernel"] == "threshold" and ranked.plan["selection_kernel"] == "ranked"
    for dec in (thr, ranked):
        dec.prefill(0, k[:n].cuda(), v[:n].cuda())
    k64, v64 = k.double().numpy(), v.double().numpy()
    reach = {"thr": 0, "ranked": 0}
    tokens = {"thr": 0, "ranked": 0}
    heads = 0
    for i in range(steps):
        q = (k[n + i].repeat_interleave(g, 0)[None].float() * 3 + torch.randn(1, hkv * g, d, generator=gen))
        q = q.to(TORCH_DT[dtype])
        og = thr.decode(0, q.cuda(), k[n + i][None].cuda(), v[n + i][None].cuda())
        ranked.decode(0, q.cuda(), k[n + i][None].cuda(), v[n + i][None].cuda())
        ctx = n + i + 1
        q64 = q[0].double().numpy()
        for name, dec in (("thr", thr), ("ranked", ranked)):
            st = dec.stats(0)
            np.testing.assert_array_equal(st["kv_tokens"][0], st["kv_mask"][0].sum(1))
            np.testing.assert_array_equal(st["head_tokens"][0], st["head_mask"][0].sum(1))
            assert (0 <= st["est_mass"]).all() and (st["est_mass"] <= 1).all()
            for hq in range(hkv * g):
                mask = st["head_mask"][0, hq][:ctx]
                reach[name] += true_mass(q64[hq], k64[:ctx, hq // g], mask, d ** -0.5) >= target
                tokens[name] += int(mask.sum())
            if name == "thr":
                assert (st["head_tokens"][0] < ctx).any(), "the test must exercise a real selection"
                out = og[0].double().cpu().numpy()
                for h in range(hkv):
                    keep = st["kv_mask"][0, h][:ctx]
                    own = st["head_mask"][0, h * g:(h + 1) * g][:, :ctx]
                    assert (own <= keep).all() and (own.any(0) == keep).all()
                    ref, _ = ref_attention(q64[h * g:(h + 1) * g], k64[:ctx][keep][:, h:h + 1],
                                           v64[:ctx][keep][:, h:h + 1], d ** -0.5)
                    np.testing.assert_allclose(out[h * g:(h + 1) * g], ref, atol=ATOL[dtype], rtol=RTOL[dtype])
        heads += hkv * g
    assert reach["thr"] >= reach["ranked"] - 0.02 * heads, (reach, heads)
    assert reach["thr"] >= 0.9 * heads, (reach, heads)
    assert tokens["thr"] <= 1.5 * tokens["ranked"], tokens


@pytest.mark.parametrize("n,target", [(100, 0.9), (3000, 1.0)])
def test_threshold_reads_everything_where_the_rule_says(n, target):
    """Fewer clusters than min_clusters, or P = 1: every token, and the output equals dense
    float64 attention."""
    gen = torch.Generator().manual_seed(n)
    hkv, g, d = 2, 4, 64
    k = mixture_keys(n + 1, hkv, d, gen).half()
    v = torch.randn(n + 1, hkv, d, generator=gen).half()
    dec = tactic.SparseDecoder(1, hkv * g, hkv, d, max_tokens=n + 1, device="cuda", dtype="float16", target=target,
                               stop_rule="prior", selection_kernel="threshold")
    dec.prefill(0, k[:n].cuda(), v[:n].cuda())
    q = (torch.randn(1, hkv * g, d, generator=gen) * 2).half()
    out = dec.decode(0, q.cuda(), k[n][None].cuda(), v[n][None].cuda())
    st = dec.stats(0)
    assert (st["kv_tokens"] == n + 1).all() and (st["head_tokens"] == n + 1).all(), st
    ref, _ = ref_attention(q[0].double().numpy(), k.double().numpy(), v.double().numpy(), d ** -0.5)
    np.testing.assert_allclose(out[0].double().cpu().numpy(), ref, atol=ATOL["float16"], rtol=RTOL["float16"])


def test_threshold_long_context_takes_several_rounds():
    """A chunk of more than one round of clusters per block (C / 31 > 512: 270K tokens), one
    KV head of 4 query heads: the output is float64 attention over the reported union."""
    gen = torch.Generator().manual_seed(3)
    hkv, g, d, n = 1, 4, 64, 270000
    k = mixture_keys(n + 1, hkv, d, gen, centres=256).half()
    v = torch.randn(n + 1, hkv, d, generator=gen).half()
    dec = tactic.SparseDecoder(1, hkv * g, hkv, d, max_tokens=n + 1, device="cuda", dtype="float16", target=0.9,
                               stop_rule="prior", selection_kernel="threshold", record_selection=True)
    dec.prefill(0, k[:n].cuda(), v[:n].cuda())
    q = (k[n].repeat_interleave(g, 0)[None].float() * 3).half()
    out = dec.decode(0, q.cuda(), k[n][None].cuda(), v[n][None].cuda())[0].double().cpu().numpy()
    st = dec.stats(0)
    keep = st["kv_mask"][0, 0][:n + 1]
    assert 0 < keep.sum() < n, keep.sum()
    np.testing.assert_array_equal(st["kv_tokens"][0], [keep.sum()])
    k64, v64, q64 = k.double().numpy(), v.double().numpy(), q[0].double().numpy()
    ref, _ = ref_attention(q64, k64[keep], v64[keep], d ** -0.5)
    np.testing.assert_allclose(out, ref, atol=ATOL["float16"], rtol=RTOL["float16"])
    for hq in range(g):
        assert true_mass(q64[hq], k64[:, 0], st["head_mask"][0, hq][:n + 1], d ** -0.5) >= 0.85


def test_threshold_batch_of_different_lengths_and_reuse():
    """Three sequences of different lengths in slots 2, 0, 1: float64 attention over each
    reported union; reuse_selection then attends a new query over the same unions (the first
    query again: bit for bit the step's output); a prefill forgets the selection."""
    gen = torch.Generator().manual_seed(11)
    hkv, g, d, dtype = 2, 4, 128, "float16"
    lens = [7000, 1500, 12000]
    dec = tactic.SparseDecoder(1, hkv * g, hkv, d, max_batch=3, max_tokens=13000, device="cuda", dtype=dtype,
                               target=0.85, stop_rule="prior", selection_kernel="threshold", record_selection=True)
    data = []
    for slot, n in zip([2, 0, 1], lens):
        k = mixture_keys(n + 1, hkv, d, gen).half()
        v = torch.randn(n + 1, hkv, d, generator=gen).half()
        dec.prefill(0, k[:n].cuda(), v[:n].cuda(), seq=slot)
        data.append((k, v))
    q = torch.stack([(k[-1].repeat_interleave(g, 0).float() * 3).half() for k, _ in data])
    kn = torch.stack([k[-1] for k, _ in data]).cuda()
    vn = torch.stack([v[-1] for _, v in data]).cuda()
    out = dec.decode(0, q.cuda(), kn, vn, seq=[2, 0, 1])
    st = dec.stats(0)
    again = dec.decode(0, q.cuda(), None, None, seq=[2, 0, 1], reuse_selection=True)
    assert torch.equal(again, out)
    q2 = (torch.randn(3, hkv * g, d, generator=gen) * 2).half()
    out2 = dec.decode(0, q2.cuda(), None, None, seq=[2, 0, 1], reuse_selection=True)
    assert_attends_unions(data, [n + 1 for n in lens], st, (("step", q, out), ("reuse", q2, out2)), dtype)
    dec.prefill(0, data[0][0][:lens[0]].cuda(), data[0][1][:lens[0]].cuda(), seq=2)
    with pytest.raises(ValueError, match="reuse_selection needs a selection"):
        dec.decode(0, q2.cuda(), None, None, seq=[2, 0, 1], reuse_selection=True)


def test_threshold_large_batch_runs_fewer_head_pass_blocks_per_item():
    """48 sequences x 8 KV heads (384 items): the head pass runs a few blocks per item rather
    than the layout's 32, and the rest pass about one per item; the output is still float64
    attention over each reported union, at the step and under reuse_selection."""
    gen = torch.Generator().manual_seed(23)
    bsz, hkv, g, d, dtype = 48, 8, 4, 128, "float16"
    lens = [2500 + 97 * b for b in range(bsz)]
    dec = tactic.SparseDecoder(1, hkv * g, hkv, d, max_batch=bsz, max_tokens=max(lens) + 1, device="cuda",
                               dtype=dtype, target=0.9, stop_rule="prior", selection_kernel="threshold",
                               record_selection=True)
    data = []
    for b, n in enumerate(lens):
        k = mixture_keys(n, hkv, d, gen).half()
        v = torch.randn(n, hkv, d, generator=gen).half()
        dec.prefill(0, k.cuda(), v.cuda(), seq=b)
        data.append((k, v))
    q = torch.stack([(k[-1].repeat_interleave(g, 0).float() * 3).half() for k, _ in data])
    out = dec.decode(0, q.cuda(), None, None)
    st = dec.stats(0)
    q2 = (torch.randn(bsz, hkv * g, d, generator=gen) * 2).half()
    out2 = dec.decode(0, q2.cuda(), None, None, reuse_selection=True)
    assert_attends_unions(data, lens, st, (("step", q, out), ("reuse", q2, out2)), dtype)


def test_threshold_graph_replays_the_step():
    """Captured in a CUDA graph, a replay gives the eager step's output, and follows new q."""
    gen = torch.Generator().manual_seed(5)
    hkv, g, d, n = 8, 4, 128, 20000
    k = mixture_keys(n, hkv, d, gen)
    v = torch.randn(n, hkv, d, generator=gen)
    dec = tactic.SparseDecoder(1, hkv * g, hkv, d, max_tokens=n + 8, device="cuda", dtype="float16", target=0.9,
                               stop_rule="prior", selection_kernel="threshold")
    dec.prefill(0, k.half().cuda(), v.half().cuda())
    q = (torch.randn(1, hkv * g, d, generator=gen) * 2).half().cuda()
    out = torch.empty_like(q)
    graph = capture_graph(lambda: dec.decode(0, q, None, None, out=out))
    eager = out.clone()
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, eager, atol=1e-3, rtol=1e-3)
    q.copy_(q * 0.5)
    graph.replay()
    torch.cuda.synchronize()
    fresh = dec.decode(0, q, None, None)
    torch.testing.assert_close(out, fresh, atol=1e-3, rtol=1e-3)


def test_threshold_step_kernels():
    """The step after prepare_q: score, hist, the two passes and one merge; none of the ranked
    selection's kernels and no row list. (The torch profiler: not under compute-sanitizer.)"""
    gen = torch.Generator().manual_seed(12)
    hkv, g, d, n = 2, 4, 128, 5000
    k = mixture_keys(n, hkv, d, gen).half()
    v = torch.randn(n, hkv, d, generator=gen).half()
    dec = tactic.SparseDecoder(1, hkv * g, hkv, d, max_tokens=n, device="cuda", dtype="float16", target=0.9,
                               stop_rule="prior", selection_kernel="threshold")
    dec.prefill(0, k.cuda(), v.cuda())
    q = (k[n - 1].repeat_interleave(g, 0)[None].float() * 3).half().cuda()
    names = _kernels(lambda: dec.decode(0, q, None, None))
    kernels = {x: c for x, c in names.items() if "tactic" in x and "set_slots" not in x}  # (the slot list's upload)
    assert sum(c for x, c in kernels.items() if "thresh_pass_kernel" in x) == 2, kernels
    assert sum(c for x, c in kernels.items() if "thresh_hist_kernel" in x) == 1, kernels
    assert sum(c for x, c in kernels.items() if "attention_merge" in x) == 1, kernels
    for gone in ("select_head", "select_exact", "select_stop", "build_rows", "chunk_sums", "attention_chunks"):
        assert not any(gone in x for x in kernels), kernels
    assert len(kernels) == 6, kernels  # prepare_q, score, hist, two passes, merge


@pytest.mark.parametrize("opts,match", [(dict(dtype="float32"), "float16 or bfloat16"),
                                        (dict(head_dim=256), "head_dim"),
                                        (dict(stop_rule="certified"), "stop_rule='prior'"),
                                        (dict(group_head=True), "group_head"),
                                        (dict(num_q_heads=32), "8 query heads")])
def test_threshold_refuses_what_it_does_not_fit(opts, match):
    cfg = dict(num_layers=1, num_q_heads=8, num_kv_heads=2, head_dim=64, max_tokens=64, device="cuda",
               dtype="float16", stop_rule="prior")
    cfg.update(opts)
    with pytest.raises(RuntimeError, match=match):
        tactic.SparseDecoder(selection_kernel="threshold", **cfg)
    with pytest.raises(ValueError, match="selection_kernel"):
        tactic.SparseDecoder(selection_kernel="sorted", **dict(cfg, dtype="float16", head_dim=64))


def test_switching_the_selection_kernel_forgets_the_selection():
    """set_kernels(selection_kernel=...) re-plans: the last selection is forgotten (the two
    keep it differently), and the next step attends exactly over what it reports."""
    gen = torch.Generator().manual_seed(9)
    hkv, g, d, n = 2, 4, 64, 3000
    k = mixture_keys(n, hkv, d, gen).half()
    v = torch.randn(n, hkv, d, generator=gen).half()
    dec = tactic.SparseDecoder(1, hkv * g, hkv, d, max_tokens=n, device="cuda", dtype="float16", stop_rule="prior",
                               record_selection=True)
    assert dec.plan["selection_kernel"] == "ranked"
    dec.prefill(0, k.cuda(), v.cuda())
    q = (torch.randn(1, hkv * g, d, generator=gen) * 2).half().cuda()
    dec.decode(0, q, None, None)
    dec.set_kernels(selection_kernel="threshold")
    assert dec.plan["selection_kernel"] == "threshold"
    with pytest.raises(ValueError, match="reuse_selection needs a selection"):
        dec.decode(0, q, None, None, reuse_selection=True)
    out = dec.decode(0, q, None, None)[0].double().cpu().numpy()
    st = dec.stats(0)
    k64, v64, q64 = k.double().numpy(), v.double().numpy(), q[0].double().cpu().numpy()
    for h in range(hkv):
        keep = st["kv_mask"][0, h][:n]
        ref, _ = ref_attention(q64[h * g:(h + 1) * g], k64[keep][:, h:h + 1], v64[keep][:, h:h + 1], d ** -0.5)
        np.testing.assert_allclose(out[h * g:(h + 1) * g], ref, atol=ATOL["float16"], rtol=RTOL["float16"])


def test_group_head_at_one_query_head_per_kv_head_is_no_obstacle():
    """group_head does nothing where each KV head has one query head: the threshold selection
    takes such a decoder (and refuses it from two query heads per KV head on, above)."""
    dec = tactic.SparseDecoder(1, 4, 4, 64, max_tokens=256, device="cuda", dtype="float16", stop_rule="prior",
                               group_head=True, selection_kernel="threshold")
    assert dec.plan["selection_kernel"] == "threshold"


def test_threshold_state_is_allocated_when_the_plan_first_picks_it():
    """A decoder whose plan keeps the ranked selection holds none of the threshold selection's
    memory (its per-layer marks alone are L * B * Hkv * clusters bytes); set_kernels picking the
    threshold selection allocates it then."""
    L, B, hkv, n = 8, 16, 8, 1 << 16
    marks = L * B * hkv * (n // 16)  # cluster_size 16: 8 MiB of marks
    cfg = dict(num_layers=L, num_q_heads=hkv * 4, num_kv_heads=hkv, head_dim=64, max_tokens=n, max_batch=B,
               device="cuda", dtype="float16", stop_rule="prior", cluster_size=16)

    def footprint(**kw):
        torch.cuda.synchronize()
        free0 = torch.cuda.mem_get_info()[0]
        dec = tactic.SparseDecoder(**cfg, **kw)
        torch.cuda.synchronize()
        return dec, free0 - torch.cuda.mem_get_info()[0]

    ranked, ranked_bytes = footprint()
    del ranked
    thresh, thresh_bytes = footprint(selection_kernel="threshold")
    del thresh
    assert thresh_bytes - ranked_bytes >= marks, (ranked_bytes, thresh_bytes, marks)
    dec, _ = footprint()
    free0 = torch.cuda.mem_get_info()[0]
    dec.set_kernels(selection_kernel="threshold")
    torch.cuda.synchronize()
    assert free0 - torch.cuda.mem_get_info()[0] >= marks
    free0 = torch.cuda.mem_get_info()[0]
    dec.set_kernels(selection_kernel="ranked")
    dec.set_kernels(selection_kernel="threshold")  # allocated once, kept
    assert abs(free0 - torch.cuda.mem_get_info()[0]) < marks


def test_threshold_cuda_agrees_with_its_cpu_twin():
    """The CPU reference of the threshold selection (select.cpp's twin, itself checked against
    a float64 model in tests/test_selection_threshold.py) on the same 16-bit K/V and queries:
    per query head the tokens within 5% and the estimated mass within 0.02 for at least 90% of
    heads (CUDA scores against 16-bit centroids on tensor cores, so a cluster near a bucket
    edge may land on either side), and the unions' tokens within 5% in all."""
    gen = torch.Generator().manual_seed(21)
    hkv, g, d, n, target = 4, 4, 128, 12000, 0.9
    k = mixture_keys(n, hkv, d, gen).half()
    v = torch.randn(n, hkv, d, generator=gen).half()
    opts = dict(max_tokens=n, dtype="float16", target=target, stop_rule="prior", share_group=False,
                selection_kernel="threshold", seed=3)
    gpu = tactic.SparseDecoder(1, hkv * g, hkv, d, device="cuda", **opts)
    cpu = tactic.SparseDecoder(1, hkv * g, hkv, d, device="cpu", **opts)
    gpu.prefill(0, k.cuda(), v.cuda())
    cpu.prefill(0, k, v)
    close = heads = 0
    ut = {"gpu": 0, "cpu": 0}
    for step in range(6):
        q = (k[(step * 997) % n].repeat_interleave(g, 0)[None].float() * 2 +
             torch.randn(1, hkv * g, d, generator=gen)).half()
        gpu.decode(0, q.cuda(), None, None)
        cpu.decode(0, q, None, None)
        sg, sc = gpu.stats(0), cpu.stats(0)
        tg, tc = sg["head_tokens"][0].astype(float), sc["head_tokens"][0].astype(float)
        ok = (np.abs(tg - tc) <= 0.05 * tc) & (np.abs(sg["est_mass"][0] - sc["est_mass"][0]) <= 0.02)
        close += int(ok.sum())
        heads += hkv * g
        ut["gpu"] += int(sg["kv_tokens"].sum())
        ut["cpu"] += int(sc["kv_tokens"].sum())
        assert (tc < n).any(), "the test must exercise a real selection"
    assert close >= 0.9 * heads, (close, heads)
    assert abs(ut["gpu"] - ut["cpu"]) <= 0.05 * ut["cpu"], ut


@pytest.mark.parametrize("batch,long_n,short", [(24, 30000, (120, 400)), (220, 0, (120, 400)),
                                                (100, 200000, (20, 60))])
def test_threshold_rest_pass_spreads_uneven_work(batch, long_n, short):
    """The rest pass's blocks are shared out over the (sequence, KV head) pairs by their
    estimated work, at least one per pair (short ones with no clusters among them), so a long
    item gets most of a wave, and with more pairs than a wave exactly one block per pair; the
    head pass runs fewer blocks per pair at these batches. Sequence 0 long with one flat KV head
    (its group reads nearly all of it), the others short: float64 attention over each reported
    union, row counts equal to the unions, and reuse_selection over the same unions."""
    gen = torch.Generator().manual_seed(batch)
    hkv, g, d, dtype = 2, 4, 64, "float16"
    lens = [long_n or 350] + [int(x) for x in torch.randint(*short, (batch - 1,), generator=gen)]
    dec = tactic.SparseDecoder(1, hkv * g, hkv, d, max_batch=batch, max_tokens=max(lens) + 1, device="cuda",
                               dtype=dtype, target=0.9, stop_rule="prior", selection_kernel="threshold",
                               cluster_size=8, min_clusters=4, record_selection=True)
    data = []
    for b, n in enumerate(lens):
        k = mixture_keys(n + 1, hkv, d, gen).half()
        v = torch.randn(n + 1, hkv, d, generator=gen).half()
        dec.prefill(0, k[:n].cuda(), v[:n].cuda(), seq=b)
        data.append((k, v))
    q = torch.stack([(k[-1].repeat_interleave(g, 0).float() * 3).half() for k, _ in data])
    q[0, :g] = (torch.randn(g, d, generator=gen) * 0.01).half()  # KV head 0 of sequence 0: flat
    seq = list(range(batch))
    out = dec.decode(0, q.cuda(), torch.stack([k[-1] for k, _ in data]).cuda(),
                     torch.stack([v[-1] for _, v in data]).cuda(), seq=seq)
    st = dec.stats(0)
    q2 = (torch.randn(batch, hkv * g, d, generator=gen) * 2).half()
    out2 = dec.decode(0, q2.cuda(), None, None, seq=seq, reuse_selection=True)
    if long_n:
        assert st["kv_tokens"][0, 0] > 0.8 * (long_n + 1), st["kv_tokens"][0]
    assert_attends_unions(data, [n + 1 for n in lens], st, (("step", q, out), ("reuse", q2, out2)), dtype)
