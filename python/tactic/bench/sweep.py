"""The decode-speed sweep: every method on the same inputs, per (N, B, heads, dtype) and P.

For each case (workload, N, B, Hq/Hkv, dtype) the workload is generated for `layers` rotation slots,
prefilled once into a Tactic decoder (clustered) and a dense one, and P is swept on the same
Tactic decoder (dec.target = p). Cases are ordered so the headline setting (fp16, B = 1,
32/8 heads) comes first, then by cost; a case that does not fit in memory, whose k-means
prefill would take longer than `max_prefill_s`, or that would overrun the time budget is
skipped with its reason (reported in the JSON). The default workloads are (b) ('synthetic') and
its sparse layer ('sparse', no flat heads). Peers that cannot run (torch SDPA backends the GPU
lacks, FlashInfer not installed, ...) are recorded per row with the reason (row['peers']), and
every timed method records the fraction of the context it read (read_fraction).
"""
from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .. import SparseDecoder
from . import peers as P
from . import traffic
from .timing import RunPolicy, Timing, capture_graphs, time_calls
from .workloads import NAMES as WORKLOAD_NAMES
from .workloads import make as make_workload

ELEM_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}
L2_BYTES = 50 << 20                 # H100 L2; the rotated set aims at several times this
KMEANS_FLOPS = 32e12                # first guess of k-means speed (H100, measured 2026-11-23);
                                    # refined from every prefill the sweep times
FIXTURE_SHAPE = (9, 3, 64)          # SmolLM2 capture: query heads, KV heads, head dim


@dataclass(frozen=True)
class Case:
    n: int
    batch: int
    hq: int
    hkv: int
    d: int
    dtype: str
    workload: str

    @property
    def kv_bytes(self) -> int:  # one layer's K and V
        return traffic.dense_bytes(self.batch, self.hkv, self.n, self.d, ELEM_BYTES[self.dtype])

    def label(self) -> str:
        return f"{self.workload} N={self.n} B={self.batch} {self.hq}/{self.hkv} D={self.d} {self.dtype}"


@dataclass
class Options:
    device: str = "cuda"
    ns: Sequence[int] = (8192, 32768, 131072, 524288)
    batches: Sequence[int] = (1, 8, 32)
    heads: Sequence[Tuple[int, int]] = ((32, 8), (32, 4))
    head_dim: int = 128
    dtypes: Sequence[str] = ("float16", "bfloat16")
    targets: Sequence[float] = (0.8, 0.9, 0.95)
    workloads: Sequence[str] = ("synthetic", "sparse")
    workload: Optional[str] = None   # one workload only (overrides `workloads`; the older option)
    rotate_bytes: int = 4 * L2_BYTES
    max_layers: int = 64
    runs: RunPolicy = field(default_factory=lambda: RunPolicy(warmup=5, min_runs=20, max_runs=100, budget_s=0.15))
    graphs: bool = True
    padded_gather: bool = True
    flashinfer: bool = True
    # The CUDA step's kernel variants (SparseDecoder's head_split / attention_kernel / pdl; an
    # A/B sets them here, and every row records the plan they resolved to).
    kernels: dict = field(default_factory=dict)
    stop_rule: Optional[str] = None  # Tactic's stop rule (None: SparseDecoder's default for the device)
    group_head: bool = False  # SparseDecoder's group_head for Tactic (the exact read from the attention)
    time_budget_s: float = 420.0
    max_prefill_s: float = 30.0
    memory_fraction: float = 0.85
    seed: int = 0

    def __post_init__(self):
        if self.workload is not None:
            self.workloads = (self.workload,)
        self.workloads = tuple(self.workloads)


