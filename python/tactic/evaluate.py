"""Accuracy of a policy on captured real attention, against a float64 NumPy reference.

Used by the demo and the tests. For each decode step of a captured layer it replays the
decode (prefill of n_prefill tokens, then one token per step) through a SparseDecoder and
compares what was read and produced with exact float64 attention.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from . import _arrays
from .decoder import SparseDecoder
from .fixtures import Fixture, LayerCapture


@dataclass
class Reference:
    probs: list          # per step: [Hq, ctx] float64 softmax
    outputs: np.ndarray  # [S, Hq, D] float64 dense attention


def reference(cap: LayerCapture, n_prefill: int, scale: float) -> Reference:
    """Exact float64 attention of every decode query over its causal context."""
    k = cap.keys.astype(np.float64)
    v = cap.values.astype(np.float64)
    s, hq, d = cap.queries.shape
    g = hq // k.shape[1]
    probs, outs = [], np.zeros((s, hq, d))
    for i in range(s):
        ctx = n_prefill + i + 1
        q = cap.queries[i].astype(np.float64)
        kk = np.repeat(k[:ctx].transpose(1, 0, 2), g, axis=0)  # [Hq, ctx, D]
        logits = np.einsum("hd,hnd->hn", q, kk) * scale
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        probs.append(p)
        outs[i] = np.einsum("hn,hnd->hd", p, np.repeat(v[:ctx].transpose(1, 0, 2), g, axis=0))
    return Reference(probs, outs)


@dataclass
class PolicyRun:
    outputs: np.ndarray      # [S, Hq, D] float32
    kv_tokens: np.ndarray    # [S, Hkv]
    head_tokens: np.ndarray  # [S, Hq]
    est_mass: np.ndarray     # [S, Hq]
    kv_mask: list            # per step [Hkv, ctx] bool
    head_mask: list          # per step [Hq, ctx] bool
    context: np.ndarray      # [S]


def run_policy(cap: LayerCapture, n_prefill: int, scale: float, policy: str = "tactic",
               target: float = 0.9, budgets: Optional[np.ndarray] = None,
               dtype: str = "float16", device: str = "cpu", **options) -> PolicyRun:
    """Replay the captured decode steps through a one-layer SparseDecoder.

    budgets: [S, Hkv] tokens per step and KV head (quest/topk). device 'cuda' moves the
    inputs to the GPU with torch.
    """
    def put(a):
        return _arrays.to_device(a, device)
    t, hkv, d = cap.keys.shape
    s, hq, _ = cap.queries.shape
    dec = SparseDecoder(1, hq, hkv, d, max_batch=1, max_tokens=t, dtype=dtype, target=target,
                        policy=policy, scale=scale, record_selection=True, device=device, **options)
    dec.prefill(0, put(cap.keys[:n_prefill]), put(cap.values[:n_prefill]))
    run = PolicyRun(np.zeros((s, hq, d), np.float32), np.zeros((s, hkv), np.int64),
                    np.zeros((s, hq), np.int64), np.zeros((s, hq)), [], [], np.zeros(s, np.int64))
    for i in range(s):
        pos = n_prefill + i
        q = cap.queries[i][None].astype(np.float32)
        out = dec.decode(0, put(q), put(cap.keys[pos][None]), put(cap.values[pos][None]),
                         budget=None if budgets is None else budgets[i][None])
        st = dec.stats(0)
        run.outputs[i] = out[0].float().cpu().numpy() if hasattr(out, "cpu") else out[0]
        run.kv_tokens[i] = st["kv_tokens"][0]
        run.head_tokens[i] = st["head_tokens"][0]
        run.est_mass[i] = st["est_mass"][0]
        run.kv_mask.append(st["kv_mask"][0])
        run.head_mask.append(st["head_mask"][0])
        run.context[i] = st["context"][0]
    return run


@dataclass
class Accuracy:
    read_fraction: np.ndarray  # [S, Hkv] union tokens / context
    own_mass: np.ndarray       # [S, Hq] true mass of each head's own set
    union_mass: np.ndarray     # [S, Hq] true mass of the union its KV head read
    rel_error: np.ndarray      # [S, Hq] ||o - o_ref|| / ||o_ref||


def accuracy(run: PolicyRun, ref: Reference) -> Accuracy:
    s, hq = run.head_tokens.shape
    hkv = run.kv_tokens.shape[1]
    g = hq // hkv
    own = np.zeros((s, hq))
    uni = np.zeros((s, hq))
    for i in range(s):
        p = ref.probs[i]
        own[i] = (p * run.head_mask[i]).sum(axis=1)
        uni[i] = (p * np.repeat(run.kv_mask[i], g, axis=0)).sum(axis=1)
    err = np.linalg.norm(run.outputs - ref.outputs, axis=2) / np.maximum(
        np.linalg.norm(ref.outputs, axis=2), 1e-30)
    return Accuracy(run.kv_tokens / run.context[:, None], own, uni, err)


def kv_union_success(acc: Accuracy, target: float, g: int) -> np.ndarray:
    """Per (step, KV head): every query head of the group reaches the target over the union."""
    s, hq = acc.union_mass.shape
    return (acc.union_mass >= target).reshape(s, hq // g, g).all(axis=2)


def fixture_layers(fx: Fixture):
    return [fx.layers[l] for l in sorted(fx.layers)]
