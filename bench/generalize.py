#!/usr/bin/env python
"""Does a stop rule reach P on models it was not tuned on? The generalisation test bed (issue 20).

Every rule runs with the same options on every workload:

* SmolLM2-135M, all 30 layers, real text (licence files, tokens never used for tuning unless
  named), the last `--steps` positions as decode queries over the keys before them;
* synthetic families that differ the way real models do: head dim 64 / 128 / 256, 1 / 4 / 8
  query heads per KV head, keys with and without RMS normalisation (unit-RMS keys times a
  learned per-channel scale), a strong attention sink or none, flat or peaked heads.

Truths are float64 NumPy over the stored (rounded) keys. Per family and P it reports: the share
of KV-head unions whose every query head has mass >= P over the union, the share of query heads
with mass >= P over their own selection, tokens per union against the cluster-optimal union
(each query head walks the same ranking, q.c + spread |q|^2 s_c / 2, whole clusters, until its
true mass reaches P; sinks and recent rows always count), and the oracle / top-k / Quest at the
same budget (top-k and Quest get the rule's own union size, step by step).

    python bench/generalize.py --out bench/results/generalize      # everything (~20 min, 2 cores)
    python bench/generalize.py --quick                               # a smaller run
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zlib
from pathlib import Path

import numpy as np

import tactic

RULES = {  # name -> SparseDecoder options; every family gets the same ones
    "certified": {"stop_rule": "certified"},
    "prior": {"stop_rule": "prior"},
    "certified-nohead": {"stop_rule": "certified", "head_fraction": 0.0},
    # the ranking's spread weight at its Gaussian value (E exp(q.k) for k ~ N(c, s I)), not
    # the 0.75 chosen on SmolLM2 with the prior rule
    "certified-spread1": {"stop_rule": "certified", "spread": 1.0},
    # the sample's size: its exact masses are most of the certified rule's bytes on a GPU
    "certified-s32": {"stop_rule": "certified", "tail_samples": 32},
    "certified-s128": {"stop_rule": "certified", "tail_samples": 128},
    # heads selecting independently (CUDA's only mode), and the same calibrated on the union
    # of the group's exact heads (group_head: the GPU design that takes the exact masses from
    # one attention pass over that union instead of a separate exact read)
    "prior-indep": {"stop_rule": "prior", "share_group": False},
    "prior-grouphead": {"stop_rule": "prior", "share_group": False, "group_head": True},
    # CUDA's threshold selection (its CPU twin): the prior rule's exact head and stop taken as
    # whole score buckets, heads independent; judged against prior-indep
    "prior-threshold": {"stop_rule": "prior", "share_group": False, "selection_kernel": "threshold"},
    "certified-indep": {"stop_rule": "certified", "share_group": False},
    "certified-grouphead": {"stop_rule": "certified", "share_group": False, "group_head": True},
}


# ----------------------------------------------------------------------------- workloads
def synth(d: int, g: int, hkv: int, n: int, steps: int, *, rms: bool, sink: bool, heads: str,
          seed: int):
    """keys [n, hkv, d], queries [steps, hkv*g, d] (unscaled), of one synthetic model."""
    rng = np.random.default_rng(seed)
    n_topics = 48
    keys = np.empty((n, hkv, d))
    qs = np.empty((steps, hkv * g, d))
    for kv in range(hkv):
        topics = rng.normal(size=(n_topics, d))
        # Text has locality: topics come in runs of a few dozen tokens.
        runs = np.repeat(rng.integers(n_topics, size=n // 16 + 1), 16)[:n]
        chan = np.exp(rng.normal(0, 0.5, size=d))          # outlier channels
        k = (topics[runs] + 0.8 * rng.normal(size=(n, d)) + 0.7 * rng.normal(size=d)) * chan
        s_dir = rng.normal(size=d)
        s_dir /= np.linalg.norm(s_dir)
        if sink:  # the sink direction is (almost) only in token 0's key
            k -= np.outer(k @ s_dir, s_dir)
        if rms:
            gamma = np.exp(rng.normal(0, 0.3, size=d))       # learned per-channel scale
            k = k / np.sqrt(np.mean(k ** 2, axis=1, keepdims=True)) * gamma
        if sink:
            k[0] = s_dir * np.median(np.linalg.norm(k, axis=1))
        keys[:, kv] = k
        for t in range(steps):
            focus = topics[rng.integers(n_topics, size=2)] * chan  # the group's shared interest
            for h in range(g):
                w = rng.dirichlet(np.ones(2))
                q = w @ focus + 0.6 * np.linalg.norm(focus[0]) / np.sqrt(d) * rng.normal(size=d)
                if rms:
                    q = q * gamma
                # Sharpness: the std of the logits over the keys.
                lo, hi = {"flat": (0.3, 1.0), "peaked": (3.0, 6.0), "mixed": (1.0, 6.0)}[heads]
                sd = np.exp(rng.uniform(np.log(lo), np.log(hi)))
                logit = k[1:] @ q / np.sqrt(d)
                q = q * sd / max(np.std(logit), 1e-9)
                if sink:  # the sink takes 20-70% of the mass
                    logit = k[1:] @ q / np.sqrt(d)
                    frac = rng.uniform(0.2, 0.7)
                    lse = np.log(np.sum(np.exp(logit - logit.max()))) + logit.max()
                    want = lse + np.log(frac / (1 - frac))
                    cur = k[0] @ q / np.sqrt(d)
                    q = q + (want - cur) * np.sqrt(d) / (k[0] @ s_dir) * s_dir
                qs[t, kv * g + h] = q
    return keys, qs


def synthetic_families(quick: bool):
    base = dict(d=128, g=4, rms=False, sink=True, heads="mixed")
    fam = {"base d128 G4": {}}
    for d in (64, 256):
        fam[f"d{d}"] = {"d": d}
    for g in (1, 8):
        fam[f"G{g}"] = {"g": g}
    fam["rms keys"] = {"rms": True}
    fam["no sink"] = {"sink": False}
    fam["flat heads"] = {"heads": "flat"}
    fam["peaked heads"] = {"heads": "peaked"}
    fam["rms, no sink, flat"] = {"rms": True, "sink": False, "heads": "flat"}
    fam["d256 G4 Hkv1 rms"] = {"d": 256, "rms": True, "hkv": 1}
    fam["d256 G8 rms flat"] = {"d": 256, "g": 8, "rms": True, "heads": "flat"}
    fam["d64 G1 peaked no sink"] = {"d": 64, "g": 1, "heads": "peaked", "sink": False}
    out = {}
    for name, over in fam.items():
        p = {**base, **over}
        p.setdefault("hkv", 2)
        out[name] = p
    if quick:
        out = {k: out[k] for k in ("base d128 G4", "d256 G4 Hkv1 rms", "flat heads", "G8")}
    return out


def smollm2_workloads(texts, n_tokens: int, steps: int):
    """{text: (layers of (keys [N, Hkv, D], queries [steps, Hq, D]), scale)} from real text."""
    import torch
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from tactic import smollm2
    cap = {}

    def capture(module, query, key, value, attention_mask, scaling=None, **kw):
        cap[module.layer_idx] = (query[0].transpose(0, 1).float().numpy().copy(),
                                 key[0].transpose(0, 1).float().numpy().copy())
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kw)

    AttentionInterface.register("tactic_capture", capture)
    model, tok = smollm2.load()
    model.set_attn_implementation("tactic_capture")
    out = {}
    for name in texts:
        text = Path("/usr/share/common-licenses", name).read_text(encoding="utf-8")
        ids = tok(text, add_special_tokens=False)["input_ids"]
        while len(ids) < n_tokens:
            ids = ids + ids  # short texts repeat (an easy case for attention, and a real one)
        ids = ids[:n_tokens]
        cap.clear()
        with torch.no_grad():
            model(torch.tensor([ids]))
        layers = []
        for li in sorted(cap):
            q, k = cap[li]
            layers.append((k[: n_tokens - steps], q[n_tokens - steps:]))
        out[name] = layers
    return out


# ----------------------------------------------------------------------------- measures
def probs64(q, k, scale):
    """softmax over tokens of q [Hq, D] . k [N, Hkv, D], float64, [Hq, N]."""
    hq, hkv = q.shape[0], k.shape[1]
    g = hq // hkv
    lg = np.einsum("hd,nhd->hn", q.astype(np.float64) * scale,
                   np.repeat(k.astype(np.float64), g, axis=1))
    lg -= lg.max(axis=1, keepdims=True)
    p = np.exp(lg)
    return p / p.sum(axis=1, keepdims=True)


def cluster_optimal(p, qs, layout, target, spread):
    """Tokens of the cluster-optimal union of one KV head: each query head walks its ranking
    (q.c + spread |q|^2 s_c / 2) over whole clusters until its true mass reaches P."""
    pos = layout["positions"]
    ns, nc = int(layout["n_sink"]), int(layout["n_clustered"])
    if "offsets" not in layout:
        return len(pos)
    off = layout["offsets"].astype(np.int64)
    always = np.r_[pos[:ns], pos[ns + nc:]]
    chosen = np.zeros(len(off) - 1, bool)
    cid = np.repeat(np.arange(len(off) - 1), np.diff(off))
    for h in range(p.shape[0]):
        cm = np.bincount(cid, weights=p[h, pos[ns:ns + nc]], minlength=len(off) - 1)
        q = qs[h].astype(np.float64)
        score = layout["centroids"] @ q + 0.5 * spread * (q @ q) * layout["spreads"]
        order = np.argsort(-score, kind="stable")
        acc = p[h, always].sum() + np.r_[0, np.cumsum(cm[order])]
        k = int(np.searchsorted(acc, target * (1 - 1e-12)))  # clusters needed
        chosen[order[:k]] = True
    return len(always) + int(np.diff(off)[chosen].sum())


def topk_union_ok(p, budget, target):
    """Exact top-`budget` tokens by the group's largest probability: every head >= P?"""
    score = p.max(axis=0)
    idx = np.argpartition(-score, min(budget, len(score)) - 1)[:budget]
    return bool(np.all(p[:, idx].sum(axis=1) >= target)), p[:, idx].sum(axis=1)


