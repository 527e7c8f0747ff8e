"""What the command-line tools record and need: the build's commit, the results folder, extras.

Shared by `python -m tactic` and its commands (demo, bench, eval, info); imports nothing heavy.
"""
from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterable, Optional

DIST_NAME = "tactic-attention"  # the distribution on PyPI; the import name is `tactic`
RESULTS_ENV = "TACTIC_RESULTS_DIR"


def _build_info():
    try:
        from . import _build_info  # written by CMake into the installed package
    except ImportError:  # running from a source tree that was never built into it
        return None
    return _build_info


def git_commit() -> str:
    """The commit of the tactic code that runs: "<sha>", "<sha>+dirty" or "unknown".

    In order: the environment variable TACTIC_GIT_COMMIT (a copied tree whose .git is stale);
    the commit CMake recorded when this package was built (tactic/_build_info.py), so an
    installed package knows it wherever it runs; else, for a package imported straight from a
    source checkout, that checkout's HEAD.
    """
    env = os.environ.get("TACTIC_GIT_COMMIT")
    if env:
        return env
    info = _build_info()
    if info is not None:
        return info.GIT_COMMIT
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def build_info() -> dict:
    """How this installation was built and what each visible GPU can use of it.

    version, git_commit, with_cuda, with_openmp, cuda_archs (the CUDA architectures compiled,
    e.g. "80 90"; "" without CUDA), cuda_compiler, package_dir, build_type and compiler (where
    CMake recorded them), and devices: per visible GPU its name, compute_capability (90 for
    sm_90), sm_count, kernel_arch (the architecture this build's kernels run as there), the
    kernel features it uses (programmatic_dependent_launch, thread_block_clusters,
    tensor_core_attention) and a warning where the GPU has a feature the kernels lack.
    """
    from ._core import build_info as core_build_info
    info = _build_info()
    d = {**core_build_info(), "git_commit": git_commit(), "package_dir": str(Path(__file__).resolve().parent)}
    if info is not None:
        d.update(build_type=info.BUILD_TYPE, compiler=info.CXX_COMPILER)
    return d


def results_dir() -> Path:
    """Where bench and eval results go by default, whatever the working directory.

    $TACTIC_RESULTS_DIR if set; else the user data folder: $XDG_DATA_HOME/tactic/results
    (~/.local/share/tactic/results) on Linux, ~/Library/Application Support/tactic/results on
    macOS, %LOCALAPPDATA%\\tactic\\results on Windows.
    """
    env = os.environ.get(RESULTS_ENV)
    if env:
        return Path(env).expanduser()
    home = Path.home()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or home / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = home / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_DATA_HOME") or home / ".local" / "share")
    return base / "tactic" / "results"


def missing(modules: Iterable[str], extra: str) -> Optional[str]:
    """None when every module imports; else one line saying which is missing and what to
    install (the `extra` of the distribution), for a command to print after its name."""
    for mod in modules:
        try:
            importlib.import_module(mod)
        except ImportError as e:
            return (f"needs `{mod}`, which cannot be imported here ({e}). Install it with: pip install '{DIST_NAME}[{extra}]' (from a source checkout: "
                    f"pip install '.[{extra}]')")
    return None


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; every option's help ends with its default, unless the help
    already says it or there is none to say (flags, options whose default depends on the run)."""

    def _get_help_string(self, action):
        text = action.help or ""
        d = action.default
        if ("default" in text or d is None or d is False or d is argparse.SUPPRESS
                or not action.option_strings):
            return text
        shown = " ".join(map(str, d)) if isinstance(d, (list, tuple)) else d
        return f"{text} (default: {shown})"
