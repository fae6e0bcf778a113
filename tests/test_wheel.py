"""The package works as a built wheel, not only as an editable checkout: it carries what its defaults name
(the configs, the tiny base, the default start) and the ``metacontrol`` command trains on them from a folder
that is not a checkout, reading the installed copies."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO

SHIPPED_CHECKPOINTS = ("tiny-sd", "joint-3x-controlnet-tiny")  # what the defaults load; the others stay out
# Every file a command in the fresh venv opens (modules included), one a line, when RECORD_OPENS names a log:
# how the test sees which copy was read. A .pth line runs at start-up, so the real console entry is what runs.
RECORD_OPENS = ("import os, sys; p = os.environ.get('RECORD_OPENS'); p and sys.addaudithook("
                "lambda event, args, log=open(p, 'a', buffering=1): event == 'open' "
                "and isinstance(args[0], (str, bytes, os.PathLike)) and log.write(os.fsdecode(args[0]) + '\\n'))\n")


def _run(*args: str | Path, cwd: Path, env: dict[str, str] | None = None,
         timeout: int = 300) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{args}: {result.stdout[-2000:]}{result.stderr[-3000:]}"
    return result


def _repository_files(*folders: str) -> list[str]:
    """Tracked and untracked files under ``folders``, not the git-ignored ones (training outputs, caches)."""
    listing = _run("git", "ls-files", "--cached", "--others", "--exclude-standard", "--", *folders, cwd=REPO).stdout
    return sorted({line for line in listing.splitlines() if (REPO / line).is_file()})


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, set[str]]:
    """The wheel, built with this environment's setuptools (no download) from a copy of the checkout's package,
    configs and checkpoints (setuptools writes build/ into the source tree), and the files it should carry."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    for name in [*_repository_files("metacontrol", "configs", "checkpoints"), "pyproject.toml", "README.md"]:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, source / name)
    expected = {name for name in _repository_files("configs", "checkpoints")
                if name.startswith("configs/") or name.split("/")[1] in SHIPPED_CHECKPOINTS}
    # What a training run leaves in a shipped folder (git-ignored) must stay out of the wheel.
    for leftover in ("checkpoint-7/optimizer.bin", "logs/events.out.tfevents.1"):
        (source / "checkpoints/tiny-sd" / leftover).parent.mkdir(parents=True, exist_ok=True)
        (source / "checkpoints/tiny-sd" / leftover).write_text("training state")
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp / "dist",
         source, cwd=tmp)
    return next((tmp / "dist").glob("metacontrol-*.whl")), expected


@pytest.fixture(scope="module")
def venv(built, tmp_path_factory) -> tuple[Path, Path]:
    """A fresh venv with the wheel installed by pip: its bin/ folder and site-packages."""
    tmp = tmp_path_factory.mktemp("venv")
    venv = tmp / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp)
    python = venv / "bin" / "python"
    # The fresh venv borrows this one's dependencies (torch is gigabytes) and pip, but none of its .pth files, so
    # the editable checkout is not importable there; the wheel is installed by pip like any other.
    site = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))", cwd=tmp).stdout.strip())
    (site / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    (site / "record_opens.pth").write_text(RECORD_OPENS)
    _run(python, "-m", "pip", "install", "--no-deps", "-q", built[0], cwd=tmp)
    where = _run(python, "-c", "import metacontrol.shipped as m; print(m.__file__)", cwd=tmp).stdout
    assert Path(where.strip()).is_relative_to(site), where  # the wheel's copy, not the checkout's
    return venv / "bin", site


def test_wheel_carries_the_package_configs_and_the_default_checkpoints_only(built):
    wheel, expected = built
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {name for name in _repository_files("metacontrol") if name.endswith(".py")}
    assert modules <= names, sorted(modules - names)  # pyproject.toml lists the packages: none may be missing
    shipped = {name.removeprefix("metacontrol/_shipped/") for name in names if name.startswith("metacontrol/_shipped/")}
    assert shipped == expected, (sorted(shipped - expected), sorted(expected - shipped))
    assert "checkpoints/tiny-sd/unet/diffusion_pytorch_model.safetensors" in shipped  # the copy is not empty
    assert wheel.stat().st_size < 30 * 2**20, wheel.stat().st_size  # 25 MiB; all of checkpoints/ would make ~47


def _run_from_elsewhere(bin_dir: Path, tmp_path: Path, *args: str) -> list[str]:
    """``metacontrol *args`` from a folder with no configs/ or checkpoints/, not importing the checkout; the
    paths of the files it opened."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    opens = tmp_path / "opens.txt"
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", RECORD_OPENS=str(opens))
    _run(bin_dir / "metacontrol", *args, cwd=elsewhere, env=env, timeout=180)  # a hang fails, not waits
    return opens.read_text().splitlines()


def _checkout_files(opened: list[str]) -> list[str]:
    """The opened files that are the checkout's package, configs or checkpoints (its .venv lends torch)."""
    return [path for path in opened if Path(path).is_relative_to(REPO)
            and Path(path).relative_to(REPO).parts[0] in ("metacontrol", "configs", "checkpoints")]


def _assert_loadable_controlnet(folder: Path, base: Path) -> None:
    from diffusers import ControlNetModel

    assert (folder / "config.json").is_file() and (folder / "diffusion_pytorch_model.safetensors").is_file()
    controlnet = ControlNetModel.from_pretrained(folder)
    unet = json.loads((base / "unet/config.json").read_text())
    assert list(controlnet.config.block_out_channels) == unet["block_out_channels"]  # made on the shipped base


def test_installed_wheel_meta_trains_on_its_defaults_outside_the_checkout(venv, tmp_path):
    bin_dir, site = venv
    out = tmp_path / "meta"
    opened = _run_from_elsewhere(bin_dir, tmp_path, "meta-train", "meta.max_meta_steps=1", "data.pool_size=8",
                                 "meta.inner_steps=1", "meta.support_batch_size=2", "meta.query_batch_size=2",
                                 "validation_steps=0", "report_to=none", "num_threads=1", f"output_dir={out}")
    installed = (site / "metacontrol/_shipped").resolve()
    assert str(installed / "configs/meta_tiny.yaml") in opened  # the default --config, from the wheel
    assert str(installed / "checkpoints/tiny-sd/unet/config.json") in opened  # the default base, from the wheel
    assert not _checkout_files(opened)
    _assert_loadable_controlnet(out, installed / "checkpoints/tiny-sd")


def test_installed_wheel_finetunes_its_default_start_outside_the_checkout(venv, tmp_path):
    bin_dir, site = venv
    out = tmp_path / "finetune"
    opened = _run_from_elsewhere(bin_dir, tmp_path, "finetune", "max_train_steps=1", "shots=2", "train_batch_size=2",
                                 "validation_steps=0", "report_to=none", "num_threads=1", f"output_dir={out}")
    installed = (site / "metacontrol/_shipped").resolve()
    assert str(installed / "configs/finetune_tiny.yaml") in opened
    assert str(installed / "checkpoints/joint-3x-controlnet-tiny/config.json") in opened  # the default start
    assert not _checkout_files(opened)
    _assert_loadable_controlnet(out, installed / "checkpoints/tiny-sd")