def quest_union_ok(p, qs, k, budget, target, page=16, n_sink=4):
    """Quest at `budget` tokens: sinks first, then pages by sum_k max(q lo, q hi) (group max)."""
    n = k.shape[0]
    np_ = (n + page - 1) // page
    pad = np.concatenate([k, np.repeat(k[-1:], np_ * page - n, axis=0)]).reshape(np_, page, -1)
    lo, hi = pad.min(axis=1), pad.max(axis=1)
    ub = np.maximum(qs[:, None, :] * lo[None], qs[:, None, :] * hi[None]).sum(-1).max(axis=0)
    mark = np.zeros(n, bool)
    mark[:n_sink] = True
    for pg in np.argsort(-ub, kind="stable"):
        if mark.sum() >= budget:
            break
        mark[pg * page:(pg + 1) * page] = True
    m = p[:, mark].sum(axis=1)
    return bool(np.all(m >= target)), m


def oracle_union(p, target):
    """Tokens of the union of each head's exact minimal top-P set."""
    mark = np.zeros(p.shape[1], bool)
    for h in range(p.shape[0]):
        o = np.argsort(-p[h])
        c = np.cumsum(p[h, o])
        mark[o[: int(np.searchsorted(c, target * (1 - 1e-12))) + 1]] = True
    return int(mark.sum())


