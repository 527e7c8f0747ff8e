"""`python -m tactic demo --model smollm2`: generate with dense attention and with Tactic, side by side.

The prompt is real text shipped with the system (a licence under /usr/share/common-licenses);
both runs use transformers' `generate` (greedy) through `tactic.integrations.transformers`.
"""
from __future__ import annotations

import textwrap
import time
from pathlib import Path

import numpy as np

TEXT = Path("/usr/share/common-licenses/GPL-3")


def run(args) -> int:
    from . import smollm2
    reason = smollm2.missing_reason()
    if reason:
        print(f"--model smollm2: {reason}")
        return 2
    import torch
    from .integrations.transformers import disable, enable

    model, tok = smollm2.load(device=args.device)
    ids = tok(TEXT.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"][:args.prompt_tokens]
    ids = torch.tensor([ids], device=args.device)
    print(f"SmolLM2-135M-Instruct on {args.device}: {ids.shape[1]}-token prompt from {TEXT} "
          f"(ends: ...{tok.decode(ids[0, -12:])!r}), {args.new_tokens} new tokens, greedy.")
    runs = {}
    for name, policy in (("dense", "dense"), (f"tactic P={args.target:g}", "tactic")):
        cache = enable(model, target=args.target, policy=policy)
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=args.new_tokens, do_sample=False, past_key_values=cache)
        runs[name] = (out[0, ids.shape[1]:].tolist(), cache, time.perf_counter() - start)
    disable(model)
    width = 48
    names = list(runs)
    print()
    print(f"{names[0]:<{width}} | {names[1]}")
    print("-" * width + "-+-" + "-" * width)
    cols = [textwrap.wrap(tok.decode(runs[n][0]).replace("\n", " / "), width) for n in names]
    for i in range(max(map(len, cols))):
        left = cols[0][i] if i < len(cols[0]) else ""
        right = cols[1][i] if i < len(cols[1]) else ""
        print(f"{left:<{width}} | {right}")
    a, b = runs[names[0]][0], runs[names[1]][0]
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    print(f"\nThe first {same} of {max(len(a), len(b))} new tokens are identical. Generate time: dense {runs[names[0]][2]:.1f} s, "
          f"tactic {runs[names[1]][2]:.1f} s (CPU Python path; see bench/NOTES.md for kernel timings).")
    cache = runs[names[1]][1]
    kv = np.stack([cache.layer_stats(li)["kv_tokens"][:, 0] for li in cache.sparse_layers])  # [L, S, Hkv]
    ctx = cache.layer_stats(cache.sparse_layers[0])["context"][:, 0]
    toks = runs[names[1]][0]
    print(f"\nTokens read per decode step by Tactic (mean over {kv.shape[0]} layers x {kv.shape[2]} KV heads; "
          "the first new token comes from the dense prefill):")
    print(f"{'step':>4} {'new token':<16} {'context':>7} {'read':>7} {'share':>6} {'min layer':>9} {'max layer':>9}")
    for s in range(kv.shape[1]):
        per_layer = kv[:, s].mean(axis=1)
        print(f"{s + 1:>4} {tok.decode([toks[s + 1]])!r:<16} {ctx[s]:>7} {per_layer.mean():>7.0f} "
              f"{per_layer.mean() / ctx[s]:>6.1%} {per_layer.min():>9.0f} {per_layer.max():>9.0f}")
    print(f"Overall Tactic read {cache.summary()['read_fraction']:.1%} of the context per KV head; "
          "dense reads 100%.")
    return 0
