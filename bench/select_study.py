#!/usr/bin/env python3
"""How close Tactic's stop rule gets to the cluster-optimal set, and what would get closer.

A float64 NumPy model of the tactic policy's selection (cpp/src/select.cpp), run on real
SmolLM2 attention captured by bench/make_fixtures.py (all layers, one text per file), so
ranking and estimation variants can be compared in seconds without touching the kernels.
The clusters are the library's own: each (layer, KV head) is prefilled into a
`tactic.SparseDecoder` and its layout read back, so only the selection is modelled here.

Per (text, layer, KV head, decode step) and variant it reports the union's tokens, the
share of unions whose every query head keeps true mass >= P, and the ratio to the
cluster-optimal union (fewest whole clusters, plus sinks and the recent segment, whose
true mass reaches P for every head), and `bytes`: what the step reads as a share of the
context's K+V (the union's K and V, one centroid per cluster, and the exact-head K rows each
query head scores before it stops, which the attention reads again).

Variants (--rank): `dot` ranks clusters by q.c (the paper); `iso` adds the isotropic
log-normal term |q|^2 s_c^2 / 2 (s_c^2: the cluster's mean squared distance to its
centroid per dimension), so a wide cluster's expected exp-score is not understated
(Jensen); `cov` uses the full covariance q^T S_c q / 2 (a reference, D^2 per cluster);
`pc1`/`pc2` keep its top 1 or 2 principal directions plus an isotropic rest (D per direction).
The prior mass of an unread cluster is size_c * exp(rank score), scaled to the exact reads.
Stop rules (--stop): `peff` is the library's acc >= P_eff z; `tail` asks
acc >= P (acc + kappa * rest), a margin on the estimated rest only; `adapt` is `tail` with
kappa = exp(kappa_a + kappa * sd), sd the mass-weighted spread of log(exact / prior) over
the exact head; `true` stops where the true mass reaches P (the ranking's own limit).

Usage:
  python bench/select_study.py /tmp/study/gpl3.npz /tmp/study/lgpl.npz --target 0.9
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np

import tactic
from tactic.fixtures import load_fixture


def layouts(cap, n0, scale, num_sink, cluster_size):
    """Per KV head: (cluster id of each prompt position (-1: always read), sizes, centroids,
    per-cluster isotropic variance, per-cluster covariance)."""
    T, hkv, d = cap.keys.shape
    dec = tactic.SparseDecoder(1, hkv * 3, hkv, d, max_tokens=T + 1, dtype="float32",
                               num_sink=num_sink, cluster_size=cluster_size)
    dec.prefill(0, cap.keys[:n0].astype(np.float32), cap.values[:n0].astype(np.float32))
    out = []
    for h in range(hkv):
        lay = dec.layout(0, 0, h)
        off = lay["offsets"].astype(np.int64)
        c = len(off) - 1
        ns, nc = int(lay["n_sink"]), int(lay["n_clustered"])
        pos = np.asarray(lay["positions"])[ns:ns + nc]
        cid = np.full(n0, -1, np.int64)
        cid[pos] = np.repeat(np.arange(c), np.diff(off))
        cent = np.asarray(lay["centroids"], np.float64).reshape(c, d)
        k = cap.keys[:n0, h].astype(np.float64)
        sizes = np.diff(off)
        dev = k[pos] - cent[cid[pos]]
        var = np.bincount(cid[pos], weights=(dev ** 2).sum(1), minlength=c) / np.maximum(sizes, 1) / d
        cov = np.zeros((c, d, d))
        np.add.at(cov, cid[pos], dev[:, :, None] * dev[:, None, :])
        cov /= np.maximum(sizes, 1)[:, None, None]
        out.append((cid, sizes, cent, var, cov))
    return out


def select_case(p, logits, cid, sizes, rank_score, target, kappa, stop, head_fraction, share,
                kappa_a=0.0):
    """Model of select_tactic for one KV head and step. p, logits: [G, n] true probabilities
    and scaled logits; rank_score: [G, C]. Returns (union cluster mask, per-head chosen masks)."""
    g, n = p.shape
    c = len(sizes)
    nclu = sizes.sum()
    clustered = cid >= 0
    # exact exp-scores per cluster (relative to each head's max logit), true masses
    union = np.zeros(c, bool)
    chosen_all = []
    head_tok = 0  # exact-head tokens summed over the G heads (K rows scored before the stop)
    for h in range(g):
        m = logits[h].max()
        e = np.exp(logits[h] - m)
        ce = np.bincount(cid[clustered], weights=e[clustered], minlength=c)
        always = e[~clustered].sum()
        order = np.argsort(-rank_score[h], kind="stable")
        cum_tok = np.cumsum(sizes[order])
        nhead = max(1, int(np.searchsorted(cum_tok, max(1.0, head_fraction * nclu)) + 1))
        nhead = min(nhead, c)
        read = np.zeros(c, bool)
        read[order[:nhead]] = True
        head_tok += sizes[order[:nhead]].sum()
        if share:
            read |= union
        prior = sizes * np.exp(rank_score[h] - m)
        alpha = ce[read].sum() / prior[read].sum()
        est = np.where(read, ce, alpha * prior)
        acc0 = always + ce[read].sum()
        unread_order = order[~read[order]]
        cum = acc0 + np.cumsum(est[unread_order])
        total = acc0 + est[~read].sum()
        if stop == "true":  # reference: stop where the true mass reaches P (needs every score)
            ctrue = np.bincount(cid[clustered], weights=p[h, clustered], minlength=c)
            tacc0 = p[h, ~clustered].sum() + ctrue[read].sum()
            tcum = tacc0 + np.cumsum(ctrue[unread_order])
            k = 0 if tacc0 >= target else min(len(tcum), int(np.searchsorted(tcum, target)) + 1)
        elif stop == "peff":
            peff = min(1.0, target + kappa * (1 - target))
            need = peff * total
            k = int(np.searchsorted(cum, need)) + 1 if acc0 < need else 0
        else:  # tail: acc >= P * (acc + kappa * rest), rest = total - acc
            if stop == "adapt":  # kappa grows with the spread of the exact/prior ratio seen so far
                hd = order[:nhead]
                w = ce[hd] / ce[hd].sum()
                lr = np.log(np.maximum(ce[hd], 1e-300) / prior[hd])
                mu = (w * lr).sum()
                kap = np.exp(kappa_a + kappa * np.sqrt((w * (lr - mu) ** 2).sum()))
            else:
                kap = kappa
            rest = total - cum
            ok = cum >= target * (cum + kap * rest)
            k = 0 if acc0 >= target * (acc0 + kap * (total - acc0)) else (int(np.argmax(ok)) + 1 if ok.any() else len(cum))
        chosen = read.copy()
        chosen[unread_order[:k]] = True
        chosen_all.append(chosen)
        union |= chosen
    return union, chosen_all, head_tok


def cluster_optimal_union(p, cid, sizes, target):
    g, n = p.shape
    c = len(sizes)
    clustered = cid >= 0
    fixed = p[:, ~clustered].sum(1)
    pick = np.zeros(c, bool)
    for h in range(g):
        cm = np.bincount(cid[clustered], weights=p[h, clustered], minlength=c)
        order = np.argsort(-cm, kind="stable")
        need = target - fixed[h]
        if need <= 0:
            continue
        k = min(c, int(np.searchsorted(np.cumsum(cm[order]), need)) + 1)
        pick[order[:k]] = True
    return pick


_EIG = {}  # id(cov) -> (cov, its eigendecomposition); cov kept so the id stays unique


def rank_scores(q, cent, var, cov, mode, beta):
    s = q @ cent.T                                     # [G, C]
    if mode == "iso":
        s = s + beta * 0.5 * (q ** 2).sum(1)[:, None] * var[None]
    elif mode == "diag":
        s = s + beta * 0.5 * (q ** 2) @ np.diagonal(cov, axis1=1, axis2=2).T
    elif mode == "cov":
        s = s + beta * 0.5 * np.einsum("gd,cde,ge->gc", q, cov, q)
    elif mode in ("pc1", "pc2"):
        # the covariance as its top r principal directions plus an isotropic rest: what r extra
        # D-vectors per cluster (instead of D^2 floats) would keep of `cov`
        r = int(mode[2])
        if id(cov) not in _EIG:                        # once per (layer, KV head) layout
            _EIG[id(cov)] = (cov, np.linalg.eigh(cov))
        lam, vec = _EIG[id(cov)][1]                    # ascending; [C, D], [C, D, D]
        top_l, top_v = lam[:, -r:], vec[:, :, -r:]     # [C, r], [C, D, r]
        rest = (lam.sum(1) - top_l.sum(1)) / cov.shape[1]
        proj = np.einsum("gd,cdr->gcr", q, top_v)
        s = s + beta * 0.5 * ((q ** 2).sum(1)[:, None] * rest[None] + (proj ** 2 * top_l[None]).sum(2))
    return s


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("fixtures", nargs="+")
    ap.add_argument("--target", type=float, nargs="+", default=[0.9])
    ap.add_argument("--rank", nargs="+", default=["dot", "iso"], choices=["dot", "iso", "diag", "cov", "pc1", "pc2"])
    ap.add_argument("--beta", type=float, nargs="+", default=[1.0], help="weight of the variance term")
    ap.add_argument("--stop", nargs="+", default=["peff"], choices=["peff", "tail", "true", "adapt"])
    ap.add_argument("--kappa", type=float, nargs="+", default=[0.5],
                    help="peff: the margin (P_eff = P + kappa (1-P)); tail: the tail factor")
    ap.add_argument("--kappa-a", type=float, nargs="+", default=[0.0],
                    help="adapt: kappa = exp(kappa_a + kappa * sd of log(exact/prior) over read clusters)")
    ap.add_argument("--steps", type=int, default=16, help="decode steps per fixture (from its first)")
    ap.add_argument("--layers", default="all")
    ap.add_argument("--head-fraction", type=float, default=0.02)
    ap.add_argument("--no-share", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    variants = []
    for t, r, st in itertools.product(args.target, args.rank, args.stop):
        for b in (args.beta if r != "dot" else [0.0]):
            for k in args.kappa:
                for ka in (args.kappa_a if st == "adapt" else [0.0]):
                    variants.append((t, r, b, st, k, ka))
    acc = {v: {"tok": [], "opt": [], "ok": [], "head_ok": [], "ctx": [], "bytes": []} for v in variants}
    for path in args.fixtures:
        fx = load_fixture(path)
        n0, scale = fx.n_prefill, fx.scale
        layers = sorted(fx.layers) if args.layers == "all" else [int(x) for x in args.layers.split(",")]
        for li in layers:
            cap = fx.layers[li]
            lays = layouts(cap, n0, scale, 4, 16)
            hkv = cap.keys.shape[1]
            g = cap.queries.shape[1] // hkv
            for step in range(min(args.steps, fx.n_decode)):
                n = n0 + step + 1
                for h in range(hkv):
                    cid0, sizes, cent, var, cov = lays[h]
                    cid = np.concatenate([cid0, np.full(n - n0, -1)])
                    k = cap.keys[:n, h].astype(np.float64)
                    q = cap.queries[step, h * g:(h + 1) * g].astype(np.float64) * scale
                    logits = q @ k.T
                    p = np.exp(logits - logits.max(1, keepdims=True))
                    p /= p.sum(1, keepdims=True)
                    n_always = (cid < 0).sum()
                    opt = {}
                    for v in variants:
                        t, r, b, st, kap, ka = v
                        if t not in opt:
                            opt[t] = n_always + sizes[cluster_optimal_union(p, cid, sizes, t)].sum()
                        rs = rank_scores(q, cent, var, cov, r, b)
                        union, _, head_tok = select_case(p, logits, cid, sizes, rs, t, kap, st,
                                               args.head_fraction, not args.no_share, ka)
                        tok = n_always + sizes[union].sum()
                        mask = np.concatenate([union, [True]])[np.where(cid >= 0, cid, len(sizes))]
                        mass = (p * mask[None]).sum(1)
                        a = acc[v]
                        a["tok"].append(tok)
                        a["opt"].append(opt[t])
                        a["ok"].append(bool((mass >= t - 1e-12).all()))
                        a["head_ok"].append(float((mass >= t - 1e-12).mean()))
                        a["ctx"].append(n)
                        # bytes per step in K-row units: union K+V, centroids, exact-head K rows
                        a["bytes"].append(2 * tok + len(sizes) + head_tok)
        print(f"done {path}", file=sys.stderr)
    rows = []
    print(f"{'P':>5} {'rank':>5} {'beta':>5} {'stop':>5} {'kappa':>6} {'k_a':>5} {'tokens':>8} {'optimal':>8} "
          f"{'ratio':>6} {'unions>=P':>10} {'heads>=P':>9} {'read':>6} {'bytes':>6}")
    for v in variants:
        a = {k: np.asarray(x, float) for k, x in acc[v].items()}
        row = dict(target=v[0], rank=v[1], beta=v[2], stop=v[3], kappa=v[4], kappa_a=v[5], tokens=a["tok"].mean(),
                   optimal=a["opt"].mean(), ratio=a["tok"].mean() / a["opt"].mean(),
                   unions_ok=a["ok"].mean(), heads_ok=a["head_ok"].mean(),
                   read=(a["tok"] / a["ctx"]).mean(), cases=len(a["tok"]),
                   bytes_kv=(a["bytes"] / (2 * a["ctx"])).mean())
        rows.append(row)
        print(f"{v[0]:5.2f} {v[1]:>5} {v[2]:5.2f} {v[3]:>5} {v[4]:6.2f} {v[5]:5.2f} {row['tokens']:8.1f} "
              f"{row['optimal']:8.1f} {row['ratio']:6.3f} {row['unions_ok']:10.3f} {row['heads_ok']:9.3f} "
              f"{row['read']:6.3f} {row['bytes_kv']:6.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