def cases(opt: Options) -> List[Case]:
    """All cases of the sweep, headline first (fp16, B = 1, the first heads), then by size; the
    workloads of one setting next to each other, in the order given."""
    out, heads_of = [], {}
    for wl in opt.workloads:
        if wl not in WORKLOAD_NAMES:
            raise ValueError(f"`workloads` must be of {WORKLOAD_NAMES}, got {wl!r}")
        heads = [FIXTURE_SHAPE[:2]] if wl == "fixture" else list(opt.heads)
        d = FIXTURE_SHAPE[2] if wl == "fixture" else opt.head_dim
        heads_of[wl] = heads[0]
        out += [Case(n, b, hq, hkv, d, dt, wl) for dt in opt.dtypes for (hq, hkv) in heads
                for b in opt.batches for n in opt.ns]
    order = {wl: i for i, wl in enumerate(opt.workloads)}
    return sorted(out, key=lambda c: ((c.dtype, (c.hq, c.hkv), c.batch) != (opt.dtypes[0], heads_of[c.workload], 1),
                                      c.batch * c.n * c.hkv, c.n, order[c.workload]))


def tactic_read_estimate(c: Case, read_fraction: float = 0.05) -> int:
    """Rough bytes one Tactic step reads (for sizing the rotation): a few % of K/V,
    the fp32 centroids and the exact-head keys (traffic.step_floor's model)."""
    es = ELEM_BYTES[c.dtype]
    clusters = math.ceil(c.n / 16)
    return int(read_fraction * c.kv_bytes + c.batch * c.hkv * clusters * c.d * 4
               + c.batch * c.hq * 0.02 * c.n * c.d * es)


def rotation_layers(c: Case, rotate_bytes: int, max_layers: int) -> int:
    """Slots so that even the smallest reader (the Tactic step) cycles through rotate_bytes."""
    if rotate_bytes <= 0:
        return 1
    per = min(tactic_read_estimate(c), c.kv_bytes)
    return int(min(max_layers, max(1, math.ceil(rotate_bytes / per))))


def fixture_layer(seed: int, slot: int, seq: int, n_layers: int) -> int:
    """Index (into the sorted captured layers) that rotation slot `slot`, sequence `seq` of a
    fixture case reads: run_case makes slot l with seed + 1000 l, and tiled_fixture gives
    sequence b the captured layer (seed + b) mod n_layers."""
    return (seed + 1000 * slot + seq) % n_layers


def fixture_layer_mix(slots: int, batch: int, seed: int, n_layers: int) -> List[int]:
    """How many (slot, sequence) pairs of a fixture case read each captured layer."""
    counts = [0] * n_layers
    for l in range(slots):
        for b in range(batch):
            counts[fixture_layer(seed, l, b, n_layers)] += 1
    return counts


@functools.lru_cache(maxsize=1)
def fixture_layer_count() -> int:
    from ..fixtures import load_fixture
    return len(load_fixture().layers)


def balanced_fixture_slots(layers: int, batch: int, n_layers: int, seed: int,
                           fits: Callable[[int], bool], max_layers: int) -> int:
    """Rotation slots for a fixture case such that every captured layer is read by as many
    (slot, sequence) pairs as every other one.

    The captured layers differ a lot (SmolLM2's layer 0 needs ~75% of its tokens at P = 0.9,
    layer 18 about 6%), so an unbalanced mix makes the reported read fraction and speed depend
    on the slot count: with B = 1 and 4 slots, layer 0 was half of the steps timed. Prefers
    the nearest balanced count at or above `layers` that `fits` (the case still runs) and stays within
    max_layers, then the nearest one below; keeps `layers` if there is none."""
    def balanced(L: int) -> bool:
        counts = fixture_layer_mix(L, batch, seed, n_layers)
        return min(counts) == max(counts)

    if n_layers <= 1 or balanced(layers):
        return layers
    for L in range(layers + 1, max(layers, max_layers) + 1):
        if balanced(L):
            if fits(L):
                return L
            break
    for L in range(layers - 1, 0, -1):
        if balanced(L):
            return L
    return layers


