"""What each decode step really kept, from the true attention scores (float64).

`TrueMass` is an `on_step` hook for `TacticCache`: it keeps its own dense copy of every
layer's keys (the prompt's, then each decoded key as it arrives), recomputes the exact
softmax of each query head, and measures the selection the decoder recorded
(`record_selection=True`) against it. With the decoder's cluster layout it also computes the
cluster-optimal count: the fewest tokens, in whole clusters plus the tokens the decoder
always attends (sinks and the recent segment), whose true mass reaches P.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch


class TrueMass:
    def __init__(self, keys: dict, values: dict, n_prompt: int, steps: int, scale: float, target: float):
        """keys, values: {layer_idx: [Hkv, n_prompt, D] of the prompt}; room is made for `steps` more."""
        self.scale, self.target, self.n_prompt = scale, target, n_prompt
        self.keys, self.values = {}, {}
        for store, src in ((self.keys, keys), (self.values, values)):
            for li, k in src.items():
                buf = torch.zeros((k.shape[0], n_prompt + steps, k.shape[2]), dtype=torch.float64)
                buf[:, :n_prompt] = k.double()
                store[li] = buf
        self.clusters = {}  # layer -> ([Hkv, n_prompt] cluster id, -1 = always attended; sizes)
        self.rows = defaultdict(lambda: defaultdict(list))

    def set_layout(self, layer_idx: int, decoder, slot: int) -> None:
        """Read the decoder's cluster layout of one layer (valid until the next re-clustering)."""
        hkv = self.keys[layer_idx].shape[0]
        cid = np.full((hkv, self.n_prompt), -1, np.int64)
        sizes = []
        for h in range(hkv):
            lay = decoder.layout(slot, 0, h)
            off = lay["offsets"].astype(np.int64)
            pos = lay["positions"][lay["n_sink"]:lay["n_sink"] + lay["n_clustered"]]
            cid[h, pos] = np.repeat(np.arange(len(off) - 1), np.diff(off))
            sizes.append(np.diff(off))
        c = max(len(s) for s in sizes)
        size = np.zeros((hkv, c), np.int64)
        for h, s in enumerate(sizes):
            size[h, :len(s)] = s
        self.clusters[layer_idx] = (torch.from_numpy(cid), torch.from_numpy(size))

    def __call__(self, layer_idx, step, q, k_new, v_new, out, st):
        K = self.keys[layer_idx]
        ctx = int(st["context"][0])
        V = self.values[layer_idx]
        K[:, ctx - 1] = k_new[0].double().cpu()
        V[:, ctx - 1] = v_new[0].double().cpu()
        hkv, _, d = K.shape
        qh = q[0].double().cpu().view(hkv, -1, d)                           # [Hkv, G, D]
        p = torch.softmax(torch.einsum("hgd,hnd->hgn", qh, K[:, :ctx]) * self.scale, dim=-1)
        kv_mask = torch.from_numpy(st["kv_mask"][0, :, :ctx])
        head_mask = torch.from_numpy(st["head_mask"][0, :, :ctx]).view(hkv, -1, ctx)
        r = self.rows[layer_idx]
        r["context"].append(ctx)
        r["kv_tokens"].append(np.asarray(st["kv_tokens"][0]))
        r["head_tokens"].append(np.asarray(st["head_tokens"][0]))
        r["attended"].append(kv_mask.sum(-1).numpy())
        r["union_mass"].append((p * kv_mask[:, None]).sum(-1).numpy())       # [Hkv, G]
        r["own_mass"].append((p * head_mask).sum(-1).numpy())
        # output error against exact dense attention of the same q/k/v (float64)
        ref = torch.einsum("hgn,hnd->hgd", p, V[:, :ctx]).reshape(-1, d)
        err = (out[0].double().cpu() - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-30)
        r["out_error"].append(err.numpy())
        if layer_idx in self.clusters:
            oh, ou = self._cluster_optimal(layer_idx, p, ctx)
            r["opt_head"].append(oh)
            r["opt_union"].append(ou)

    def _cluster_optimal(self, layer_idx, p, ctx):
        """Per query head and per KV-head union: tokens of the cluster-optimal set for P."""
        cid, size = self.clusters[layer_idx]
        hkv, g, _ = p.shape
        c = size.shape[1]
        ids = torch.full((hkv, ctx), -1, dtype=torch.int64)
        ids[:, :self.n_prompt] = cid                 # decoded tokens: recent segment, always read
        always = ids < 0
        n_always = always.sum(-1)                                              # [Hkv]
        fixed = (p * always[:, None]).sum(-1)                                  # [Hkv, G]
        cm = torch.zeros((hkv, g, c), dtype=torch.float64)
        cm.scatter_add_(2, ids.clamp(min=0)[:, None].expand(hkv, g, ctx), p * (~always)[:, None])
        order = torch.argsort(cm, dim=-1, descending=True)
        cum = torch.cumsum(torch.gather(cm, 2, order), dim=-1)
        need = self.target - fixed
        # clusters to take: those before the cumulative mass reaches `need`, plus the one that does
        take = torch.where(need <= 0, torch.zeros_like(need, dtype=torch.int64),
                           ((cum < need[..., None]).sum(-1) + 1).clamp(max=c))
        chosen = torch.arange(c)[None, None] < take[..., None]                # over ranked order
        sz = torch.gather(size[:, None].expand(hkv, g, c), 2, order)
        head = n_always[:, None] + (sz * chosen).sum(-1)                       # [Hkv, G]
        picked = torch.zeros((hkv, g, c), dtype=torch.bool).scatter_(2, order, chosen).any(1)
        union = n_always + (size * picked).sum(-1)                             # [Hkv]
        return head.reshape(-1).numpy(), union.numpy()

    def layer_arrays(self, layer_idx) -> dict:
        return {k: np.stack(v) for k, v in self.rows[layer_idx].items()}
