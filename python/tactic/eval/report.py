"""Aggregation of the harness's raw results, the targets check, Markdown and PNG output."""
from __future__ import annotations

import numpy as np

from .passkey import answer_key

POLICY_ORDER = ("tactic", "quest", "topk", "oracle")
COLORS = {"tactic": "tab:blue", "quest": "tab:orange", "topk": "tab:green", "oracle": "tab:gray",
          "dense": "black"}


def pool_texts(per_text: list) -> dict:
    """Mean over texts of every overall and per-layer number, per config."""
    out = {}
    for name in per_text[0]:
        runs = [t[name] for t in per_text]
        overall = {k: float(np.mean([r["overall"][k] for r in runs])) for k in runs[0]["overall"]}
        layers = {li: {k: float(np.mean([r["layers"][li][k] for r in runs])) for k in runs[0]["layers"][li]}
                  for li in runs[0]["layers"]}
        out[name] = {"overall": overall, "layers": layers}
    dense_ppl = out["dense"]["overall"]["ppl"]
    for name, r in out.items():
        r["overall"]["ppl_change"] = r["overall"]["ppl"] / dense_ppl - 1
    return out


def pool_passkey(trials: dict) -> dict:
    """trials: {length: [ {config: (answer, read), ...}, keys ]} -> accuracy and agreement."""
    out = {}
    for length, (answers, keys) in trials.items():
        if not answers:
            continue
        names = answers[0].keys()
        res = {}
        for name in names:
            got = [a[name][0] for a in answers]
            ok = [answer_key(g) == k for g, k in zip(got, keys)]
            same = [answer_key(g) == answer_key(a["dense"][0]) for g, a in zip(got, answers)]
            res[name] = {"accuracy": float(np.mean(ok)), "agrees_with_dense": float(np.mean(same)),
                         "read_fraction": float(np.mean([a[name][1] for a in answers]))}
        out[int(length)] = res
    return out


def targets(text: dict, passkey: dict, p: float = 0.9) -> list:
    """The issue's targets for the default policy at P=0.9: (name, met, detail)."""
    t, q = text.get(f"tactic@{p:g}"), text.get(f"quest@{p:g}")
    rows = []
    if t is None:
        return rows
    o = t["overall"]
    rows.append(("KV-head unions reaching P >= 95%", o["unions_reaching"] >= 0.95,
                 f"{o['unions_reaching']:.1%}"))
    rows.append(("tokens read <= 1.3x cluster-optimal (per query head)", o["head_tokens_over_optimal"] <= 1.3,
                 f"{o['head_tokens_over_optimal']:.2f}x ({o['head_tokens']:.0f} vs {o['opt_head_tokens']:.0f})"))
    rows.append(("tokens read <= 1.3x cluster-optimal (per KV-head union)", o["kv_tokens_over_optimal"] <= 1.3,
                 f"{o['kv_tokens_over_optimal']:.2f}x ({o['kv_tokens']:.0f} vs {o['opt_union_tokens']:.0f})"))
    if q is not None:
        qo = q["overall"]
        rows.append(("KL below quest at the same budget", o["kl"] < qo["kl"],
                     f"{o['kl']:.4f} vs {qo['kl']:.4f} nats"))
        rows.append(("perplexity change below quest", abs(o["ppl_change"]) < abs(qo["ppl_change"]),
                     f"{o['ppl_change']:+.2%} vs {qo['ppl_change']:+.2%}"))
    for length, res in sorted(passkey.items()):
        name = f"tactic@{p:g}"
        if name in res:
            rows.append((f"passkey {length}: accuracy equal to dense",
                         res[name]["accuracy"] >= res["dense"]["accuracy"],
                         f"{res[name]['accuracy']:.0%} vs {res['dense']['accuracy']:.0%}"))
    return rows


