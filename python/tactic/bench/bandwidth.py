"""The device's measured copy bandwidth: the yardstick every kernel's GB/s is compared with."""
from __future__ import annotations

import torch

from .timing import RunPolicy, time_calls


def copy_bandwidth(device, nbytes: int = 1 << 30) -> dict:
    """GB/s of a large device-to-device copy (dst.copy_(src)), counting bytes read + written.

    1 GiB by default: far beyond any L2, so it measures DRAM/HBM. Returns the median and the
    best run (the best is the closest to what a read-only kernel can reach).
    """
    src = torch.empty(nbytes // 2, dtype=torch.float16, device=device).normal_()
    dst = torch.empty_like(src)
    t = time_calls([lambda: dst.copy_(src)], device, RunPolicy(warmup=3, min_runs=10, max_runs=30, budget_s=0.3))
    moved = 2 * src.numel() * src.element_size()
    del src, dst
    return {"bytes_per_copy": moved, "median_gbps": moved / t.median_us / 1e3,
            "p10_time_gbps": moved / t.p10_us / 1e3, "runs": t.runs,
            "method": "torch dst.copy_(src), read + write bytes / median time"}
