"""Tactic's decode step as a `torch.library` custom op, so `torch.compile` keeps it in the graph.

    import tactic, tactic.torch_ops
    dec = tactic.SparseDecoder(...); dec.prefill(...)
    h = tactic.torch_ops.handle(dec)           # once, outside the compiled code

    @torch.compile(fullgraph=True)
    def step(x, k_new, v_new):
        q = proj(x).view(1, Hq, D)
        return h.decode(layer, q, k_new, v_new)  # torch.ops.tactic.decode: no graph break

A decoder is not a tensor, so the op reaches it through an opaque handle: an int id (a
constant in the graph) plus a one-element int64 `state` tensor that the op declares it mutates
(`mutates_args=("state",)`) and bumps on every call. The compiler therefore treats each call
as a side effect on `state`: it never removes a call whose output is unused, and it keeps the
calls on one decoder in program order (each reads the `state` the previous one wrote). The fake
(meta) implementation gives the output's shape and dtype, `q`'s, without running anything.

No autograd formula is registered: decoding is inference (gradients through it raise).
"""
from __future__ import annotations

import itertools
import weakref
from typing import List, Optional

import torch

from .decoder import SparseDecoder

_ids = itertools.count(1)
_handles: "weakref.WeakValueDictionary[int, DecoderHandle]" = weakref.WeakValueDictionary()


class DecoderHandle:
    """A SparseDecoder as torch custom ops see it: `id` (int) and `state` (int64 [1], the number
    of decode calls made through the op; the op mutates it). Get one with `handle(dec)`; it
    keeps its decoder alive, and the op finds the decoder through it while it lives."""

    def __init__(self, dec: SparseDecoder):
        self.id = next(_ids)
        self.state = torch.zeros(1, dtype=torch.int64)
        self.decoder = dec
        _handles[self.id] = self

    def decode(self, layer: int, q: torch.Tensor, k_new: Optional[torch.Tensor] = None,
               v_new: Optional[torch.Tensor] = None, seq: Optional[List[int]] = None,
               budget: Optional[int] = None) -> torch.Tensor:
        """`SparseDecoder.decode` through `torch.ops.tactic.decode`: q [B, Hq, D], k_new/v_new
        [B, Hkv, D] or both None; returns a new tensor [B, Hq, D] of q's dtype."""
        if isinstance(seq, int):
            seq = [seq]
        return torch.ops.tactic.decode(self.state, self.id, layer, q, k_new, v_new, seq, budget)

    def __repr__(self) -> str:
        return f"DecoderHandle(id={self.id}, decoder={self.decoder!r})"


def handle(dec: SparseDecoder) -> DecoderHandle:
    """The handle of `dec` (created on first use and kept on the decoder). Create it outside
    compiled code: making a handle allocates its state tensor."""
    if not isinstance(dec, SparseDecoder):
        raise TypeError(f"`dec` must be a tactic.SparseDecoder, got {type(dec).__name__}")
    h = dec.__dict__.get("_torch_handle")
    if h is None:
        h = DecoderHandle(dec)
        dec._torch_handle = h
    return h


def _decoder(handle_id: int) -> SparseDecoder:
    h = _handles.get(handle_id)
    if h is None:
        raise ValueError(f"`handle` {handle_id} names no live SparseDecoder (its DecoderHandle was "
                         f"garbage-collected, or the id was not made by tactic.torch_ops.handle)")
    return h.decoder


@torch.library.custom_op("tactic::decode", mutates_args=("state",))
def decode(state: torch.Tensor, handle: int, layer: int, q: torch.Tensor, k_new: Optional[torch.Tensor],
           v_new: Optional[torch.Tensor], seq: Optional[List[int]], budget: Optional[int]) -> torch.Tensor:
    """One decode step of the SparseDecoder `handle` names (see DecoderHandle.decode)."""
    out = _decoder(handle).decode(layer, q, k_new, v_new, seq=seq, budget=budget)
    state.add_(1)  # after the step: a call that raised leaves the count as it was
    return out


@decode.register_fake
def _(state, handle, layer, q, k_new, v_new, seq, budget):
    torch._check(q.dim() == 3, lambda: f"`q` must be [B, Hq, D], got {q.dim()} dimensions")
    return torch.empty_like(q, memory_format=torch.contiguous_format)