def markdown(data: dict) -> str:
    text, passkey, meta = data["text"], data["passkey"], data["meta"]
    lines = [f"# Tactic accuracy on SmolLM2-135M-Instruct ({meta['date']})", "",
             f"Machine: {meta['machine']}; device {meta['device']}; torch {meta['torch']}, "
             f"transformers {meta['transformers']}.", "",
             f"Sizes: {len(meta['texts'])} texts ({', '.join(f'{n} ({c} tokens)' for n, c in meta['texts'])}), "
             f"teacher-forced decoding of the last {meta['steps']} tokens of each; passkey "
             f"{meta['passkey_trials']} trials at each of {meta['passkey_lengths']} tokens. "
             f"Decoder options: {meta['decoder_opts'] or 'defaults'}; KV stored in float32.", "",
             "Quest and top-k get, at every step, layer and KV head, the tokens Tactic read there. "
             "Numbers are means over texts, layers, steps and heads. *read*: tokens read per KV head "
             "(the union of its query heads) over the context; *mass*: true softmax mass of that union "
             "per query head; *heads/unions >= P*: query heads (KV heads with all their query heads) "
             "whose union mass reaches P; attn error: ||o - o_dense|| / ||o_dense|| of each query head's "
             "attention output against exact float64 attention over the same q/k/v; KL: KL(dense || policy) of the next-token distribution; "
             "ppl: change of perplexity of the true next tokens against dense.", ""]
    if text:
        lines += ["| P | policy | read | tokens/KV head | mass | heads >= P | unions >= P | attn error mean / p90 | KL (nats) | KL p90 | ppl change |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        d = text["dense"]["overall"]
        lines.append(f"| - | dense | 100% | {d['kv_tokens']:.0f} | 1.000 | - | - | {d['out_error']:.1e} | 0 | 0 | ppl {d['ppl']:.3f} |")
        for p in meta["targets"]:
            for pol in POLICY_ORDER:
                r = text.get(f"{pol}@{p:g}")
                if r is None:
                    continue
                o = r["overall"]
                lines.append(f"| {p:g} | {pol} | {o['read_fraction']:.1%} | {o['kv_tokens']:.0f} | "
                             f"{o['union_mass']:.3f} | {o['heads_reaching']:.1%} | {o['unions_reaching']:.1%} | "
                             f"{o['out_error']:.4f} / {o['out_error_p90']:.4f} | "
                             f"{o['kl']:.4f} | {o['kl_p90']:.4f} | {o['ppl_change']:+.2%} |")
        lines.append("")
        lines += ["Tactic against the cluster-optimal count (fewest tokens in whole clusters, plus the "
                  "sinks and recent tokens it always reads, whose true mass reaches P):", "",
                  "| P | tokens per query head | cluster-optimal | ratio | tokens per KV head | optimal union | ratio |",
                  "|---|---|---|---|---|---|---|"]
        for p in meta["targets"]:
            r = text.get(f"tactic@{p:g}")
            if r:
                o = r["overall"]
                lines.append(f"| {p:g} | {o['head_tokens']:.0f} | {o['opt_head_tokens']:.0f} | "
                             f"{o['head_tokens_over_optimal']:.2f}x | {o['kv_tokens']:.0f} | "
                             f"{o['opt_union_tokens']:.0f} | {o['kv_tokens_over_optimal']:.2f}x |")
        lines.append("")
        t, q = text.get("tactic@0.9"), text.get("quest@0.9")
        if t and q:
            lines += ["Per layer at P = 0.9 (read share / union mass / unions >= P):", "",
                      "| layer | tactic read | tactic mass | tactic unions | quest mass | quest unions |",
                      "|---|---|---|---|---|---|"]
            for li in sorted(t["layers"], key=int):
                a, b = t["layers"][li], q["layers"][li]
                lines.append(f"| {li} | {a['read_fraction']:.1%} | {a['union_mass']:.3f} | "
                             f"{a['unions_reaching']:.0%} | {b['union_mass']:.3f} | {b['unions_reaching']:.0%} |")
            lines.append("")
    if passkey:
        names = list(next(iter(passkey.values())).keys())
        lines += ["Passkey retrieval, exact-match accuracy (agreement with dense's answer; share read):", "",
                  "| config | " + " | ".join(f"{l} tokens" for l in sorted(passkey)) + " |",
                  "|---|" + "---|" * len(passkey)]
        for name in names:
            cells = [f"{passkey[l][name]['accuracy']:.0%} ({passkey[l][name]['agrees_with_dense']:.0%}; "
                     f"{passkey[l][name]['read_fraction']:.0%})" for l in sorted(passkey)]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    rows = targets(text, passkey) if text else []
    if rows:
        lines += ["Targets for policy tactic at P = 0.9:", "", "| target | met | value |", "|---|---|---|"]
        lines += [f"| {n} | {'met' if ok else 'MISSED'} | {v} |" for n, ok, v in rows]
        lines.append("")
    return "\n".join(lines)


def plot(data: dict, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    text, passkey, meta = data["text"], data["passkey"], data["meta"]
    ps = meta["targets"]
    fig, ax = plt.subplots(2, 3, figsize=(15, 8.5))
    panels = [("read_fraction", "tokens read / context", ax[0, 0]),
              ("unions_reaching", "KV-head unions reaching P", ax[0, 1]),
              ("kl", "KL(dense || policy), nats", ax[0, 2]),
              ("ppl_change", "perplexity change vs dense", ax[1, 0])]
    for key, title, a in panels:
        for pol in POLICY_ORDER:
            ys = [text.get(f"{pol}@{p:g}", {}).get("overall", {}).get(key) for p in ps]
            if all(y is not None for y in ys):
                a.plot(ps, ys, "o-", color=COLORS[pol], label=pol)
        if key == "unions_reaching":
            a.plot(ps, [0.95] * len(ps), ":", color="red", label="95% target")
        if key == "kl":
            a.set_yscale("log")
        a.set_title(title)
        a.set_xlabel("P")
        a.grid(alpha=0.3)
    ax[0, 0].legend()
    a = ax[1, 1]
    if passkey:
        lengths = sorted(passkey)
        names = ["dense"] + [f"{pol}@0.9" for pol in POLICY_ORDER]
        w = 0.8 / len(names)
        for i, name in enumerate(names):
            if name in passkey[lengths[0]]:
                a.bar(np.arange(len(lengths)) + i * w, [passkey[l][name]["accuracy"] for l in lengths], w,
                      color=COLORS[name.split("@")[0]], label=name)
        a.set_xticks(np.arange(len(lengths)) + 0.4 - w / 2, [str(l) for l in lengths])
        a.set_ylim(0, 1.05)
        a.legend(fontsize=8)
    a.set_title("passkey exact match (P = 0.9)")
    a.set_xlabel("prompt tokens")
    a = ax[1, 2]
    t = text.get("tactic@0.9")
    if t:
        layers = sorted(t["layers"], key=int)
        x = np.arange(len(layers))
        for pol in ("tactic", "oracle"):
            r = text.get(f"{pol}@0.9")
            if r is None:  # a run without this policy (--policies)
                continue
            a.plot(x, [r["layers"][l]["read_fraction" if pol == "tactic" else "attended"] /
                       (1 if pol == "tactic" else r["layers"][l]["context"]) for l in layers],
                   "o-", color=COLORS[pol], label=f"{pol} read" if pol == "tactic" else "oracle set")
        a.plot(x, [t["layers"][l]["opt_union_tokens"] / t["layers"][l]["context"] for l in layers],
               "s--", color="tab:purple", label="cluster-optimal union")
        a.set_yscale("log")
        a.set_xlabel("layer")
        a.legend(fontsize=8)
    a.set_title("share of context per KV head, P = 0.9")
    fig.suptitle(f"Tactic on SmolLM2-135M-Instruct: {len(meta['texts'])} real texts, last {meta['steps']} "
                 f"tokens teacher-forced; quest/top-k at Tactic's per-step budget ({meta['date']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
