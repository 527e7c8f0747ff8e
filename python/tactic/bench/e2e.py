"""End to end: a Llama-3.1-8B-shaped decode loop with Tactic or dense attention.

Model: 32 layers, hidden 4096, 32 query / 8 KV heads of 128, SwiGLU MLP 14336, vocabulary
128256, RMSNorm, RoPE (theta 500000), random weights in the KV dtype, a distinct set per layer
(so every layer reads its own 436 MB of weights, as the real model does; 16 GB in all).
Each step embeds the last token, runs every layer (fused QKV projection, attention, output
projection, MLP), the final norm and the LM head, and picks the next token by argmax.

Attention sees realistic inputs: the KV cache of every layer is prefilled with the calibrated
synthetic workload (workloads.synthetic; running the model over 128K tokens would take long
and random weights would not make realistic attention anyway), by default in the model-shaped
mix ('model': the first two layers with a quarter of their query heads flat, the other layers
none, as real models concentrate flat heads in their first layers; 'synthetic' is workload (b)
in every layer, 'sparse' no flat head anywhere), and the attention's query is
that workload's query of the layer plus 1% of the projected q (the projection runs and feeds
attention, but random weights cannot aim a query at the workload's relevant tokens). The new
token's key/value likewise are a background token of the workload plus 1% of the projections.
Both methods do exactly this; only the attention differs:
- tactic: SparseDecoder.decode(layer, q, k_new, v_new), appending the token.
- dense: a preallocated torch KV cache [B, Hkv, capacity, D] per layer; the token is written in
  place, then torch SDPA over the filled part (flash or cuDNN backend, G query heads folded
  into query rows).
- dense-flashinfer: FlashInfer's FA2 paged decode over a preallocated NHD page cache (page 16)
  per layer; the token is written into its page, and the wrapper is planned once per step (at
  layer 0, all layers have the same lengths), as a serving engine does, then run per layer.
- none: attention skipped (its output is q): the step's cost without attention, the bound.
Eager by default. With graphs=True (CUDA), the step runs as inference engines run decode:
piecewise CUDA graphs. Each layer's work before attention (norm, QKV projection, RoPE, the
workload mix) and after it (output projection, MLP), the embedding and the LM head are each
captured once as a graph over fixed buffers, with the position in a device tensor, and
replayed every step; attention runs eagerly between them, for every method alike (Tactic's
decode with append keeps host-side lengths, and torch SDPA over a growing cache has a
different shape every step, so neither can be replayed). That removes the ~15 eager launches
per layer that made the eager loop host-bound. StaticStep holds that split; on the CPU it runs
the same pieces without graphs.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from .. import SparseDecoder
from . import peers as P
from .workloads import DEFAULT_SPEC, SPARSE_SPEC, TORCH_DTYPES, model_layer_spec, synthetic

E2E_WORKLOADS = ("model", "synthetic", "sparse")


def layer_spec(workload: str, layer: int):
    """The synthetic workload's spec of `layer` under the e2e workload name (E2E_WORKLOADS)."""
    if workload == "model":
        return model_layer_spec(layer)
    if workload == "synthetic":
        return DEFAULT_SPEC
    if workload == "sparse":
        return SPARSE_SPEC
    raise ValueError(f"`workload` must be one of {E2E_WORKLOADS}, got {workload!r}")


@dataclass(frozen=True)
class ModelShape:
    layers: int = 32
    hidden: int = 4096
    hq: int = 32
    hkv: int = 8
    head_dim: int = 128
    ffn: int = 14336
    vocab: int = 128256
    rope_theta: float = 500000.0

    def weight_bytes(self, elem_bytes: int) -> int:
        per_layer = self.hidden * (self.hq + 2 * self.hkv) * self.head_dim + self.hq * self.head_dim * self.hidden \
            + 3 * self.hidden * self.ffn + 2 * self.hidden
        return elem_bytes * (self.layers * per_layer + 2 * self.vocab * self.hidden + self.hidden)


