"""Timing of device calls: CUDA events (wall clock on the CPU), warm-up, percentiles, input
rotation and CUDA-graph capture.

Rotation: a method is given one call per rotation slot (e.g. one per decoder layer, each over
its own KV copy); run i makes call i % len(calls), so consecutive runs read different memory
and the 50 MB L2 of an H100 cannot serve the next run from cache (the caller sizes the rotated
set to several times the L2).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable, List, Sequence

import numpy as np
import torch


@dataclass
class Timing:
    median_us: float
    p10_us: float
    p90_us: float
    runs: int
    mode: str  # 'eager' (one Python call per run) or 'graph' (one CUDA-graph replay per run)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class RunPolicy:
    """How many runs a series gets: enough to fill `budget_s`, within [min_runs, max_runs]."""
    warmup: int = 5
    min_runs: int = 20
    max_runs: int = 200
    budget_s: float = 0.25


def _is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def _sync(device) -> None:
    if _is_cuda(device):
        torch.cuda.synchronize(device)


def time_calls(calls: Sequence[Callable[[], object]], device, policy: RunPolicy = RunPolicy(),
               mode: str = "eager") -> Timing:
    """Median / p10 / p90 in microseconds of calls[i % len(calls)]() over the runs.

    On CUDA each run sits between two events recorded on the current stream, with all runs
    queued back to back (no host sync in between), so a run's time is the GPU time of its
    work plus any gap the host leaves while launching it. On the CPU: perf_counter per run.
    """
    if not calls:
        raise ValueError("`calls` must hold at least one callable")
    n_slots = len(calls)
    warm = max(policy.warmup, n_slots)  # every slot runs once before timing (lazy setup)
    _sync(device)
    t0 = time.perf_counter()
    for i in range(warm):
        calls[i % n_slots]()
    _sync(device)
    per_call = (time.perf_counter() - t0) / warm
    runs = int(np.clip(policy.budget_s / max(per_call, 1e-7), policy.min_runs, policy.max_runs))
    times = np.empty(runs)
    if _is_cuda(device):
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
        for i in range(runs):
            starts[i].record()
            calls[i % n_slots]()
            ends[i].record()
        torch.cuda.synchronize(device)
        for i in range(runs):
            times[i] = starts[i].elapsed_time(ends[i]) * 1e3
    else:
        for i in range(runs):
            t = time.perf_counter()
            calls[i % n_slots]()
            times[i] = (time.perf_counter() - t) * 1e6
    p10, med, p90 = np.percentile(times, [10, 50, 90])
    return Timing(float(med), float(p10), float(p90), runs, mode)


def capture_graphs(calls: Sequence[Callable[[], object]], device) -> List[Callable[[], None]]:
    """Capture each call into its own CUDA graph (sharing one memory pool); returns the replays.

    Each call runs once eagerly on the capture stream first (lazy allocations, uploads of
    per-call constants), as tests/test_cuda.py does for the decode step. The calls must be
    host-sync free and write into buffers that outlive the graphs.
    """
    if not _is_cuda(device):
        raise RuntimeError("CUDA graphs need a CUDA device")
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    graphs: List[torch.cuda.CUDAGraph] = []
    with torch.cuda.stream(stream):
        for c in calls:
            c()
        stream.synchronize()
        pool = None
        for c in calls:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool, stream=stream):
                c()
            pool = g.pool() if pool is None else pool
            graphs.append(g)
    torch.cuda.current_stream(device).wait_stream(stream)
    return [g.replay for g in graphs]
