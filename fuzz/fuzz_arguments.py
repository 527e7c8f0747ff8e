#!/usr/bin/env python3
"""Atheris fuzz target for Tactic's argument checking (docs/CONTRACT.md).

Each input is a small program: build a SparseDecoder from fuzzed options (valid or not), then
run up to 8 fuzzed calls (prefill, decode, select, stats, length, reset, recluster, layout,
and the functional ops) with arrays of fuzzed shapes, dtypes, strides (sliced, transposed,
broadcast, reversed, read-only, overlapping, misaligned), values (NaN, Inf, beyond float16) and
options. The contract it enforces:

- only documented exceptions come out: ValueError (tactic.CapacityError included),
  TypeError, RuntimeError for device='cuda' in a build or machine without CUDA and for
  reuse_selection on a CPU decoder;
- a call that raises leaves every sequence length, and the target, as they were;
- a successful decode of arrays that all fit float16 gives finite outputs;
- the process never crashes (a segfault or abort is reported by libFuzzer).

Run (see fuzz/README.md):  python fuzz/fuzz_arguments.py fuzz/corpus -max_total_time=600
"""
import sys

import atheris

with atheris.instrument_imports():
    import numpy as np
    import tactic
    import tactic.ops

DOCUMENTED = (ValueError, TypeError)
DTYPES = [np.float16, np.float32, np.float64, np.int32, np.int8, np.bool_]


