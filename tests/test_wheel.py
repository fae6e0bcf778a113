"""The package works as a built wheel, not only as an editable checkout: the ``metacontrol`` console entry
runs the training scripts from the installed package."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from tests.conftest import REPO


def _run(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{args}: {result.stdout[-2000:]}{result.stderr[-2000:]}"
    return result


def test_wheel_in_a_fresh_venv_runs_meta_train_help(tmp_path):
    # Built from a copy of what the wheel is made of (setuptools writes build/ into the source tree), with
    # this environment's setuptools (no download), without dependencies.
    source = tmp_path / "source"
    shutil.copytree(REPO / "metacontrol", source / "metacontrol", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path / "dist",
         source, cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("metacontrol-*.whl"))
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    # The fresh venv borrows this one's dependencies (torch is gigabytes) but none of its .pth files, so the
    # editable checkout is not importable there; the wheel is installed by pip like any other.
    site = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))", cwd=tmp_path).stdout.strip())
    (site / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    _run(python, "-m", "pip", "install", "--no-deps", "-q", wheel, cwd=tmp_path)

    where = _run(python, "-c", "import metacontrol.scripts.meta_train as m; print(m.__file__)", cwd=tmp_path).stdout
    assert Path(where.strip()).is_relative_to(site), where  # the wheel's copy, not the checkout's
    help_text = _run(venv / "bin" / "metacontrol", "meta-train", "--help", cwd=tmp_path).stdout
    assert help_text.startswith("usage: metacontrol meta-train") and "--config" in help_text
    assert "finetune" in _run(venv / "bin" / "metacontrol", "--help", cwd=tmp_path).stdout
