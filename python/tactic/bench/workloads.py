"""Decode workloads for the benchmarks: KV caches and queries whose attention looks real.

(a) `tiled_fixture`: the real SmolLM2-135M capture shipped with the package (9 query / 3 KV
    heads, head dim 64), its prompt tiled up to N tokens, queries from its decode steps.
(b) `synthetic`: a generator whose attention sparsity is calibrated to published real-model
    statistics (FINDINGS.md, the paper's Table 1: at P = 0.9 the exact oracle needs ~2-5% of
    a 32K context, fewer at longer contexts; an attention sink in most heads; a few dense
    heads). tests/test_bench_workloads.py checks the calibration against a float64 oracle.
(b') `sparse` ("sparse layer"): workload (b) without its flat heads (dense_head_fraction = 0),
    the shape of most layers of a real model (SmolLM2-135M at P = 0.9 reads 5-19% of the
    context in its layers after the first, 67% in layer 0).
`model_layer_spec` gives the model-shaped mix of the end-to-end loop: the first two layers
with a quarter of their query heads flat, the other layers with none.

Both return keys/values as [B, Hkv, N, D] (the layout torch SDPA reads; SparseDecoder.prefill
takes the token-major view `keys.transpose(1, 2)`) and queries [B, Hq, D], on the requested
device, in torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Tuple

import numpy as np
import torch

TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class Workload:
    keys: torch.Tensor     # [B, Hkv, N, D]
    values: torch.Tensor   # [B, Hkv, N, D]
    queries: torch.Tensor  # [B, Hq, D]
    scale: float           # softmax scale the workload was made for
    name: str
    info: dict = field(default_factory=dict)


@dataclass(frozen=True)
class SyntheticSpec:
    """Knobs of the synthetic generator; the defaults are the calibrated ones.

    Keys: a shared mean direction (real keys have a large common component) + a sparse mix of
    `topics_per_key` directions out of a `dictionary` of random directions + isotropic noise,
    so k-means finds structure but no clean clusters. Each KV head has a few query topics;
    `relevant` tokens per topic (scattered uniformly over positions) carry that topic with a
    strength that falls off like a Zipf law in a random rank order, so the exp-scores of the
    ranked tokens follow ~ a / rank^zipf plus a flat background (the shape the paper fits).
    The number of relevant tokens grows like N^relevant_growth: a longer context holds more
    distractors, not proportionally more tokens that matter to the current query, which is
    why real long contexts are sparser. Token 0 is an attention sink: a small key that gets
    a chosen share of the mass because the queries point away from the shared key mean.
    """
    dictionary: int = 1024           # topic directions per KV head
    topics_per_key: int = 3
    topic_weight: float = 2.0        # mean weight of a key's topics
    key_noise: float = 0.4           # per-dimension noise std
    mean_norm: float = 8.0           # norm of the shared key mean
    relevant_at_32k: int = 2100      # relevant tokens per query topic at N = 32768
    relevant_growth: float = 0.7     # relevant ~ N^growth
    top_gap: float = 13.0            # logit of the strongest relevant token over the background
    zipf: float = 0.6                # exp-score of relevant rank r ~ r^-zipf
    query_weight: float = 16.0       # query component along its topic
    query_noise: float = 0.3
    sink_share: Tuple[float, float] = (0.15, 0.6)   # sink mass per sparse head, uniform
    dense_head_fraction: float = 1 / 16             # heads with flat attention
    dense_sink_share: Tuple[float, float] = (0.0, 0.1)


DEFAULT_SPEC = SyntheticSpec()
SPARSE_SPEC = replace(DEFAULT_SPEC, dense_head_fraction=0.0)   # the "sparse layer"
MODEL_FLAT_LAYERS = 2           # model-shaped mix: layers with flat heads ...
MODEL_FLAT_FRACTION = 0.25      # ... and the share of their query heads that are flat

# The names the bench accepts (sweep: --workload; the fixture has its own heads, see make()).
NAMES = ("synthetic", "sparse", "fixture")


def model_layer_spec(layer: int, flat_layers: int = MODEL_FLAT_LAYERS,
                     flat_fraction: float = MODEL_FLAT_FRACTION) -> SyntheticSpec:
    """Spec of layer `layer` in the model-shaped mix: the first `flat_layers` layers have
    `flat_fraction` of their query heads flat, the others none (real models concentrate their
    flat heads in the first layers)."""
    return replace(DEFAULT_SPEC, dense_head_fraction=flat_fraction if layer < flat_layers else 0.0)


def _unit_orthogonal(x: torch.Tensor, axis_dir: torch.Tensor) -> torch.Tensor:
    """Rows of x made orthogonal to the unit vector axis_dir, then normalised."""
    x = x - (x @ axis_dir)[..., None] * axis_dir
    return x / x.norm(dim=-1, keepdim=True)


def synthetic(n: int, batch: int, num_q_heads: int, num_kv_heads: int, head_dim: int,
              dtype: str = "float16", device="cuda", seed: int = 0,
              spec: SyntheticSpec = DEFAULT_SPEC) -> Workload:
    """Workload (b): B independent sequences of N tokens (see SyntheticSpec for the model);
    `spec=SPARSE_SPEC` gives the sparse layer (see make())."""
    if n < 2:
        raise ValueError(f"`n` must be >= 2 (a sink and one more token), got {n}")
    if num_q_heads % num_kv_heads:
        raise ValueError("`num_q_heads` must be a multiple of `num_kv_heads`")
    tdt = TORCH_DTYPES[dtype]
    dev = torch.device(device)
    d, hkv, hq, g = head_dim, num_kv_heads, num_q_heads, num_q_heads // num_kv_heads
    gen = torch.Generator(device=dev).manual_seed(seed)
    # Host-side choices (a few numbers per head) come from numpy, seeded alike.
    rng = np.random.default_rng(seed)
    keys = torch.empty(batch, hkv, n, d, dtype=tdt, device=dev)
    values = torch.empty(batch, hkv, n, d, dtype=tdt, device=dev)
    queries = torch.empty(batch, hq, d, dtype=tdt, device=dev)
    sqrt_d = math.sqrt(d)
    n_topics = max(1, g // 2)
    n_rel = max(1, min((n - 1) // n_topics, round(spec.relevant_at_32k * (n / 32768) ** spec.relevant_growth)))
    n_dense = int(round(hq * spec.dense_head_fraction))
    dense = np.zeros(hq, bool)
    if n_dense:
        dense[rng.choice(hq, n_dense, replace=False)] = True
    sink_share = np.where(dense, rng.uniform(*spec.dense_sink_share, hq), rng.uniform(*spec.sink_share, hq))
    # Zipf strengths, in logit units, for ranks 1..n_rel (negative ones are background).
    ranks = torch.arange(1, n_rel + 1, device=dev, dtype=torch.float32)
    gap = (spec.top_gap - spec.zipf * torch.log(ranks)).clamp_min(0)
    for b in range(batch):
        for h in range(hkv):
            mean_dir = torch.randn(d, generator=gen, device=dev)
            mean_dir /= mean_dir.norm()
            dic = _unit_orthogonal(torch.randn(spec.dictionary, d, generator=gen, device=dev), mean_dir)
            topics = _unit_orthogonal(torch.randn(n_topics, d, generator=gen, device=dev), mean_dir)
            idx = torch.randint(0, spec.dictionary, (spec.topics_per_key, n), generator=gen, device=dev)
            w = spec.topic_weight * (1 + 0.25 * torch.randn(spec.topics_per_key, n, generator=gen, device=dev))
            k = spec.key_noise * torch.randn(n, d, generator=gen, device=dev)
            k -= (k @ mean_dir)[:, None] * mean_dir
            for j in range(spec.topics_per_key):
                k += w[j, :, None] * dic[idx[j]]
            # Relevant tokens of each topic: random positions (never the sink), random ranks,
            # disjoint between topics (a token in two sets would outrank every other).
            perm = torch.randperm(n - 1, generator=gen, device=dev)[:n_topics * n_rel] + 1
            for t in range(n_topics):
                k[perm[t * n_rel:(t + 1) * n_rel]] += (gap * sqrt_d / spec.query_weight)[:, None] * topics[t]
            k[0] = 0.3 * _unit_orthogonal(torch.randn(1, d, generator=gen, device=dev), mean_dir)[0]
            # Queries of this group: topic t = g % n_topics at full weight plus a weaker second
            # one, so heads of a group overlap partly (the union is larger than one head's set).
            qh = np.arange(h * g, (h + 1) * g)
            q = spec.query_noise * torch.randn(g, d, generator=gen, device=dev)
            q -= (q @ mean_dir)[:, None] * mean_dir
            for i, head in enumerate(qh):
                if dense[head]:
                    continue
                q[i] += spec.query_weight * (topics[i % n_topics] + 0.5 * topics[(i + 1) % n_topics] * (n_topics > 1))
                q[i] *= math.exp(0.15 * rng.standard_normal())  # heads differ in sharpness
            # Sink share: shift every non-sink logit by delta via the mean direction (the sink's
            # key has no mean component, so its logit stays put). Solved exactly per head.
            logits = (q @ k[1:].T) / sqrt_d                     # [G, N-1], mean part excluded
            sink_logit = (q @ k[0]) / sqrt_d
            s = torch.tensor(sink_share[qh], device=dev, dtype=torch.float32)
            delta = sink_logit + torch.log((1 - s) / s) - torch.logsumexp(logits, dim=1)
            q += (delta * sqrt_d / spec.mean_norm)[:, None] * mean_dir
            k[1:] += spec.mean_norm * mean_dir
            keys[b, h] = k.to(tdt)
            queries[b, h * g:(h + 1) * g] = q.to(tdt)
            v = torch.randn(n, d, generator=gen, device=dev)
            v[0] *= 0.1  # real sinks carry small values too
            values[b, h] = v.to(tdt)
    info = {"relevant_per_topic": n_rel, "topics_per_kv_head": n_topics,
            "dense_heads": [int(x) for x in np.flatnonzero(dense)],
            "sink_share": [float(x) for x in sink_share], "spec": spec.__dict__.copy()}
    info["spec"]["sink_share"] = list(spec.sink_share)
    info["spec"]["dense_sink_share"] = list(spec.dense_sink_share)
    name = {DEFAULT_SPEC: "synthetic", SPARSE_SPEC: "sparse"}.get(
        spec, f"synthetic(dense_head_fraction={spec.dense_head_fraction:g})")
    info["flat_head_fraction"] = n_dense / hq
    return Workload(keys, values, queries, 1 / sqrt_d, name, info)


def tiled_fixture(n: int, batch: int, dtype: str = "float16", device="cuda", layer: int = 0,
                  fixture=None) -> Workload:
    """Workload (a): real SmolLM2-135M keys/values/queries (9 query / 3 KV heads, D = 64).

    The captured prompt (3056 tokens) is repeated up to N. Copies after the first leave out
    the first token, so the context holds one attention sink as a real one does. Sequence b
    uses the captured layer `layer + b` (cyclically over the captured layers), rolled by a
    different offset, and the query of decode step b % 16.
    """
    from ..fixtures import load_fixture
    fx = fixture if fixture is not None else load_fixture()
    caps = [fx.layers[l] for l in sorted(fx.layers)]
    tdt = TORCH_DTYPES[dtype]
    dev = torch.device(device)
    n_p = fx.n_prefill
    hkv, d = caps[0].keys.shape[1:]
    hq = caps[0].queries.shape[1]
    keys = torch.empty(batch, hkv, n, d, dtype=tdt, device=dev)
    values = torch.empty_like(keys)
    queries = torch.empty(batch, hq, d, dtype=tdt, device=dev)
    for b in range(batch):
        cap = caps[(layer + b) % len(caps)]
        body = np.arange(1, n_p)
        body = np.roll(body, -(b * 997) % len(body))  # a different tiling phase per sequence
        order = np.concatenate([[0], np.resize(body, n - 1)])
        keys[b] = torch.from_numpy(cap.keys[order].transpose(1, 0, 2).copy()).to(dev, tdt)
        values[b] = torch.from_numpy(cap.values[order].transpose(1, 0, 2).copy()).to(dev, tdt)
        queries[b] = torch.from_numpy(cap.queries[b % cap.queries.shape[0]]).to(dev, tdt)
    return Workload(keys, values, queries, fx.scale, "fixture",
                    {"model": fx.meta.get("model"), "captured_layers": sorted(fx.layers),
                     "prompt_tokens": n_p})


def make(name: str, n: int, batch: int, num_q_heads: int, num_kv_heads: int, head_dim: int,
         dtype: str, device, seed: int) -> Workload:
    """The workload called `name` (one of NAMES): 'synthetic' is workload (b), 'sparse' the
    same without flat heads, 'fixture' the SmolLM2 capture (it has its own heads)."""
    if name == "synthetic":
        return synthetic(n, batch, num_q_heads, num_kv_heads, head_dim, dtype, device, seed)
    if name == "sparse":
        return synthetic(n, batch, num_q_heads, num_kv_heads, head_dim, dtype, device, seed, spec=SPARSE_SPEC)
    if name == "fixture":
        return tiled_fixture(n, batch, dtype, device, layer=seed)
    raise ValueError(f"`workload` must be one of {NAMES}, got {name!r}")
