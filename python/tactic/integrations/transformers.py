"""Tactic decode attention inside Hugging Face transformers' `generate()`.

Two stable hooks of transformers, no patching of model classes:

* an attention function registered under the name ``"tactic"`` through
  ``transformers.AttentionInterface`` (and the stock sdpa mask under the same name through
  ``AttentionMaskInterface``), selected with ``model.set_attn_implementation("tactic")``;
* `TacticCache`, a `DynamicCache` subclass whose full-attention layers keep no dense K/V:
  the prompt's K/V go into a `tactic.SparseDecoder` (one decoder layer per model layer), and
  every later token is appended there and attended sparsely by `SparseDecoder.decode`.

The prefill itself stays dense (delegated to transformers' sdpa attention). Layers with
sliding-window or chunked attention keep transformers' own cache layers and dense attention.

    from tactic.integrations.transformers import enable
    cache = enable(model, target=0.9)                  # or policy="quest", budget=256, ...
    out = model.generate(**inputs, max_new_tokens=64)  # runs on `cache`
    cache.summary()                                    # tokens read per layer, est. mass

`enable` also wraps this model's `generate` (an attribute of the instance; `disable` removes
it) so that every call runs on Tactic: without a cache argument it uses the cache `enable`
returned; the store is sized from the call's own `max_new_tokens`/`max_length`; a second call
on a used cache either continues it (its input extends what the cache holds, as with
`DynamicCache`) or starts it afresh; a cache that is not a `TacticCache`, `use_cache=False` or
`cache_implementation=` raise instead of running dense attention. The cache goes to
`generate` under the name this transformers uses (`cache=` since 5.x, `past_key_values=`
before); both names are accepted.

Capacity: a CPU store that a generation outruns grows (a larger decoder is built and the
stored K/V are copied into it in token order; the clusters are rebuilt over all tokens). A
CUDA store cannot be read back, so it cannot grow: outside `generate` (or with `grow=False`)
a step past its capacity raises `tactic.CapacityError` naming the `max_tokens=` to pass,
before anything changes.

How the attention function finds its cache: transformers calls ``cache.update(k, v, layer)``
right before the layer's attention function and passes it the tensors `update` returned, but
not the cache itself. `TacticLayer.update` therefore leaves a hand-off (this thread: the
layer and the exact key tensor it returned); the attention function takes it only when the
key it receives *is* that tensor, and otherwise runs plain sdpa (a forward without a
`TacticCache` is ordinary dense attention).
"""
from __future__ import annotations

import functools
import inspect
import numbers
import threading
from typing import Callable, Optional, Union

import numpy as np
import torch

try:
    import transformers
    from transformers import AttentionInterface
    from transformers.cache_utils import DynamicCache, DynamicLayer
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("tactic.integrations.transformers needs transformers>=4.56,<6: "
                      "pip install 'tactic[hf]'") from e

from .._core import CapacityError
from ..decoder import SparseDecoder

ATTN_NAME = "tactic"
_TORCH_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}
_handoff = threading.local()


class TacticLayer(DynamicLayer):
    """Cache layer of one full-attention model layer, backed by a layer of the shared decoder.

    It stores no dense K/V: `update` returns the new tokens' K/V unchanged (the prompt for the
    dense prefill, or the new tokens for `SparseDecoder.decode`) and counts positions.
    """

    is_croppable = False

    def __init__(self, owner: "TacticCache", layer_idx: int, slot: int):
        super().__init__()
        self.owner, self.layer_idx, self.slot = owner, layer_idx, slot
        self.seen = 0           # positions so far, padding included (what the masks expect)
        self.prefilled = False
        self.steps = 0          # decode calls so far (the `step` passed to budget callables)

    def lazy_initialization(self, key_states, value_states=None) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not getattr(self, "is_initialized", False):  # 4.x layers have no such flag
            self.lazy_initialization(key_states, value_states)
        _handoff.value = (self, key_states)
        return key_states, value_states

    def advance(self, tokens: int) -> None:
        self.seen += tokens

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length):
        # transformers 5.x passes the query length, 4.x the query's cache_position tensor
        if isinstance(query_length, torch.Tensor):
            query_length = query_length.shape[0]
        return self.seen + int(query_length), 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.seen, self.prefilled, self.steps = 0, False, 0
        self.owner._reset_decoder()

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise NotImplementedError("TacticCache cannot drop tokens (crop): the sparse store only grows; "
                                      "assisted/speculative decoding is not supported")

    def _unsupported(self, *args, **kwargs):
        raise NotImplementedError("TacticCache does not reorder or repeat sequences: beam search, "
                                  "contrastive search and assisted decoding are not supported")

    reorder_cache = batch_repeat_interleave = batch_select_indices = _unsupported

    def offload(self):
        pass

    def prefetch(self):
        pass


