"""CPU timings of the two costs the foundation must keep sane (numbers go to bench/NOTES.md).

1. k-means over N keys of dim D into C clusters (default 32768 x 128, C = 2048, 10 iterations).
2. A decode step over L layers of Hkv KV heads at a long context (default 32 layers, 32/8
   heads, D 128, 32K tokens, fp16 store ~4.3 GB), dense vs tactic on the same data, plus a
   context sweep on one layer to show the step grows linearly with the context.

Keys are a Gaussian mixture (512 centres per head, unit-norm centres scaled to norm 4, noise
0.5) and each query is `sharpness` x the sum of 3 centres, so attention is skewed the way real heads are;
the fraction Tactic reads is printed next to every timing. Usage:

    python bench/bench_cpu.py [--layers 32] [--context 32768] [--kmeans-iters 10] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
from tqdm.auto import tqdm

import tactic


def mixture(rng, n, h, d, centres=512):
    c = rng.standard_normal((h, centres, d)).astype(np.float32)
    c *= 4.0 / np.linalg.norm(c, axis=2, keepdims=True)
    idx = rng.integers(0, centres, size=(h, n))
    x = np.take_along_axis(c, idx[:, :, None], axis=1) + 0.5 * rng.standard_normal((h, n, d), dtype=np.float32)
    return x.transpose(1, 0, 2).astype(np.float16), c  # [N, H, D], centres [H, C, D]


def queries(rng, centres, hq, steps, sharpness):
    h, nc, d = centres.shape
    g = hq // h
    q = np.zeros((steps, hq, d), np.float32)
    for s in range(steps):
        for i in range(hq):
            pick = rng.integers(0, nc, size=3)
            q[s, i] = centres[i // g, pick].sum(axis=0) * sharpness + 0.3 * rng.standard_normal(d)
    return q.astype(np.float16)


def cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def time_kmeans(args, rng):
    x, _ = mixture(rng, args.kmeans_n, 1, args.head_dim)
    x = x[:, 0]
    tactic.ops.kmeans(x[:4096], 256, max_iters=2)  # warm-up
    t0 = time.perf_counter()
    res = tactic.ops.kmeans(x, args.kmeans_c, max_iters=10, seed=0)
    dt = time.perf_counter() - t0
    return {"n": args.kmeans_n, "d": args.head_dim, "clusters": args.kmeans_c, "iters": 10,
            "dtype": "float16", "seconds": dt, "inertia_first_last": [float(res.inertia[0]), float(res.inertia[-1])]}


def decode_steps(dec, layers, q, kv_new, reps):
    """Median seconds of one full decode step (every layer), and the mean read fraction."""
    times, read = [], []
    for _ in range(reps):
        for s in range(q.shape[0]):
            t0 = time.perf_counter()
            for l in range(layers):
                dec.decode(l, q[s][None], kv_new[s][None], kv_new[s][None])
            times.append(time.perf_counter() - t0)
            read.append(np.mean([dec.stats(l)["read_fraction"].mean() for l in range(layers)]))
    return float(np.median(times)), float(np.mean(read))


def time_decode(args, rng, layers, context, policies=("dense", "tactic"), progress=True):
    hkv, hq, d = args.kv_heads, args.q_heads, args.head_dim
    keys, centres = mixture(rng, context, hkv, d)
    vals = rng.standard_normal((context, hkv, d)).astype(np.float16)
    q = queries(rng, centres, hq, args.steps, args.sharpness)
    kv_new = rng.standard_normal((args.steps, hkv, d)).astype(np.float16)
    out = {}
    for policy in policies:
        dec = tactic.SparseDecoder(layers, hq, hkv, d, max_tokens=context + args.steps * args.reps,
                                   policy=policy, target=args.target, kmeans_iters=args.kmeans_iters)
        t0 = time.perf_counter()
        for l in tqdm(range(layers), desc=f"prefill {policy} {context}", leave=False, disable=not progress):
            dec.prefill(l, keys, vals)
        prefill = time.perf_counter() - t0
        step, read = decode_steps(dec, layers, q, kv_new, args.reps)
        out[policy] = {"step_ms": step * 1e3, "read_fraction": read, "prefill_s": prefill,
                       "store_gib": dec.nbytes / 2**30}
        del dec
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--sweep", type=int, nargs="*", default=[8192, 16384, 32768, 65536],
                   help="contexts for the one-layer linearity sweep")
    p.add_argument("--target", type=float, default=0.9)
    p.add_argument("--sharpness", type=float, default=6.0,
                   help="query = sharpness * (sum of 3 key centres) + noise; larger is more skewed")
    p.add_argument("--kmeans-iters", type=int, default=10, help="k-means iterations at prefill")
    p.add_argument("--kmeans-n", type=int, default=32768)
    p.add_argument("--kmeans-c", type=int, default=2048)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--skip", nargs="*", default=[], choices=["kmeans", "decode", "sweep"])
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    res = {"device": f"cpu: {cpu_name()}, {os.cpu_count()} threads", "tactic": tactic.__version__,
           "date": time.strftime("%Y-%m-%d"), "args": vars(args)}
    print(res["device"])
    if "kmeans" not in args.skip:
        res["kmeans"] = time_kmeans(args, rng)
        k = res["kmeans"]
        print(f"k-means {k['n']}x{k['d']} fp16 -> C={k['clusters']}, 10 iters: {k['seconds']:.2f} s")
    if "decode" not in args.skip:
        r = time_decode(args, rng, args.layers, args.context)
        res["decode"] = r
        print(f"decode step, {args.layers} layers x {args.q_heads}/{args.kv_heads} heads x D{args.head_dim}, "
              f"context {args.context}, fp16 store {r['dense']['store_gib']:.2f} GiB:")
        for pol, v in r.items():
            print(f"  {pol:<7} {v['step_ms']:9.2f} ms/step  read {v['read_fraction']:.1%}  "
                  f"(prefill of all layers {v['prefill_s']:.1f} s)")
    if "sweep" not in args.skip and args.sweep:
        res["sweep"] = {}
        print(f"one layer, {args.q_heads}/{args.kv_heads} heads x D{args.head_dim}:")
        for n in tqdm(args.sweep, desc="context sweep", leave=False):
            r = time_decode(args, rng, 1, n, progress=False)
            res["sweep"][n] = r
            print(f"  context {n:>6}: dense {r['dense']['step_ms']:7.3f} ms, tactic "
                  f"{r['tactic']['step_ms']:7.3f} ms (read {r['tactic']['read_fraction']:.1%})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