def memory_estimate(c: Case, layers: int) -> int:
    """Device bytes a case needs: workload copies, both decoders, selection and scratch."""
    es = ELEM_BYTES[c.dtype]
    kv = layers * c.kv_bytes
    tokens = layers * c.batch * c.hkv * c.n
    clusters = math.ceil(c.n / 16)
    tactic = kv + tokens * 4 + layers * c.batch * c.hkv * clusters * (c.d * 4 + 4) \
        + c.batch * c.hkv * c.n * 4 + layers * c.batch * c.hq * clusters + c.batch * c.hq * clusters * 16
    dense = kv + tokens * 4
    gather = c.kv_bytes + c.batch * c.hkv * c.n * 8        # worst case: a whole layer selected
    generate = 5 * c.n * c.d * 4 + c.hq * c.n * 4          # one (sequence, KV head) in fp32
    return int(kv + tactic + dense + gather + generate + (1 << 30) * (es > 0))


def prefill_estimate_s(c: Case, layers: int, flops: float) -> float:
    """k-means time: 10 Lloyd iterations of N x C x D multiply-adds per (layer, seq, KV head)."""
    return layers * c.batch * c.hkv * 10 * 2.0 * c.n * math.ceil(c.n / 16) * c.d / flops


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _set_target(dec: SparseDecoder, p: float) -> bool:
    """dec.target = p where the decoder has that setter (True), else False."""
    prop = getattr(type(dec), "target", None)
    if isinstance(prop, property) and prop.fset is not None:
        dec.target = p
        return True
    return False


def _timed(method: P.Method, device, runs: RunPolicy, nbytes: Optional[int], copy_gbps: float,
           mode="eager") -> dict:
    t: Timing = time_calls(method.calls, device, runs, mode)
    r = t.as_dict()
    r["note"] = method.note
    if nbytes is not None:
        r["bytes"] = int(nbytes)
        r["gbps"] = traffic.gbps(nbytes, t.median_us)
        r["pct_of_copy"] = 100.0 * r["gbps"] / copy_gbps if copy_gbps else None
    r.update(method.extra)
    return r


def _graph_of(method: P.Method, device) -> P.Method:
    return P.Method(method.name + "_graph", capture_graphs(method.calls, device), method.outputs,
                    method.note + "; CUDA graph replay")


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


