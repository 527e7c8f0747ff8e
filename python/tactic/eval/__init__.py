"""Accuracy harness: `python -m tactic eval` (SmolLM2-135M on real text, Tactic vs Quest/top-k/oracle/dense).

See `python -m tactic eval --help`; results go to --out (default: the user results folder,
tactic._runinfo.results_dir()) as JSON, Markdown and PNG.
"""
