"""The sweep's figure: latency vs N per method, and speedup over the best dense method vs N.

One column per batch size and two rows per workload, for one (heads, dtype, P) slice; log axes.
Each Tactic point is labelled with the fraction of the context it read (the methods over
Tactic's selection read the same; the dense ones read all of it).
"""
from __future__ import annotations

from typing import List, Optional

LATENCY = [("tactic_step", "Tactic step", "C0", "-"), ("tactic_step_graph", "Tactic step (graph)", "C0", "--"),
           ("tactic_attention", "Tactic attention", "C1", "-"), ("gather_sdpa", "gather + SDPA", "C2", "-"),
           ("flashinfer_selection", "FlashInfer over the selection", "C6", "-"),
           ("dense", "Tactic dense", "C3", "-")]
# dense peers, dotted: (key or SDPA backend prefix, label, color)
SDPA = [("sdpa_cudnn", "SDPA cuDNN", "C4"), ("sdpa_flash", "SDPA flash", "C5"),
        ("flashinfer_dense", "FlashInfer dense (page 16)", "C7")]


def _best_sdpa(methods: dict, backend: str) -> Optional[float]:
    keys = (f"{backend}_gqa", f"{backend}_folded") if backend.startswith("sdpa_") else (backend,)
    ts = [methods[k]["median_us"] for k in keys if "median_us" in methods.get(k, {})]
    return min(ts) if ts else None


def choose_slice(rows: List[dict]) -> dict:
    """The headline slice present in rows: fp16, 32/8 heads, P = 0.9 where available."""
    def pick(key, want):
        vals = sorted({r[key] for r in rows}, key=str)
        return want if want in vals else vals[0]
    s = {"dtype": pick("dtype", "float16"), "P": pick("P", 0.9), "workload": pick("workload", "synthetic")}
    present = {r["workload"] for r in rows}
    s["workloads"] = [w for w in ("synthetic", "sparse", "fixture") if w in present] + sorted(
        present - {"synthetic", "sparse", "fixture"})
    heads = sorted({(r["Hq"], r["Hkv"]) for r in rows})
    s["heads"] = (32, 8) if (32, 8) in heads else heads[0]
    return s


def plot(rows: List[dict], path, title: str, slice_: Optional[dict] = None) -> Optional[dict]:
    """Write the PNG; returns the slice plotted (None when no row matches)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        return None
    s = dict(slice_ or choose_slice(rows))
    s.setdefault("workloads", [s["workload"]])
    # the fixture has its own heads: its rows are plotted whatever s["heads"] says
    sel = [r for r in rows if r["dtype"] == s["dtype"] and r["P"] == s["P"] and r["workload"] in s["workloads"]
           and ((r["Hq"], r["Hkv"]) == tuple(s["heads"]) or r["workload"] == "fixture")]
    if not sel:
        return None
    wls = [w for w in s["workloads"] if any(r["workload"] == w for r in sel)]
    batches = sorted({r["B"] for r in sel})
    fig, axes = plt.subplots(2 * len(wls), len(batches), figsize=(5.2 * len(batches), 8 * len(wls)), squeeze=False)
    for i, j in ((i, j) for i in range(len(wls)) for j in range(len(batches))):
        b, wl = batches[j], wls[i]
        rs = sorted((r for r in sel if r["B"] == b and r["workload"] == wl), key=lambda r: r["N"])
        if not rs:
            axes[2 * i][j].set_visible(False)
            axes[2 * i + 1][j].set_visible(False)
            continue
        ns = [r["N"] for r in rs]
        ax, axs = axes[2 * i][j], axes[2 * i + 1][j]
        for key, label, color, style in LATENCY:
            pts = [(r["N"], r["methods"][key]["median_us"]) for r in rs if "median_us" in r["methods"].get(key, {})]
            if pts:
                ax.plot(*zip(*pts), style, color=color, marker="o", label=label)
        for key, label, color in SDPA:
            pts = [(r["N"], _best_sdpa(r["methods"], key)) for r in rs if _best_sdpa(r["methods"], key)]
            if pts:
                ax.plot(*zip(*pts), ":", color=color, marker="s", label=label)
        fl = [(r["N"], r["floor"]["us"]) for r in rs]
        ax.plot(*zip(*fl), "-", color="0.6", lw=1, label="step floor (bytes / copy BW + launch)")
        for r in rs:
            if "median_us" in r["methods"].get("tactic_step", {}):
                ax.annotate(f"{r['selected_fraction']:.1%}", (r["N"], r["methods"]["tactic_step"]["median_us"]),
                            textcoords="offset points", xytext=(4, -10), fontsize=7, color="C0")
        ax.set(xscale="log", yscale="log", title=f"{wl} workload, B = {b}", xlabel="context N (tokens)",
               ylabel="latency (us, median)")
        ax.set_xticks(ns, [f"{n // 1024}K" for n in ns])
        ax.set_xticks([], minor=True)  # the log axis's own minor labels overlapped these
        ax.grid(True, which="both", alpha=0.3)
        for key, label, color, style in LATENCY:
            pts = [(r["N"], r.get("speedup_vs_dense_best", r["speedup"]).get(key)) for r in rs]
            pts = [p for p in pts if p[1]]
            if pts:
                axs.plot(*zip(*pts), style, color=color, marker="o", label=label)
        axs.axhline(1.0, color="k", lw=0.8)
        axs.set(xscale="log", yscale="log", xlabel="context N (tokens)",
                ylabel="speedup over the best dense (SDPA or FlashInfer)")
        axs.set_xticks(ns, [f"{n // 1024}K" for n in ns])
        axs.set_xticks([], minor=True)  # the log axis's own minor labels overlapped these
        axs.grid(True, which="both", alpha=0.3)
    for ax in (axes[0][0], axes[1][0]):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    rule = rows[0].get("stop_rule") if rows else None  # recorded since the CUDA certified rule
    fig.suptitle(f"{title}\n{', '.join(wls)} workload(s), Hq/Hkv {s['heads'][0]}/{s['heads'][1]}, {s['dtype']}, "
                 f"P = {s['P']}{f', stop rule {rule}' if rule else ''}\nlabels: tokens read by Tactic / N (the read fraction of step, attention,\n"
                 f"FlashInfer over the selection and gather; dense methods read all)", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.75 / fig.get_figheight()))  # room for the four title lines
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return s
