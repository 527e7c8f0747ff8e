"""The FlashInfer peers' CPU side: page tables, paged caches, query folding, plan/run calls.

FlashInfer runs on CUDA only, so the kernel itself is not run here. What is checked is what we
hand it: the page tables against loops written here, and the attention that FlashInfer's
documented paged-KV semantics (BatchDecodeWithPagedKVCacheWrapper: row r reads pages
indices[indptr[r]:indptr[r+1]], all full but the last, which holds last_page_len[r] entries;
NHD pages [page_size, num_kv_heads, head_dim]; query head i reads KV head i // (Hq / Hkv)) give
over our tables, caches and folded queries, against the float64 attention of conftest. A
stand-in module with that semantics then drives the peers' builders and the e2e cache end to
end (plan arguments, slots, outputs).
"""
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from conftest import bench_inputs as _inputs, ref_attention  # noqa: E402
from tactic.bench import e2e, peers  # noqa: E402




def _mask(b, hkv, n, seed):
    rng = np.random.default_rng(seed)
    mask = rng.random((b, hkv, n)) < 0.2
    mask[0, 0] = False
    mask[0, 0, n - 1] = True       # one token, the last
    if b * hkv > 1:
        mask.reshape(b * hkv, n)[1] = True   # every token
    return mask


def paged_attention(q, k_pages, v_pages, indptr, indices, last_page_len, scale):
    """float64 paged decode as FlashInfer documents it: q [R, Hq, D]; pages [P, S, Hkv, D] (NHD)."""
    q, kp, vp = (np.asarray(x, np.float64) for x in (q, k_pages, v_pages))
    rows, hq, d = q.shape
    hkv, ps = kp.shape[2], kp.shape[1]
    out = np.zeros((rows, hq, d))
    for r in range(rows):
        pages = indices[indptr[r]:indptr[r + 1]]
        if len(pages) == 0:
            continue
        ks = [kp[p, :(last_page_len[r] if i == len(pages) - 1 else ps)] for i, p in enumerate(pages)]
        vs = [vp[p, :(last_page_len[r] if i == len(pages) - 1 else ps)] for i, p in enumerate(pages)]
        k, v = np.concatenate(ks), np.concatenate(vs)    # [T, Hkv, D]
        for h in range(hq):
            kh = h // (hq // hkv)
            logits = k[:, kh] @ q[r, h] * scale
            p = np.exp(logits - logits.max())
            out[r, h] = p @ v[:, kh] / p.sum()
    return out


# ---------------------------------------------------------------------------------- page tables
@pytest.mark.parametrize("b,hkv,n", [(1, 1, 1), (2, 3, 17), (3, 2, 1000)])
def test_selection_page_table_lists_each_kv_heads_selected_rows(b, hkv, n):
    mask = _mask(b, hkv, n, n)
    mask.reshape(b * hkv, n)[-1] = False   # and a head with nothing selected
    t = peers.selection_page_table(mask)
    assert t.page_size == 1 and t.rows == b * hkv
    assert t.indptr.dtype == t.indices.dtype == t.last_page_len.dtype == np.int32
    for bb in range(b):
        for h in range(hkv):
            r = bb * hkv + h
            want = [(bb * hkv + h) * n + pos for pos in range(n) if mask[bb, h, pos]]
            assert t.indices[t.indptr[r]:t.indptr[r + 1]].tolist() == want
            assert t.last_page_len[r] == (1 if want else 0)
    assert t.seq_lens().tolist() == mask.reshape(b * hkv, n).sum(axis=1).tolist()
    # the rows the gather peers read, too
    sel = peers.selection_from_mask(mask, "cpu")
    np.testing.assert_array_equal(t.indices, sel.rows.numpy())


