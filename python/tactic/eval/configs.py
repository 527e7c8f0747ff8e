"""The policy configurations the harness compares, and how quest/top-k get Tactic's budget.

Per P: tactic first, then quest and topk at *the tokens Tactic read at that step, layer
and KV head*, then the oracle (exact top-P). Dense runs once, as the reference.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

FIXED_BUDGET = ("quest", "topk")


@dataclass(frozen=True)
class Config:
    policy: str
    target: Optional[float] = None   # None for dense

    @property
    def name(self) -> str:
        return "dense" if self.target is None else f"{self.policy}@{self.target:g}"


def configurations(targets, policies=("tactic", "quest", "topk", "oracle")):
    out = [Config("dense")]
    for p in targets:
        out += [Config(pol, float(p)) for pol in policies]
    return out


class StepBudgets:
    """`budget(layer_idx, step)` callable replaying the per-step [B, Hkv] token counts of a run."""

    def __init__(self, cache):
        self.kv = {li: cache.layer_stats(li)["kv_tokens"] for li in cache.sparse_layers}

    def __call__(self, layer_idx: int, step: int):
        steps = self.kv[layer_idx]
        return np.maximum(steps[min(step, len(steps) - 1)], 1)
