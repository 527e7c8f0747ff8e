"""Where results go and what they carry: the environment record, the printed table, the JSON."""
from __future__ import annotations

import json
import platform
import re
import time
from pathlib import Path
from typing import List

import torch

from .. import __version__
from .._runinfo import build_info, git_commit, results_dir  # noqa: F401  (git_commit: part of this module's API)


def device_name(device) -> str:
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def device_slug(device) -> str:
    """Short file-name form: 'h100' for 'NVIDIA H100 80GB HBM3', else the name's words."""
    name = device_name(device)
    if torch.device(device).type != "cuda":
        return "cpu"
    m = re.search(r"\b([A-Z]\d{2,4}[A-Za-z]*)\b", name.replace("NVIDIA ", ""))
    return (m.group(1) if m else re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")).lower()


def environment(device) -> dict:
    return {"device": device_name(device), "date": time.strftime("%Y-%m-%d"), "git_commit": git_commit(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "tactic": __version__,
            "python": platform.python_version(), "build": build_info()}


def result_path(out_dir, device, kind: str, suffix: str) -> Path:
    """<out_dir>/<device>-<kind>-<date>.<suffix>; out_dir None: the user results folder
    (tactic._runinfo.results_dir())."""
    out = Path(out_dir) if out_dir is not None else results_dir()
    out.mkdir(parents=True, exist_ok=True)
    return out / f"{device_slug(device)}-{kind}-{time.strftime('%Y-%m-%d')}.{suffix}"


def write_json(path, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, default=_plain)


def _plain(x):
    if hasattr(x, "tolist"):
        return x.tolist()
    if hasattr(x, "__dict__"):
        return x.__dict__
    return str(x)


def _us(methods: dict, *names) -> str:
    """Fastest available median among `names` (e.g. the two GQA forms of one backend)."""
    ts = [methods[n]["median_us"] for n in names if "median_us" in methods.get(n, {})]
    return f"{min(ts):.1f}" if ts else "n/a"


def table(rows: List[dict]) -> str:
    """One line per (case, P): latencies in us (medians), read fraction, floor, speedups."""
    hdr = (f"{'workload':>9} {'N':>7} {'B':>3} {'Hq/Hkv':>6} {'dtype':>8} {'P':>5} {'sel':>6} | {'cudnn':>8} "
           f"{'flash':>8} {'fi-dns':>8} {'dense':>8} | {'step':>8} {'step-g':>8} {'attn':>8} {'fi-sel':>8} "
           f"{'gather':>8} | {'floor':>7} {'st/fl':>5} | {'spd':>6} {'spd-g':>6} {'spd-bd':>6}")
    lines = [hdr, "-" * len(hdr)]
    for r in rows:
        m = r["methods"]
        sp = r["speedup"]
        fl = r["floor"]

        def x(v):
            return f"{v:.2f}x" if v else "n/a"
        lines.append(
            f"{r['workload']:>9} {r['N']:>7} {r['B']:>3} {str(r['Hq']) + '/' + str(r['Hkv']):>6} {r['dtype']:>8} "
            f"{r['P']:>5.2f} {r['selected_fraction']:>6.1%} | {_us(m, 'sdpa_cudnn_gqa', 'sdpa_cudnn_folded'):>8} "
            f"{_us(m, 'sdpa_flash_gqa', 'sdpa_flash_folded'):>8} {_us(m, 'flashinfer_dense'):>8} "
            f"{_us(m, 'dense'):>8} | "
            f"{_us(m, 'tactic_step'):>8} {_us(m, 'tactic_step_graph'):>8} {_us(m, 'tactic_attention'):>8} "
            f"{_us(m, 'flashinfer_selection'):>8} {_us(m, 'gather_sdpa'):>8} | "
            f"{fl['us']:>7.1f} {fl.get('ratio_eager') or float('nan'):>5.2f} | "
            f"{x(sp.get('tactic_step')):>6} {x(sp.get('tactic_step_graph')):>6} "
            f"{x(r.get('speedup_vs_dense_best', {}).get('tactic_step')):>6}")
    lines.append("us, medians. sel: tokens Tactic read / N (mean over KV heads and rotation layers): the read "
                 "fraction of step, step-g, attn, fi-sel and gather; cudnn, flash, fi-dns and dense read every "
                 "token. cudnn/flash: faster of the two GQA forms; fi-dns: FlashInfer paged decode, all tokens, "
                 "page 16; dense: Tactic's dense policy; step: selection + attention; step-g: the same replayed "
                 "as a CUDA graph; attn: attention over the step's selection; fi-sel: FlashInfer paged decode over "
                 "the same selection (page 1, a row per KV head); gather: torch gather + SDPA at the same tokens; "
                 "floor: step's byte floor / copy BW + launch; st/fl: step / floor; spd: faster SDPA / step "
                 "(eager), spd-g: the same with CUDA graphs on both sides; spd-bd: best dense (SDPA or "
                 "FlashInfer) / step (eager).")
    return "\n".join(lines)
