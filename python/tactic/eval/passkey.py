"""Passkey retrieval: a random 5-digit number hidden at a random depth of long filler text.

The filler and the question follow the passkey test of Mohtashami & Jaggi (2023, "Landmark
Attention"). The prompt's context (everything before the question) is prefilled densely
once per trial; each configuration then reads the question through its decode path
(teacher-forced, one token per step) and answers greedily, so every attention over the
long context after the needle goes through the policy under test.
"""
from __future__ import annotations

import re

import numpy as np
import torch
from transformers import DynamicCache

from ..integrations.transformers import TacticCache
from .configs import FIXED_BUDGET, StepBudgets

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
         "it. I will quiz you about the important information there.\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key? The pass key is"
ANSWER_TOKENS = 8


def build(tok, length: int, rng: np.random.Generator):
    """(context ids, question ids, key) with len(context) + len(question) + answer <= length."""
    key = int(rng.integers(10000, 100000))
    depth = float(rng.uniform(0.1, 0.9))
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]
    intro, filler, needle, question = enc(INTRO), enc(FILLER), enc(NEEDLE.format(key=key)), enc(QUESTION)
    room = length - len(intro) - len(needle) - len(question) - ANSWER_TOKENS
    if room < len(filler):
        raise ValueError(f"passkey length {length} is too short for the prompt")
    body = (filler * (room // len(filler) + 1))[:room]
    cut = int(depth * room)
    return intro + body[:cut] + needle + body[cut:], question, key


def answer_key(text: str):
    m = re.search(r"\d+", text)
    return int(m.group()) if m else None


def run_trial(model, tok, context, question, configs, decoder_opts=None, bar=None) -> dict:
    """{config name: (answer text, tokens read / context averaged over steps and layers)}."""
    device = next(model.parameters()).device
    dyn = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(torch.tensor([context], device=device), past_key_values=dyn, logits_to_keep=1)
    q_ids = torch.tensor([question], device=device)
    budgets, out = {}, {}
    for cfg in configs:
        opts = dict(decoder_opts or {})
        if cfg.policy in FIXED_BUDGET:
            opts["budget"] = budgets[cfg.target]
        cache = TacticCache(model, target=cfg.target or 0.9, policy=cfg.policy,
                            max_tokens=len(context) + len(question) + ANSWER_TOKENS + 8,
                            dtype="float32", **opts)
        cache.prefill_from(dyn)
        generated = []
        with torch.inference_mode():
            logits = model(q_ids, past_key_values=cache).logits[0, -1]
            for j in range(ANSWER_TOKENS):
                generated.append(int(torch.argmax(logits)))
                if j + 1 < ANSWER_TOKENS:
                    step = torch.tensor([generated[-1:]], device=device)
                    logits = model(step, past_key_values=cache).logits[0, -1]
        if cfg.policy == "tactic":
            budgets[cfg.target] = StepBudgets(cache)
        out[cfg.name] = (tok.decode(generated), cache.summary()["read_fraction"])
        if bar is not None:
            bar.update()
    return out