@pytest.mark.parametrize("n,ps", [(1, 16), (15, 16), (16, 16), (17, 16), (1000, 16), (37, 1), (40, 8)])
@pytest.mark.parametrize("seq_pages_extra", [None, 0, 3])
def test_dense_page_table(n, ps, seq_pages_extra):
    b = 3
    pages = -(-n // ps)
    seq_pages = None if seq_pages_extra is None else pages + seq_pages_extra
    t = peers.dense_page_table(b, n, ps, seq_pages)
    stride = pages if seq_pages is None else seq_pages
    assert t.indptr.tolist() == [i * pages for i in range(b + 1)]
    assert t.indices.tolist() == [s * stride + j for s in range(b) for j in range(pages)]
    assert t.last_page_len.tolist() == [n - (pages - 1) * ps] * b
    assert all(1 <= x <= ps for x in t.last_page_len)
    assert t.seq_lens().tolist() == [n] * b
    with pytest.raises(ValueError, match="seq_pages"):
        peers.dense_page_table(b, n, ps, pages - 1)


def test_page_tables_refuse_indices_beyond_int32():
    # 2^31 + 8 token rows (a zero-stride view: nothing this size is allocated)
    huge = np.broadcast_to(np.zeros(1, bool), (4, 8, (1 << 26) + 1))
    with pytest.raises(ValueError, match="int32"):
        peers.selection_page_table(huge)
    peers.selection_page_table(np.broadcast_to(np.zeros(1, bool), (1, 1, 5)))   # a small view is fine
    with pytest.raises(ValueError, match="int32"):
        peers.dense_page_table(1 << 16, 1 << 16, 1)   # 2^32 pages
    with pytest.raises(peers.Unavailable, match="int32"):
        x = torch.empty(4, 8, 1, 1)
        peers.flashinfer_selection([x], [x], [x], [huge])


# ------------------------------------------------------ our tables + caches under FlashInfer's rules
@pytest.mark.parametrize("b,hkv,g,n,d", [(2, 2, 3, 257, 64), (1, 4, 4, 33, 128), (3, 1, 1, 16, 80)])
def test_dense_pages_give_full_attention(b, hkv, g, n, d):
    k, v, q = _inputs(b, hkv, g, n, d, torch.float32, 1)
    ps = 16
    t = peers.dense_page_table(b, n, ps, -(-n // ps) + 2)   # room to append, as e2e has
    kp, vp = peers.dense_paged_cache(k, v, ps, -(-n // ps) + 2)
    assert kp.shape == (b * (-(-n // ps) + 2), ps, hkv, d) and kp.is_contiguous()
    got = paged_attention(q.numpy(), kp.numpy(), vp.numpy(), t.indptr, t.indices, t.last_page_len, d ** -0.5)
    for i in range(b):
        ref, _ = ref_attention(q[i].double().numpy(), k[i].double().numpy().transpose(1, 0, 2),
                               v[i].double().numpy().transpose(1, 0, 2), d ** -0.5)
        np.testing.assert_allclose(got[i], ref, atol=1e-10)


@pytest.mark.parametrize("b,hkv,g,n,d", [(2, 2, 3, 257, 64), (1, 8, 4, 100, 128), (2, 3, 5, 17, 80)])
def test_selection_pages_give_attention_over_the_selection(b, hkv, g, n, d):
    k, v, q = _inputs(b, hkv, g, n, d, torch.float32, 2)
    mask = _mask(b, hkv, n, 3)
    t = peers.selection_page_table(mask)
    kp, vp = peers.selection_paged_cache(k, v)
    assert kp.shape == (b * hkv * n, 1, 1, d) and kp.data_ptr() == k.data_ptr()   # a view, no copy
    qr = peers.kv_head_rows(q, hkv)
    assert qr.shape == (b * hkv, g, d) and qr.data_ptr() == q.data_ptr()
    got = paged_attention(qr.numpy(), kp.numpy(), vp.numpy(), t.indptr, t.indices, t.last_page_len, 0.1)
    got = got.reshape(b, hkv * g, d)     # kv_head_rows undone
    for i in range(b):
        ref, _ = ref_attention(q[i].double().numpy(), k[i].double().numpy().transpose(1, 0, 2),
                               v[i].double().numpy().transpose(1, 0, 2), 0.1, mask=mask[i])
        np.testing.assert_allclose(got[i], ref, atol=1e-10)


# ------------------------------------------- the builders, driven by a stand-in with those rules
class _Wrapper:
    """BatchDecodeWithPagedKVCacheWrapper's documented contract, checked, over paged_attention."""
    runs = []

    def __init__(self, workspace, kv_layout="NHD"):
        assert kv_layout == "NHD" and workspace.dtype == torch.uint8
        self.device = workspace.device
        self.plan_args = None

    def plan(self, indptr, indices, last_page_len, num_qo_heads, num_kv_heads, head_dim, page_size, *,
             pos_encoding_mode="NONE", q_data_type=torch.float16, kv_data_type=None, sm_scale=None):
        for x in (indptr, indices, last_page_len):
            assert isinstance(x, torch.Tensor) and x.dtype == torch.int32 and x.dim() == 1
        assert len(indptr) == len(last_page_len) + 1 and int(indptr[-1]) == len(indices)
        assert indices.device == self.device and num_qo_heads % num_kv_heads == 0
        assert ((last_page_len >= 1) & (last_page_len <= page_size)).all()
        assert pos_encoding_mode == "NONE" and isinstance(q_data_type, torch.dtype)
        self.plan_args = (indptr.clone(), indices.clone(), last_page_len.clone(), num_qo_heads, num_kv_heads,
                          head_dim, page_size, q_data_type, kv_data_type,
                          head_dim ** -0.5 if sm_scale is None else sm_scale)

    def run(self, q, paged_kv_cache, out=None):
        indptr, indices, last, hq, hkv, d, ps, qdt, kvdt, scale = self.plan_args
        k, v = paged_kv_cache
        assert q.shape == (len(last), hq, d) and q.dtype == qdt and k.dtype == (kvdt or qdt)
        assert k.shape[1:] == (ps, hkv, d) and v.shape == k.shape and int(indices.max()) < k.shape[0]
        o = paged_attention(q.float().numpy(), k.float().numpy(), v.float().numpy(), indptr.numpy(),
                            indices.numpy(), last.numpy(), scale)
        out = torch.empty_like(q) if out is None else out
        assert out.shape == q.shape
        out.copy_(torch.from_numpy(o))
        _Wrapper.runs.append(id(self))
        return out


class _FlashInfer:
    __version__ = "stand-in"
    BatchDecodeWithPagedKVCacheWrapper = _Wrapper


@pytest.fixture
def stand_in(monkeypatch):
    monkeypatch.setattr(peers, "flashinfer_module", lambda device: _FlashInfer)
    _Wrapper.runs = []


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float16, 2e-3)])
def test_flashinfer_builders_compute_the_attention_they_claim(stand_in, dtype, tol):
    b, hkv, g, n, d = 2, 2, 3, 100, 64
    slots = [_inputs(b, hkv, g, n, d, dtype, s) for s in range(3)]
    keys, values, queries = ([x[i] for x in slots] for i in range(3))
    masks = [_mask(b, hkv, n, 10 + s) for s in range(3)]
    scale = 0.11
    dense = peers.flashinfer_dense(keys, values, queries, scale=scale)
    sel = peers.flashinfer_selection(keys, values, queries, masks, scale=scale)
    assert dense.extra["plans"] == 1 and sel.extra["plans"] == 3    # one plan, or one per slot
    assert sel.extra["num_kv_heads"] == 1 and sel.extra["num_qo_heads"] == g and sel.extra["page_size"] == 1
    assert dense.extra["page_size"] == 16 and dense.extra["batch_rows"] == b
    for m, masked in ((dense, False), (sel, True)):
        for c in m.calls[::-1]:     # every slot, out of order
            c()
        for s in range(3):
            out = m.outputs[s].double().numpy()
            assert m.outputs[s].shape == (b, hkv * g, d)
            for i in range(b):
                ref, _ = ref_attention(queries[s][i].double().numpy(), keys[s][i].double().numpy().transpose(1, 0, 2),
                                       values[s][i].double().numpy().transpose(1, 0, 2), scale,
                                       mask=masks[s][i] if masked else None)
                np.testing.assert_allclose(out[i], ref, atol=tol, rtol=tol)


def test_flashinfer_peers_say_why_they_cannot_run(monkeypatch):
    k, v, q = _inputs(1, 2, 2, 16, 64, torch.float16, 0)
    monkeypatch.setitem(sys.modules, "flashinfer", None)   # import flashinfer -> ImportError
    with pytest.raises(peers.Unavailable, match="flashinfer not installed: pip install flashinfer-python"):
        peers.flashinfer_dense([k], [v], [q])
    with pytest.raises(peers.Unavailable, match="flashinfer not installed"):
        peers.flashinfer_selection([k], [v], [q], [np.ones((1, 2, 16), bool)])
    monkeypatch.setitem(sys.modules, "flashinfer", _FlashInfer)
    with pytest.raises(peers.Unavailable, match="CUDA only"):
        peers.flashinfer_module("cpu")


def test_flashinfer_run_errors_become_unavailable(stand_in):
    k, v, q = _inputs(1, 2, 2, 16, 64, torch.float16, 0)
    with pytest.raises(peers.Unavailable, match="flashinfer_selection: AssertionError"):
        # q in float32 against an fp16 plan: the stand-in refuses, as the kernel dispatch would
        peers.flashinfer_selection([k], [v], [q.float()], [np.ones((1, 2, 16), bool)])


def test_e2e_flashinfer_cache_matches_dense_sdpa(stand_in):
    shape = e2e.ModelShape(layers=2, hidden=128, hq=4, hkv=2, head_dim=64, ffn=256, vocab=512)
    model = e2e.RandomModel(shape, "float32", "cpu", seed=1)
    runs = {m: e2e.run_method(m, model, 37, 2, "float32", 1.0, warmup=1, steps=3, log=lambda s: None, reps=1)
            for m in ("dense", "dense-flashinfer")}
    a, b = runs["dense-flashinfer"]["logits"], runs["dense"]["logits"]
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=2e-4, rtol=2e-4)
    assert torch.equal(runs["dense-flashinfer"]["tokens"], runs["dense"]["tokens"])
    assert runs["dense-flashinfer"]["read_fraction"] == 1.0
    # planned once per step (not per layer): 4 steps, 2 layers each
    assert len(_Wrapper.runs) == 4 * shape.layers and len(set(_Wrapper.runs)) == 1


def test_sweep_times_and_cross_checks_the_flashinfer_peers(stand_in, tmp_path, capsys):
    import json
    from tactic.bench.__main__ import main
    rc = main(["--device", "cpu", "--workload", "sparse", "--n", "1000", "--batch", "2", "--heads", "8/2",
               "--head-dim", "64", "--target", "0.9", "--series-s", "0.01", "--min-runs", "3", "--max-runs", "3",
               "--out", str(tmp_path), "--tag", "fi", "--no-plot"])
    assert rc == 0
    printed = capsys.readouterr().out
    (path,) = tmp_path.iterdir()
    assert path.name.startswith("cpu-bench-sparse-fi-")
    d = json.loads(path.read_text())
    (row,) = d["rows"]
    assert row["workload"] == "sparse" and d["workloads"] == ["sparse"]
    m = row["methods"]
    for name in ("flashinfer_dense", "flashinfer_selection"):
        assert m[name]["median_us"] > 0 and m[name]["flashinfer_version"] == "stand-in", m[name]
        assert name in row["peers"]["ran"] and d["peers"][name]["ran_rows"] == 1
    assert m["flashinfer_dense"]["read_fraction"] == 1.0 and m["flashinfer_dense"]["bytes"] == m["dense"]["bytes"]
    assert m["flashinfer_selection"]["read_fraction"] == pytest.approx(row["selected_fraction"])
    assert 0 < row["selected_fraction"] < 1
    # the same attention as Tactic's dense policy and as Tactic's step over its own selection
    assert row["checks"]["dense_vs_flashinfer_dense_max_abs"] < 5e-3
    assert row["checks"]["step_vs_flashinfer_selection_max_abs"] < 2e-2
    assert row["check_failures"] == []
    # no SDPA on the CPU: the best dense is FlashInfer's (stand-in), and the table shows it
    assert row["dense_best"]["eager"]["name"] == "flashinfer_dense"
    assert row["speedup_vs_dense_best"]["tactic_step"] > 0
    assert "fi-sel" in printed and "read" in printed