BudgetArg = Union[None, int, Callable[[int, int], object]]


class TacticCache(DynamicCache):
    """A transformers `Cache` whose full-attention layers live in a `tactic.SparseDecoder`.

    Build it with `enable(model, ...)` (which also selects the attention function and wraps
    `generate`) or directly with `TacticCache(model, ...)` after
    ``model.set_attn_implementation("tactic")``. Through `enable`'s `generate`, one cache
    serves any number of calls: each either continues what the cache holds or starts it
    afresh (see `enable`); `summary()` and `layer_stats()` describe the decode steps since the
    cache last started.

    Args:
        model: the transformers model (its config gives the layer types; its first
            parameter's device gives the decoder's device).
        target, policy, budget: see `enable`.
        max_tokens: per-sequence capacity of the decoder (prompt incl. padding + new
            tokens), at least. Default: what the `generate` call can reach (prompt +
            `max_new_tokens`, or `max_length`) under `enable`'s `generate`, else the padded
            prompt + 1024; the CPU store grows past it when outrun (see `grow`).
        grow: let a CPU store that a generation outruns grow (a larger decoder; the stored K/V
            are copied in token order and re-clustered). With False, or on CUDA (whose store
            cannot be read back), a step past capacity raises `tactic.CapacityError` naming the
            `max_tokens=` to pass, and changes nothing.
        on_step: optional callable ``on_step(layer_idx, step, q, k_new, v_new, out, stats)``
            run after every decode step of every Tactic layer (q [B, Hq, D] torch; stats is
            `SparseDecoder.stats`). For diagnostics and the accuracy harness.
        **decoder_kwargs: passed to `tactic.SparseDecoder` (cluster_size, num_sink, ...).
    """

    def __init__(self, model, target: float = 0.9, policy: str = "tactic", budget: BudgetArg = None,
                 max_tokens: Optional[int] = None, on_step=None, grow: bool = True, **decoder_kwargs):
        config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") \
            else model.config
        self._config = config
        self._install_layers()
        self.geometry = check_model(model)
        self.device = _model_device(model)
        self.target, self.policy, self.budget = float(target), policy, budget
        if max_tokens is not None:
            if not isinstance(max_tokens, numbers.Integral) or isinstance(max_tokens, bool) or max_tokens < 1:
                raise ValueError(f"`max_tokens` must be a positive int (tokens per sequence), got {max_tokens!r}")
            max_tokens = int(max_tokens)
        if not isinstance(grow, bool):
            raise TypeError(f"`grow` must be a bool, got {type(grow).__name__}")
        self.max_tokens, self.on_step, self.grow = max_tokens, on_step, grow
        self.decoder_kwargs = dict(decoder_kwargs)
        self.kv_dtype = self.decoder_kwargs.pop("dtype", None)  # storage; default: the model's
        self.decoder: Optional[SparseDecoder] = None
        self.batch = 0
        self.growths = 0             # times the store was re-homed into a larger decoder
        self._planned = None         # tokens per sequence the current generate call can reach
        self._spare: Optional[SparseDecoder] = None   # a decoder kept across restarts for reuse
        self._held_ids = None        # [B, seen] token ids the cache holds, after enable's generate
        self._stats: dict = {}
        # Fail here, not in the middle of generate: the decoder must accept this geometry/policy.
        hq, hkv, d = self.geometry
        _make_decoder(self.num_tactic_layers, hq, hkv, d, 1, 8, self.device, self.kv_dtype or "float32",
                      self.target, policy, None,
                      {k: v for k, v in self.decoder_kwargs.items() if k != "record_selection"})

    def _install_layers(self) -> None:
        """(Re)build the layer list from the config: transformers' layers, with each plain
        full-attention `DynamicLayer` replaced by a `TacticLayer`."""
        DynamicCache.__init__(self, config=self._config)
        if not self.layers:
            raise ValueError("TacticCache: could not derive the layer types from the model config")
        n = 0
        for i, layer in enumerate(self.layers):
            # Exactly DynamicLayer: sliding/chunked/linear/shared layers keep their own class.
            if type(layer) is DynamicLayer:
                self.layers[i] = TacticLayer(self, i, n)
                n += 1
        if n == 0:
            raise ValueError("TacticCache: the model has no full-attention layer (all are sliding-window, "
                             "chunked or linear); Tactic would change nothing")
        self.num_tactic_layers = n
        self.sparse_layers = [i for i, l in enumerate(self.layers) if isinstance(l, TacticLayer)]
        self.dense_layers = [i for i in range(len(self.layers)) if i not in self.sparse_layers]

    # ------------------------------------------------------------------ generate calls
    def held_tokens(self) -> int:
        """Positions the cache holds (padding included), like `get_seq_length()`."""
        return self.layers[self.sparse_layers[0]].seen

    def restart(self) -> None:
        """Forget every sequence and every statistic: the cache is as new (its decoder is
        kept for reuse when the next prompt fits it)."""
        self._install_layers()
        if self.decoder is not None:
            self._spare, self.decoder = self.decoder, None
        self.batch, self._stats, self._held_ids = 0, {}, None
        _handoff.value = None

    def plan(self, input_ids, total_tokens: int) -> str:
        """Get ready for a `generate` call on `input_ids` [B, N] (None if unknown) that can
        reach `total_tokens` positions per sequence. Returns what it did: 'fresh' (nothing
        held), 'continue' (input_ids extends what the cache holds, as after a previous call
        on this cache: only the new tokens are run) or 'restart' (anything else: the cache
        forgets what it held and the call prefills its whole input)."""
        total = int(total_tokens)
        held = self.held_tokens()
        if held == 0 and self.decoder is None:
            self._planned = total
            return "fresh"
        prev = self._held_ids
        if (prev is not None and input_ids is not None and input_ids.dim() == 2
                and input_ids.shape[0] == prev.shape[0] and prev.shape[1] == held
                and input_ids.shape[1] > held
                and torch.equal(input_ids[:, :held].to(prev.device), prev)):
            if self.decoder is None or total <= self.decoder.max_tokens or self._can_grow():
                self._planned = total
                if self.decoder is not None and total > self.decoder.max_tokens:
                    self._grow(total, exact=True)
                return "continue"
        self.restart()
        self._planned = total
        return "restart"

    def _can_grow(self) -> bool:
        return self.grow and self.decoder is not None and not self.decoder.device.startswith("cuda")

    # ------------------------------------------------------------------ decoder
    def _reset_decoder(self) -> None:
        if self.decoder is not None:
            self.decoder.reset()
            self._stats = {}

    def _ensure_decoder(self, query, key, scaling: float, padded_len: int) -> SparseDecoder:
        if self.decoder is not None:
            if abs(self.decoder_scale - scaling) > 1e-6 * scaling:
                raise ValueError(f"TacticCache: layers use different softmax scales "
                                 f"({self.decoder_scale} and {scaling}); one decoder serves one scale")
            return self.decoder
        dtype = self.kv_dtype or _TORCH_DTYPES.get(key.dtype)
        if dtype is None:
            raise TypeError(f"TacticCache: keys of dtype {key.dtype} are not supported "
                            "(float16, bfloat16, float32)")
        cap = max(self.max_tokens or 0, self._planned or 0, padded_len + 1)
        if self.max_tokens is None and self._planned is None:
            cap = padded_len + 1024      # outside enable's generate: a guess, grown when outrun
        dev = "cuda:%d" % key.device.index if key.device.type == "cuda" else "cpu"
        spare, self._spare = self._spare, None
        if (spare is not None and spare.max_batch == key.shape[0] and spare.max_tokens >= cap
                and spare.dtype == dtype and spare.device == dev and self.decoder_scale == scaling):
            spare.reset()
            self.decoder, self.batch = spare, key.shape[0]
            return spare
        del spare                        # free the old store before allocating the new one
        try:
            self.decoder = _make_decoder(self.num_tactic_layers, query.shape[1], key.shape[1], key.shape[3],
                                         key.shape[0], cap, dev, dtype, self.target, self.policy, scaling,
                                         self.decoder_kwargs)
        except CapacityError as e:
            raise CapacityError(f"TacticCache: a store for {key.shape[0]} sequence(s) of {cap} tokens (the prompt, "
                                f"{padded_len} positions with padding, plus the tokens to generate) does not fit. "
                                "Generate fewer tokens (max_new_tokens=), pass fewer prompts at once, or store "
                                f"K/V in a narrower dtype (enable(model, dtype='float16')). {e}") from e
        self.batch, self.decoder_scale = key.shape[0], scaling
        return self.decoder

    def _grow(self, min_tokens: int, exact: bool = False) -> None:
        """Re-home the store into a decoder of `min_tokens` (exact: a planned size) or at
        least twice the old capacity (an unplanned growth, so that growths stay rare): every
        (layer, sequence)'s K/V, read back in token order, are prefilled into the new
        decoder, which clusters them afresh. The old decoder stays in place until the new one
        is complete, so a failure changes nothing."""
        old = self.decoder
        cap = int(min_tokens) if exact else max(int(min_tokens), 2 * old.max_tokens)
        try:
            new = _make_decoder(old.num_layers, old.num_q_heads, old.num_kv_heads, old.head_dim, old.max_batch,
                                cap, old.device, old.dtype, old.target, self.policy, self.decoder_scale,
                                self.decoder_kwargs)
        except CapacityError as e:
            raise CapacityError(f"TacticCache: the store (max_tokens={old.max_tokens}) is full and could not grow "
                                f"to max_tokens={cap} while the old one is held: {e} Nothing was changed; for a "
                                f"generation that long pass enable(model, max_tokens={cap}) up front (one store, "
                                "no copy), or generate fewer tokens.") from e
        hkv, d = old.num_kv_heads, old.head_dim
        for layer in range(old.num_layers):
            for seq in range(old.max_batch):
                n = old.length(layer, seq)
                if n == 0:
                    continue
                k = np.empty((n, hkv, d), np.float32)
                v = np.empty((n, hkv, d), np.float32)
                for h in range(hkv):
                    lay = old.layout(layer, seq, h)
                    order = np.argsort(lay["positions"], kind="stable")
                    if not np.array_equal(lay["positions"][order], np.arange(n)):
                        raise RuntimeError(f"TacticCache: the store of layer {layer}, sequence {seq}, KV head "
                                           f"{h} does not hold positions 0..{n - 1}; cannot re-home it")
                    k[:, h], v[:, h] = lay["keys"][order], lay["values"][order]
                new.prefill(layer, k, v, seq=seq)
        self.decoder = new
        self.growths += 1

    def _capacity_error(self, layer: "TacticLayer", seq: int, held: int) -> CapacityError:
        cap = self.decoder.max_tokens
        why = ("a CUDA store cannot grow (its K/V are not read back)" if self.decoder.device.startswith("cuda")
               else "this cache was made with grow=False")
        return CapacityError(
            f"TacticCache: sequence {seq} holds {held} tokens in layer {layer.layer_idx}, the store's capacity "
            f"(max_tokens={cap}), and {why}. Pass max_tokens= at least the prompt (padding included) plus "
            f"every token to decode, e.g. enable(model, max_tokens={2 * cap}) or TacticCache(model, "
            f"max_tokens={2 * cap}); under enable()'s generate() the capacity follows max_new_tokens/max_length. "
            "Nothing was changed: the cache still holds every earlier token.")

    def _budget(self, layer: TacticLayer):
        b = self.budget
        if callable(b):
            b = b(layer.layer_idx, layer.steps)
        if b is None:
            return None
        if isinstance(b, torch.Tensor):
            b = b.detach().cpu().numpy()
        return b if isinstance(b, (int, np.integer)) else np.asarray(b, dtype=np.int64).reshape(self.batch, -1)

    # ------------------------------------------------------------------ called by the attention function
    def prefill_layer(self, layer: TacticLayer, query, key, value, attention_mask, scaling: float) -> None:
        """Store the valid prompt tokens of every sequence (padding dropped, order kept)."""
        dec = self._ensure_decoder(query, key, scaling, key.shape[2])
        if key.shape[0] != self.batch:
            raise ValueError(f"TacticCache: batch changed from {self.batch} to {key.shape[0]}")
        valid = _valid_keys(attention_mask, key.shape[0], key.shape[2])
        for b in range(key.shape[0]):
            if valid is None:
                k, v = key[b], value[b]
            else:
                idx = torch.nonzero(valid[b], as_tuple=False).flatten().to(key.device)
                k, v = key[b].index_select(1, idx), value[b].index_select(1, idx)
            dec.prefill(layer.slot, k.transpose(0, 1).contiguous(), v.transpose(0, 1).contiguous(), seq=b)
        layer.prefilled = True

    def decode_layer(self, layer: TacticLayer, query, key, value):
        """Decode the T new tokens one at a time (causal), returning [B, T, Hq, D]."""
        slots = list(range(self.batch))
        outs = []
        for t in range(query.shape[2]):
            dec = self._room_for_one(layer)
            q = query[:, :, t].contiguous()
            k = key[:, :, t].contiguous()
            v = value[:, :, t].contiguous()
            out = dec.decode(layer.slot, q, k, v, seq=slots, budget=self._budget(layer))
            st = dec.stats(layer.slot)
            self._record(layer.layer_idx, st)
            if self.on_step is not None:
                self.on_step(layer.layer_idx, layer.steps, q, k, v, out, st)
            layer.steps += 1
            outs.append(out)
        return torch.stack(outs, dim=1)

    def _room_for_one(self, layer: TacticLayer) -> SparseDecoder:
        """The decoder, with room for one more token in every sequence of `layer` (grown if
        needed and allowed; else CapacityError before anything changes)."""
        dec = self.decoder
        held = [dec.length(layer.slot, b) for b in range(self.batch)]
        full = [b for b, n in enumerate(held) if n >= dec.max_tokens]
        if full:
            if not self._can_grow():
                raise self._capacity_error(layer, full[0], held[full[0]])
            self._grow(max(held) + 1)
            dec = self.decoder
        return dec

    def _record(self, layer_idx: int, st: dict) -> None:
        d = self._stats.setdefault(layer_idx, {"kv_tokens": [], "head_tokens": [], "est_mass": [],
                                               "context": []})
        for name in d:
            d[name].append(np.array(st[name], copy=True))

    # ------------------------------------------------------------------ results
    def layer_stats(self, layer_idx: int) -> dict:
        """Per decode step of model layer `layer_idx`: `kv_tokens` [S, B, Hkv] tokens read per KV
        head, `head_tokens` [S, B, Hq], `est_mass` [S, B, Hq] (the selector's estimate of the
        mass kept; NaN for policies without one), `context` [S, B] tokens held."""
        if layer_idx not in self._stats:
            if layer_idx in self.dense_layers:
                raise ValueError(f"layer {layer_idx} is not run by Tactic (sliding-window, chunked "
                                 "or linear attention stays dense)")
            return {}
        return {k: np.stack(v) for k, v in self._stats[layer_idx].items()}

    def summary(self) -> dict:
        """Mean over decode steps, sequences and KV heads: per layer and overall share of the
        context read, tokens read per KV head, and the mean estimated mass."""
        per_layer = {}
        for li in sorted(self._stats):
            s = self.layer_stats(li)
            frac = s["kv_tokens"] / np.maximum(s["context"], 1)[..., None]
            per_layer[li] = {"steps": int(s["kv_tokens"].shape[0]),
                             "kv_tokens": float(s["kv_tokens"].mean()),
                             "read_fraction": float(frac.mean()),
                             "est_mass": float(np.nanmean(s["est_mass"])) if np.isfinite(s["est_mass"]).any()
                             else float("nan")}
        overall = float(np.mean([v["read_fraction"] for v in per_layer.values()])) if per_layer else float("nan")
        return {"policy": self.policy, "target": self.target, "read_fraction": overall,
                "dense_layers": self.dense_layers, "layers": per_layer}

    def steps_read(self) -> np.ndarray:
        """Tokens read per decode step, summed over Tactic layers and KV heads: [S, B]."""
        if not self._stats:
            return np.zeros((0, self.batch), np.int64)
        return sum(self.layer_stats(li)["kv_tokens"].sum(axis=2) for li in self._stats)

    def prefill_from(self, past_key_values, attention_mask=None, input_ids=None) -> "TacticCache":
        """Fill this cache from a dense `DynamicCache` that already holds a prompt (for
        example from one dense forward reused for several policies).

        attention_mask: the 2D [B, N] padding mask of that prompt (1 = token), if any. The
        softmax scale is the model's (1/sqrt(head_dim) unless `scale=` was given).
        input_ids: the [B, N] token ids of that prompt, if `enable`'s `generate` is to
        continue from it (an input that extends them runs only its new tokens); without
        them, such a `generate` cannot check what the cache holds and starts it afresh.
        """
        if input_ids is not None and (input_ids.dim() != 2 or input_ids.shape[1] != past_key_values.get_seq_length()):
            raise ValueError(f"prefill_from: `input_ids` must be the [B, {past_key_values.get_seq_length()}] "
                             f"tokens the cache holds, got shape {tuple(input_ids.shape)}")
        if any(l.prefilled for l in self.layers if isinstance(l, TacticLayer)):
            raise ValueError("prefill_from: this cache already holds a prompt")
        hq = self.geometry[0]
        scale = self.decoder_kwargs.get("scale") or self.geometry[2] ** -0.5
        for i, layer in enumerate(self.layers):
            src = past_key_values.layers[i]
            k, v = src.keys, src.values
            if isinstance(layer, TacticLayer):
                layer.lazy_initialization(k, v)
                mask4 = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
                q_like = k.new_empty((k.shape[0], hq, 0, k.shape[3]))
                self.prefill_layer(layer, q_like, k, v, mask4, scale)
                layer.advance(k.shape[2])
            else:
                layer.update(k, v)
        _handoff.value = None
        self._held_ids = None if input_ids is None else input_ids.detach().clone()
        return self