class Program:
    def __init__(self, data: bytes):
        self.fdp = atheris.FuzzedDataProvider(data)
        self.big = False  # an array beyond float16 was made: a float16 `out` may overflow

    def pick(self, options):
        return options[self.fdp.ConsumeIntInRange(0, len(options) - 1)]

    def int_arg(self, lo, hi, huge=True):
        """A small valid-ish int most of the time, else an odd value or a wrong type.
        huge=False leaves out 2^31, which is a valid geometry that would only measure how
        much memory the machine has (and make the arrays of this harness enormous)."""
        r = self.fdp.ConsumeIntInRange(0, 15)
        if r < 11:
            return self.fdp.ConsumeIntInRange(lo, hi)
        odd = [-1, 0, 2**63, 2**70, -2**64, 1.5, "3", None, True, np.int64(2)]
        return self.pick(odd + [2**31] if huge else odd)

    def float_arg(self):
        r = self.fdp.ConsumeIntInRange(0, 9)
        if r < 7:
            return self.fdp.ConsumeProbability()
        return self.pick([0.0, -0.5, 1.0, 1.5, float("nan"), float("inf"), 10**400, "0.9", None])

    def array(self, shape):
        """An array near `shape`: the right one or a mutated one, any dtype and layout."""
        shape = list(shape)
        if self.fdp.ConsumeIntInRange(0, 5) == 0 and shape:  # wrong extent or rank
            i = self.fdp.ConsumeIntInRange(0, len(shape) - 1)
            how = self.fdp.ConsumeIntInRange(0, 2)
            if how == 0:
                shape[i] = self.fdp.ConsumeIntInRange(0, 9)
            elif how == 1:
                shape = shape[:-1]
            else:
                shape = shape + [2]
        dtype = DTYPES[0] if self.fdp.ConsumeBool() else self.pick(DTYPES)
        scale = self.pick([1.0, 1.0, 0.0, 1e-3, 300.0, 1e5])
        self.big |= scale == 1e5
        n = int(np.prod(shape)) if shape else 1
        vals = np.array([self.fdp.ConsumeRegularFloat() for _ in range(min(n, 8))] or [0.0])
        vals = np.nan_to_num(vals, nan=0.0, posinf=1.0, neginf=-1.0) % 4.0 - 2.0
        with np.errstate(all="ignore"):
            a = (np.resize(vals, n).reshape(shape) * scale).astype(dtype)
        if self.fdp.ConsumeIntInRange(0, 7) == 0 and a.size and a.dtype.kind == "f":
            a.flat[self.fdp.ConsumeIntInRange(0, a.size - 1)] = self.pick([np.nan, np.inf, -np.inf])
        layout = self.fdp.ConsumeIntInRange(0, 9)
        if layout == 1 and a.ndim >= 1:  # strided last axis
            a = np.repeat(a, 2, axis=-1)[..., ::2]
        elif layout == 2 and a.ndim >= 2:  # non-row-major, same logical values
            a = np.ascontiguousarray(np.swapaxes(a, 0, 1)).swapaxes(0, 1)
        elif layout == 3 and a.ndim >= 1 and a.shape[0]:  # broadcast leading axis
            a = np.broadcast_to(a[:1], a.shape)
        elif layout == 4 and a.ndim >= 1:  # reversed
            a = a[::-1]
        elif layout == 5:
            a = a.copy()
            a.flags.writeable = False
        elif layout == 6 and a.ndim >= 1 and a.size:  # writable with overlapping elements
            a = np.lib.stride_tricks.as_strided(a, a.shape, (0,) * (a.ndim - 1) + (a.strides[-1],),
                                                writeable=True)
        elif layout == 7:
            return a.tolist() if a.size < 64 else None
        elif layout == 8 and a.itemsize > 1:  # data one byte past an aligned address
            raw = np.zeros(a.nbytes + 1, np.uint8)
            b = raw[1:].view(a.dtype).reshape(a.shape)
            b[...] = a
            return b
        return a

    def decoder(self):
        geo = dict(num_layers=self.int_arg(1, 3, huge=False), num_q_heads=self.int_arg(1, 6, huge=False),
                   num_kv_heads=self.int_arg(1, 3, huge=False), head_dim=self.pick([1, 3, 8, 16, 16, 0, 2000]),
                   max_batch=self.int_arg(1, 3, huge=False),
                   max_tokens=self.pick([1, 5, 16, 40, 64, 64, 0, -3, 2**31, 10**9]))
        if geo["max_tokens"] == 10**9:  # refused for want of memory, never allocated
            geo.update(num_kv_heads=4, num_q_heads=4, head_dim=64)
        opts = {}
        for name, gen in [
            ("dtype", lambda: self.pick(["float16", "float32", "bfloat16", "int8", np.float16, 3])),
            ("target", self.float_arg), ("margin", self.float_arg),
            ("policy", lambda: self.pick(["tactic", "dense", "oracle", "quest", "topk", "x", 1])),
            ("estimator", lambda: self.pick(["centroid_prior", "two_segment", "?"])),
            ("metric", lambda: self.pick(["euclidean", "spherical", "cosine"])),
            ("cluster_size", lambda: self.int_arg(1, 20)), ("num_sink", lambda: self.int_arg(0, 5)),
            ("recluster_interval", lambda: self.int_arg(1, 8)), ("budget", lambda: self.int_arg(0, 30)),
            ("page_size", lambda: self.int_arg(1, 20)), ("kmeans_iters", lambda: self.int_arg(1, 12)),
            ("sample_segments", lambda: self.int_arg(-1, 2)), ("min_clusters", lambda: self.int_arg(1, 9)),
            ("share_group", lambda: self.pick([True, False, None, 1])),
            ("record_selection", lambda: self.pick([False, True, "yes"])),
            ("scale", lambda: self.pick([None, 0.1, -1.0, 0.0, float("nan")])),
            ("device", lambda: self.pick(["cpu", "cpu", "cuda", "cuda:1", "tpu", None])),
            ("seed", lambda: self.int_arg(0, 5)), ("num_threads", lambda: self.int_arg(0, 2)),
        ]:
            if self.fdp.ConsumeIntInRange(0, 3) == 0:
                opts[name] = gen()
        return tactic.SparseDecoder(**geo, **opts)

    def lengths(self, dec):
        return [dec.length(layer, s) for layer in range(dec.num_layers) for s in range(dec.max_batch)]

    def step(self, dec):
        L, Hq, H, D = dec.num_layers, dec.num_q_heads, dec.num_kv_heads, dec.head_dim
        B = self.fdp.ConsumeIntInRange(1, dec.max_batch)
        layer = self.int_arg(0, L)
        seq = self.pick([None, None, 0, list(range(B)), [0] * B, self.int_arg(0, 3)])
        action = self.fdp.ConsumeIntInRange(0, 11)
        if action <= 2:
            n = self.fdp.ConsumeIntInRange(0, dec.max_tokens + 1)
            if self.fdp.ConsumeBool():
                return dec.prefill(layer, self.array([n, H, D]), self.array([n, H, D]),
                                   seq=0 if seq is None else seq)
            lens = self.pick([None, [n] * B, [self.int_arg(0, n)] * B, [1]])
            return dec.prefill(layer, self.array([B, n, H, D]), self.array([B, n, H, D]),
                               seq=0 if seq is None else seq, lengths=lens)
        if action <= 6:
            append = self.fdp.ConsumeIntInRange(0, 3) > 0
            kn = self.array([B, H, D]) if append else None
            vn = self.array([B, H, D]) if append else None
            if self.fdp.ConsumeIntInRange(0, 9) == 0:
                vn = None
            out = self.array([B, Hq, D]) if self.fdp.ConsumeIntInRange(0, 3) == 0 else None
            budget = self.pick([None, None, 4, 0, -1, np.full((B, H), 3), np.ones((B, H)), "4"])
            q = self.array([B, Hq, D])
            reuse = self.pick([False] * 6 + [True, "yes"])
            res = dec.decode(layer, q, kn, vn, seq=seq, out=out, budget=budget, reuse_selection=reuse)
            if not self.big:  # stored values and q fit float16: so does the output
                assert np.isfinite(np.asarray(res, dtype=np.float64)).all(), "non-finite output"
            return res
        if action == 7:
            return dec.select(layer, self.array([B, Hq, D]), seq=seq)
        if action == 8:
            return self.pick([dec.stats, lambda l: setattr(dec, "target", self.float_arg()), lambda l: dec.length(l, self.int_arg(0, 3)),
                              lambda l: dec.recluster(l, self.int_arg(0, 3)),
                              lambda l: dec.layout(l, self.int_arg(0, 3), self.int_arg(0, H))])(layer)
        if action == 9:
            return dec.reset(self.pick([None, self.int_arg(0, 3)]))
        return self.op(Hq, H, D)

    def op(self, Hq, H, D):
        n = self.fdp.ConsumeIntInRange(0, 40)
        which = self.fdp.ConsumeIntInRange(0, 3)
        scale = self.pick([None, 0.5, 0.0, float("inf"), "x"])
        want_out = self.fdp.ConsumeIntInRange(0, 4) == 0
        out = self.array([1, Hq, D] if which == 1 else [Hq, D]) if want_out else None
        if which == 0:
            return tactic.ops.kmeans(self.array([n, D]), self.pick([None, self.int_arg(1, 9)]),
                                     max_iters=self.int_arg(1, 5), metric=self.pick(["euclidean", "spherical", 3]))
        if which == 1:
            lens = self.pick([None, [n], [self.int_arg(0, n)], [n, n], np.array([n], np.int64)])
            return tactic.ops.dense_decode(self.array([1, Hq, D]), self.array([1, n, H, D]),
                                           self.array([1, n, H, D]), lengths=lens, scale=scale, out=out)
        if which == 2:
            mask = self.array([H, n])
            if self.fdp.ConsumeBool() and isinstance(mask, np.ndarray):
                mask = mask.astype(bool)
            return tactic.ops.sparse_decode(self.array([Hq, D]), self.array([n, H, D]),
                                            self.array([n, H, D]), mask, scale=scale, out=out)
        return tactic.ops.select(self.array([Hq, D]), self.array([max(n, 1), H, D]),
                                 target=self.float_arg(), policy=self.pick(["tactic", "oracle", "quest"]),
                                 budget=self.pick([None, 4]))


def test_one_input(data: bytes):
    prog = Program(data)
    try:
        dec = prog.decoder()
    except DOCUMENTED:
        return
    except RuntimeError as e:  # only the unavailable CUDA device is a RuntimeError
        if "not available" not in str(e) and "CUDA" not in str(e):
            raise
        return
    for _ in range(prog.fdp.ConsumeIntInRange(1, 8)):
        before = prog.lengths(dec)
        target = dec.target
        try:
            prog.step(dec)
        except (ValueError, TypeError, RuntimeError) as e:
            # RuntimeError is documented only for reuse_selection on a CPU decoder
            if isinstance(e, RuntimeError) and "CUDA decoders only" not in str(e):
                raise
            after = prog.lengths(dec)
            assert after == before, f"a failed call changed lengths {before} -> {after}"
            assert dec.target == target, "a failed call changed the target"


def main():
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
