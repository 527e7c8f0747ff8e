"""Per-kernel GPU time of one Tactic decode step (torch.profiler / CUPTI), to see where the
step's time goes. Workloads: those of `python -m tactic.bench` (synthetic (b), its sparse layer).
PDL is off by default here: with programmatic dependent launch a kernel's time includes its wait
for the one before it, which hides where the time goes.

    python bench/profile_step.py [--context 32768 131072] [--workload sparse] [--batch 8] [--pdl]
"""
import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import tactic
from tactic.bench.workloads import make


def profile_one(n, a):
    hq, hkv, d = 32, 8, 128
    wl = make(a.workload, n, a.batch, hq, hkv, d, "float16", "cuda", seed=0)
    q = wl.queries
    dec = tactic.SparseDecoder(1, hq, hkv, d, max_tokens=n + 8, max_batch=a.batch, device="cuda", target=a.target, stop_rule=a.stop_rule,
                               policy=a.policy, pdl=a.pdl, head_split=a.head_split,
                               selection_kernel=a.selection_kernel, **a.rule_options)
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
    print(f"N={n} B={a.batch} workload={a.workload} policy={a.policy} read={dec.stats(0)['read_fraction'].mean():.1%} "
          f"{a.rule_options or ''} plan={dec.plan}; per step:")
    rows = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)
    total = 0.0
    for e in rows:
        t = e.device_time_total / steps
        total += t
        print(f"  {t:9.1f} us  {e.count // steps:3d}x  {e.key[:90]}")
    print(f"  {total:9.1f} us  total GPU time per step")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--context", type=int, nargs="+", default=[32768])
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together (all of length N)")
    p.add_argument("--workload", default="sparse", choices=["synthetic", "sparse"])
    p.add_argument("--policy", default="tactic")
    p.add_argument("--target", type=float, default=0.9)
    p.add_argument("--pdl", action="store_true", help="launch with programmatic dependent launch")
    p.add_argument("--head-split", type=int, default=None)
    p.add_argument("--selection-kernel", default="auto", choices=["auto", "ranked", "threshold"])
    p.add_argument("--stop-rule", default="prior", choices=["certified", "prior"])
    # the certified rule's knobs, to time its phases apart by difference (fewer draws, no rounds)
    p.add_argument("--tail-samples", type=int, default=None)
    p.add_argument("--max-rounds", type=int, default=None)
    p.add_argument("--group-head", action="store_true", help="group_head=True (the exact read from the attention)")
    a = p.parse_args()
    a.rule_options = {k: v for k, v in (("tail_samples", a.tail_samples), ("max_rounds", a.max_rounds)) if v is not None}
    if a.group_head:
        a.rule_options["group_head"] = True
    for n in a.context:
        profile_one(n, a)


if __name__ == "__main__":
    main()
