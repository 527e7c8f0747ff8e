"""What the installed distribution ships: its name, the licence, build info and type stubs."""
import ast
import importlib.metadata as md
import re
from pathlib import Path

import pytest

import tactic
from tactic import _core, _runinfo

PKG = Path(tactic.__file__).resolve().parent
ROOT = Path(__file__).resolve().parents[1]


def _dist():
    try:
        return md.distribution(_runinfo.DIST_NAME)
    except md.PackageNotFoundError:
        pytest.skip(f"{_runinfo.DIST_NAME} is not installed (tactic imported from a source tree)")


def test_distribution_name_version_and_license():
    dist = _dist()
    assert dist.metadata["Name"] == "tactic-attention" and dist.version == tactic.__version__
    files = [f for f in dist.files if f.name.startswith("LICENSE")]
    assert files, "LICENSE is not in the wheel's dist-info"
    text = Path(files[0].locate()).read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert text == (ROOT / "LICENSE").read_text()
    assert any(f.parts[0] == "tactic" and f.name == "__init__.py" for f in dist.files)  # import name
    assert "tactic-attention" in re.sub(r"\s+", " ", (ROOT / "README.md").read_text())


def test_build_info_is_shipped():
    from tactic import _build_info
    assert _build_info.VERSION == tactic.__version__
    assert _build_info.WITH_CUDA == tactic.with_cuda
    assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?|unknown", _build_info.GIT_COMMIT)


def test_stubs_and_py_typed_cover_the_compiled_module():
    stub = PKG / "_core.pyi"
    assert (PKG / "py.typed").exists() and stub.exists()
    tree = ast.parse(stub.read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
            names.add(node.name)
        elif isinstance(node, ast.AnnAssign):
            names.add(node.target.id)
    public = {n for n in dir(_core) if not n.startswith("_")} | {"__version__"}
    assert public <= names, public - names
    decoder = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Decoder")
    methods = {f.name for f in decoder.body if isinstance(f, ast.FunctionDef)}
    assert {"prefill", "decode"} <= methods, methods