def _make_decoder(layers, hq, hkv, d, batch, max_tokens, device, dtype, target, policy, scale, kwargs):
    try:
        return SparseDecoder(layers, hq, hkv, d, max_batch=batch, max_tokens=max_tokens, device=device,
                             dtype=dtype, target=target, policy=policy, scale=scale, **kwargs)
    except CapacityError:
        raise                # the store does not fit: the callers say what to pass
    except (ValueError, TypeError, RuntimeError) as e:
        raise type(e)(f"Tactic cannot run this model's attention ({hq} query heads, {hkv} KV heads, "
                      f"head dim {d}, policy {policy!r}, device {device}): {e}") from e


def _valid_keys(mask, batch: int, n: int):
    """[B, N] bool of the prompt tokens each sequence attends to, or None when all do.

    The last query row of the 4D mask sees every earlier key that is not padding, whatever
    side the padding is on. Boolean masks say True = attend; additive masks use 0.
    """
    if mask is None:
        return None
    if mask.dim() == 2:
        rows = mask
    elif mask.dim() == 4:
        rows = mask[:, 0, -1, :]
    else:
        raise ValueError(f"TacticCache: unexpected attention mask of shape {tuple(mask.shape)}")
    rows = rows[..., -n:] if rows.shape[-1] >= n else rows
    valid = rows if rows.dtype == torch.bool else rows == 0
    valid = valid.expand(batch, n)
    return None if bool(valid.all()) else valid.cpu()


