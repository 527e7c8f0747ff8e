"""C++ embedding: build and install the library with plain CMake (no Python involved), build
tests/embed against the installed package alone, and run it (shared and static linking)."""
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd, cwd=None, timeout=300):
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, (f"`{' '.join(map(str, cmd))}` exited {r.returncode}\n"
                               f"--- stdout\n{r.stdout[-6000:]}\n--- stderr\n{r.stderr[-6000:]}")
    return r.stdout


@pytest.mark.slow
def test_embed_from_installed_package(tmp_path, cmake_cxx):
    cmake, cxx = cmake_cxx
    build, prefix, demo = tmp_path / "build", tmp_path / "prefix", tmp_path / "embed"
    common = ["-DCMAKE_BUILD_TYPE=Release", f"-DCMAKE_CXX_COMPILER={cxx}"]
    # CPU only, so the result does not depend on the machine having nvcc.
    _run([cmake, "-S", ROOT, "-B", build, "-DTACTIC_CUDA=OFF", *common])
    _run([cmake, "--build", build, "-j2"])
    _run([cmake, "--install", build, "--prefix", prefix])

    assert (prefix / "include" / "tactic" / "decoder.hpp").is_file()
    assert not list((prefix / "include").rglob("parallel.hpp")), "internal headers were installed"
    assert list(prefix.glob("lib*/cmake/tactic/tacticConfig.cmake"))

    _run([cmake, "-S", ROOT / "tests" / "embed", "-B", demo, f"-DCMAKE_PREFIX_PATH={prefix}",
          *common])
    _run([cmake, "--build", demo, "-j2"])
    for exe in ("embed_demo", "embed_demo_static"):
        out = _run([demo / exe], timeout=120)
        print(out)
        assert "embed_demo: PASS" in out, out
        for p in ("0.50", "0.90", "1.00"):
            assert f"cpu  float32  P={p}" in out and f"cpu  float16  P={p}" in out, out
