"""Shared fixtures: tiny random Stable-Diffusion folders built with the real diffusers classes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# A few thousand parameters per part: enough to exercise every code path in well under a second a step.
TINY_TEST_MODEL = dict(vae_channels=[8, 16, 16], unet_channels=[16, 32], unet_norm_groups=8, vae_norm_groups=8,
                       text_hidden=16, text_heads=2, resolution=32)


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory) -> Path:
    """A randomly initialised SD-shaped pipeline folder (x4 VAE, 32 px), saved with save_pretrained."""
    import torch

    from metacontrol.models.tiny import TinySDConfig, tiny_pipeline
    from metacontrol.world import vocabulary

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-sd")
    tiny_pipeline(TinySDConfig(**TINY_TEST_MODEL), vocabulary()).save_pretrained(path)
    return path




@pytest.fixture(scope="session")
def tiny_family_dir(tmp_path_factory) -> Callable[[str], Path]:
    """``tiny_family_dir(name)``: a randomly initialised pipeline folder of family ``sdxl``, ``sd3`` or ``flux``
    (the tiny test model's VAE widths and tokenizer, 32 px), built once per session."""
    import torch

    from metacontrol.models import random_bases
    from metacontrol.models.tiny import TinySDConfig
    from metacontrol.world import vocabulary

    made: dict[str, Path] = {}

    def build(name: str) -> Path:
        if name not in made:
            torch.manual_seed(0)
            tiny = TinySDConfig(**TINY_TEST_MODEL)
            pipe = (random_bases.sdxl_pipeline("tiny", vocabulary(), tiny) if name == "sdxl" else
                    getattr(random_bases, f"{name}_pipeline")(vocabulary(), tiny))
            made[name] = tmp_path_factory.mktemp(f"tiny-{name}")
            pipe.save_pretrained(made[name])
        return made[name]

    return build


def meta_train_args(tiny_sd_dir: Path, output_dir: Path, *overrides: str) -> list[str]:
    """Overrides for a seconds-long meta-training run on the tiny random model."""
    return [
        f"pretrained_model_name_or_path={tiny_sd_dir}", f"output_dir={output_dir}", "resolution=32",
        "data.pool_size=8", "meta.max_meta_steps=4", "meta.tasks_per_meta_step=2",
        "meta.inner_steps=2", "meta.support_batch_size=2", "meta.query_batch_size=2", "validation_steps=0",
        "checkpointing_steps=2", "report_to=none", "num_threads=1", f"cache_dir={output_dir.parent / 'cache'}",
        *overrides,
    ]  # fmt: skip


def finetune_args(tiny_sd_dir: Path, output_dir: Path, *overrides: str) -> list[str]:
    """A seconds-long fine-tuning run on the 32 px tiny random model: 8 shots, batches of 4."""
    return [
        PYTHON, "train/finetune.py", f"pretrained_model_name_or_path={tiny_sd_dir}",
        f"output_dir={output_dir}", "controlnet_model_name_or_path=null", "resolution=32",
        "shots=8", "train_batch_size=4", "max_train_steps=4", "validation_steps=0",
        "report_to=none", "num_threads=1", *overrides,
    ]  # fmt: skip


def run_script(args: list[str], env: dict[str, str] | None = None, timeout: int = 300,
               check: bool = True, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run a command (from the repo root unless ``cwd``) in a real subprocess, returning its output."""
    result = subprocess.run(args, cwd=cwd, env=script_env(env), capture_output=True, text=True, timeout=timeout)
    return _succeeded(result) if check else result


def _succeeded(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """``result``, or an AssertionError with the ends of its output if it failed."""
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, result.args))} failed ({result.returncode}):\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def run_side_by_side(commands: list[list[str]], env: dict[str, str] | None = None,
                     timeout: int = 300) -> list[subprocess.CompletedProcess]:
    """Scripts at once (independent one-thread runs, one per core, or the nodes of one job), each checked as
    ``run_script`` checks one; all are killed at the end, so a hang fails at ``timeout``."""
    processes = [subprocess.Popen(c, cwd=REPO, env=script_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for c in commands]
    try:
        outputs = [p.communicate(timeout=timeout) for p in processes]
    finally:
        for p in processes:
            p.kill()
    return [_succeeded(subprocess.CompletedProcess(c, p.returncode, out, err))
            for c, p, (out, err) in zip(commands, processes, outputs)]


def script_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a script run by a test: this checkout importable, one OpenMP thread."""
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(extra or {})}


PYTHON = sys.executable
# `accelerate launch` as the README runs it: -q, so a failed script's error is not repeated by the launcher.
ACCELERATE_LAUNCH = [PYTHON, "-m", "accelerate.commands.launch", "-q", "--num_processes", "1", "--num_machines", "1",
                     "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip


def free_port() -> int:
    """A TCP port nobody listens on now, for a rendezvous: fixed ports collide between concurrent runs."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(*script_args: str, nproc: int = 1, nnodes: int = 1, node_rank: int = 0, port: int | None = None,
             log_dir: Path | None = None) -> list[str]:
    """``torchrun`` on this machine with a localhost rendezvous; ``log_dir``: each rank's stderr in its own file
    (see ``rank_stderr``), apart from the launcher's own report."""
    args = [PYTHON, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--node_rank", str(node_rank),
            "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1", "--master_port", str(port or free_port())]
    if log_dir is not None:
        args += ["--log_dir", str(log_dir), "--redirects", "2"]
    return [*args, *script_args]


def rank_stderr(log_dir: Path) -> dict[int, str]:
    """What each process of a one-node ``torchrun(..., log_dir=...)`` run wrote to stderr, by rank."""
    found = {int(path.parent.name): path.read_text() for path in log_dir.rglob("attempt_0/*/stderr.log")}
    assert found, f"no per-rank logs under {log_dir}"
    return found
