"""`SparseDecoder`: a KV store plus adaptive sparse decode attention for every layer."""
from __future__ import annotations

import numbers
from typing import Iterable, Optional, Sequence

import numpy as np

from . import _arrays
from . import _core

POLICIES = ("tactic", "dense", "oracle", "quest", "topk")
ESTIMATORS = ("centroid_prior", "two_segment")
STOP_RULES = ("certified", "prior")
METRICS = ("euclidean", "spherical")


_INT64_MAX = 2**63 - 1
_INT32_MAX = 2**31 - 1  # fields the core holds as C `int`


def _int(name: str, value, minimum: Optional[int] = None, maximum: int = _INT64_MAX) -> int:
    """`value` as a Python int, checked here so that the core's fixed-width integers never
    see (and nanobind never refuses with an anonymous error) a value they cannot hold."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}")
    if value > maximum or value < -_INT64_MAX - 1:
        raise ValueError(f"`{name}` must be <= {maximum}, got {value}")
    return value


def _float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a number, got {type(value).__name__} {value!r}")
    try:
        return float(value)
    except OverflowError:  # an int beyond float range
        raise ValueError(f"`{name}` must be a finite number, got {value}") from None


def _bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be a bool, got {type(value).__name__}")
    return value


def _choice(name: str, value, allowed: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"`{name}` must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    return value


def _parse_device(device):
    text = str(device)
    if text == "cpu":
        return "cpu", 0
    if text == "cuda":
        return "cuda", 0
    if text.startswith("cuda:") and text[5:].isdigit():
        return "cuda", int(text[5:])
    raise ValueError(f"`device` must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")


def _kernel_options(head_split, attention_kernel, pdl, selection_kernel="auto"):
    """(head_split, attention_kernel, pdl, selection_kernel) as the core takes them: 0 / -1
    for automatic."""
    if head_split is None:
        head_split = 0
    elif isinstance(head_split, bool) or not isinstance(head_split, (int, np.integer)) or head_split not in (1, 2, 4):
        raise ValueError(f"`head_split` must be None (automatic), 1, 2 or 4, got {head_split!r}")
    if not isinstance(attention_kernel, str):
        raise TypeError(f"`attention_kernel` must be a str, got {type(attention_kernel).__name__}")
    if pdl is not None and not isinstance(pdl, bool):
        raise TypeError(f"`pdl` must be None (automatic) or a bool, got {type(pdl).__name__}")
    if not isinstance(selection_kernel, str):
        raise TypeError(f"`selection_kernel` must be a str, got {type(selection_kernel).__name__}")
    return int(head_split), attention_kernel, -1 if pdl is None else int(pdl), selection_kernel


class SparseDecoder:
    """Adaptive sparse attention for decoding, over a KV store it owns.

    Each decode step, for every query head, Tactic reads the smallest set of whole key
    clusters whose estimated softmax mass reaches `target` (P), plus the attention sinks and
    the tokens decoded since the last clustering, and attends over the union of the G query
    heads' sets of each KV head.

    Args:
        num_layers, num_q_heads, num_kv_heads, head_dim: model geometry (num_q_heads a
            multiple of num_kv_heads).
        max_batch: sequence slots. max_tokens: capacity per slot (prompt + decoded tokens);
            all memory is allocated at construction.
        device: 'cpu' (this build); dtype: KV storage, 'float16', 'bfloat16' or 'float32'.
        target: P in (0, 1], the fraction of attention mass to keep (1.0 reads everything).
        policy: 'tactic' (default), 'dense', 'oracle' (exact top-p; reads every key),
            'quest' (pages of `page_size` by min/max bound, at `budget` tokens per KV head),
            'topk' (the exact top-`budget` tokens per KV head: those with the largest
            probability under any query head of its group; every head attends them).
        stop_rule: 'certified' (the default on the CPU) or 'prior' (the default on CUDA, where
            'certified' runs too but its sample and top-ups still cost more than the
            attention they save: 2.3-2.7x the step on an H200 at 32K-512K). certified: the
            mass of what a query head attends (its group's union) is computed exactly and
            only the unread rest is estimated, from `tail_samples` seeded draws of unread
            clusters scored whole;
            clusters are added (at most `max_rounds` rounds) until read >= P * (read +
            upper bound of the rest), the bound holding with probability `confidence` under
            a normal approximation (docs/CONTRACT.md: what is guaranteed, what is not).
            prior: stop where the estimator's guess reaches P + margin * (1 - P).
        estimator: 'centroid_prior' (default, measured best) or 'two_segment' (the paper's
            a/x + b fit): the tail guess (prior rule) and the first read (certified).
            margin: the prior rule aims at P + margin * (1 - P).
            spread: clusters are ranked (and their unread mass estimated) by
            q.c + spread * |q|^2 s_c / 2, s_c the cluster's mean squared distance to its
            centroid per dimension (the log-normal mean of exp(q.k) over the cluster); 0
            ranks by q.c alone, as the paper does.
            share_group: a query head scores exactly the clusters that earlier heads of its
            GQA group chose (they are read for the union anyway) instead of estimating them.
            Default: True on the CPU (measured ~2 points fewer tokens read at equal success),
            False on CUDA (heads select in parallel; the only mode the GPU implements).
            group_head: every query head of a GQA group reads the union of the group's
            exact heads and calibrates on it (default False). On CUDA (stop_rule 'prior'
            only) that union is read by a first attention pass whose log-sum-exp gives the
            exact masses; the pass over the rest merges its partials.
        cluster_size: average tokens per k-means cluster; kmeans_iters; metric:
            'euclidean' or 'spherical'; seed: k-means initialisation seed.
        num_sink: first tokens always attended exactly and never clustered.
        recluster_interval: decoded tokens after which the recent segment is folded into
            the clusters. scale: softmax scale (default 1/sqrt(head_dim)).
        record_selection: keep per-token selection masks in `stats()` (memory: B*H*max_tokens).
        num_threads: CPU threads (0: all cores).
        head_split, attention_kernel, pdl: the CUDA step's kernel variants, resolved once into
            `plan` (and again by `set_kernels`): blocks per query head in the selection (None:
            automatic; 1, 2 or 4, where 2 and 4 need sm_90 kernels), the attention chunk kernel
            ('auto', 'cuda_cores', 'tensor_cores') and programmatic dependent launch (None:
            where the kernels have it; True / False). A variant this build or GPU lacks raises
            UnsupportedError (RuntimeError) at construction. Ignored on the CPU.
        selection_kernel: how the step selects with the prior stop rule: 'auto' (today
            'ranked'), 'ranked' (crossing buckets ranked exactly; on CUDA a row list) or
            'threshold' (each head's exact head and stop taken as whole score buckets, query
            heads independently (share_group then defaults to False); on CUDA the attention
            reads the clusters straight from the store in two passes and needs 16-bit K/V,
            head_dim 64/80/96/128 and at most 8 query heads per KV head). On the CPU
            'threshold' runs the same rule (its twin), so its accuracy can be judged there.

    Layouts: keys/values are token-major in every call, [N, Hkv, D] for one sequence and
    [B, N, Hkv, D] for a batch (FlashInfer's NHD; pass torch SDPA / Hugging Face K/V
    [B, Hkv, N, D] as the view k.transpose(1, 2)); queries and outputs are [B, Hq, D], the
    new token's k/v [B, Hkv, D].

    Every method checks all its arguments before changing anything: a call that raises
    leaves the decoder as it was.
    """

    def __init__(self, num_layers: int, num_q_heads: int, num_kv_heads: int, head_dim: int,
                 max_batch: int = 1, max_tokens: int = 8192, device="cpu", dtype="float16",
                 target: float = 0.9, policy: str = "tactic", *, stop_rule: Optional[str] = None,
                 confidence: float = 0.95, tail_samples: int = 64, max_rounds: int = 4,
                 estimator: str = "centroid_prior",
                 margin: float = 0.35, spread: float = 0.75, cluster_size: int = 16, kmeans_iters: int = 10,
                 metric: str = "euclidean", num_sink: int = 4, recluster_interval: int = 2048,
                 budget: int = 0, page_size: int = 16, head_fraction: float = 0.02,
                 sample_fraction: float = 0.01, sample_segments: int = -1, min_clusters: int = 8,
                 share_group: Optional[bool] = None, group_head: bool = False, seed: int = 0,
                 scale: Optional[float] = None, record_selection: bool = False,
                 num_threads: int = 0, head_split: Optional[int] = None,
                 attention_kernel: str = "auto", pdl: Optional[bool] = None,
                 selection_kernel: str = "auto"):
        c = _core.DecoderConfig()
        c.num_layers = _int("num_layers", num_layers)
        c.num_q_heads = _int("num_q_heads", num_q_heads)
        c.num_kv_heads = _int("num_kv_heads", num_kv_heads)
        c.head_dim = _int("head_dim", head_dim)
        c.max_batch = _int("max_batch", max_batch)
        c.max_tokens = _int("max_tokens", max_tokens)
        c.set_device(*_parse_device(device))
        c.set_dtype(_arrays.dtype_name(dtype))
        c.target = _float("target", target)
        c.set_policy(_choice("policy", policy, POLICIES))
        c.set_estimator(_choice("estimator", estimator, ESTIMATORS))
        if stop_rule is None:  # certified on CUDA costs 2-3x the step for now (bench/NOTES.md)
            stop_rule = "certified" if _parse_device(device)[0] == "cpu" else "prior"
        c.set_stop_rule(_choice("stop_rule", stop_rule, STOP_RULES))
        c.confidence = _float("confidence", confidence)
        c.tail_samples = _int("tail_samples", tail_samples)
        c.max_rounds = _int("max_rounds", max_rounds, maximum=_INT32_MAX)
        c.margin = _float("margin", margin)
        c.spread = _float("spread", spread)
        c.cluster_size = _int("cluster_size", cluster_size)
        c.kmeans_iters = _int("kmeans_iters", kmeans_iters, maximum=_INT32_MAX)
        c.set_metric(_choice("metric", metric, METRICS))
        c.num_sink = _int("num_sink", num_sink)
        c.recluster_interval = _int("recluster_interval", recluster_interval)
        c.budget = _int("budget", budget)
        c.page_size = _int("page_size", page_size)
        c.head_fraction = _float("head_fraction", head_fraction)
        c.sample_fraction = _float("sample_fraction", sample_fraction)
        c.sample_segments = _int("sample_segments", sample_segments, maximum=_INT32_MAX)
        c.min_clusters = _int("min_clusters", min_clusters)
        if share_group is None:  # CUDA and the threshold selection select every query head independently
            share_group = _parse_device(device)[0] == "cpu" and selection_kernel != "threshold"
        c.share_group = _bool("share_group", share_group)
        c.group_head = _bool("group_head", group_head)
        c.seed = _int("seed", seed, 0, maximum=2**64 - 1)
        c.scale = 0.0 if scale is None else _float("scale", scale)
        if scale is not None and not c.scale > 0:
            raise ValueError(f"`scale` must be > 0, got {scale}")
        c.record_selection = _bool("record_selection", record_selection)
        c.num_threads = _int("num_threads", num_threads, 0, maximum=_INT32_MAX)
        c.head_split, kernel, c.pdl, selection = _kernel_options(head_split, attention_kernel, pdl, selection_kernel)
        c.set_attention_kernel(kernel)
        c.set_selection_kernel(selection)
        c.validate()
        self._cfg = c
        self._core = _core.Decoder(c)
        self._on_cuda = _parse_device(device)[0] == "cuda"
        self.policy = policy
        self.stop_rule = stop_rule
        self.group_head = bool(c.group_head)
        self.device = device if isinstance(device, str) else str(device)
        self.dtype = _arrays.dtype_name(dtype)
        self.num_layers, self.num_q_heads = c.num_layers, c.num_q_heads
        self.num_kv_heads, self.head_dim = c.num_kv_heads, c.head_dim
        self.max_batch, self.max_tokens = c.max_batch, c.max_tokens
        self._target = c.target

    # ------------------------------------------------------------------ helpers
    def _layer(self, layer) -> int:
        layer = _int("layer", layer)
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"`layer` must be in [0, {self.num_layers}), got {layer}")
        return layer

    def _slots(self, seq, batch: int) -> list:
        if seq is None:
            if batch > self.max_batch:
                raise ValueError(f"`q` holds {batch} sequences but max_batch is {self.max_batch}")
            return list(range(batch))
        if isinstance(seq, numbers.Integral) and not isinstance(seq, bool):
            seq = [int(seq)]
        try:
            slots = [_int("seq", s) for s in seq]
        except TypeError as e:
            raise TypeError(f"`seq` must be an int or a sequence of ints, got {seq!r}") from e
        if len(slots) != batch:
            raise ValueError(f"`seq` must name {batch} slots (one per sequence), got {len(slots)}")
        return slots

    def _budgets(self, budget, batch: int):
        if budget is None:
            return None
        if isinstance(budget, numbers.Integral) and not isinstance(budget, bool):
            if budget <= 0:
                raise ValueError(f"`budget` must be a positive token count, got {budget}")
            return np.full(batch * self.num_kv_heads, int(budget), dtype=np.int64)
        arr = np.asarray(budget)
        if arr.dtype.kind not in "iu" or arr.size != batch * self.num_kv_heads:
            raise ValueError(f"`budget` must be an int or an integer array of shape "
                             f"[{batch}, {self.num_kv_heads}], got {arr.dtype} {arr.shape}")
        if (arr <= 0).any():
            raise ValueError("`budget` entries must be positive token counts")
        return np.ascontiguousarray(arr.reshape(-1), dtype=np.int64)

    # ------------------------------------------------------------------ API
    def _use_stream(self, x, stream) -> None:
        """CUDA decoders queue their work on `stream` (a cudaStream_t as int, or an object with
        `.cuda_stream`/`.ptr`), by default the current stream of x's framework."""
        if not self._on_cuda:
            return
        if stream is None:
            s = _arrays.current_stream(x)
        elif isinstance(stream, numbers.Integral):
            s = int(stream)
        elif hasattr(stream, "cuda_stream"):
            s = int(stream.cuda_stream)
        elif hasattr(stream, "ptr"):
            s = int(stream.ptr)
        else:
            raise TypeError(f"`stream` must be an int handle, a torch or CuPy stream, got {type(stream).__name__}")
        self._core.set_stream(s)

    def prefill(self, layer: int, keys, values, seq=0, lengths: Optional[Iterable[int]] = None,
                stream=None):
        """Store a prompt's keys/values for `layer` (replacing what `seq` held there).

        keys, values: token-major, like every K/V array in Tactic: [N, Hkv, D] for one
        sequence (slot `seq`), or [B, N, Hkv, D] for B sequences (slots `seq`, default
        0..B-1) with optional `lengths` [B] (valid tokens of each, the rest is padding).
        Head-major K/V ([B, Hkv, N, D], torch SDPA's and Hugging Face's layout) are refused
        with a ValueError; pass `keys.transpose(1, 2)`, a view (no copy). Arrays are read in
        place, strided views included. Under the tactic policy the keys are clustered here.
        stream: CUDA only, see `decode`.
        """
        layer = self._layer(layer)
        keys = _arrays.prepare(keys, "keys")
        values = _arrays.prepare(values, "values")
        self._use_stream(keys, stream)
        if len(keys.shape) == 4:
            _core.check_kv_layout(keys, "keys", True, self.num_kv_heads, self.num_q_heads, self.head_dim)
            B, N = int(keys.shape[0]), int(keys.shape[1])
            if tuple(values.shape) != tuple(keys.shape):
                raise ValueError(f"`values` must have the shape of `keys` {tuple(keys.shape)}, "
                                 f"got {tuple(values.shape)}")
            slots = self._slots(None if seq == 0 else seq, B)
            if len(set(slots)) != len(slots):
                raise ValueError(f"`seq` must not repeat a slot, got {slots}")
            lens = [N] * B if lengths is None else [_int("lengths", n, 0) for n in lengths]
            if len(lens) != B or any(n > N for n in lens):
                raise ValueError(f"`lengths` must hold {B} values in [0, {N}], got {list(lengths)}")
            # one core call: every sequence is checked before any is stored
            self._core.prefill_batch(layer, slots, keys, values, lens)
            return
        if len(keys.shape) != 3:
            raise ValueError(f"`keys` must be [N, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}] "
                             f"or [B, N, num_kv_heads, head_dim] (token-major), got shape {tuple(keys.shape)}")
        self._core.prefill(layer, _int("seq", seq), keys, values)

    @property
    def target(self) -> float:
        """P, the fraction of attention mass each query head keeps; settable between steps
        (the store and its clusters stay as they are)."""
        return self._target

    @target.setter
    def target(self, value) -> None:
        value = _float("target", value)
        self._core.set_target(value)  # ValueError outside (0, 1]
        self._target = value

    @property
    def plan(self) -> dict:
        """The CUDA step's resolved kernel variants: device, sm_count, kernel_arch (the
        architecture the kernels run as), head_split (blocks per query head in the selection,
        by the step's sequence count: head_split[b - 1]), attention_kernel ('cuda_cores' or
        'tensor_cores'), score_kernel (the centroid scores: 'tensor_cores' where the build and
        shape allow, else 'cuda_cores'; chosen automatically), pdl and selection_kernel
        ('ranked' or 'threshold'). device -1 on the CPU, where only selection_kernel is planned."""
        return self._core.plan()

    def set_kernels(self, head_split: Optional[int] = None, attention_kernel: str = "auto",
                    pdl: Optional[bool] = None, selection_kernel: str = "auto") -> None:
        """Re-plans the CUDA step with other kernel variants (see the constructor); on error
        the plan stays as it was. A change of selection_kernel forgets the layers' last
        selections (reuse_selection then needs a new decode)."""
        self._core.set_kernels(*_kernel_options(head_split, attention_kernel, pdl, selection_kernel))

    def decode(self, layer: int, q, k_new, v_new, seq=None, out=None, budget=None, stream=None,
               reuse_selection: bool = False):
        """One decode step of `layer`: append the new token's k/v, then attend.

        q: [B, Hq, D] queries of the new token; k_new, v_new: [B, Hkv, D] its key/value
        (appended before attention, so the token attends to itself), or both None to attend
        over the stored context without appending (e.g. inside a captured CUDA graph). seq: the B slots
        (default 0..B-1). out: optional [B, Hq, D] array to write into. budget: tokens per
        KV head for quest/topk (int or [B, Hkv]). Returns out [B, Hq, D] in q's framework,
        with q's dtype. stream (CUDA): where the step's kernels run; default the current
        stream of q's framework (torch.cuda.current_stream(), CuPy's current stream). The
        step never waits for the GPU, so it can be captured in a CUDA graph.
        reuse_selection (CUDA): attend over the tokens the previous decode/select of this layer
        chose for the same `seq` instead of selecting again (k_new, v_new must be None); e.g.
        to time attention alone. ValueError when no such selection exists.
        """
        layer = self._layer(layer)
        _bool("reuse_selection", reuse_selection)
        q = _arrays.prepare(q, "q")
        self._use_stream(q, stream)
        if reuse_selection:
            if k_new is not None or v_new is not None:
                raise ValueError("`reuse_selection` attends without appending: pass k_new=v_new=None")
            if len(q.shape) != 3:
                raise ValueError(f"`q` must be [B, num_q_heads={self.num_q_heads}, head_dim={self.head_dim}], "
                                 f"got shape {tuple(q.shape)}")
            slots = self._slots(seq, q.shape[0])
            result = (_arrays.writable(out, "out") if out is not None
                      else _arrays.empty(q, q.shape, _arrays.array_dtype(q)))
            self._core.attend(layer, q, result, slots)
            return _arrays.finish(q, result) if out is None else out
        append = k_new is not None or v_new is not None
        if append:
            k_new = _arrays.prepare(k_new, "k_new")
            v_new = _arrays.prepare(v_new, "v_new")
        if len(q.shape) != 3:
            raise ValueError(f"`q` must be [B, num_q_heads={self.num_q_heads}, head_dim={self.head_dim}], "
                             f"got shape {tuple(q.shape)}")
        slots = self._slots(seq, q.shape[0])
        result = out if out is None else _arrays.writable(out, "out")
        if out is None:
            dt = _arrays.array_dtype(q)
            if dt not in ("float16", "bfloat16", "float32"):
                raise TypeError(f"`q` must be float16, bfloat16 or float32, got {dt}")
            result = _arrays.empty(q, q.shape, dt)
        self._core.decode(layer, q, k_new, v_new, result, slots, self._budgets(budget, len(slots)), append)
        return _arrays.finish(q, result) if out is None else out

    def select(self, layer: int, q, seq=None, budget=None) -> dict:
        """Run selection only (no append, no attention) for q [B, Hq, D]; returns stats()."""
        layer = self._layer(layer)
        q = _arrays.prepare(q, "q")
        if len(q.shape) != 3:
            raise ValueError(f"`q` must be [B, Hq, D], got shape {tuple(q.shape)}")
        slots = self._slots(seq, q.shape[0])
        self._core.decode(layer, q, None, None, None, slots, self._budgets(budget, len(slots)), False)
        return self.stats(layer)

    def stats(self, layer: int) -> dict:
        """What the last decode/select of `layer` read, per sequence of that call.

        Returns numpy arrays: `seq` [B], `context` [B] tokens in each sequence,
        `kv_tokens` [B, Hkv] tokens read per KV head (the union of its query heads),
        `head_tokens` [B, Hq] tokens each query head selected, `est_mass` [B, Hq] the
        selector's estimate of the mass it kept (NaN where a policy has none), and
        `read_fraction` [B, Hkv]. With record_selection: `kv_mask` [B, Hkv, context_max]
        and `head_mask` [B, Hq, context_max], booleans over token positions.
        """
        raw = self._core.stats(self._layer(layer))
        out = {"seq": raw["slots"], "context": raw["context"], "kv_tokens": raw["kv_tokens"],
               "head_tokens": raw["head_tokens"], "est_mass": raw["est_mass"]}
        ctx = np.maximum(raw["context"], 1)[:, None]
        out["read_fraction"] = raw["kv_tokens"] / ctx
        if "kv_mask" in raw:
            n = int(raw["context"].max()) if raw["context"].size else 0
            out["kv_mask"] = raw["kv_mask"][:, :, :n].astype(bool)
            out["head_mask"] = raw["head_mask"][:, :, :n].astype(bool)
        return out

    def length(self, layer: int, seq: int = 0) -> int:
        """Tokens held for sequence `seq` in `layer`."""
        return self._core.length(self._layer(layer), _int("seq", seq))

    def reset(self, seq: Optional[int] = None) -> None:
        """Forget sequence `seq` (all layers), or every sequence when seq is None."""
        if seq is None:
            self._core.reset_all()
        else:
            self._core.reset(_int("seq", seq))

    def recluster(self, layer: int, seq: int = 0) -> None:
        """Fold the recent segment of (`layer`, `seq`) into the clusters now.

        Replays of a CUDA graph that captured ``decode`` with ``k_new``/``v_new`` never
        re-cluster; call this between replays. It waits for replays already launched and
        returns once the new clusters are in place, so replays launched afterwards on any
        stream see them. It cannot itself be captured (RuntimeError)."""
        self._core.recluster(self._layer(layer), _int("seq", seq))

    def layout(self, layer: int, seq: int = 0, head: int = 0) -> dict:
        """Copies of the store's physical layout for one KV head (for tests and debugging)."""
        return self._core.layout(self._layer(layer), _int("seq", seq), _int("head", head))

    @property
    def nbytes(self) -> int:
        """Bytes held by the KV store."""
        return self._core.store_bytes()

    def __repr__(self) -> str:
        return (f"SparseDecoder(layers={self.num_layers}, heads={self.num_q_heads}/{self.num_kv_heads}, "
                f"head_dim={self.head_dim}, max_batch={self.max_batch}, max_tokens={self.max_tokens}, "
                f"dtype={self.dtype}, policy={self.policy!r}, target={self.target})")