class RandomModel:
    """Random weights of `shape` (scaled 1/sqrt(fan_in) so activations stay O(1) in fp16)."""

    def __init__(self, shape: ModelShape, dtype: str, device, seed: int = 0):
        self.shape, self.dtype, self.device = shape, TORCH_DTYPES[dtype], torch.device(device)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        s, dt, dev = shape, self.dtype, self.device

        def w(rows, cols):
            x = torch.randn(rows, cols, generator=gen, device=dev, dtype=dt)
            return x.mul_(1.0 / math.sqrt(rows))
        qkv = (s.hq + 2 * s.hkv) * s.head_dim
        self.wqkv = [w(s.hidden, qkv) for _ in range(s.layers)]
        self.wo = [w(s.hq * s.head_dim, s.hidden) for _ in range(s.layers)]
        self.wgu = [w(s.hidden, 2 * s.ffn) for _ in range(s.layers)]
        self.wdown = [w(s.ffn, s.hidden) for _ in range(s.layers)]
        self.norm_attn = [torch.ones(s.hidden, device=dev, dtype=dt) for _ in range(s.layers)]
        self.norm_mlp = [torch.ones(s.hidden, device=dev, dtype=dt) for _ in range(s.layers)]
        self.norm_final = torch.ones(s.hidden, device=dev, dtype=dt)
        self.embed = torch.randn(s.vocab, s.hidden, generator=gen, device=dev, dtype=dt)
        self.lm_head = w(s.hidden, s.vocab)
        inv = 1.0 / s.rope_theta ** (torch.arange(0, s.head_dim, 2, device=dev, dtype=torch.float32) / s.head_dim)
        self.inv_freq = inv

    def rope(self, x: torch.Tensor, pos) -> torch.Tensor:
        """Rotate-half RoPE of x [B, H, D] at position pos (an int or a device scalar tensor)."""
        ang = (pos.to(torch.float32) if isinstance(pos, torch.Tensor) else pos) * self.inv_freq
        cos, sin = torch.cos(ang).to(x.dtype), torch.sin(ang).to(x.dtype)
        x1, x2 = x[..., ::2], x[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)

    def step(self, tokens: torch.Tensor, pos: int, attend: Callable, inputs: Callable) -> torch.Tensor:
        """One decode step for tokens [B] at position pos; returns logits [B, vocab].

        attend(layer, q, k, v) -> [B, Hq, D]; inputs(layer, q, k, v, pos) -> the (q, k, v) the
        attention sees (see the module docstring)."""
        x = self.embed[tokens]
        for l in range(self.shape.layers):
            q, k, v = self.pre_attention(l, x, pos, inputs)
            x = self.post_attention(l, x, attend(l, q, k, v))
        return self.logits(x)

    # The step's pieces, shared by step() and StaticStep (which replays them as CUDA graphs).
    def pre_attention(self, l: int, x: torch.Tensor, pos, inputs: Callable):
        """Layer l's attention inputs (q, k, v) from the residual stream x [B, hidden]."""
        s, b = self.shape, x.shape[0]
        h = F.rms_norm(x, (s.hidden,), self.norm_attn[l], 1e-5)
        qkv = h @ self.wqkv[l]
        q = qkv[:, :s.hq * s.head_dim].view(b, s.hq, s.head_dim)
        k = qkv[:, s.hq * s.head_dim:(s.hq + s.hkv) * s.head_dim].view(b, s.hkv, s.head_dim)
        v = qkv[:, (s.hq + s.hkv) * s.head_dim:].view(b, s.hkv, s.head_dim)
        q, k = self.rope(q, pos), self.rope(k, pos)
        return inputs(l, q, k, v, pos)

    def post_attention(self, l: int, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """The residual stream after layer l's output projection of o [B, Hq, D] and its MLP."""
        s = self.shape
        x = x + o.reshape(x.shape[0], s.hq * s.head_dim) @ self.wo[l]
        h = F.rms_norm(x, (s.hidden,), self.norm_mlp[l], 1e-5)
        g, u = (h @ self.wgu[l]).chunk(2, dim=-1)
        return x + (F.silu(g) * u) @ self.wdown[l]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (self.shape.hidden,), self.norm_final, 1e-5) @ self.lm_head


