"""The command line: one parser that lists every command, help and a default for every option,
the old module entry points as aliases, clear messages for missing extras, and results that
land in a folder independent of the working directory, stamped with the build's commit."""
import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import tactic
from tactic import _runinfo
from tactic.__main__ import build_parser, main


def _run(args, cwd, env=None, block=(), timeout=300):
    """`python -m MODULE ARGS` in a subprocess; `block` makes those imports fail, as if the
    packages were not installed."""
    mod, *rest = args
    code = ("import os, runpy, sys; " + "".join(f"sys.modules[{m!r}] = None; " for m in block)
            + "runpy.run_module(os.environ['TEST_MODULE'], run_name='__main__', alter_sys=True)")
    full_env = dict(os.environ, TEST_MODULE=mod, OMP_WAIT_POLICY="PASSIVE", **(env or {}))
    return subprocess.run([sys.executable, "-c", code, *rest], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def _subparsers(parser):
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            return a.choices
    return {}


def _all_parsers(parser, path=()):
    yield path, parser
    for name, sp in _subparsers(parser).items():
        yield from _all_parsers(sp, path + (name,))


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("demo", "bench", "eval", "info"):
        assert re.search(rf"^\s+{cmd}\s+\S", out, re.M), (cmd, out)
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    out = capsys.readouterr().out
    for cmd in ("sweep", "e2e", "plot"):
        assert re.search(rf"^\s+{cmd}\s+\S", out, re.M), (cmd, out)
    paths = {p for p, _ in _all_parsers(build_parser())}
    assert {(), ("demo",), ("bench",), ("bench", "sweep"), ("bench", "e2e"), ("bench", "plot"),
            ("eval",), ("info",)} <= paths


def test_every_option_has_help_and_says_its_default():
    for path, parser in _all_parsers(build_parser()):
        formatter = parser._get_formatter()
        for a in parser._actions:
            if isinstance(a, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
                continue
            where = " ".join(path) + " " + (a.option_strings[0] if a.option_strings else a.dest)
            assert a.help, f"{where}: no help"
            if not a.option_strings or a.const is not None or isinstance(a, argparse._StoreTrueAction):
                continue  # positionals and flags have no default to state
            text = formatter._expand_help(a)
            assert "default" in text, f"{where}: help does not state the default: {text!r}"


def test_defaults_shown_are_the_real_ones():
    p = build_parser()
    a = p.parse_args(["bench", "e2e"])
    assert (a.batch, a.steps, a.target, a.out, a.device) == (1, 16, 0.9, None, "auto")
    a = p.parse_args(["eval"])
    assert a.targets == [0.5, 0.8, 0.9, 0.95] and a.out is None
    text = _subparsers(p)["eval"].format_help()
    assert "(default: 0.5 0.8 0.9 0.95)" in re.sub(r"\s+", " ", text)


def test_bench_without_a_command_is_the_sweep():
    from tactic.bench.__main__ import default_to_sweep
    assert default_to_sweep([]) == ["sweep"]
    assert default_to_sweep(["--quick", "--device", "cpu"]) == ["sweep", "--quick", "--device", "cpu"]
    assert default_to_sweep(["e2e", "--steps", "2"]) == ["e2e", "--steps", "2"]
    assert default_to_sweep(["--help"]) == ["--help"]


def test_bad_values_are_usage_errors_not_tracebacks(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "sweep", "--heads", "32x8"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "32/8" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        main(["eval", "--targets", "1.5"])
    assert "(0, 1]" in capsys.readouterr().err


@pytest.mark.parametrize("args,block,extra,mod", [
    (["tactic", "bench", "--device", "cpu"], ["torch"], "bench", "torch"),
    (["tactic.bench", "e2e", "--device", "cpu"], ["torch"], "bench", "torch"),
    (["tactic.bench", "plot", "x.json"], ["matplotlib"], "bench", "matplotlib"),
    (["tactic", "eval"], ["transformers"], "eval", "transformers"),
    (["tactic.eval"], ["torch"], "eval", "torch"),
])
def test_missing_extra_says_what_to_install(tmp_path, args, block, extra, mod):
    res = _run(args, tmp_path, block=block)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and "ModuleNotFoundError" not in res.stderr.split("(")[0]
    assert f"needs `{mod}`" in res.stderr
    assert f"pip install '{_runinfo.DIST_NAME}[{extra}]'" in res.stderr


def test_help_works_without_torch(tmp_path):
    res = _run(["tactic", "bench", "sweep", "--help"], tmp_path, block=["torch"])
    assert res.returncode == 0 and "--quick" in res.stdout, res.stderr


def test_results_dir_is_independent_of_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.delenv(_runinfo.RESULTS_ENV, raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
    if sys.platform.startswith("linux"):
        assert _runinfo.results_dir() == tmp_path / "data" / "tactic" / "results"
    assert _runinfo.results_dir().is_absolute()
    monkeypatch.setenv(_runinfo.RESULTS_ENV, str(tmp_path / "mine"))
    assert _runinfo.results_dir() == tmp_path / "mine"


def test_commit_comes_from_the_installed_package_not_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("TACTIC_GIT_COMMIT", raising=False)
    monkeypatch.chdir(tmp_path)   # not a git checkout
    commit = _runinfo.git_commit()
    try:
        from tactic import _build_info
    except ImportError:
        pytest.skip("tactic imported from a source tree, not an installed build")
    assert commit == _build_info.GIT_COMMIT
    assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?|unknown", commit), commit
    monkeypatch.setenv("TACTIC_GIT_COMMIT", "abc1234")
    assert _runinfo.git_commit() == "abc1234"


def test_info_and_version(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert tactic.__version__ in out and _runinfo.git_commit() in out
    assert str(_runinfo.results_dir()) in out
    with pytest.raises(SystemExit):
        main(["--version"])
    assert f"tactic {tactic.__version__} (commit " in capsys.readouterr().out


def test_bench_e2e_writes_to_the_results_dir_from_any_folder(tmp_path):
    pytest.importorskip("torch")
    results = tmp_path / "results"
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    res = _run(["tactic", "bench", "e2e", "--device", "cpu", "--context", "256", "--steps", "2",
                "--warmup", "1", "--reps", "1", "--methods", "dense", "tactic", "--layers", "1"],
               cwd, env={_runinfo.RESULTS_ENV: str(results), "TACTIC_GIT_COMMIT": ""})
    assert res.returncode == 0, res.stderr[-3000:]
    assert list(cwd.iterdir()) == []
    files = list(results.glob("cpu-e2e-*.json"))
    assert len(files) == 1, res.stdout
    d = json.loads(files[0].read_text())
    assert d["git_commit"] == _runinfo.git_commit() and d["tactic"] == tactic.__version__


def test_a_reader_leaving_early_is_no_traceback(tmp_path):
    """`python -m tactic info | head -1`: the pipe closes after the first line; the command
    stops quietly (no BrokenPipeError traceback on stderr)."""
    proc = subprocess.Popen([sys.executable, "-m", "tactic", "info"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = proc.stdout.readline()
    proc.stdout.close()  # what `head -1` does after its line
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert first.strip(), "info printed nothing"
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_eval_without_passkey_trials_reports_no_passkey():
    """`python -m tactic eval --passkey-trials 0` skips the passkey test: its pooled report is
    empty instead of an IndexError after the text runs."""
    from tactic.eval import report

    assert report.pool_passkey({2048: ([], []), 4096: ([], [])}) == {}
