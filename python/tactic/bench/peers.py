"""The methods timed side by side, on the same inputs, as lists of zero-argument calls.

Every builder returns a `Method`: one call per rotation slot (slot l reads layer l's KV, see
timing.py) and the [B, Hq, D] output each call writes, so the sweep can cross-check methods.
A method that cannot run here raises `Unavailable` with a readable reason (e.g. a torch SDPA
backend this GPU or dtype lacks); the sweep reports it as n/a.

GQA for torch SDPA, two forms (both timed, the faster is the peer's figure):
- 'gqa': q [B, Hq, 1, D] against K/V [B, Hkv, N, D] with enable_gqa=True;
- 'folded': the G query heads of a KV head become G query rows, q [B, Hkv, G, D], no GQA
  argument needed (legal for decode: every query row sees every key), as FlashInfer does.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable, List, Sequence

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
