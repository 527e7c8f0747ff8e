"""Can the prior rule's stop be decided before the exact head is read? (CPU study for issue 19)

The GPU threshold step runs two attention passes because the prior rule's stop bucket bx needs
alpha = (exact mass of the head) / (centroid prior of the head), known only after the exact
head is read. A one-pass design would take bx from a guessed alpha before any attention (the
always-read sinks and recent rows are few and can be scored exactly first), read every bucket
<= bx_guess in one pass, compute the true alpha from the head's rows in that pass, and top up
(bx_guess, bx_true] only for the heads that fell short, so it never reads fewer tokens than the
rule asks for. What that costs depends on how well alpha carries over; this measures it.

Guesses, all calibration-free (no constant fitted to a model):
  prev     alpha of the same (layer, query head) at the previous decode step (also x2, x4:
           what a safety factor would buy; reported, not proposed)
  one      alpha = 1 (the uncalibrated centroid prior)
  inf      alpha -> infinity: the prior alone, the always-read rows' mass ignored. The stop
           bucket grows with alpha (the rule is am + alpha prior(<= k) >= P_eff (am + alpha
           prior(all)): alpha only weighs the exact sinks and recent rows against the clustered
           prior), so this one never needs a top-up; the question is what it reads
Per family and P: the share of head-steps (and of KV heads, where any of its query heads
falls short) that need a top-up pass, and the tokens one pass reads against the rule's own.

The rule is modelled in float64 over the store's own clusters (SparseDecoder.layout), as
tests/test_selection_threshold.py models it; SmolLM2 queries are consecutive real decode steps
(the last `steps` tokens of a licence text over the ones before), the synthetic families'
queries are independent draws (so 'prev' there is alpha from an unrelated query of the head).

  python bench/alpha_reuse.py [--quick] [--out bench/results]
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import generalize as G  # noqa: E402  (the workload families and SmolLM2 capture)

import tactic  # noqa: E402

KB = 2048          # score buckets (cpp/src/score_buckets.hpp)
MARGIN = 0.35      # SelectOptions defaults (the prior rule as shipped)
HEAD_FRACTION = 0.02
SPREAD = 0.75
# guess -> factor on its alpha: the previous step's (x1, and x2 / x4 to see the trade-off
# between top-ups and tokens a safety factor buys), 1, and infinity
GUESSES = {"prev": 1.0, "prev x2": 2.0, "prev x4": 4.0, "one": 1.0, "inf": 1.0}


def head_step(q, lay, target):
    """The threshold rule for one scaled query over one KV head's layout: (log alpha, a closure
    giving the stop bucket for a guessed log alpha, the true stop bucket, cumulative tokens)."""
    off = lay["offsets"].astype(np.int64)
    size = np.diff(off)
    ns, nclu = lay["n_sink"], lay["n_clustered"]
    keys = lay["keys"].astype(np.float64)
    score = lay["centroids"].astype(np.float64) @ q + 0.5 * SPREAD * (q @ q) * lay["spreads"].astype(np.float64)
    mx, mn = score.max(), score.min()
    bpl = float(np.clip((KB - 1) / (mx - mn), 64.0, 1e6)) if mx > mn else 64.0
    x = (mx - score) * bpl
    bucket = np.where(x < KB - 1, np.maximum(0, np.floor(x)), KB - 1).astype(np.int64)
    tok = np.cumsum(np.bincount(bucket, weights=size, minlength=KB))
    pri = np.cumsum(np.bincount(bucket, weights=size * np.exp(score - mx), minlength=KB))  # rel. to mx
    bh = int(np.argmax(tok >= max(1.0, HEAD_FRACTION * nclu)))
    always = np.r_[np.arange(ns), np.arange(ns + nclu, len(keys))]
    exact = np.concatenate([np.arange(ns + off[j], ns + off[j + 1]) for j in np.flatnonzero(bucket <= bh)])
    la, le = keys[always] @ q, keys[exact] @ q
    m = max(la.max(initial=-np.inf), le.max(), mx)
    am, ex = np.exp(la - m).sum(), np.exp(le - m).sum()
    prim = pri * np.exp(mx - m)  # the prior relative to m
    p_eff = min(1.0, target + MARGIN * (1 - target))

    def stop(alpha):  # alpha: exact / prior over the head (scale-free); inf: the prior alone
        if np.isinf(alpha):
            reach = prim >= p_eff * prim[-1]
        else:
            reach = am + alpha * prim >= p_eff * (am + alpha * prim[-1])
        reach[:bh] = False
        return int(np.argmax(reach)) if reach.any() else KB - 1

    log_alpha = float(np.log(ex) - np.log(prim[bh]))
    # The rule as shipped (exact head mass plus the calibrated prior beyond it).
    z = am + ex + np.exp(log_alpha) * max(0.0, prim[-1] - prim[bh])
    reach = am + ex + np.exp(log_alpha) * (prim - prim[bh]) >= p_eff * z
    reach[:bh] = False
    bx = int(np.argmax(reach)) if reach.any() else KB - 1
    return log_alpha, stop, bx, tok


def study(keys, queries, targets, scale=None, dtype="float16"):
    """keys [N, Hkv, D], queries [steps, Hq, D]: per (guess, P) the per-head-step records."""
    n, hkv, d = keys.shape
    steps, hq, _ = queries.shape
    g = hq // hkv
    keys = keys.astype(dtype).astype(np.float32)
    scale = scale or d ** -0.5
    dec = tactic.SparseDecoder(1, hq, hkv, d, max_tokens=n, dtype=dtype)
    dec.prefill(0, keys, keys)
    lays = [dec.layout(0, 0, h) for h in range(hkv)]
    out = {}
    for P in targets:
        prev = [None] * hq
        for t in range(steps):
            need = {k: np.zeros(hkv, bool) for k in GUESSES}
            for h in range(hq):
                kv = h // g
                q = queries[t, h].astype(np.float64) * scale
                la, stop, bx, tok = head_step(q, lays[kv], P)
                for guess in GUESSES:
                    a = {"one": 0.0, "inf": np.inf}.get(guess, prev[h])
                    if a is None:
                        continue
                    bg = stop(np.exp(a) * GUESSES[guess])
                    r = out.setdefault((guess, P), {"topup": [], "ratio": [], "kv_topup": []})
                    r["topup"].append(bool(bg < bx))
                    r["ratio"].append(float(max(tok[bg], tok[bx]) / max(tok[bx], 1.0)))
                    need[guess][kv] |= bg < bx
                prev[h] = la
            for guess in need:
                if (guess, P) in out and (not guess.startswith("prev") or t > 0):
                    out[(guess, P)]["kv_topup"].extend(bool(x) for x in need[guess])
    return out


def summary(r):
    ratio = np.array(r["ratio"])
    return {"head_steps": len(r["topup"]), "topup_heads": float(np.mean(r["topup"])),
            "topup_kv_heads": float(np.mean(r["kv_topup"])), "tokens_mean": float(ratio.mean()),
            "tokens_p50": float(np.median(ratio)), "tokens_p90": float(np.quantile(ratio, 0.9))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4 synthetic families, one text, fewer layers")
    ap.add_argument("--targets", nargs="+", type=float, default=[0.9, 0.95])
    ap.add_argument("--n", type=int, default=8192, help="synthetic context (SmolLM2: 4096 tokens of text)")
    ap.add_argument("--steps", type=int, default=12, help="decode steps per workload")
    ap.add_argument("--out", default="bench/results")
    a = ap.parse_args(argv)
    try:
        from tqdm import tqdm
    except ImportError:  # progress is a convenience
        def tqdm(x, **k):
            return x
    results = {}
    fams = G.synthetic_families(a.quick)
    for name, p in tqdm(fams.items(), desc="synthetic families"):
        keys, qs = G.synth(p["d"], p["g"], p["hkv"], a.n, a.steps, rms=p["rms"], sink=p["sink"],
                           heads=p["heads"], seed=7)
        G.merge(results.setdefault(name, {}), study(keys, qs, a.targets))
    texts = ["GPL-3"] if a.quick else ["GPL-3", "Apache-2.0"]
    wl = G.smollm2_workloads(texts, 4096, a.steps)
    for text, layers in wl.items():
        for li, (k, q) in enumerate(tqdm(layers, desc=f"SmolLM2 {text}")):
            if a.quick and li % 3:
                continue
            G.merge(results.setdefault("SmolLM2", {}), study(k, q, a.targets, scale=64 ** -0.5))
    table = {fam: {f"{g} P={P}": summary(r) for (g, P), r in res.items()} for fam, res in results.items()}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / "alpha-reuse-cpu-2026-12-06"
    (stem.with_suffix(".json")).write_text(json.dumps({"argv": sys.argv[1:], "margin": MARGIN,
                                                      "head_fraction": HEAD_FRACTION, "results": table}, indent=1))
    lines = ["| family | guess, P | head-steps | heads needing a top-up | KV heads needing one | "
             "one pass's tokens / rule's (mean, p50, p90) |", "|---|---|---|---|---|---|"]
    for fam, rows in table.items():
        for key, s in rows.items():
            lines.append(f"| {fam} | {key} | {s['head_steps']} | {s['topup_heads']:.1%} | {s['topup_kv_heads']:.1%} | "
                         f"{s['tokens_mean']:.2f} / {s['tokens_p50']:.2f} / {s['tokens_p90']:.2f} |")
    (stem.with_suffix(".md")).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(table, a.targets, stem.with_suffix(".png"))
    return 0


def plot(table, targets, path):
    """Per P: KV heads needing a top-up against the tokens one pass reads, a point per family
    and guess (SmolLM2 outlined)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(targets), figsize=(5.5 * len(targets), 4.5), squeeze=False)
    colours = dict(zip(GUESSES, ["C0", "C1", "C2", "C3", "C4"]))
    for ax, P in zip(axes[0], targets):
        for guess, c in colours.items():
            for fam, rows in table.items():
                s = rows.get(f"{guess} P={P}")
                if s:
                    ax.scatter(s["tokens_mean"], 100 * s["topup_kv_heads"], color=c, s=60 if fam == "SmolLM2" else 18,
                               edgecolors="k" if fam == "SmolLM2" else "none", label=guess if fam == "SmolLM2" else None)
        ax.set_xlabel("tokens one pass reads / the rule's (mean)")
        ax.set_ylabel("KV heads needing a top-up pass (%)")
        ax.set_title(f"P = {P}: alpha guessed before the attention")
        ax.grid(alpha=0.3)
        ax.legend(title="guess (SmolLM2 outlined)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