class StaticStep:
    """One decode step split at attention, over fixed buffers (see the module docstring).

    embed() reads self.tokens; pre(l) leaves layer l's attention inputs in self.q / k / v;
    attention writes self.o; post(l) finishes the layer; head() leaves self.logits and the next
    self.tokens. The position is the device scalar self.pos. The arithmetic is RandomModel's own
    pieces (pre_attention, post_attention, logits), so both give the same logits
    (tests/test_bench_e2e.py)."""

    def __init__(self, model: RandomModel, inputs: "WorkloadInputs", batch: int, graphs: bool):
        s, dev, dt = model.shape, model.device, model.dtype
        self.model, self.inputs, self.batch = model, inputs, batch
        self.tokens = torch.zeros(batch, dtype=torch.long, device=dev)
        self.pos = torch.zeros((), dtype=torch.long, device=dev)
        self.x = torch.empty(batch, s.hidden, dtype=dt, device=dev)
        self.q = torch.empty(batch, s.hq, s.head_dim, dtype=dt, device=dev)
        self.k = torch.empty(batch, s.hkv, s.head_dim, dtype=dt, device=dev)
        self.v = torch.empty_like(self.k)
        self.o = torch.empty_like(self.q)
        self.logits = torch.empty(batch, s.vocab, dtype=dt, device=dev)
        self.graphs: Optional[dict] = None
        if graphs:
            if dev.type != "cuda":
                raise ValueError("CUDA graphs need a CUDA device")
            self._capture()

    def embed(self) -> None:
        self.x.copy_(self.model.embed[self.tokens])

    def pre(self, l: int) -> None:
        q, k, v = self.model.pre_attention(l, self.x, self.pos, self.inputs)
        self.q.copy_(q)
        self.k.copy_(k)
        self.v.copy_(v)

    def post(self, l: int) -> None:
        self.x.copy_(self.model.post_attention(l, self.x, self.o))

    def head(self) -> None:
        self.logits.copy_(self.model.logits(self.x))
        self.tokens.copy_(self.logits.argmax(-1))

    def _capture(self) -> None:
        """Each piece as a graph, all in one memory pool, captured in the order step() replays
        them (one after another, never concurrently; every value that crosses pieces lives in
        the fixed buffers, outside the pool)."""
        pieces = [("embed", self.embed)]
        for l in range(self.model.shape.layers):
            pieces += [(("pre", l), (lambda l=l: self.pre(l))), (("post", l), (lambda l=l: self.post(l)))]
        pieces.append(("head", self.head))
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside capture (lazy initialisation, workspaces)
            for _, f in pieces:
                f()
        torch.cuda.current_stream().wait_stream(side)
        pool = torch.cuda.graph_pool_handle()
        self.graphs = {}
        for name, f in pieces:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                f()
            self.graphs[name] = g

    def run(self, name, f) -> None:
        if self.graphs is not None:
            self.graphs[name].replay()
        else:
            f()

    def step(self, attend: Callable, pos: int) -> None:
        """One decode step at position pos: self.tokens -> self.logits, self.tokens."""
        self.pos.fill_(pos)
        self.run("embed", self.embed)
        for l in range(self.model.shape.layers):
            self.run(("pre", l), lambda: self.pre(l))
            o = attend(l, self.q, self.k, self.v)
            if o is not self.o:
                self.o.copy_(o)
            self.run(("post", l), lambda: self.post(l))
        self.run("head", self.head)


class WorkloadInputs:
    """Calibrated attention inputs per layer (the synthetic workload, each layer's spec from
    layer_spec(workload, layer)), shared by all methods."""

    def __init__(self, shape: ModelShape, n: int, batch: int, dtype: str, device, seed: int = 0, mix: float = 0.01,
                 workload: str = "model"):
        layer_spec(workload, 0)  # checks the name
        self.workload = workload
        self.mix = mix
        self.n = n
        self.q: List[torch.Tensor] = []
        self.bg_k: List[torch.Tensor] = []
        self.bg_v: List[torch.Tensor] = []
        self.seed, self.shape, self.batch, self.dtype, self.device = seed, shape, batch, dtype, device

    def layer(self, l: int):
        """The workload of layer l (regenerated on demand: identical for every method)."""
        return synthetic(self.n, self.batch, self.shape.hq, self.shape.hkv, self.shape.head_dim,
                         self.dtype, self.device, seed=self.seed + l, spec=layer_spec(self.workload, l))

    def remember(self, l: int, wl) -> None:
        """Keep what decode steps need from layer l's workload: its query and 64 background tokens."""
        idx = torch.randint(1, self.n, (64,), generator=torch.Generator().manual_seed(self.seed + l)).to(wl.keys.device)
        if len(self.q) <= l:
            self.q.append(wl.queries.clone())
            self.bg_k.append(wl.keys[:, :, idx].clone())    # [B, Hkv, 64, D]
            self.bg_v.append(wl.values[:, :, idx].clone())

    def __call__(self, l, q, k, v, pos):
        if isinstance(pos, torch.Tensor):  # a device scalar (StaticStep): index on the device
            j = (pos % self.bg_k[l].shape[2]).view(1)
            bk, bv = self.bg_k[l].index_select(2, j)[:, :, 0], self.bg_v[l].index_select(2, j)[:, :, 0]
        else:
            j = pos % self.bg_k[l].shape[2]
            bk, bv = self.bg_k[l][:, :, j], self.bg_v[l][:, :, j]
        return self.q[l] + self.mix * q, bk + self.mix * k, bv + self.mix * v


