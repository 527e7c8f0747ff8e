"""First GPU timing: one Tactic decode step (selection + attention) vs torch SDPA.

    python bench/gpu_step.py [--contexts 32768 131072] [--json out.json]

Shapes: B = 1, Hq = 32, Hkv = 8, D = 128, fp16. Peers in the same run, on the same K/V:
torch.nn.functional.scaled_dot_product_attention with the cuDNN and the flash backends
(GQA expanded by enable_gqa), and Tactic's own dense kernel. Timing: CUDA events around
`--iters` calls after warm-up, median reported.

Keys: a Gaussian mixture per KV head (512 unit centres scaled to norm 4, noise 0.5), each
query `sharpness` x the sum of 3 centres + noise. At sharpness 6 this concentrates ~95% of a
head's mass on the ~0.6% of keys around its 3 centres, and Tactic at P = 0.9 reads the share
printed next to each timing (the generator is a stand-in for real heads; bench/NOTES.md
compares it with the SmolLM2 fixture's read fractions).
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F

import tactic


def mixture(n, hkv, d, gen, centres=512):
    c = torch.randn(hkv, centres, d, generator=gen, device="cuda")
    c = 4 * c / c.norm(dim=2, keepdim=True)
    idx = torch.randint(0, centres, (hkv, n), generator=gen, device="cuda")
    k = torch.gather(c, 1, idx[:, :, None].expand(hkv, n, d)) + 0.5 * torch.randn(hkv, n, d, generator=gen, device="cuda")
    return k, c  # [Hkv, N, D]


def time_fn(fn, iters, warmup=5):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return float(np.median(times))  # microseconds


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--target", type=float, default=0.9)
    p.add_argument("--sharpness", type=float, default=6.0)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--json")
    args = p.parse_args()
    hq, hkv, d = 32, 8, 128
    gen = torch.Generator(device="cuda").manual_seed(0)
    res = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "tactic": tactic.__version__,
           "torch": torch.__version__, "shape": {"B": 1, "Hq": hq, "Hkv": hkv, "D": d, "dtype": "float16"},
           "target": args.target, "sharpness": args.sharpness, "rows": []}
    print(f"{res['device']}, B=1 Hq={hq} Hkv={hkv} D={d} fp16, P={args.target}; median us of {args.iters}")
    print(f"{'N':>7} {'sdpa cudnn':>11} {'sdpa flash':>11} {'dense':>9} {'tactic':>9} {'read':>7} {'speedup':>8}")
    for n in args.contexts:
        k, cent = mixture(n, hkv, d, gen)
        v = torch.randn(hkv, n, d, generator=gen, device="cuda")
        k16, v16 = k.half(), v.half()
        pick = torch.randint(0, cent.shape[1], (hq, 3), generator=gen, device="cuda")
        q = (args.sharpness * cent[torch.arange(hq, device="cuda") // (hq // hkv)][torch.arange(hq, device="cuda")[:, None], pick].sum(1)
             + 0.3 * torch.randn(hq, d, generator=gen, device="cuda")).half()[None]  # [1, Hq, D]
        qs = q[:, :, None, :]  # [1, Hq, 1, D]
        ks, vs = k16[None], v16[None]  # [1, Hkv, N, D]
        row = {"N": n}
        for name, backend in (("sdpa_cudnn", torch.nn.attention.SDPBackend.CUDNN_ATTENTION),
                              ("sdpa_flash", torch.nn.attention.SDPBackend.FLASH_ATTENTION)):
            try:
                with torch.nn.attention.sdpa_kernel(backend):
                    row[name] = time_fn(lambda: F.scaled_dot_product_attention(qs, ks, vs, enable_gqa=True), args.iters)
            except RuntimeError as e:
                row[name] = None
                print(f"  ({name} unavailable: {str(e).splitlines()[0]})")
        for policy in ("dense", "tactic"):
            dec = tactic.SparseDecoder(1, hq, hkv, d, max_tokens=n + 8, device="cuda", dtype="float16",
                                       target=args.target, policy=policy)
            dec.prefill(0, k16.permute(1, 0, 2), v16.permute(1, 0, 2))
            out = torch.empty_like(q)
            row[policy] = time_fn(lambda: dec.decode(0, q, None, None, out=out), args.iters)
            row[f"{policy}_read"] = float(dec.stats(0)["read_fraction"].mean())
            del dec
        peers = [row[x] for x in ("sdpa_cudnn", "sdpa_flash") if row.get(x)]
        row["speedup_vs_best_sdpa"] = min(peers) / row["tactic"] if peers else None
        res["rows"].append(row)
        fmt = lambda x: f"{x:11.1f}" if x else f"{'n/a':>11}"
        print(f"{n:>7} {fmt(row['sdpa_cudnn'])} {fmt(row['sdpa_flash'])} {row['dense']:9.1f} {row['tactic']:9.1f} "
              f"{row['tactic_read']:7.1%} {row['speedup_vs_best_sdpa'] or float('nan'):8.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
