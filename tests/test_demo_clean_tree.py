"""`make demo`'s code path leaves a checkout as it was: default commands never write into committed files."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from accelerate.state import AcceleratorState

from metacontrol.scripts import meta_train
from tests.conftest import REPO


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout


def _fresh_checkout(dest: Path) -> Path:
    """This checkout's files as they are now (tracked, and untracked but not ignored), committed in a new repo.

    The demo then runs there, from a clean state, with its own relative defaults, and cannot touch
    the outputs a user's own `make demo` left in this checkout.
    """
    names = _git(REPO, "ls-files", "-z", "--cached", "--others", "--exclude-standard").split("\0")
    for name in filter(None, names):
        if (REPO / name).is_file():  # not deleted in the working tree
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    _git(dest, "init", "-q")
    _git(dest, "add", "-A")
    _git(dest, "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-q", "-m", "checkout")
    return dest


def test_demo_code_path_leaves_the_checkout_unchanged(tmp_path, monkeypatch):
    try:
        status = _git(REPO, "status", "--porcelain")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not in a git checkout (or no git)")
    checkout = _fresh_checkout(tmp_path / "checkout")
    monkeypatch.chdir(checkout)
    try:  # the demo's defaults (configs/meta_tiny.yaml, the shipped tiny model) on a tiny budget
        meta_train.main(["meta.max_meta_steps=2", "data.pool_size=8", "validation_steps=0", "num_threads=1"])
    finally:
        AcceleratorState._reset_state(True)
    assert _git(checkout, "status", "--porcelain", "--untracked-files=all") == ""
    assert (checkout / "outputs/meta-controlnet-tiny/diffusion_pytorch_model.safetensors").is_file()  # it did write
    assert _git(REPO, "status", "--porcelain") == status
