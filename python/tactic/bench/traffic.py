"""Bytes each timed method must read (the numerator of its GB/s) and the Tactic step's floor.

Byte model (documented in bench/NOTES.md; es = bytes per K/V element):
- dense attention (our dense kernel, torch SDPA): every K and V row, B * Hkv * N * 2 * D * es.
- attention over a selection (Tactic attention alone, gather-then-SDPA): the selected K and V
  rows of each KV head, sum(kv_tokens) * 2 * D * es. For gather-then-SDPA these are the
  useful bytes; its real traffic is ~3x (read rows, write the gathered copy, read it again).
- the Tactic step's floor: what one step cannot avoid reading with today's algorithm:
    selected K/V of each KV head (the union of its query heads, sinks and recent tokens)
  + all centroids, fp32, once per KV head: B * Hkv * C * D * 4, C = ceil((N - sinks) / cluster_size)
  + the exact-head keys scored by each query head before it knows its stop point:
    B * Hq * head_fraction * (N - sinks) * D * es (the selection reads them once per query
    head; a fused kernel that reuses them in the attention would drop this term)
  + q in and out: 2 * B * Hq * D * es.
  Cluster offsets (4 bytes per cluster) and sorting scratch are left out: small, and not
  inherent. floor time = floor bytes / measured copy bandwidth + one launch (5 us).
"""
from __future__ import annotations

import math

import numpy as np

LAUNCH_US = 5.0  # one kernel launch, the least a step can cost


def dense_bytes(batch: int, num_kv_heads: int, n: int, head_dim: int, elem_bytes: int) -> int:
    return batch * num_kv_heads * n * 2 * head_dim * elem_bytes


def selected_bytes(kv_tokens: np.ndarray, head_dim: int, elem_bytes: int) -> int:
    """K and V of the tokens read per (sequence, KV head); kv_tokens [B, Hkv]."""
    return int(np.asarray(kv_tokens, dtype=np.int64).sum()) * 2 * head_dim * elem_bytes


def step_floor(kv_tokens: np.ndarray, context: np.ndarray, num_q_heads: int, head_dim: int,
               elem_bytes: int, copy_gbps: float, cluster_size: int = 16, num_sink: int = 4,
               head_fraction: float = 0.02) -> dict:
    """The Tactic step's floor bytes (by part) and time, from stats() of the step.

    kv_tokens [B, Hkv] and context [B] as `SparseDecoder.stats` returns them.
    """
    kv_tokens = np.asarray(kv_tokens, dtype=np.int64)
    b, hkv = kv_tokens.shape
    clustered = np.maximum(np.asarray(context, dtype=np.int64) - num_sink, 0)
    clusters = sum(math.ceil(c / cluster_size) for c in clustered)  # per KV head, summed over b
    parts = {
        "selected_kv": selected_bytes(kv_tokens, head_dim, elem_bytes),
        "centroids": int(clusters * hkv * head_dim * 4),
        "exact_head_keys": int(sum(num_q_heads * head_fraction * c for c in clustered) * head_dim * elem_bytes),
        "q_out": 2 * b * num_q_heads * head_dim * elem_bytes,
    }
    total = sum(parts.values())
    return {"bytes": total, "parts": parts, "us": total / (copy_gbps * 1e3) + LAUNCH_US,
            "copy_gbps": copy_gbps, "launch_us": LAUNCH_US}


def gbps(nbytes: float, us: float) -> float:
    return nbytes / (us * 1e3)
