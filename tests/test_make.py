"""`make test` installs what its tests need (Debian's chromium for the report tests) or says in one line what to
install; real subprocesses of the shipped script and of make."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.conftest import REPO

ENSURE_CHROMIUM = REPO / ".ci" / "ensure-chromium"


def _ensure_chromium(path: Path) -> subprocess.CompletedProcess:
    """The script with only ``path`` on PATH, so what it finds there is all this machine has."""
    return subprocess.run(["/bin/sh", str(ENSURE_CHROMIUM)], env={"PATH": str(path)}, capture_output=True, text=True,
                          timeout=60)  # fmt: skip


def test_without_chromium_and_a_way_to_install_it_make_test_stops_in_one_line(tmp_path: Path) -> None:
    tmp_path.joinpath("id").symlink_to(shutil.which("id"))  # no chromium, apt-get or sudo
    result = _ensure_chromium(tmp_path)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == ("make test: the report tests need Debian's chromium: "
                             "run 'sudo apt-get install chromium chromium-driver'\n")  # fmt: skip


def test_with_chromium_on_the_path_nothing_is_installed(tmp_path: Path) -> None:
    tmp_path.joinpath("chromium").symlink_to(shutil.which("true"))  # found; no apt-get to install anything with
    result = _ensure_chromium(tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_make_test_checks_for_chromium_before_anything_else() -> None:
    """Before minutes of installing the virtualenv, and before pytest."""
    # --no-print-directory: under `make test` itself this make is nested, and would print where it runs
    result = subprocess.run(["make", "--no-print-directory", "-n", "test"], cwd=REPO, capture_output=True, text=True,
                            timeout=60, check=True)  # fmt: skip
    commands = result.stdout.splitlines()
    assert commands[0] == "sh .ci/ensure-chromium" and "python -m pytest -q" in commands[-1], commands
