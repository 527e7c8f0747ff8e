"""The methods timed side by side, on the same inputs, as lists of zero-argument calls.

Every builder returns a `Method`: one call per rotation slot (slot l reads layer l's KV, see
timing.py) and the [B, Hq, D] output each call writes, so the sweep can cross-check methods.
A method that cannot run here raises `Unavailable` with a readable reason (e.g. a torch SDPA
backend this GPU or dtype lacks); the sweep reports it as n/a.

GQA for torch SDPA, two forms (both timed, the faster is the peer's figure):
- 'gqa': q [B, Hq, 1, D] against K/V [B, Hkv, N, D] with enable_gqa=True;
- 'folded': the G query heads of a KV head become G query rows, q [B, Hkv, G, D], no GQA
  argument needed (legal for decode: every query row sees every key), as FlashInfer does.

FlashInfer (flashinfer-python), its FA2 paged decode kernel (BatchDecodeWithPagedKVCacheWrapper,
CUDA cores), two ways; plan() once outside the timed calls, run() timed:
- 'flashinfer_dense': every token, page size 16, NHD pages [pages, 16, Hkv, D] (a serving
  engine's cache). Built by copying the same K/V once, outside timing.
- 'flashinfer_selection': the same kernel over Tactic's own selection, as the Tactic paper ran
  it: page size 1, one batch row per (sequence, KV head) with that head's G query heads as its
  query heads and num_kv_heads = 1; the page indices are the selected token rows of that KV
  head (stats()['kv_mask']). No copy: K [B, Hkv, N, D] viewed as [B*Hkv*N, 1, 1, D] pages.
The page tables are plain NumPy (dense_page_table, selection_page_table), so the CPU tests
check them against a float64 paged-attention reference.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

SDPA_BACKENDS = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION"}


class Unavailable(Exception):
    """The method cannot run in this setting; the message says why."""


@dataclass
class Method:
    name: str
    calls: List[Callable[[], object]]
    outputs: List[torch.Tensor]  # [B, Hq, D] per slot, valid after that slot's call ran
    note: str = ""
    extra: dict = field(default_factory=dict)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def tactic_step(dec, queries: Sequence[torch.Tensor], outs: Sequence[torch.Tensor], name="tactic_step") -> Method:
    """dec.decode(layer, q, None, None): selection + attention over the stored context, no append."""
    calls = [lambda l=l: dec.decode(l, queries[l], None, None, out=outs[l]) for l in range(len(queries))]
    return Method(name, calls, list(outs), f"SparseDecoder(policy={dec.policy!r}).decode without append")


def tactic_attention(dec, queries, outs) -> Method:
    """Attention alone over the previous decode's selection of each layer (reuse_selection=True).

    Needs a decoder that offers it; probed once on slot 0 (after the caller ran the step there).
    """
    try:
        dec.decode(0, queries[0], None, None, out=outs[0], reuse_selection=True)
    except (TypeError, RuntimeError, ValueError) as e:
        raise Unavailable(f"decode(..., reuse_selection=True) not available: {_first_line(e)}") from e
    calls = [lambda l=l: dec.decode(l, queries[l], None, None, out=outs[l], reuse_selection=True)
             for l in range(len(queries))]
    return Method("tactic_attention", calls, list(outs), "decode(reuse_selection=True): attention over the step's selection")


def _sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend
    return getattr(SDPBackend, SDPA_BACKENDS[name])


def sdpa(backend: str, form: str, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
         queries: Sequence[torch.Tensor]) -> Method:
    """torch SDPA pinned to one backend ('cudnn' or 'flash') over the full K/V [B, Hkv, N, D]."""
    from torch.nn.attention import sdpa_kernel
    if torch.device(keys[0].device).type != "cuda":
        raise Unavailable(f"the {backend} SDPA backend runs on CUDA only")
    be = _sdpa_backend(backend)
    b, hkv, n, d = keys[0].shape
    hq = queries[0].shape[1]
    g = hq // hkv
    outs = [torch.empty_like(q) for q in queries]

    def one(l: int):
        if form == "gqa":
            q4, kw = queries[l][:, :, None, :], {"enable_gqa": True}
        else:
            q4, kw = queries[l].view(b, hkv, g, d), {}
        with sdpa_kernel(be):
            o = F.scaled_dot_product_attention(q4, keys[l], values[l], **kw)
        outs[l].copy_(o.view(b, hq, d))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            one(0)
            torch.cuda.synchronize()
        except RuntimeError as e:
            why = "; ".join(_first_line(w.message) for w in caught) or _first_line(e)
            raise Unavailable(f"SDPA {backend} ({form}): {why}") from e
    calls = [lambda l=l: one(l) for l in range(len(queries))]
    note = (f"torch SDPA, {backend} backend, " +
            ("q [B,Hq,1,D] with enable_gqa=True" if form == "gqa" else "q folded to [B,Hkv,G,D]"))
    return Method(f"sdpa_{backend}_{form}", calls, outs, note)


@dataclass
class Selection:
    """Token positions a KV head attends to, from stats()['kv_mask'] [B, Hkv, N]."""
    rows: torch.Tensor     # flat row indices into K.view(B*Hkv*N, D), grouped by (b, h)
    counts: np.ndarray     # [B, Hkv] tokens per KV head
    offsets: torch.Tensor  # [B*Hkv + 1] cumulative counts (device)


def selection_from_mask(kv_mask: np.ndarray, device) -> Selection:
    b, hkv, n = kv_mask.shape
    flat = kv_mask.reshape(b * hkv, n)
    counts = flat.sum(axis=1)
    rows = np.concatenate([np.flatnonzero(flat[i]) + i * n for i in range(b * hkv)]).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return Selection(torch.from_numpy(rows).to(device), counts.reshape(b, hkv),
                     torch.from_numpy(offsets).to(device))


def gather_sdpa(keys, values, queries, selections: Sequence[Selection]) -> Method:
    """Plain PyTorch: gather the selected rows of each KV head, then SDPA over them (varlen).

    Timed: index_select of the K and V rows + SDPA on nested (jagged) tensors, one entry per
    (sequence, KV head) with its G query heads as G query rows; torch picks the SDPA backend
    (flash or memory-efficient varlen on CUDA, math on the CPU). No padding: each KV head reads
    only its own selection.
    """
    b, hkv, n, d = keys[0].shape
    hq = queries[0].shape[1]
    g = hq // hkv
    dev = keys[0].device
    q_off = torch.arange(b * hkv + 1, device=dev, dtype=torch.int64) * g
    outs = [torch.empty_like(q) for q in queries]
    bounds = [(int(s.counts.min()), int(s.counts.max())) for s in selections]
    nested = torch.nested.nested_tensor_from_jagged

    def one(l: int):
        s = selections[l]
        lo, hi = bounds[l]
        kf = keys[l].reshape(b * hkv * n, 1, d).index_select(0, s.rows)
        vf = values[l].reshape(b * hkv * n, 1, d).index_select(0, s.rows)
        kn = nested(kf, s.offsets, min_seqlen=lo, max_seqlen=hi).transpose(1, 2)
        vn = nested(vf, s.offsets, min_seqlen=lo, max_seqlen=hi).transpose(1, 2)
        qn = nested(queries[l].reshape(b * hq, 1, d), q_off, min_seqlen=g, max_seqlen=g).transpose(1, 2)
        o = F.scaled_dot_product_attention(qn, kn, vn)
        outs[l].copy_(o.transpose(1, 2).values().view(b, hq, d))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nested tensors warn that they are a prototype
        try:
            one(0)
        except (RuntimeError, NotImplementedError, TypeError) as e:
            raise Unavailable(f"gather + nested SDPA: {_first_line(e)}") from e

    def quiet(l):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            one(l)
    calls = [lambda l=l: quiet(l) for l in range(len(queries))]
    return Method("gather_sdpa", calls, outs, "index_select of the selected rows + SDPA on jagged nested tensors")


def gather_sdpa_padded(keys, values, queries, selections: Sequence[Selection]) -> Method:
    """Plain PyTorch, padded: gather every KV head's selection into [B, Hkv, M, D] (M = the
    largest selection, rounded up to 16) and run SDPA with a boolean mask; torch picks the
    backend. Every KV head pays for the largest one (dense heads make M large)."""
    b, hkv, n, d = keys[0].shape
    hq = queries[0].shape[1]
    g = hq // hkv
    dev = keys[0].device
    idx, masks = [], []
    for s in selections:
        m = int(-(-int(s.counts.max()) // 16) * 16)
        rows = np.zeros((b * hkv, m), np.int64)
        mask = np.zeros((b * hkv, m), bool)
        off = s.offsets.cpu().numpy()
        flat = s.rows.cpu().numpy()
        for i in range(b * hkv):
            c = off[i + 1] - off[i]
            rows[i, :c] = flat[off[i]:off[i + 1]]
            rows[i, c:] = i * n  # padding reads the sink row, masked out below
            mask[i, :c] = True
        idx.append(torch.from_numpy(rows.reshape(-1)).to(dev))
        masks.append(torch.from_numpy(mask.reshape(b, hkv, 1, m)).to(dev).expand(b, hkv, g, m))
    outs = [torch.empty_like(q) for q in queries]

    def one(l: int):
        m = masks[l].shape[-1]
        kf = keys[l].reshape(b * hkv * n, d).index_select(0, idx[l]).view(b, hkv, m, d)
        vf = values[l].reshape(b * hkv * n, d).index_select(0, idx[l]).view(b, hkv, m, d)
        o = F.scaled_dot_product_attention(queries[l].view(b, hkv, g, d), kf, vf, attn_mask=masks[l])
        outs[l].copy_(o.view(b, hq, d))

    try:
        one(0)
    except RuntimeError as e:
        raise Unavailable(f"gather + padded SDPA: {_first_line(e)}") from e
    calls = [lambda l=l: one(l) for l in range(len(queries))]
    return Method("gather_sdpa_padded", calls, outs, "index_select into [B,Hkv,M,D] padded + SDPA with a mask",
                  {"padded_rows": [int(m.shape[-1]) for m in masks]})


# ---------------------------------------------------------------------------------- FlashInfer
FLASHINFER_INSTALL = "pip install flashinfer-python"
FLASHINFER_WORKSPACE_BYTES = 128 << 20   # FlashInfer's recommended float workspace (split-KV partials)
INT32_MAX = 2**31 - 1


def flashinfer_module(device):
    """The flashinfer package, or Unavailable saying why it cannot run here."""
    try:
        import flashinfer
    except ImportError as e:
        raise Unavailable(f"flashinfer not installed: {FLASHINFER_INSTALL} ({_first_line(e)})") from e
    except Exception as e:  # a broken install can fail at import with anything
        raise Unavailable(f"flashinfer failed to import: {type(e).__name__}: {_first_line(e)}") from e
    if not hasattr(flashinfer, "BatchDecodeWithPagedKVCacheWrapper"):
        raise Unavailable(f"flashinfer {getattr(flashinfer, '__version__', '?')} has no "
                          "BatchDecodeWithPagedKVCacheWrapper")
    if torch.device(device).type != "cuda":
        raise Unavailable("FlashInfer runs on CUDA only")
    return flashinfer


@dataclass
class PageTable:
    """A FlashInfer page table (CSR over batch rows): row r owns pages
    indices[indptr[r]:indptr[r+1]], all full but the last, which holds last_page_len[r]
    entries (1..page_size; 0 for a row without pages)."""
    indptr: np.ndarray         # int32 [R + 1]
    indices: np.ndarray        # int32 [indptr[-1]]
    last_page_len: np.ndarray  # int32 [R]
    page_size: int

    @property
    def rows(self) -> int:
        return len(self.last_page_len)

    def seq_lens(self) -> np.ndarray:
        """Tokens per row, as FlashInfer computes them from the table (flashinfer.get_seq_lens)."""
        pages = np.diff(self.indptr.astype(np.int64))
        return np.maximum(pages - 1, 0) * self.page_size + self.last_page_len


def _int32(x: np.ndarray, what: str) -> np.ndarray:
    if x.size and int(x.max()) > INT32_MAX:
        raise ValueError(f"{what} exceed int32 (max {int(x.max())}), FlashInfer's index type")
    return x.astype(np.int32)


def dense_page_table(batch: int, n: int, page_size: int, seq_pages: Optional[int] = None) -> PageTable:
    """Every token of B sequences of N tokens in ceil(N / page_size) pages each; sequence b owns
    pages b * seq_pages ... b * seq_pages + ceil(N / page_size) - 1 (seq_pages: the pages each
    sequence has in the cache, default ceil(N / page_size): dense_paged_cache's layout)."""
    if n < 1 or page_size < 1:
        raise ValueError(f"`n` and `page_size` must be >= 1, got {n} and {page_size}")
    pages = -(-n // page_size)
    seq_pages = pages if seq_pages is None else seq_pages
    if seq_pages < pages:
        raise ValueError(f"`seq_pages` ({seq_pages}) must hold ceil(n / page_size) = {pages} pages")
    if batch * seq_pages - 1 > INT32_MAX:
        raise ValueError(f"{batch * seq_pages} pages exceed int32, FlashInfer's index type")
    indptr = np.arange(batch + 1, dtype=np.int64) * pages
    indices = (np.arange(batch, dtype=np.int64)[:, None] * seq_pages + np.arange(pages)).reshape(-1)
    return PageTable(_int32(indptr, "page counts"), _int32(indices, "page indices"),
                     np.full(batch, n - (pages - 1) * page_size, np.int32), page_size)


def selection_page_table(kv_mask: np.ndarray) -> PageTable:
    """Page size 1 over a selection kv_mask [B, Hkv, N]: one row per (sequence, KV head), row
    b * Hkv + h, whose pages are the selected token rows (b * Hkv + h) * N + t, ascending: the
    row indices of K.view(B * Hkv * N, D)."""
    b, hkv, n = kv_mask.shape
    if b * hkv * n - 1 > INT32_MAX:
        raise ValueError(f"B*Hkv*N = {b * hkv * n} token rows exceed int32, FlashInfer's index type")
    flat = np.asarray(kv_mask, bool).reshape(b * hkv, n)
    counts = flat.sum(axis=1, dtype=np.int64)
    indices = np.flatnonzero(flat)  # row-major: row r's tokens are r * n + t, in order
    indptr = np.concatenate([[0], np.cumsum(counts)])
    return PageTable(_int32(indptr, "page counts"), _int32(indices, "page indices"),
                     (counts > 0).astype(np.int32), 1)


def dense_paged_cache(keys: torch.Tensor, values: torch.Tensor, page_size: int, seq_pages: Optional[int] = None):
    """(k, v) pages [B * seq_pages, page_size, Hkv, D] (FlashInfer's NHD layout) from K/V
    [B, Hkv, N, D]: a copy; seq_pages (default ceil(N / page_size)) pages per sequence, the
    tokens after N zero (room to append)."""
    b, hkv, n, d = keys.shape
    pages = -(-n // page_size) if seq_pages is None else seq_pages
    if pages * page_size < n:
        raise ValueError(f"`seq_pages` ({seq_pages}) pages of {page_size} cannot hold {n} tokens")

    def one(x):
        c = x.new_zeros(b, pages * page_size, hkv, d)
        c[:, :n] = x.transpose(1, 2)
        return c.view(b * pages, page_size, hkv, d)
    return one(keys), one(values)


def selection_paged_cache(keys: torch.Tensor, values: torch.Tensor):
    """(k, v) as pages of one token, [B * Hkv * N, 1, 1, D] NHD: a view of K/V [B, Hkv, N, D],
    no copy (selection_page_table's indices address these rows)."""
    b, hkv, n, d = keys.shape
    return keys.view(b * hkv * n, 1, 1, d), values.view(b * hkv * n, 1, 1, d)


def kv_head_rows(x: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[B, Hq, D] -> [B * Hkv, G, D] (a view): row b * Hkv + h holds query heads h*G .. h*G+G-1,
    the heads of KV head h (the rows of selection_page_table)."""
    b, hq, d = x.shape
    return x.view(b * num_kv_heads, hq // num_kv_heads, d)


def _flashinfer_method(name: str, fi, tables: Sequence[PageTable], caches, queries: Sequence[torch.Tensor],
                       outs: Sequence[torch.Tensor], num_qo_heads: int, num_kv_heads: int, scale,
                       note: str, extra: dict) -> Method:
    """Plan one wrapper per table (one table: shared by every slot, as an engine shares one plan
    across layers), run slot l as wrapper[l % len] over caches[l]; queries[l] and outs[l] are
    [rows, num_qo_heads, D] views (of the caller's [B, Hq, D] tensors)."""
    dev = queries[0].device
    d = queries[0].shape[-1]
    dtype = queries[0].dtype
    workspace = torch.zeros(FLASHINFER_WORKSPACE_BYTES, dtype=torch.uint8, device=dev)  # shared: runs are sequential
    wrappers = []
    try:
        for t in tables:
            w = fi.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD")
            w.plan(torch.from_numpy(t.indptr), torch.from_numpy(t.indices).to(dev), torch.from_numpy(t.last_page_len),
                   num_qo_heads, num_kv_heads, d, t.page_size, pos_encoding_mode="NONE",
                   q_data_type=dtype, kv_data_type=dtype, sm_scale=scale)
            wrappers.append(w)
        # first run (builds the JIT kernel on first use, ~10 s): outside timing; does run()
        # write into `out` (else each call copies its result there)?
        r = wrappers[0].run(queries[0], caches[0], out=outs[0])
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    except Exception as e:  # JIT build errors, unsupported dtype/group size, ...: say which
        raise Unavailable(f"{name}: {type(e).__name__}: {_first_line(e)}") from e
    in_place = r.data_ptr() == outs[0].data_ptr()
    if not in_place:
        outs[0].copy_(r)
    nw = len(wrappers)

    def one(l: int):
        o = wrappers[l % nw].run(queries[l], caches[l], out=outs[l])
        if not in_place:
            outs[l].copy_(o)

    calls = [lambda l=l: one(l) for l in range(len(queries))]
    info = {"flashinfer_version": getattr(fi, "__version__", "?"),
            "flashinfer_backend": getattr(wrappers[0], "resolved_backend", "?"),
            "page_size": tables[0].page_size, "kv_layout": "NHD", "batch_rows": tables[0].rows,
            "num_qo_heads": num_qo_heads, "num_kv_heads": num_kv_heads, "plans": nw,
            "out_in_place": in_place}
    return Method(name, calls, list(outs), note, {**info, **extra})


def flashinfer_dense(keys, values, queries, scale=None, page_size: int = 16) -> Method:
    """FlashInfer's FA2 paged decode over every token: B rows, Hq / Hkv heads, NHD pages of
    `page_size` tokens copied once from K/V (outside timing), one plan for all slots."""
    fi = flashinfer_module(keys[0].device)
    b, hkv, n, d = keys[0].shape
    hq = queries[0].shape[1]
    table = dense_page_table(b, n, page_size)
    caches = [dense_paged_cache(k, v, page_size) for k, v in zip(keys, values)]
    outs = [torch.empty_like(q) for q in queries]
    return _flashinfer_method(
        "flashinfer_dense", fi, [table], caches, list(queries), outs, hq, hkv, scale,
        f"FlashInfer BatchDecodeWithPagedKVCacheWrapper, all tokens, page size {page_size}, NHD; "
        "pages copied from K/V once outside timing; plan() once, run() timed",
        {"paged_cache_copy_bytes_per_slot": int(2 * table.indices.size * page_size * hkv * d * keys[0].element_size())})


def flashinfer_selection(keys, values, queries, kv_masks: Sequence[np.ndarray], scale=None) -> Method:
    """FlashInfer's FA2 paged decode over Tactic's selection of each slot (kv_masks[l]
    [B, Hkv, N]): page size 1, B*Hkv rows of G query heads and one KV head, zero-copy pages."""
    hkv = keys[0].shape[1]
    g = queries[0].shape[1] // hkv
    try:
        tables = [selection_page_table(m) for m in kv_masks]
    except ValueError as e:
        raise Unavailable(f"flashinfer_selection: {e}") from e
    fi = flashinfer_module(keys[0].device)
    caches = [selection_paged_cache(k, v) for k, v in zip(keys, values)]
    outs = [torch.empty_like(q) for q in queries]
    q_rows = [kv_head_rows(q, hkv) for q in queries]
    o_rows = [kv_head_rows(o, hkv) for o in outs]
    m = _flashinfer_method(
        "flashinfer_selection", fi, tables, caches, q_rows, o_rows, g, 1, scale,
        "FlashInfer BatchDecodeWithPagedKVCacheWrapper over Tactic's selection: page size 1, one row "
        "per (sequence, KV head) with its G query heads, num_kv_heads=1; pages are K/V rows (no copy); "
        "plan() once per slot, run() timed", {"selected_tokens": [int(t.indices.size) for t in tables]})
    m.outputs = outs
    return m