class Sweep:
    def __init__(self, opt: Options, copy_gbps: float, log: Callable[[str], None] = print):
        self.opt = opt
        self.copy_gbps = copy_gbps
        self.log = log
        self.kmeans_flops = KMEANS_FLOPS if torch.device(opt.device).type == "cuda" else 2e10
        self.rows: List[dict] = []
        self.skipped: List[dict] = []
        self.cases_run: List[dict] = []

    def peers_summary(self) -> dict:
        """Over all rows: per method, in how many rows it ran, and every reason it was skipped."""
        out: dict = {}
        for r in self.rows:
            for k, v in r["methods"].items():
                e = out.setdefault(k, {"ran_rows": 0, "skipped": []})
                if "median_us" in v:
                    e["ran_rows"] += 1
                elif "unavailable" in v and v["unavailable"] not in e["skipped"]:
                    e["skipped"].append(v["unavailable"])
        return out

    # -------------------------------------------------------------- planning
    def _free_bytes(self) -> int:
        if torch.device(self.opt.device).type == "cuda":
            return torch.cuda.mem_get_info(self.opt.device)[0]
        try:
            import os
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return 8 << 30

    def case_time_estimate(self, c: Case, layers: int) -> float:
        fi, gr = self.opt.flashinfer, self.opt.graphs
        n_series = 3 + (4 + fi) * (1 + gr) + len(self.opt.targets) * (4 + gr + self.opt.padded_gather + fi * (1 + gr))
        return prefill_estimate_s(c, layers, self.kmeans_flops) + n_series * (self.opt.runs.budget_s + 0.1)

    def _skip_reason(self, c: Case, layers: int, free: int, elapsed: float) -> Optional[str]:
        need = memory_estimate(c, layers)
        est_prefill = prefill_estimate_s(c, layers, self.kmeans_flops)
        if need > self.opt.memory_fraction * free:
            return f"memory: needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"
        if est_prefill > self.opt.max_prefill_s:
            return f"k-means prefill ~{est_prefill:.0f} s > max_prefill_s {self.opt.max_prefill_s:.0f}"
        if elapsed + self.case_time_estimate(c, layers) > self.opt.time_budget_s:
            return (f"time budget: {elapsed:.0f} s spent, case needs ~{self.case_time_estimate(c, layers):.0f} s "
                    f"of {self.opt.time_budget_s:.0f}")
        return None

    def slots(self, c: Case, free: int) -> int:
        """Rotation slots of a case: enough to rotate past L2 (rotation_layers); for the fixture,
        adjusted so every captured layer weighs the same (balanced_fixture_slots)."""
        layers = rotation_layers(c, self.opt.rotate_bytes, self.opt.max_layers)
        if c.workload != "fixture":
            return layers
        n_layers = fixture_layer_count()
        # a balanced count must not make the case skip (memory, k-means prefill time) where the
        # rotation's own count would run: then the nearest balanced count below, or the original
        return balanced_fixture_slots(
            layers, c.batch, n_layers, self.opt.seed,
            lambda L: self._skip_reason(c, L, free, 0.0) is None,
            max(self.opt.max_layers, n_layers))

    def plan_text(self, free: int) -> str:
        """The sweep as it would run on a device with `free` bytes, by the estimates alone."""
        lines, elapsed = [], 0.0
        for c in cases(self.opt):
            layers = self.slots(c, free)
            reason = self._skip_reason(c, layers, free, elapsed)
            est = self.case_time_estimate(c, layers)
            if not reason:
                elapsed += est
            lines.append(f"{c.label():<50} slots {layers:>2}  mem {memory_estimate(c, layers) / 2**30:6.1f} GiB  "
                         f"k-means {prefill_estimate_s(c, layers, self.kmeans_flops):6.1f} s  case ~{est:5.1f} s  "
                         + (f"SKIP ({reason})" if reason else f"run (t ~{elapsed:.0f} s)"))
        return "\n".join(lines)

    def run(self) -> None:
        t_start = time.perf_counter()
        for c in cases(self.opt):
            free = self._free_bytes()
            layers = self.slots(c, free)
            reason = self._skip_reason(c, layers, free, time.perf_counter() - t_start)
            if reason:
                self.skipped.append({"case": c.__dict__, "reason": reason})
                self.log(f"skip {c.label()}: {reason}")
                continue
            self.run_case(c, layers)
            if torch.device(self.opt.device).type == "cuda":
                torch.cuda.empty_cache()

    # -------------------------------------------------------------- one case
    def run_case(self, c: Case, layers: int) -> None:
        opt, dev, es = self.opt, self.opt.device, ELEM_BYTES[c.dtype]
        t0 = time.perf_counter()
        wls = [make_workload(c.workload, c.n, c.batch, c.hq, c.hkv, c.d, c.dtype, dev, opt.seed + 1000 * l)
               for l in range(layers)]
        keys = [w.keys for w in wls]
        values = [w.values for w in wls]
        queries = [w.queries for w in wls]
        _sync(dev)
        t_gen = time.perf_counter() - t0
        common = dict(max_batch=c.batch, max_tokens=c.n, device=dev, dtype=c.dtype, scale=wls[0].scale)

        def build(policy: str, target: float) -> Tuple[SparseDecoder, float]:
            rule = dict(group_head=True) if opt.group_head and policy == "tactic" else {}
            dec = SparseDecoder(layers, c.hq, c.hkv, c.d, target=target, policy=policy, stop_rule=opt.stop_rule,
                                record_selection=policy == "tactic", **common, **opt.kernels, **rule)
            _sync(dev)
            t = time.perf_counter()
            for l in range(layers):
                dec.prefill(l, keys[l].transpose(1, 2), values[l].transpose(1, 2))  # token-major views
            _sync(dev)
            return dec, time.perf_counter() - t

        dense, t_dense_prefill = build("dense", 1.0)
        tac, t_prefill = build("tactic", opt.targets[0])
        flops = prefill_estimate_s(c, layers, 1.0)  # flop count
        if t_prefill > 0.2:
            self.kmeans_flops = flops / t_prefill
        info = {"case": c.__dict__, "layers": layers, "generate_s": t_gen, "tactic_prefill_s": t_prefill,
                "dense_prefill_s": t_dense_prefill, "kmeans_flops_est": flops / max(t_prefill, 1e-9),
                "workload_info": wls[0].info}
        if c.workload == "fixture":  # which captured layers the timed steps read, and how often
            caps = wls[0].info["captured_layers"]
            mix = fixture_layer_mix(layers, c.batch, opt.seed, len(caps))
            info["fixture_layer_mix"] = {str(caps[i]): m for i, m in enumerate(mix)}
        self.log(f"{c.label()}: {layers} rotation slot(s), generate {t_gen:.1f} s, "
                 f"tactic prefill {t_prefill:.1f} s, dense prefill {t_dense_prefill:.2f} s"
                 + (f", layers read {info['fixture_layer_mix']}" if "fixture_layer_mix" in info else ""))

        full = traffic.dense_bytes(c.batch, c.hkv, c.n, c.d, es)
        shared, graphs_ok = {}, opt.graphs and torch.device(dev).type == "cuda"
        out_dense = [torch.empty_like(q) for q in queries]
        m = P.tactic_step(dense, queries, out_dense, name="dense")
        shared["dense"] = _timed(m, dev, opt.runs, full, self.copy_gbps)
        if graphs_ok:
            shared["dense_graph"] = self._graph_timed(m, full)
        checks = {}
        for backend in P.SDPA_BACKENDS:
            for form in ("gqa", "folded"):
                name = f"sdpa_{backend}_{form}"
                try:
                    sm = P.sdpa(backend, form, keys, values, queries)
                except P.Unavailable as e:
                    shared[name] = {"unavailable": str(e)}
                    continue
                shared[name] = _timed(sm, dev, opt.runs, full, self.copy_gbps)
                checks[f"dense_vs_{name}_max_abs"] = _maxdiff(out_dense[0], sm.outputs[0])
                if graphs_ok:
                    shared[name + "_graph"] = self._graph_timed(sm, full)
        del dense, m  # (m's calls hold the decoder) before FlashInfer's copy of the K/V takes its place
        if opt.flashinfer:
            try:
                fm = P.flashinfer_dense(keys, values, queries, scale=wls[0].scale)
            except P.Unavailable as e:
                shared["flashinfer_dense"] = {"unavailable": str(e)}
            else:
                shared["flashinfer_dense"] = _timed(fm, dev, opt.runs, full, self.copy_gbps)
                checks["dense_vs_flashinfer_dense_max_abs"] = _maxdiff(out_dense[0], fm.outputs[0])
                if graphs_ok:
                    shared["flashinfer_dense_graph"] = self._graph_timed(fm, full)
                del fm
        else:
            shared["flashinfer_dense"] = {"unavailable": "not asked for (--no-flashinfer)"}

        for p in opt.targets:
            if tac.target != p and not _set_target(tac, p):
                del tac
                tac, extra = build("tactic", p)
                info.setdefault("rebuilt_for_target_s", []).append(extra)
            self.rows.append(self._p_row(c, layers, tac, p, keys, values, queries, shared, dict(checks), full,
                                         wls[0].scale))
        info["total_s"] = time.perf_counter() - t0
        self.cases_run.append(info)
        del tac, wls, keys, values, queries

    def _graph_timed(self, m: P.Method, nbytes) -> dict:
        try:
            g = _graph_of(m, self.opt.device)
        except Exception as e:  # capture refuses host syncs and some kernels: say which
            return {"unavailable": f"CUDA graph capture failed: {P._first_line(e)}"}
        return _timed(g, self.opt.device, self.opt.runs, nbytes, self.copy_gbps, mode="graph")

    def _p_row(self, c: Case, layers: int, tac: SparseDecoder, p: float, keys, values, queries,
               shared: dict, checks: dict, full: int, scale: Optional[float] = None) -> dict:
        opt, dev, es = self.opt, self.opt.device, ELEM_BYTES[c.dtype]
        methods = dict(shared)
        outs = [torch.empty_like(q) for q in queries]
        step = P.tactic_step(tac, queries, outs)
        t_step = time_calls(step.calls, dev, opt.runs)  # also leaves each layer's selection
        stats = [tac.stats(l) for l in range(layers)]
        kv_tokens = np.stack([s["kv_tokens"] for s in stats])        # [L, B, Hkv]
        head_tokens = np.stack([s["head_tokens"] for s in stats])    # [L, B, Hq]
        context = stats[0]["context"]
        floors = [traffic.step_floor(s["kv_tokens"], s["context"], c.hq, c.d, es, self.copy_gbps)
                  for s in stats]
        floor_bytes = float(np.mean([f["bytes"] for f in floors]))
        sel_bytes = float(np.mean([traffic.selected_bytes(s["kv_tokens"], c.d, es) for s in stats]))
        r = t_step.as_dict()
        r.update(note=step.note, bytes=int(floor_bytes), gbps=traffic.gbps(floor_bytes, t_step.median_us),
                 pct_of_copy=100.0 * traffic.gbps(floor_bytes, t_step.median_us) / self.copy_gbps)
        methods["tactic_step"] = r
        out_step0 = outs[0].clone()

        try:
            am = P.tactic_attention(tac, queries, [torch.empty_like(q) for q in queries])
            methods["tactic_attention"] = _timed(am, dev, opt.runs, sel_bytes, self.copy_gbps)
            checks["attention_vs_step_max_abs"] = _maxdiff(am.outputs[0], out_step0)
        except P.Unavailable as e:
            methods["tactic_attention"] = {"unavailable": str(e)}

        sels = [P.selection_from_mask(s["kv_mask"], dev) for s in stats]
        builders = [P.gather_sdpa] + ([P.gather_sdpa_padded] if opt.padded_gather else [])
        for b in builders:
            name = b.__name__
            try:
                gm = b(keys, values, queries, sels)
            except P.Unavailable as e:
                methods[name] = {"unavailable": str(e)}
                continue
            methods[name] = _timed(gm, dev, opt.runs, sel_bytes, self.copy_gbps)
            checks[f"step_vs_{name}_max_abs"] = _maxdiff(gm.outputs[0], out_step0)
        del sels

        if opt.flashinfer:
            try:
                fm = P.flashinfer_selection(keys, values, queries, [s["kv_mask"] for s in stats], scale=scale)
            except P.Unavailable as e:
                methods["flashinfer_selection"] = {"unavailable": str(e)}
            else:
                methods["flashinfer_selection"] = _timed(fm, dev, opt.runs, sel_bytes, self.copy_gbps)
                checks["step_vs_flashinfer_selection_max_abs"] = _maxdiff(fm.outputs[0], out_step0)
                if opt.graphs and torch.device(dev).type == "cuda":
                    methods["flashinfer_selection_graph"] = self._graph_timed(fm, sel_bytes)
                del fm
        else:
            methods["flashinfer_selection"] = {"unavailable": "not asked for (--no-flashinfer)"}

        if opt.graphs and torch.device(dev).type == "cuda":
            methods["tactic_step_graph"] = self._graph_timed(step, floor_bytes)

        floor_us = float(np.mean([f["us"] for f in floors]))
        selected = float(kv_tokens.mean() / c.n)
        for k, v in methods.items():  # every figure says how much of the context it read
            if "median_us" in v:
                v["read_fraction"] = selected if is_selection_method(k) else 1.0
        row = {
            "workload": c.workload, "N": c.n, "B": c.batch, "Hq": c.hq, "Hkv": c.hkv, "D": c.d,
            "dtype": c.dtype, "P": p, "rotation_layers": layers,
            "selected_fraction": selected,
            "selected_fraction_kv_heads": {q: float(np.quantile(kv_tokens / c.n, x))
                                           for q, x in (("min", 0), ("median", 0.5), ("max", 1))},
            "head_fraction_mean": float(head_tokens.mean() / c.n),
            "context": [int(x) for x in context],
            "methods": methods,
            "floor": {"bytes": floor_bytes, "us": floor_us, "parts": floors[0]["parts"],
                      "copy_gbps": self.copy_gbps, "launch_us": traffic.LAUNCH_US},
            "checks": checks,
            "plan": tac.plan,
            "stop_rule": tac.stop_rule,
            "group_head": tac.group_head,
        }
        row["sdpa_best"], row["speedup"] = speedups(methods)
        row["dense_best"], row["speedup_vs_dense_best"] = speedups(methods, DENSE_PEERS)
        row["peers"] = peer_record(methods)
        row["check_failures"] = check_failures(checks, c.dtype)
        if row["check_failures"]:
            self.log(f"  WARNING: outputs differ beyond tolerance: {row['check_failures']}")
        for mode, key in (("eager", "tactic_step"), ("graph", "tactic_step_graph")):
            t = methods.get(key, {}).get("median_us")
            row["floor"][f"ratio_{mode}"] = t / floor_us if t else None
        self.log(format_row_line(row))
        return row


