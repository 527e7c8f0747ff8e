"""Decode-speed benchmarks: `python -m tactic bench {sweep,e2e,plot}` (alias: python -m tactic.bench).

  sweep [options]   decode-attention sweep, every peer in one run (the default command)
  e2e [options]     Llama-3.1-8B-shaped decode loop, tokens/s
  plot FILE.json    redraw the PNG of a sweep's JSON

Results (JSON + PNG, named <device>-<kind>-<date>) go to --out, by default the user results
folder ($TACTIC_RESULTS_DIR, else ~/.local/share/tactic/results on Linux); the JSON records the
commit the installed package was built from. Needs PyTorch (and matplotlib for the PNGs):
pip install 'tactic-attention[bench]'.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from .._runinfo import HelpFormatter, missing, results_dir

K = 1024
COMMANDS = ("sweep", "e2e", "plot")


def _tokens(text: str) -> int:
    """'32K' / '512k' / '2048' -> tokens."""
    t = text.strip().lower()
    try:
        return int(float(t[:-1]) * K) if t.endswith("k") else int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a token count such as 2048 or 32K, got {text!r}") from None


def _heads(text: str):
    try:
        hq, hkv = text.split("/")
        return int(hq), int(hkv)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected query/KV heads such as 32/8, got {text!r}") from None


def _resolve_device(device: str) -> str:
    import torch
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _needs(modules, parser) -> bool:
    """Print what to install and return True when a module the command needs is missing."""
    reason = missing(modules, "bench")
    if reason:
        print(f"{parser.prog}: {reason}", file=sys.stderr)
    return reason is not None


def _out_help() -> str:
    return f"output folder (default: {results_dir()}; set {'$'}TACTIC_RESULTS_DIR to change it)"


def add_sweep_arguments(ap) -> None:
    ap.add_argument("--device", default="auto", help="cuda, cuda:N or cpu; auto: cuda if a GPU is visible")
    ap.add_argument("--n", nargs="+", type=_tokens, metavar="N",
                    help="contexts, e.g. 8K 32K 128K 512K (default: 8K to 512K on CUDA, 2048 on the CPU)")
    ap.add_argument("--batch", nargs="+", type=int, help="batch sizes (default: 1 8 32 on CUDA, 1 on the CPU)")
    ap.add_argument("--heads", nargs="+", type=_heads, metavar="HQ/HKV",
                    help="query/KV head pairs, e.g. 32/8 32/4 (default: 32/8 32/4 on CUDA, 8/2 on the CPU)")
    ap.add_argument("--head-dim", type=int, help="head dimension (default: 128 on CUDA, 64 on the CPU)")
    ap.add_argument("--dtype", nargs="+", choices=["float16", "bfloat16", "float32"],
                    help="K/V storage dtypes (default: float16 bfloat16 on CUDA, float16 on the CPU)")
    ap.add_argument("--target", nargs="+", type=float, metavar="P",
                    help="attention-mass targets P (default: 0.8 0.9 0.95 on CUDA, 0.9 on the CPU)")
    ap.add_argument("--workload", nargs="+", default=["synthetic", "sparse"],
                    choices=["synthetic", "sparse", "fixture"],
                    help="synthetic: calibrated generator, workload (b); sparse: the same without flat heads "
                         "(a sparse layer); fixture: real SmolLM2 KV tiled (9/3 heads, D 64) "
                         "(default: synthetic sparse)")
    ap.add_argument("--no-flashinfer", action="store_true",
                    help="leave out the FlashInfer peers (default: timed where flashinfer imports)")
    ap.add_argument("--head-split", type=int, choices=[1, 2, 4], default=None,
                    help="CUDA kernel variant: blocks per query head in the selection (default: the plan's choice)")
    ap.add_argument("--attention-kernel", choices=["auto", "cuda_cores", "tensor_cores"], default="auto",
                    help="CUDA kernel variant: the attention chunk kernel (default: auto)")
    ap.add_argument("--selection-kernel", choices=["auto", "ranked", "threshold"], default="auto",
                    help="CUDA kernel variant: how the prior rule's selection runs (default: auto)")
    ap.add_argument("--stop-rule", choices=["certified", "prior"], default=None,
                    help="Tactic's stop rule (default: SparseDecoder's for the device: certified on the CPU, prior on CUDA)")
    ap.add_argument("--group-head", action="store_true",
                    help="Tactic with group_head=True (each group's exact heads read by the attention; default: off)")
    ap.add_argument("--pdl", choices=["auto", "on", "off"], default="auto",
                    help="CUDA kernel variant: programmatic dependent launch (default: auto, on with sm_90 kernels)")
    ap.add_argument("--quick", action="store_true", help="~2 minutes: 8K-128K, B=1, 32/8, fp16, P=0.9")
    ap.add_argument("--rotate-mb", type=float,
                    help="MiB the L2 rotation cycles through (default: 4x the L2 of an H100 on CUDA, 0 on the CPU)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="wall-clock budget of the sweep in seconds (default: 420; 120 with --quick; cases past it are skipped, with the reason)")
    ap.add_argument("--max-prefill-s", type=float, default=30.0,
                    help="skip cases whose k-means would take longer, in seconds")
    ap.add_argument("--series-s", type=float, default=0.15, help="seconds per timed series (sets the run count)")
    ap.add_argument("--min-runs", type=int, default=20, help="fewest timed runs per method and case")
    ap.add_argument("--max-runs", type=int, default=100, help="most timed runs per method and case")
    ap.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph variants")
    ap.add_argument("--no-padded-gather", action="store_true", help="skip the padded torch-gather peer")
    ap.add_argument("--seed", type=int, default=0, help="seed of the workloads")
    ap.add_argument("--out", default=None, help=_out_help())
    ap.add_argument("--tag", default="", help="added to the file names (default: none)")
    ap.add_argument("--no-plot", action="store_true", help="write the JSON only, no PNG")
    ap.add_argument("--plan", type=float, metavar="GPU_GIB", default=None,
                    help="print the cases, rotation, memory and time estimates for a GPU with this much "
                         "free memory, and exit (no GPU needed; default: run the sweep)")


def sweep_main(argv) -> int:
    """`python -m tactic bench sweep ARGS` as a function (the tests call it)."""
    return main(["sweep", *argv])


def run_sweep(a, ap) -> int:
    if _needs(["torch"], ap):
        return 2
    import torch
    from . import report
    from .bandwidth import copy_bandwidth
    from .plot import plot
    from .sweep import Options, RunPolicy, Sweep

    a.device = _resolve_device(a.device)
    cuda = torch.device(a.device).type == "cuda" or a.plan is not None
    if a.plan is None and cuda and not torch.cuda.is_available():
        ap.error("no CUDA device visible: pass --device cpu (tiny sizes) or run on a GPU machine")
    import tactic
    if cuda and a.plan is None and not tactic.with_cuda:
        ap.error("this build of tactic has no CUDA backend (rebuild with -Ccmake.define.TACTIC_CUDA=ON)")
    opt = Options(device=a.device, workloads=tuple(a.workload), seed=a.seed, graphs=not a.no_graphs,
                  flashinfer=not a.no_flashinfer, stop_rule=a.stop_rule, group_head=a.group_head,
                  kernels=dict(head_split=a.head_split, attention_kernel=a.attention_kernel,
                               pdl=None if a.pdl == "auto" else a.pdl == "on",
                               selection_kernel=a.selection_kernel),
                  padded_gather=not a.no_padded_gather, max_prefill_s=a.max_prefill_s,
                  runs=RunPolicy(warmup=5, min_runs=a.min_runs, max_runs=a.max_runs, budget_s=a.series_s))
    if not cuda:  # development defaults: a few seconds on a laptop core
        opt.ns, opt.batches, opt.heads, opt.head_dim = (2048,), (1,), ((8, 2),), 64
        opt.dtypes, opt.targets, opt.rotate_bytes = ("float16",), (0.9,), 0
    if a.quick:
        opt.ns, opt.batches, opt.heads = (8 * K, 32 * K, 128 * K), (1,), ((32, 8),)
        opt.dtypes, opt.targets = ("float16",), (0.9,)
    for name, val in (("ns", a.n), ("batches", a.batch), ("heads", a.heads), ("dtypes", a.dtype),
                      ("targets", a.target)):
        if val:
            setattr(opt, name, tuple(val))
    if a.head_dim:
        opt.head_dim = a.head_dim
    if a.rotate_mb is not None:
        opt.rotate_bytes = int(a.rotate_mb * 2**20)
    opt.time_budget_s = a.budget_s if a.budget_s is not None else (120.0 if a.quick else 420.0)

    if a.plan is not None:
        opt.device = "cuda"  # estimates for the GPU, whatever runs this
        print(Sweep(opt, 0.0).plan_text(a.plan * 2**30))
        return 0
    env = report.environment(a.device)
    print(f"tactic.bench on {env['device']}, torch {env['torch']}, commit {env['git_commit'][:12]}, {env['date']}")
    bw = copy_bandwidth(a.device, (1 << 30) if cuda else (256 << 20))
    print(f"device copy bandwidth: {bw['median_gbps']:.0f} GB/s (read + write, median)")
    sw = Sweep(opt, bw["median_gbps"])
    t0 = time.perf_counter()
    sw.run()
    wall = time.perf_counter() - t0
    print()
    print(report.table(sw.rows))
    for s in sw.skipped:
        c = s["case"]
        print(f"skipped {c['workload']} N={c['n']} B={c['batch']} {c['hq']}/{c['hkv']} {c['dtype']}: {s['reason']}")
    print(f"sweep wall time {wall:.0f} s")
    kind = "bench-" + "-".join(a.workload) + ("-quick" if a.quick else "") + (f"-{a.tag}" if a.tag else "")
    payload = {**env, "kind": "sweep", "workload": "+".join(a.workload), "workloads": list(a.workload),
               "copy_bandwidth": bw, "peers": sw.peers_summary(),
               "options": {k: v for k, v in vars(opt).items() if k != "runs"} | {"runs": vars(opt.runs)},
               "argv": sys.argv[1:], "wall_s": wall, "rows": sw.rows, "skipped": sw.skipped, "cases": sw.cases_run}
    path = report.result_path(a.out, a.device, kind, "json")
    report.write_json(path, payload)
    print(f"wrote {path}")
    if not a.no_plot and sw.rows:
        png = path.with_suffix(".png")
        try:
            import matplotlib  # noqa: F401  (the 'plot' extra)
        except ImportError:
            print("no PNG: matplotlib is not installed (pip install matplotlib, or tactic[plot]); "
                  f"redraw later with: python -m tactic.bench plot {path}", file=sys.stderr)
        else:
            if plot(sw.rows, png, f"{env['device']}, {env['date']}, commit {env['git_commit'][:10]}"):
                print(f"wrote {png}")
    return 0


def add_e2e_arguments(ap) -> None:
    ap.add_argument("--device", default="auto", help="cuda, cuda:N or cpu; auto: cuda if a GPU is visible")
    ap.add_argument("--context", nargs="+", type=_tokens, metavar="N",
                    help="context lengths (default: 32K 128K on CUDA, 1K on the CPU)")
    ap.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                    help="weights and K/V dtype")
    ap.add_argument("--target", type=float, default=0.9, help="Tactic's attention-mass target P")
    ap.add_argument("--steps", type=int, default=16, help="timed decode steps per loop")
    ap.add_argument("--warmup", type=int, default=3, help="untimed decode steps first")
    ap.add_argument("--reps", type=int, default=3, help="timed loops per method; the median is reported")
    ap.add_argument("--mode", default="eager", choices=["eager", "static", "graphs"],
                    help="eager ops; the step's pieces over fixed buffers; or those pieces as CUDA graphs "
                         "with attention eager between them (piecewise graphs, as engines run decode)")
    ap.add_argument("--methods", nargs="+", choices=["none", "dense", "dense-flash", "dense-cudnn", "dense-flashinfer", "tactic"],
                    help="attention methods timed; none: the loop without attention (default: none "
                         "dense-flash dense-cudnn dense-flashinfer tactic on CUDA, none dense tactic on the CPU)")
    ap.add_argument("--workload", default="model", choices=["model", "synthetic", "sparse"],
                    help="model: first two layers with a quarter of their query heads flat, the others none "
                         "(default); synthetic: workload (b) in every layer; sparse: no flat heads")
    ap.add_argument("--stop-rule", choices=["certified", "prior"], default=None,
                    help="Tactic's stop rule (default: SparseDecoder's for the device: certified on the CPU, prior on CUDA)")
    ap.add_argument("--selection-kernel", choices=["auto", "ranked", "threshold"], default="auto",
                    help="how Tactic's prior-rule selection runs (default: auto; threshold needs --stop-rule prior "
                         "on the CPU)")
    ap.add_argument("--layers", type=int, help="model layers (default: 32 on CUDA, 2 on the CPU)")
    ap.add_argument("--hidden", type=int, help="hidden size (default: 4096 on CUDA, 256 on the CPU)")
    ap.add_argument("--heads", type=_heads, metavar="HQ/HKV",
                    help="query/KV heads (default: 32/8 on CUDA, 4/2 on the CPU)")
    ap.add_argument("--head-dim", type=int, help="head dimension (default: 128 on CUDA, 64 on the CPU)")
    ap.add_argument("--ffn", type=int, help="MLP width (default: 14336 on CUDA, 512 on the CPU)")
    ap.add_argument("--vocab", type=int, help="vocabulary size (default: 128256 on CUDA, 1024 on the CPU)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")
    ap.add_argument("--out", default=None, help=_out_help())
    ap.add_argument("--tag", default="", help="added to the file name (default: none)")


def e2e_main(argv) -> int:
    return main(["e2e", *argv])


def run_e2e(a, ap) -> int:
    if _needs(["torch"], ap):
        return 2
    import torch
    from . import report
    from .e2e import ModelShape, run

    a.device = _resolve_device(a.device)
    cuda = torch.device(a.device).type == "cuda"
    if cuda and not torch.cuda.is_available():
        ap.error("no CUDA device visible: pass --device cpu with small --layers/--hidden/... for a dry run")
    kw = {}
    if not cuda:  # a shape a CPU runs in seconds
        kw = dict(layers=2, hidden=256, hq=4, hkv=2, head_dim=64, ffn=512, vocab=1024)
    for name, val in (("layers", a.layers), ("hidden", a.hidden), ("head_dim", a.head_dim),
                      ("ffn", a.ffn), ("vocab", a.vocab)):
        if val:
            kw[name] = val
    if a.heads:
        kw["hq"], kw["hkv"] = a.heads
    shape = ModelShape(**kw)
    contexts = a.context or ([32 * K, 128 * K] if cuda else [1024])
    methods = a.methods or (["none", "dense-flash", "dense-cudnn", "dense-flashinfer", "tactic"] if cuda else ["none", "dense", "tactic"])
    env = report.environment(a.device)
    options = dict(selection_kernel=a.selection_kernel)
    if a.stop_rule:
        options["stop_rule"] = a.stop_rule
    print(f"tactic.bench e2e on {env['device']}, {shape}, B={a.batch}, {a.dtype}, P={a.target}, mode {a.mode}, "
          f"workload {a.workload}, Tactic {options}")
    if a.mode == "graphs" and not cuda:
        ap.error("--mode graphs needs a CUDA device")
    res = run(contexts, a.batch, a.dtype, a.target, a.device, shape, methods, a.warmup, a.steps, a.seed, reps=a.reps,
              mode=a.mode, workload=a.workload, options=options)
    for r in res["rows"]:
        if "speedup_vs_faster_dense" in r:
            print(f"N={r['N']}: Tactic {r['methods']['tactic']['tokens_per_s']:.2f} tokens/s, "
                  f"{r['speedup_vs_faster_dense']:.2f}x the faster dense ({r['faster_dense']}, reads 100%) "
                  f"(Tactic reads {r['tactic_read_fraction']:.2%}; per layer "
                  f"{', '.join(f'{x:.0%}' for x in r['tactic_read_fraction_per_layer'])})")
    path = report.result_path(a.out, a.device, "e2e" + (f"-{a.tag}" if a.tag else ""), "json")
    report.write_json(path, {**env, "kind": "e2e", "argv": sys.argv[1:], **res})
    print(f"wrote {path}")
    return 0


def add_plot_arguments(ap) -> None:
    ap.add_argument("json", help="a sweep's JSON file (written by `bench sweep`)")
    ap.add_argument("--png", help="where to write the plot (default: the JSON's path with .png)")


def plot_main(argv) -> int:
    return main(["plot", *argv])


def run_plot(a, ap) -> int:
    if _needs(["matplotlib"], ap):
        return 2
    from .plot import plot
    with open(a.json) as f:
        d = json.load(f)
    png = a.png or a.json.rsplit(".", 1)[0] + ".png"
    plot(d["rows"], png, f"{d['device']}, {d['date']}, commit {d['git_commit'][:10]}")
    print(f"wrote {png}")
    return 0


def add_commands(parser, prog: str) -> None:
    """The bench commands as subcommands of `parser` (`python -m tactic bench` or tactic.bench)."""
    sub = parser.add_subparsers(dest="bench_command", title="commands", metavar="{sweep,e2e,plot}")
    for name, add, run, help_, desc in (
            ("sweep", add_sweep_arguments, run_sweep,
             "decode-attention sweep over contexts, batches, heads, dtypes and P, every peer in one run",
             "Decode attention, Tactic against dense peers (torch SDPA flash/cuDNN, CUDA graphs), over a "
             "grid of cases.\nDefaults are the full GPU sweep (~8 min on an H100); --quick is a ~2 minute "
             "subset. Without\na GPU the defaults shrink to a tiny CPU run (--device cpu), skipping the "
             "GPU-only peers."),
            ("e2e", add_e2e_arguments, run_e2e,
             "Llama-3.1-8B-shaped decode loop (random weights): Tactic vs dense attention, tokens/s",
             "Llama-3.1-8B-shaped decode loop (random weights): Tactic vs dense attention, tokens/s.\n"
             "On the CPU the model shrinks to one that runs in seconds."),
            ("plot", add_plot_arguments, run_plot, "redraw the PNG of a sweep's JSON",
             "Redraw the PNG of a sweep's JSON (needs matplotlib).")):
        sp = sub.add_parser(name, help=help_, description=desc, formatter_class=HelpFormatter,
                            prog=f"{prog} {name}")
        add(sp)
        sp.set_defaults(bench_run=run, bench_parser=sp)


def default_to_sweep(argv):
    """`bench [sweep options]` means `bench sweep [sweep options]` (the sweep is the default)."""
    argv = list(argv)
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help")):
        return ["sweep", *argv]
    return argv


def run(args) -> int:
    return args.bench_run(args, args.bench_parser)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = "python -m tactic.bench"
    ap = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=HelpFormatter)
    add_commands(ap, prog)
    return run(ap.parse_args(default_to_sweep(argv)))


if __name__ == "__main__":
    sys.exit(main())