def _model_device(model) -> str:
    p = next(model.parameters(), None)
    if p is None or p.device.type == "cpu":
        return "cpu"
    if p.device.type == "cuda":
        return "cuda:%d" % (p.device.index or 0)
    raise ValueError(f"Tactic runs on CPU or CUDA; the model is on {p.device}")


def check_model(model):
    """(Hq, Hkv, head_dim) of a decoder-only model Tactic can run, or a clear error."""
    cfg = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") \
        else model.config
    name = type(model).__name__
    if getattr(cfg, "is_encoder_decoder", False):
        raise ValueError(f"{name}: encoder-decoder models are not supported (decoder-only only)")
    hq = getattr(cfg, "num_attention_heads", None)
    if not isinstance(hq, int) or hq < 1:
        raise ValueError(f"{name}: the config has no num_attention_heads")
    hkv = getattr(cfg, "num_key_value_heads", None) or hq
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // hq
    if hq % hkv:
        raise ValueError(f"{name}: num_attention_heads={hq} is not a multiple of num_key_value_heads={hkv}")
    for key in ("attn_logit_softcapping",):
        if getattr(cfg, key, None):
            raise ValueError(f"{name}: attention logit soft-capping ({key}={getattr(cfg, key)}) is not "
                             "supported by Tactic's decode attention (it changes the softmax)")
    if getattr(cfg, "use_mla", False) or getattr(cfg, "kv_lora_rank", None):
        raise ValueError(f"{name}: multi-head latent attention is not supported")
    return hq, hkv, d


