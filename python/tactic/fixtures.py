"""Real attention captured from SmolLM2-135M-Instruct (see bench/make_fixtures.py).

The file ships inside the package, so tests and the demo never touch the network.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict

import numpy as np

FIXTURE_PATH = Path(__file__).with_name("data") / "smollm2_fixture.npz"


@dataclass
class LayerCapture:
    layer: int
    keys: np.ndarray     # [T, Hkv, D] float16, post-RoPE, token order
    values: np.ndarray   # [T, Hkv, D] float16
    queries: np.ndarray  # [S, Hq, D] float16: decode step i is position n_prefill + i


@dataclass
class Fixture:
    meta: dict
    layers: Dict[int, LayerCapture]

    @property
    def n_prefill(self) -> int:
        return int(self.meta["n_prefill"])

    @property
    def n_decode(self) -> int:
        return int(self.meta["n_decode"])

    @property
    def scale(self) -> float:
        return float(self.meta["softmax_scale"])


def load_fixture(path=None) -> Fixture:
    """Load the embedded SmolLM2 capture (or another file written by make_fixtures.py)."""
    path = Path(path) if path is not None else FIXTURE_PATH
    if not path.exists():
        raise FileNotFoundError(f"fixture file not found: {path}")
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        layers = {int(l): LayerCapture(int(l), z[f"L{l}_k"], z[f"L{l}_v"], z[f"L{l}_q"])
                  for l in z["layers"]}
    return Fixture(meta, layers)