class DenseCache:
    """Preallocated torch KV cache per layer; attention by torch SDPA over the filled part."""

    def __init__(self, shape: ModelShape, batch: int, capacity: int, dtype, device, backend: Optional[str]):
        self.k = [torch.empty(batch, shape.hkv, capacity, shape.head_dim, dtype=dtype, device=device)
                  for _ in range(shape.layers)]
        self.v = [torch.empty_like(x) for x in self.k]
        self.length = [0] * shape.layers
        self.backend = backend
        self.g = shape.hq // shape.hkv

    def prefill(self, l: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        n = keys.shape[2]
        self.k[l][:, :, :n].copy_(keys)
        self.v[l][:, :, :n].copy_(values)
        self.length[l] = n

    def __call__(self, l, q, k, v):
        n = self.length[l]
        self.k[l][:, :, n].copy_(k)
        self.v[l][:, :, n].copy_(v)
        self.length[l] = n + 1
        b, hkv, _, d = self.k[l].shape
        qf = q.reshape(b, hkv, self.g, d)
        kk, vv = self.k[l][:, :, :n + 1], self.v[l][:, :, :n + 1]
        if self.backend is None:
            o = F.scaled_dot_product_attention(qf, kk, vv)
        else:
            from torch.nn.attention import SDPBackend, sdpa_kernel
            be = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[self.backend]
            with sdpa_kernel(be):
                o = F.scaled_dot_product_attention(qf, kk, vv)
        return o.reshape(b, hkv * self.g, d)


class FlashInferCache:
    """Preallocated FlashInfer page cache per layer ([B * pages, 16, Hkv, D] NHD, K and V);
    attention by BatchDecodeWithPagedKVCacheWrapper, planned once per step."""

    def __init__(self, shape: ModelShape, batch: int, capacity: int, dtype, device, page_size: int = 16):
        self.fi = P.flashinfer_module(device)
        self.page_size, self.batch = page_size, batch
        self.seq_pages = -(-capacity // page_size)
        self.hq, self.hkv, self.d = shape.hq, shape.hkv, shape.head_dim
        self.dtype = dtype
        pages = batch * self.seq_pages
        self.k = [torch.zeros(pages, page_size, shape.hkv, shape.head_dim, dtype=dtype, device=device)
                  for _ in range(shape.layers)]
        self.v = [torch.zeros_like(x) for x in self.k]
        self.length = [0] * shape.layers
        self.planned = 0  # the sequence length the wrapper is planned for
        workspace = torch.zeros(P.FLASHINFER_WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self.wrapper = self.fi.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD")
        self.out = torch.empty(batch, shape.hq, shape.head_dim, dtype=dtype, device=device)

    def _tokens(self, l: int) -> torch.Tensor:
        """Layer l's K cache as [B, seq_pages * page_size, Hkv, D] (a view)."""
        return self.k[l].view(self.batch, self.seq_pages * self.page_size, self.hkv, self.d)

    def prefill(self, l: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        n = keys.shape[2]
        self._tokens(l)[:, :n] = keys.transpose(1, 2)
        self.v[l].view(self.batch, -1, self.hkv, self.d)[:, :n] = values.transpose(1, 2)
        self.length[l] = n

    def plan(self, n: int) -> None:
        t = P.dense_page_table(self.batch, n, self.page_size, self.seq_pages)
        dev = self.k[0].device
        self.wrapper.plan(torch.from_numpy(t.indptr), torch.from_numpy(t.indices).to(dev),
                          torch.from_numpy(t.last_page_len), self.hq, self.hkv, self.d, self.page_size,
                          pos_encoding_mode="NONE", q_data_type=self.dtype, kv_data_type=self.dtype)
        self.planned = n

    def __call__(self, l, q, k, v):
        n = self.length[l]
        self._tokens(l)[:, n] = k
        self.v[l].view(self.batch, -1, self.hkv, self.d)[:, n] = v
        self.length[l] = n + 1
        if self.planned != n + 1:  # once per step: every layer has the same length
            self.plan(n + 1)
        return self.wrapper.run(q, (self.k[l], self.v[l]), out=self.out)


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def decode_loop(model: RandomModel, attend: Callable, inputs: Callable, tokens: torch.Tensor, pos: int,
                warmup: int, steps: int, static: Optional[StaticStep] = None) -> dict:
    """Greedy decode: `warmup` untimed steps, then `steps` timed ones (CUDA events / wall clock),
    eagerly (model.step) or through `static` (its pieces, graphed or not).
    Returns seconds per step, tokens/s and the last logits."""
    dev = model.device
    logits = None
    if static is not None:
        static.tokens.copy_(tokens)

    def one(i: int, tokens: torch.Tensor):
        if static is None:
            logits = model.step(tokens, pos + i, attend, inputs)
            return logits, logits.argmax(-1)
        static.step(attend, pos + i)
        return static.logits, static.tokens

    for i in range(warmup):
        logits, tokens = one(i, tokens)
    _sync(dev)
    cuda = dev.type == "cuda"
    if cuda:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
    t = time.perf_counter()
    for i in range(steps):
        logits, tokens = one(warmup + i, tokens)
    if cuda:
        b.record()
        b.synchronize()
        total = a.elapsed_time(b) / 1e3
    else:
        total = time.perf_counter() - t
    return {"s_per_step": total / max(steps, 1), "tokens_per_s": tokens.shape[0] * steps / total,
            "steps": steps, "warmup": warmup, "logits": logits.clone(), "tokens": tokens.clone()}


MODES = ("eager", "static", "graphs")


def run_method(method: str, model: RandomModel, n: int, batch: int, dtype: str, target: float,
               warmup: int, steps: int, seed: int = 0, log=print, reps: int = 3, mode: str = "eager",
               workload: str = "model", options: Optional[dict] = None) -> dict:
    """Prefill the KV of every layer with the workload (E2E_WORKLOADS) and time the decode loop
    with `method`: 'tactic', 'dense-flash', 'dense-cudnn', 'dense' (default SDPA dispatch),
    'dense-flashinfer' or 'none'.
    mode: 'eager' (RandomModel.step), 'static' (StaticStep's pieces, no graphs) or 'graphs'
    (StaticStep's pieces as CUDA graphs, attention eager between them).
    options: SparseDecoder options for 'tactic' (e.g. stop_rule, selection_kernel); its resolved
    plan is reported as res['plan']."""
    if mode not in MODES:
        raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}")
    s, dev = model.shape, model.device
    inputs = WorkloadInputs(s, n, batch, dtype, dev, seed, workload=workload)
    cap = n + reps * (warmup + steps) + 1
    t0 = time.perf_counter()
    dec = cache = None
    if method == "tactic":
        dec = SparseDecoder(s.layers, s.hq, s.hkv, s.head_dim, max_batch=batch, max_tokens=cap, device=str(dev),
                            dtype=dtype, target=target, **(options or {}))
    elif method == "dense-flashinfer":
        cache = FlashInferCache(s, batch, cap, model.dtype, dev)
    elif method in ("dense", "dense-flash", "dense-cudnn"):
        cache = DenseCache(s, batch, cap, model.dtype, dev, method.split("-", 1)[1] if "-" in method else None)
    elif method != "none":
        raise ValueError(f"`method` must be tactic, dense, dense-flash, dense-cudnn, dense-flashinfer or none, "
                         f"got {method!r}")
    flat = []
    for l in range(s.layers):
        wl = inputs.layer(l)
        flat.append(wl.info["flat_head_fraction"])
        inputs.remember(l, wl)
        if dec is not None:
            dec.prefill(l, wl.keys.transpose(1, 2), wl.values.transpose(1, 2))  # token-major views
        elif cache is not None:
            cache.prefill(l, wl.keys, wl.values)
        del wl
    _sync(dev)
    prefill_s = time.perf_counter() - t0
    out = [torch.empty(batch, s.hq, s.head_dim, dtype=model.dtype, device=dev) for _ in range(s.layers)]
    reads: List[float] = []

    if dec is not None:
        def attend(l, q, k, v):
            return dec.decode(l, q, k, v, out=out[l])
    elif cache is not None:
        attend = cache
    else:
        def attend(l, q, k, v):
            return q
    static = StaticStep(model, inputs, batch, graphs=mode == "graphs") if mode != "eager" else None
    # `reps` timed loops, the median reported: single 16-step loops of this host-bound eager
    # model varied up to 2x between runs on the H100 machine (2026-11-23).
    runs = []
    for r in range(max(1, reps)):
        tokens = torch.zeros(batch, dtype=torch.long, device=dev)
        runs.append(decode_loop(model, attend, inputs, tokens, n + r * (warmup + steps), warmup, steps, static))
    per_step = sorted(x["s_per_step"] for x in runs)
    res = dict(runs[-1])
    res["s_per_step"] = per_step[len(per_step) // 2]
    res["tokens_per_s"] = batch / res["s_per_step"]
    res["s_per_step_reps"] = [x["s_per_step"] for x in runs]
    if dec is not None:
        reads = [float(dec.stats(l)["read_fraction"].mean()) for l in range(s.layers)]
        res["read_fraction_per_layer"] = reads
        res["plan"] = dict(dec.plan)
    if static is not None and method == "none":
        # the pieces (graphed or not) against the eager step on the same token and position:
        # 'none' keeps no state, so both must give the same logits
        p = n + reps * (warmup + steps)
        tok = torch.zeros(batch, dtype=torch.long, device=dev)
        static.tokens.copy_(tok)
        static.step(attend, p)
        ref = model.step(tok, p, attend, inputs)
        diff = float((static.logits.float() - ref.float()).abs().max())
        res["pieces_vs_eager_max_abs"] = diff
        if not diff <= 1e-3 * max(1.0, float(ref.float().abs().max())):
            raise RuntimeError(f"the {mode} step differs from the eager one: max |diff| {diff:.3g}")
    res.update(method=method, N=n, prefill_s=prefill_s, mode=mode, workload=workload, flat_head_fraction_per_layer=flat,
               read_fraction=(sum(reads) / len(reads)) if reads else (1.0 if cache is not None else 0.0))
    log(f"  {method:<12} N={n}: {res['tokens_per_s']:.2f} tokens/s ({res['s_per_step'] * 1e3:.2f} ms/step, "
        f"median of {' / '.join(f'{x * 1e3:.1f}' for x in res['s_per_step_reps'])}), "
        f"prefill {prefill_s:.1f} s" + (f", Tactic reads {res['read_fraction']:.2%}" if reads else ""))
    del dec, cache
    return res


def run(contexts, batch: int, dtype: str, target: float, device, shape: ModelShape = ModelShape(),
        methods=("none", "dense-flash", "dense-cudnn", "dense-flashinfer", "tactic"), warmup: int = 3,
        steps: int = 16, seed: int = 0, log=print, reps: int = 3, mode: str = "eager",
        workload: str = "model", options: Optional[dict] = None) -> dict:
    """Every method at every context; returns the JSON-ready result (logits dropped).
    options: SparseDecoder options for 'tactic' (run_method)."""
    model = RandomModel(shape, dtype, device, seed)
    rows = []
    for n in contexts:
        per: Dict[str, dict] = {}
        for m in methods:
            try:
                r = run_method(m, model, n, batch, dtype, target, warmup, steps, seed, log, reps, mode, workload,
                               options)
            except (RuntimeError, P.Unavailable) as e:  # e.g. an SDPA backend this GPU lacks, no FlashInfer
                log(f"  {m:<12} N={n}: n/a ({str(e).strip().splitlines()[0]})")
                per[m] = {"unavailable": str(e).strip().splitlines()[0]}
                continue
            r.pop("logits")
            r.pop("tokens")
            per[m] = r
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()
        dense = [per[m]["tokens_per_s"] for m in per if m.startswith("dense") and "tokens_per_s" in per[m]]
        row = {"N": n, "methods": per}
        if dense:
            best = max((m for m in per if m.startswith("dense") and "tokens_per_s" in per[m]),
                       key=lambda m: per[m]["tokens_per_s"])
            row["faster_dense"] = best
        if dense and "tokens_per_s" in per.get("tactic", {}):
            row["speedup_vs_faster_dense"] = per["tactic"]["tokens_per_s"] / max(dense)
            row["tactic_read_fraction"] = per["tactic"]["read_fraction"]
            row["tactic_read_fraction_per_layer"] = per["tactic"]["read_fraction_per_layer"]
        rows.append(row)
    return {"shape": asdict(shape), "batch": batch, "dtype": dtype, "target": target,
            "weight_bytes": shape.weight_bytes(torch.finfo(TORCH_DTYPES[dtype]).bits // 8),
            "mode": mode, "cuda_graphs": mode == "graphs", "workload": workload,
            "peers": {m: [r["methods"][m]["unavailable"] for r in rows if "unavailable" in r["methods"].get(m, {})]
                      for m in methods},
            "rows": rows}