def tactic_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The registered attention function: dense sdpa for the prompt, Tactic for new tokens."""
    pending = getattr(_handoff, "value", None)
    _handoff.value = None
    if pending is None or pending[1] is not key:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    layer: TacticLayer = pending[0]
    cache = layer.owner
    for bad in ("softcap", "s_aux", "sinks"):
        if kwargs.get(bad) is not None:
            raise ValueError(f"Tactic does not support attention with `{bad}` (layer {layer.layer_idx})")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if not layer.prefilled:
        out = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                     dropout=dropout, **kwargs)
        with torch.no_grad():
            cache.prefill_layer(layer, query, key, value, attention_mask, float(scaling))
        layer.advance(key.shape[2])
        return out
    with torch.no_grad():
        out = cache.decode_layer(layer, query, key, value)
    layer.advance(key.shape[2])
    return out, None


def register() -> None:
    """Register the ``"tactic"`` attention function (and sdpa's mask under the same name)."""
    AttentionInterface.register(ATTN_NAME, tactic_attention)
    try:
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
        AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
    except ImportError:  # older transformers build the sdpa-style mask for any name
        pass


def enable(model, target: float = 0.9, policy: str = "tactic", budget: BudgetArg = None,
           max_tokens: Optional[int] = None, grow: bool = True, **decoder_kwargs) -> TacticCache:
    """Make `model` decode with Tactic and return the cache its `generate` runs on.

    Selects the registered ``"tactic"`` attention function on `model`, and wraps this
    model's `generate` (an instance attribute; `disable` removes it) so that every call runs
    on Tactic:

    * ``model.generate(**inputs, max_new_tokens=64)`` uses the returned cache; so does
      passing it, as ``cache=`` or ``past_key_values=`` (either name; it reaches transformers
      under the one this version uses). Another `TacticCache` may be passed instead.
    * The store is sized for the call: prompt (padding included) + `max_new_tokens`, or
      `max_length` (at least `max_tokens`).
    * A later call on the same cache continues it when its input extends what the cache
      holds (for example the previous output plus a new user turn: only the new tokens are
      run); any other input starts the cache afresh (the statistics then describe the new
      call).
    * A dense cache (a `DynamicCache` or any non-Tactic cache), ``use_cache=False`` or
      ``cache_implementation=`` raise ValueError: the model would run dense attention.
      Call `disable(model)` first for a dense `generate`.

    Forwards called directly (``model(ids, cache=...)``) are not wrapped: with a
    `TacticCache` they run Tactic, without one plain sdpa (for example a dense prefill into a
    `DynamicCache` for `TacticCache.prefill_from`).

    Args:
        target: P, the attention mass each query head keeps (tactic; also oracle's P).
        policy: 'tactic', 'dense', 'oracle' (exact top-P), 'quest' or 'topk' (need `budget`).
            CUDA decoders run 'tactic' and 'dense' only.
        budget: tokens per KV head for quest/topk: an int, or a callable
            ``budget(layer_idx, step) -> int or [B, num_kv_heads] ints`` for per-step budgets.
        max_tokens: decoder capacity per sequence, at least (default: what each `generate`
            call can reach; outside `generate`, the padded prompt + 1024).
        grow: let a CPU store that a generation outruns grow (see `TacticCache`).
        **decoder_kwargs: `tactic.SparseDecoder` options (cluster_size, num_sink, margin, ...).
    """
    if policy in ("quest", "topk") and budget is None:
        raise ValueError(f"policy {policy!r} needs `budget=` (tokens per KV head, or a callable)")
    register()
    cache = TacticCache(model, target=target, policy=policy, budget=budget, max_tokens=max_tokens,
                        grow=grow, **decoder_kwargs)
    if getattr(model.config, "_attn_implementation", None) != ATTN_NAME:
        model._tactic_previous_attn = model.config._attn_implementation
        _set_attn(model, ATTN_NAME)
    model._tactic_cache = cache
    if not getattr(model.__dict__.get("generate"), "_tactic_wrapper", False):
        model.generate = _tactic_generate(model)
    return cache


def disable(model) -> None:
    """Go back to the attention implementation the model had before `enable`, and to the
    model's own `generate`."""
    prev = getattr(model, "_tactic_previous_attn", None) or "sdpa"
    _set_attn(model, prev)
    if getattr(model.__dict__.get("generate"), "_tactic_wrapper", False):
        del model.__dict__["generate"]
    model.__dict__.pop("_tactic_cache", None)


def cache_arg(model) -> str:
    """The keyword under which this transformers' models take a cache: 'cache' (5.x, where
    `past_key_values` is deprecated) or 'past_key_values'."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - forward without a signature
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def planned_tokens(model, kwargs: dict, input_len: int) -> int:
    """Positions per sequence a `generate(**kwargs)` call on `input_len` prompt positions can
    reach (an upper bound: `max_new_tokens` past the prompt, else `max_length`)."""
    cfg = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    max_new = kwargs.get("max_new_tokens", getattr(cfg, "max_new_tokens", None))
    if max_new is not None:
        return input_len + int(max_new)
    max_length = kwargs.get("max_length")
    if max_length is not None:
        return max(int(max_length), input_len + 1)
    max_length = getattr(cfg, "max_length", None) or 20
    if max_length == 20:
        # transformers' default; 5.x counts it past the prompt, 4.x from the start
        return input_len + max_length
    return max(int(max_length), input_len + 1)


def _tactic_generate(model):
    original = type(model).generate.__get__(model)

    @functools.wraps(original)
    def generate(*args, **kwargs):
        given = [name for name in ("cache", "past_key_values") if kwargs.get(name) is not None]
        if len(given) == 2:
            raise ValueError("generate: pass the cache once, as `cache=` or `past_key_values=`, not both")
        for name in ("cache", "past_key_values"):
            if name in kwargs and kwargs[name] is None:
                del kwargs[name]
        cache = kwargs.pop(given[0]) if given else model.__dict__.get("_tactic_cache")
        fix = ("pass cache=tactic.integrations.transformers.enable(model, ...) (or a TacticCache), or call "
               "disable(model) first for dense attention")
        if not isinstance(cache, TacticCache):
            raise ValueError(f"generate: enable() made this model decode with Tactic, but the cache passed is a "
                             f"{type(cache).__name__}, which would run dense attention; {fix}")
        if kwargs.get("use_cache") is False or (kwargs.get("generation_config") is not None
                                                and kwargs["generation_config"].use_cache is False):
            raise ValueError(f"generate: use_cache=False would run dense attention over the whole sequence "
                             f"at every step; {fix}")
        if kwargs.get("cache_implementation") is not None:
            raise ValueError(f"generate: cache_implementation={kwargs['cache_implementation']!r} would replace "
                             f"Tactic's cache with a dense one; {fix}")
        ids = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))
        ids = ids if isinstance(ids, torch.Tensor) and ids.dim() == 2 and not ids.is_floating_point() else None
        embeds = kwargs.get("inputs_embeds")
        input_len = max(ids.shape[1] if ids is not None else 0,
                        embeds.shape[1] if isinstance(embeds, torch.Tensor) else 0, 1)
        cache.plan(ids if embeds is None else None, planned_tokens(model, kwargs, input_len))
        kwargs[cache_arg(model)] = cache
        try:
            out = original(*args, **kwargs)
        except BaseException:
            cache._held_ids = None           # what it holds is no longer known: the next call restarts
            raise
        seqs = out if isinstance(out, torch.Tensor) else getattr(out, "sequences", None)
        held = cache.held_tokens()
        cache._held_ids = (seqs[:, :held].clone() if embeds is None and isinstance(seqs, torch.Tensor)
                           and seqs.shape[1] >= held else None)
        return out

    generate._tactic_wrapper = True
    return generate


def _set_attn(model, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:  # transformers before set_attn_implementation
        model.config._attn_implementation = name


__all__ = ["enable", "disable", "register", "TacticCache", "TacticLayer", "tactic_attention",
           "check_model", "cache_arg", "planned_tokens", "ATTN_NAME"]
