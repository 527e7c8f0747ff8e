"""Per-kernel GPU time of one Tactic decode step (torch.profiler / CUPTI), to see where the
step's time goes. Workload: the calibrated synthetic generator of `python -m tactic.bench`.

    python bench/profile_step.py [--context 32768] [--policy tactic]
"""
import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import tactic
from tactic.bench.workloads import synthetic


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--policy", default="tactic")
    p.add_argument("--target", type=float, default=0.9)
    a = p.parse_args()
    hq, hkv, d, n = 32, 8, 128, a.context
    wl = synthetic(n, 1, hq, hkv, d, "float16", "cuda", seed=0)
    q = wl.queries
    dec = tactic.SparseDecoder(1, hq, hkv, d, max_tokens=n + 8, device="cuda", target=a.target, policy=a.policy)
    dec.prefill(0, wl.keys.transpose(1, 2), wl.values.transpose(1, 2))  # token-major views
    out = torch.empty_like(q)
    for _ in range(5):
        dec.decode(0, q, None, None, out=out)
    torch.cuda.synchronize()
    steps = 20
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            dec.decode(0, q, None, None, out=out)
        torch.cuda.synchronize()
    print(f"N={n} policy={a.policy} read={dec.stats(0)['read_fraction'].mean():.1%}; per step:")
    rows = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)
    total = 0.0
    for e in rows:
        t = e.device_time_total / steps
        total += t
        print(f"  {t:9.1f} us  {e.count // steps:3d}x  {e.key[:90]}")
    print(f"  {total:9.1f} us  total GPU time per step")


if __name__ == "__main__":
    main()