def run_workload(keys, queries, targets, rules, *, scale=None, dtype="float16", num_threads=1,
                 baselines=True):
    """Per (rule, P): lists of per-union and per-head results over the query steps."""
    n, hkv, d = keys.shape
    hq = queries.shape[1]
    g = hq // hkv
    keys = keys.astype(dtype).astype(np.float32)  # the stored values are the truth's values
    scale = scale or d ** -0.5
    res = {}
    for rname, opts in rules.items():
        dec = tactic.SparseDecoder(1, hq, hkv, d, max_tokens=n, dtype=dtype, record_selection=True,
                                   scale=scale, num_threads=num_threads, **opts)
        dec.prefill(0, keys, keys)
        lays = [dec.layout(0, 0, h) for h in range(hkv)]
        spread = 0.75 if "spread" not in opts else opts["spread"]
        for P in targets:
            dec.target = P
            r = res.setdefault((rname, P), {k: [] for k in (
                "union_ok", "union_min_mass", "head_ok", "head_mass", "est_mass", "kv_tokens",
                "opt_tokens", "oracle_tokens", "topk_ok", "quest_ok", "n")})
            for t in range(queries.shape[0]):
                q = queries[t].astype(np.float32)
                st = dec.select(0, q[None])
                p = probs64(q, keys, scale)
                for kv in range(hkv):
                    hs = slice(kv * g, (kv + 1) * g)
                    um = p[hs][:, st["kv_mask"][0, kv]].sum(axis=1)
                    r["union_ok"].append(bool(np.all(um >= P)))
                    r["union_min_mass"].append(float(um.min()))
                    tok = int(st["kv_tokens"][0, kv])
                    r["kv_tokens"].append(tok)
                    r["n"].append(n)
                    r["opt_tokens"].append(cluster_optimal(p[hs], q[hs] * scale, lays[kv], P, spread))
                    if baselines:
                        r["oracle_tokens"].append(oracle_union(p[hs], P))
                        r["topk_ok"].append(topk_union_ok(p[hs], tok, P)[0])
                        r["quest_ok"].append(quest_union_ok(p[hs], q[hs], keys[:, kv], tok, P)[0])
                for h in range(hq):
                    m = float(p[h, st["head_mask"][0, h]].sum())
                    r["head_mass"].append(m)
                    r["head_ok"].append(m >= P)
                    r["est_mass"].append(float(st["est_mass"][0, h]))
    return res


