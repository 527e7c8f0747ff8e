"""Teacher-forced decoding of the last tokens of a real text under every configuration.

One dense prefill of the text's first N - S tokens (a `DynamicCache`) serves all
configurations: each gets a fresh `TacticCache` filled from it, then decodes the last S
tokens one at a time, fed the true tokens. Per step it records what every Tactic layer
kept (`TrueMass`) and the next-token distribution, scored against dense (KL) and against
the true next token (perplexity).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from transformers import DynamicCache

from ..integrations.transformers import TacticCache
from .configs import FIXED_BUDGET, StepBudgets
from .truth import TrueMass


def run_text(model, ids, steps: int, configs, bar=None, decoder_opts=None) -> dict:
    """Results of every config on one text: {config name: summary dict}."""
    decoder_opts = dict(decoder_opts or {})
    device = next(model.parameters()).device
    n = len(ids)
    n0 = n - steps
    tokens = torch.tensor([ids], device=device)
    dyn = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(tokens[:, :n0], past_key_values=dyn, logits_to_keep=1)
    dense_logp = None
    budgets = {}
    results = {}
    for cfg in configs:
        target = cfg.target if cfg.target is not None else 0.9
        opts = dict(decoder_opts)
        if cfg.policy in FIXED_BUDGET:
            opts["budget"] = budgets[cfg.target]
        cache = TacticCache(model, target=target, policy=cfg.policy, max_tokens=n + 8,
                            record_selection=True, dtype="float32", **opts)
        scale = cache.decoder_kwargs.get("scale") or cache.geometry[2] ** -0.5
        truth = TrueMass({li: dyn.layers[li].keys[0].cpu() for li in cache.sparse_layers},
                         {li: dyn.layers[li].values[0].cpu() for li in cache.sparse_layers},
                         n0, steps, scale, target)
        cache.on_step = truth
        cache.prefill_from(dyn)
        if cfg.policy == "tactic":
            for li in cache.sparse_layers:
                truth.set_layout(li, cache.decoder, cache.layers[li].slot)
        logps, kl, nll = [], [], []
        with torch.inference_mode():
            for i in range(steps):
                out = model(tokens[:, n0 + i:n0 + i + 1], past_key_values=cache)
                lp = torch.log_softmax(out.logits[0, -1].double(), dim=-1).cpu()
                if i + 1 < steps:
                    nll.append(-float(lp[ids[n0 + i + 1]]))
                if dense_logp is None:
                    logps.append(lp.float())
                else:
                    ref = dense_logp[i].double()
                    kl.append(float((ref.exp() * (ref - lp)).sum()))
                if bar is not None:
                    bar.update()
        if dense_logp is None:
            dense_logp = torch.stack(logps)
        if cfg.policy == "tactic":
            budgets[cfg.target] = StepBudgets(cache)
        results[cfg.name] = summarise(cache, truth, target if cfg.target is not None else None, kl, nll)
    return results


def summarise(cache, truth: TrueMass, target, kl, nll) -> dict:
    """Per layer and overall: tokens read, true mass kept, share reaching P; KL and ppl."""
    layers, pooled = {}, {}
    for li in cache.sparse_layers:
        a = truth.layer_arrays(li)
        ctx = a["context"][:, None]
        d = {"kv_tokens": a["kv_tokens"].mean(), "read_fraction": (a["kv_tokens"] / ctx).mean(),
             "attended": a["attended"].mean(), "union_mass": a["union_mass"].mean(),
             "head_tokens": a["head_tokens"].mean(), "context": a["context"].mean(),
             "out_error": a["out_error"].mean(), "out_error_p90": np.quantile(a["out_error"], 0.9)}
        if target is not None:
            d["heads_reaching"] = (a["union_mass"] >= target).mean()
            d["unions_reaching"] = (a["union_mass"] >= target).all(-1).mean()
            d["own_reaching"] = (a["own_mass"] >= target).mean()
        if "opt_head" in a:
            d["opt_head_tokens"] = a["opt_head"].mean()
            d["opt_union_tokens"] = a["opt_union"].mean()
        layers[li] = {k: float(v) for k, v in d.items()}
        for k, v in d.items():
            pooled.setdefault(k, []).append(v)
    overall = {k: float(np.mean(v)) for k, v in pooled.items()}
    if "opt_head_tokens" in overall:
        overall["head_tokens_over_optimal"] = overall["head_tokens"] / overall["opt_head_tokens"]
        overall["kv_tokens_over_optimal"] = overall["kv_tokens"] / overall["opt_union_tokens"]
    overall["kl"] = float(np.mean(kl)) if kl else 0.0
    overall["kl_p90"] = float(np.quantile(kl, 0.9)) if kl else 0.0
    overall["nll"] = float(np.mean(nll))
    overall["ppl"] = math.exp(overall["nll"])
    overall["steps"] = len(nll) + 1
    return {"overall": overall, "layers": layers}