# Methods that read every token (peers of the dense baseline) and those over Tactic's selection.
DENSE_PEERS = ("sdpa_", "flashinfer_dense")
SELECTION_METHODS = ("tactic_", "gather_sdpa", "flashinfer_selection")
# Largest |difference| between two methods' outputs that counts as agreement, per dtype
# (outputs are O(1); fp16 checks of the gather peer stay under 2e-2, tests/test_bench_cli.py).
CHECK_TOL = {"float16": 2e-2, "bfloat16": 8e-2, "float32": 1e-3}


def is_selection_method(name: str) -> bool:
    return name.startswith(SELECTION_METHODS)


def peer_record(methods: dict) -> dict:
    """Which methods ran and why each other one did not."""
    return {"ran": sorted(k for k, v in methods.items() if "median_us" in v),
            "skipped": {k: v["unavailable"] for k, v in sorted(methods.items()) if "unavailable" in v}}


def check_failures(checks: dict, dtype: str) -> List[str]:
    """The output cross-checks (…_max_abs) beyond CHECK_TOL[dtype] (or not finite)."""
    tol = CHECK_TOL[dtype]
    return sorted(k for k, v in checks.items() if k.endswith("_max_abs") and not v <= tol)


def speedups(methods: dict, baseline: Tuple[str, ...] = ("sdpa_",)) -> Tuple[dict, dict]:
    """Fastest baseline method (default: torch SDPA backends; DENSE_PEERS adds FlashInfer dense),
    eager and graph, and every other method's speedup over it (eager methods against the eager
    baseline, graph replays against graph replays)."""
    best, out = {}, {}
    for mode, suffix in (("eager", ""), ("graph", "_graph")):
        cands = {k: v["median_us"] for k, v in methods.items()
                 if k.startswith(baseline) and k.endswith(suffix) and (suffix or not k.endswith("_graph"))
                 and "median_us" in v}
        if cands:
            name = min(cands, key=cands.get)
            best[mode] = {"name": name, "median_us": cands[name]}
    for k, v in methods.items():
        if "median_us" not in v or k.startswith(baseline):
            continue
        mode = "graph" if k.endswith("_graph") else "eager"
        if mode in best:
            out[k] = best[mode]["median_us"] / v["median_us"]
    return best, out


def format_row_line(row: dict) -> str:
    m = row["methods"]

    def t(name):
        v = m.get(name, {})
        return f"{v['median_us']:.1f}" if "median_us" in v else "n/a"
    sp = row["speedup"].get("tactic_step")
    bd = row.get("speedup_vs_dense_best", {}).get("tactic_step")
    head = (f"  {row['workload']} P={row['P']:.2f} read {row['selected_fraction']:.2%}: step {t('tactic_step')} us "
            f"(graph {t('tactic_step_graph')}), attn {t('tactic_attention')}, "
            f"FlashInfer sel {t('flashinfer_selection')}, gather {t('gather_sdpa')} (these at the read fraction); "
            f"dense {t('dense')}, FlashInfer dense {t('flashinfer_dense')} (all tokens)")
    if sp:
        head += f"; best sdpa {row['sdpa_best'].get('eager', {}).get('name', 'n/a')} -> step speedup {sp:.2f}x"
    if bd:
        head += f", vs best dense ({row['dense_best']['eager']['name']}) {bd:.2f}x"
    return head