def summarise(acc):
    s = {}
    for key, r in acc.items():
        kv, opt = np.array(r["kv_tokens"], float), np.array(r["opt_tokens"], float)
        s[key] = {
            "unions": len(kv), "query_heads": len(r["head_ok"]),
            "union_share": float(np.mean(r["union_ok"])), "head_share": float(np.mean(r["head_ok"])),
            "head_mass_p5": float(np.percentile(r["head_mass"], 5)),
            "mean_head_mass": float(np.mean(r["head_mass"])),
            "tokens_per_union": float(kv.mean()), "opt_tokens_per_union": float(opt.mean()),
            "over_optimal": float(kv.sum() / opt.sum()),
            "read_fraction": float(kv.sum() / np.sum(r["n"])),
        }
        if r["oracle_tokens"]:
            s[key].update({"oracle_tokens_per_union": float(np.mean(r["oracle_tokens"])),
                           "topk_union_share": float(np.mean(r["topk_ok"])),
                           "quest_union_share": float(np.mean(r["quest_ok"]))})
    return s


def merge(into, res):
    for key, r in res.items():
        d = into.setdefault(key, {k: [] for k in r})
        for k, v in r.items():
            d[k].extend(v)


# ----------------------------------------------------------------------------- report
def markdown(results, targets, rules):
    lines = ["# Stop-rule generalisation (bench/generalize.py)", "",
             "Unions: share of KV-head unions whose every query head has mass >= P over the union. "
             "Heads: share of query heads with mass >= P over their own selection. Tokens: mean "
             "union size / the cluster-optimal union along the same ranking. Top-k and Quest: "
             "union share at the rule's own union size, step by step.", ""]
    for P in targets:
        lines += [f"## P = {P}", "",
                  "| family | rule | unions >= P | heads >= P | head mass p5 | tokens / union | "
                  "x cluster-optimal | read | top-k same budget | Quest same budget | oracle union |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for fam, per in results.items():
            for rname in rules:
                s = per.get(f"{rname}@{P}")
                if s is None:
                    continue
                lines.append(
                    f"| {fam} | {rname} | {100 * s['union_share']:.1f}% | {100 * s['head_share']:.1f}% | "
                    f"{s['head_mass_p5']:.3f} | {s['tokens_per_union']:.0f} | {s['over_optimal']:.2f}x | "
                    f"{100 * s['read_fraction']:.1f}% | "
                    f"{100 * s.get('topk_union_share', float('nan')):.1f}% | "
                    f"{100 * s.get('quest_union_share', float('nan')):.1f}% | "
                    f"{s.get('oracle_tokens_per_union', float('nan')):.0f} |")
        lines.append("")
    return "\n".join(lines)


def plot(results, targets, rules, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(targets), figsize=(6 * len(targets), 5), squeeze=False)
    for ax, P in zip(axes[0], targets):
        for fam, per in results.items():
            for rname, mk in zip(rules, "os^v"):
                s = per.get(f"{rname}@{P}")
                if s is None:
                    continue
                ax.scatter(s["read_fraction"], s["union_share"], marker=mk,
                           color={"certified": "tab:blue", "prior": "tab:orange"}.get(rname, "tab:purple"),
                           label=f"Tactic {rname}" if fam == next(iter(results)) else None)
                if rname == "certified" and "oracle_tokens_per_union" in s:  # absent with --no-baselines
                    n = s["tokens_per_union"] / s["read_fraction"]
                    ax.scatter(s["oracle_tokens_per_union"] / n, 1.0, marker="*", color="k",
                               label="oracle" if fam == next(iter(results)) else None)
                    ax.scatter(s["read_fraction"], s["topk_union_share"], marker="x", color="tab:green",
                               label="top-k, same budget" if fam == next(iter(results)) else None)
                    ax.scatter(s["read_fraction"], s["quest_union_share"], marker="+", color="tab:red",
                               label="Quest, same budget" if fam == next(iter(results)) else None)
        ax.axhline(0.97, ls=":", color="gray")
        ax.set_xscale("log")
        ax.set_xlabel("tokens read per KV-head union (fraction of context)")
        ax.set_ylabel(f"share of unions reaching P = {P}")
        ax.set_title(f"P = {P}: one point per family")
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--targets", type=float, nargs="+", default=[0.9, 0.95])
    ap.add_argument("--rules", nargs="+", default=list(RULES), choices=list(RULES))
    ap.add_argument("--tokens", type=int, default=4096, help="synthetic context length")
    ap.add_argument("--steps", type=int, default=8, help="decode queries per instance")
    ap.add_argument("--instances", type=int, default=2, help="synthetic models per family")
    ap.add_argument("--texts", nargs="*", default=["Apache-2.0", "GPL-2", "Artistic"],
                    help="licence files for SmolLM2 (none: skip the real model)")
    ap.add_argument("--smol-tokens", type=int, default=4096)
    ap.add_argument("--smol-steps", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="4 families, 1 instance, 1 text")
    ap.add_argument("--no-baselines", action="store_true", help="skip oracle / top-k / Quest")
    ap.add_argument("--out", default=None, help="write OUT.json, OUT.md and OUT.png")
    a = ap.parse_args(argv)
    if a.quick:
        a.instances, a.texts = 1, a.texts[:1]
    rules = {r: RULES[r] for r in a.rules}
    results = {}
    t0 = time.time()
    for fam, p in synthetic_families(a.quick).items():
        acc = {}
        for inst in range(a.instances):
            keys, qs = synth(p["d"], p["g"], p["hkv"], a.tokens, a.steps, rms=p["rms"], sink=p["sink"],
                             heads=p["heads"], seed=1000 * inst + zlib.crc32(fam.encode()) % 997)
            merge(acc, run_workload(keys, qs, a.targets, rules, baselines=not a.no_baselines))
        results[fam] = {f"{r}@{P}": v for (r, P), v in summarise(acc).items()}
        print(f"[{time.time() - t0:5.0f}s] {fam}: " + ", ".join(
            f"{k} U{100 * v['union_share']:.0f}% H{100 * v['head_share']:.0f}% {v['over_optimal']:.2f}x"
            for k, v in results[fam].items()), flush=True)
    if a.texts:
        acc = {}
        for name, layers in smollm2_workloads(a.texts, a.smol_tokens, a.smol_steps).items():
            for li, (k, q) in enumerate(layers):
                merge(acc, run_workload(k, q, a.targets, rules, baselines=not a.no_baselines))
            print(f"[{time.time() - t0:5.0f}s] SmolLM2 {name} done", flush=True)
        results["SmolLM2-135M (30 layers)"] = {f"{r}@{P}": v for (r, P), v in summarise(acc).items()}
        print("SmolLM2: " + ", ".join(
            f"{k} U{100 * v['union_share']:.0f}% H{100 * v['head_share']:.0f}% {v['over_optimal']:.2f}x"
            for k, v in results["SmolLM2-135M (30 layers)"].items()), flush=True)
    md = markdown(results, a.targets, rules)
    print(md)
    if a.out:
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"args": vars(a), "rules": rules, "tactic_commit": os.popen("git rev-parse --short HEAD").read().strip(),
                "seconds": time.time() - t0}
        out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
        out.with_suffix(".md").write_text(md + "\n")
        plot(results, a.targets, rules, out.with_suffix(".png"))
    return results


if __name__ == "__main__":
    sys.exit(main() is None)
