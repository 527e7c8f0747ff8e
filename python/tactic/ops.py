"""Functional operations over plain arrays (no decoder state).

Every function takes arrays of any DLPack-capable framework (numpy, torch, CuPy, JAX) on
the CPU, reads them without a copy and returns results in the caller's framework.

Layout: keys and values are token-major everywhere in Tactic, [N, Hkv, D] for one sequence and
[B, N, Hkv, D] for a batch (FlashInfer's "NHD", flash-attn's layout); queries and outputs are
[Hq, D] / [B, Hq, D]. Head-major K/V ([B, Hkv, N, D], torch SDPA's and Hugging Face's) get a
ValueError naming the transposed view to pass instead (`k.transpose(1, 2)`, no copy).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np

from . import _arrays, _core
from .decoder import _INT32_MAX, SparseDecoder, _float, _int


@dataclass
class KMeansResult:
    centroids: object          # [C, D] float32 (unit rows for spherical)
    assign: object             # [N] int32 cluster of every row
    inertia: List[float] = field(default_factory=list)  # after each iteration (non-increasing)
    iterations: int = 0


def kmeans(x, num_clusters: Optional[int] = None, *, cluster_size: int = 16, max_iters: int = 10,
           metric: str = "euclidean", seed: int = 0, num_threads: int = 0) -> KMeansResult:
    """Lloyd k-means of the rows of x [N, D] (float16/bfloat16/float32).

    num_clusters defaults to ceil(N / cluster_size) and is clamped to N. Seeded random
    initialisation; empty clusters are re-seeded at the farthest point; 'spherical'
    normalises rows and centroids and maximises cosine similarity.
    """
    x = _arrays.prepare(x, "x")
    if len(x.shape) != 2:
        raise ValueError(f"`x` must be [N, D], got shape {tuple(x.shape)}")
    n = int(x.shape[0])
    if num_clusters is None:
        num_clusters = max(1, math.ceil(n / _int("cluster_size", cluster_size, 1)))
    num_clusters = _int("num_clusters", num_clusters, 1)
    c = max(1, min(num_clusters, n))
    centroids = _arrays.empty(x, (c, int(x.shape[1])), "float32")
    assign = _arrays.empty(x, (n,), "int32")
    if not isinstance(metric, str):
        raise TypeError(f"`metric` must be a str, got {type(metric).__name__}")
    inertia, iters = _core.kmeans(x, num_clusters, _int("max_iters", max_iters, maximum=_INT32_MAX),
                                  metric, _int("seed", seed, 0, maximum=2**64 - 1),
                                  _int("num_threads", num_threads, 0, maximum=_INT32_MAX),
                                  centroids, assign)
    return KMeansResult(_arrays.finish(x, centroids), _arrays.finish(x, assign), list(inertia), iters)


def _out(like, shape, out, name="out"):
    if out is not None:
        return _arrays.writable(out, name), False
    dt = _arrays.array_dtype(like)
    if dt not in ("float16", "bfloat16", "float32"):
        raise TypeError(f"`q` must be float16, bfloat16 or float32, got {dt}")
    return _arrays.empty(like, shape, dt), True


def dense_decode(q, keys, values, lengths=None, *, scale: Optional[float] = None, out=None,
                 num_threads: int = 0):
    """Dense decode attention: q [B, Hq, D] over keys/values [B, N, Hkv, D] (token-major).

    lengths: optional [B] valid tokens per sequence (int32 array or list). Returns
    out [B, Hq, D] (q's dtype and framework, or the given `out`).
    """
    q = _arrays.prepare(q, "q")
    keys, values = _arrays.prepare(keys, "keys"), _arrays.prepare(values, "values")
    if lengths is not None and hasattr(lengths, "__dlpack__"):
        lengths = _arrays.prepare(lengths, "lengths")
    elif lengths is not None:
        try:
            lengths = np.asarray([_int("lengths", n, 0, _INT32_MAX) for n in lengths], dtype=np.int32)
        except TypeError as e:
            raise TypeError(f"`lengths` must be an int32 array or a sequence of ints ({e})") from None
    res, fresh = _out(q, q.shape, out)
    _core.dense_decode(q, keys, values, lengths, res, 0.0 if scale is None else _float("scale", scale),
                       _int("num_threads", num_threads, 0, maximum=_INT32_MAX))
    return _arrays.finish(q, res) if fresh else res


def sparse_decode(q, keys, values, mask, *, scale: Optional[float] = None, out=None,
                  num_threads: int = 0):
    """Attention of q [Hq, D] over the tokens of keys/values [N, Hkv, D] (token-major) selected by
    mask [Hkv, N] (bool/uint8; query head h uses KV head h // (Hq / Hkv)).

    Split-KV over the selected rows with a log-sum-exp merge and fp32 accumulation. A head
    whose mask is empty outputs zeros. Returns out [Hq, D].
    """
    q = _arrays.prepare(q, "q")
    keys, values = _arrays.prepare(keys, "keys"), _arrays.prepare(values, "values")
    mask = _arrays.prepare(mask, "mask")
    res, fresh = _out(q, q.shape, out)
    _core.sparse_decode(q, keys, values, mask, res, 0.0 if scale is None else _float("scale", scale),
                        _int("num_threads", num_threads, 0, maximum=_INT32_MAX))
    return _arrays.finish(q, res) if fresh else res


def select(q, keys, values=None, *, target: float = 0.9, policy: str = "tactic",
           budget=None, dtype=None, **options) -> dict:
    """Which tokens of keys [N, Hkv, D] the policy reads for q [Hq, D].

    Builds a one-layer, one-sequence store from keys (clustered for 'tactic'), runs one
    selection and returns numpy arrays: `kv_mask` [Hkv, N] (the union each KV head reads),
    `head_mask` [Hq, N] (each query head's own set), `kv_tokens` [Hkv], `head_tokens`
    [Hq], `est_mass` [Hq]. Extra options are SparseDecoder's (cluster_size, num_sink,
    estimator, margin, metric, seed, ...).
    """
    q = _arrays.prepare(q, "q")
    keys = _arrays.prepare(keys, "keys")
    values = keys if values is None else _arrays.prepare(values, "values")
    if len(q.shape) != 2 or len(keys.shape) != 3:
        raise ValueError(f"`q` must be [Hq, D] and `keys` [N, Hkv, D], got {tuple(q.shape)} "
                         f"and {tuple(keys.shape)}")
    _core.check_kv_layout(keys, "keys", False, 0, int(q.shape[0]), int(q.shape[1]))
    n, hkv, d = (int(s) for s in keys.shape)
    dec = SparseDecoder(1, int(q.shape[0]), hkv, d, max_batch=1, max_tokens=max(n, 1),
                        dtype=dtype or _arrays.array_dtype(keys), target=target, policy=policy,
                        record_selection=True, **options)
    dec.prefill(0, keys, values)
    st = dec.select(0, q[None], budget=budget)
    return {"kv_mask": st["kv_mask"][0], "head_mask": st["head_mask"][0],
            "kv_tokens": st["kv_tokens"][0], "head_tokens": st["head_tokens"][0],
            "est_mass": st["est_mass"][0]}
