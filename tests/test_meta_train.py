"""meta_train.py end to end on a tiny random model: real subprocesses, real files, real pipelines."""

from __future__ import annotations

import hashlib
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import (
    ACCELERATE_LAUNCH,
    PYTHON,
    REPO,
    free_port,
    meta_train_args,
    run_script,
    run_side_by_side,
    script_env,
    torchrun,
)

WEIGHTS = "diffusion_pytorch_model.safetensors"


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / WEIGHTS))


def _assert_same_weights(a: Path, b: Path, atol: float = 0.0) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=atol, msg=f"{key} differs")


def _digest(folder: Path) -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(folder.iterdir()))).hexdigest()


def _initial_controlnet(tiny_sd_dir: Path):
    from metacontrol.controlnet import create_controlnet
    from metacontrol.models.base import load_base_model

    return create_controlnet(load_base_model(str(tiny_sd_dir)))


@pytest.fixture(scope="module")
def reference_run(tiny_sd_dir, tmp_path_factory) -> Path:
    """An uninterrupted single-process Reptile run of 6 meta-steps."""
    out = tmp_path_factory.mktemp("reference")
    run_script([PYTHON, "meta_train.py", *meta_train_args(tiny_sd_dir, out, "meta.max_meta_steps=6")])
    return out


def test_run_writes_a_diffusers_controlnet_that_runs_in_the_pipeline(reference_run, tiny_sd_dir):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    for name in ("config.json", WEIGHTS, "README.md", "meta_train_config.yaml"):
        assert (reference_run / name).is_file(), name
    assert sorted(p.name for p in reference_run.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]  # limit 2
    assert "reptile" in (reference_run / "README.md").read_text()
    controlnet = ControlNetModel.from_pretrained(reference_run)
    trained, initial = controlnet.state_dict(), _initial_controlnet(tiny_sd_dir).state_dict()
    moved = [k for k in trained if not torch.equal(trained[k], initial[k])]
    assert any(k.startswith("controlnet_down_blocks") for k in moved)  # zero convolutions learned something
    assert all(v.dtype == torch.float32 for v in trained.values())
    pipe = StableDiffusionControlNetPipeline.from_pretrained(tiny_sd_dir, controlnet=controlnet, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red ball in front of a blue wall on a gray floor", image=torch.rand(1, 3, 32, 32),
                 num_inference_steps=2, height=32, width=32, output_type="np").images
    assert image.shape == (1, 32, 32, 3) and torch.isfinite(torch.from_numpy(image)).all()


def test_two_processes_equal_one_process(reference_run, tiny_sd_dir, tmp_path):
    """gloo on CPU: each process adapts on its own task, the meta-gradient is averaged by one all-reduce.

    With 2 tasks per meta-step the sum is a + b in both runs, so the result is bit-identical. Validation
    runs on rank 0 only (rank 1 waits) and must neither deadlock nor change the training; nor may reading the
    batches ahead in a DataLoader worker (the reference reads them in the loop).
    """
    out = tmp_path / "two"
    run_script(torchrun("meta_train.py", *meta_train_args(
        tiny_sd_dir, out, "meta.max_meta_steps=6", "validation_steps=3", "num_validation_images=1",
        "validation_inference_steps=2", "dataloader_num_workers=1"), nproc=2), env={"ACCELERATE_USE_CPU": "1"})  # fmt: skip
    _assert_same_weights(out, reference_run)
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step-000003.png", "step-000006.png"]
    # The logged losses are means over every task of every process, not rank 0's own task's.
    losses = _loss_rows(reference_run)
    assert _loss_rows(out) == losses and len(losses) >= 3  # inner_loss and two of its tasks at least


def _loss_rows(folder: Path) -> list[str]:
    """The model card's rows of the last meta-step's logged losses."""
    return [line for line in (folder / "README.md").read_text().splitlines() if "| last meta-step: " in line]


def test_two_nodes_equal_one_process(reference_run, tiny_sd_dir, tmp_path):
    """Two machines of one process each, as `accelerate launch --num_machines 2` starts them: here two torchrun
    agents with node ranks 0 and 1 meeting at a localhost rendezvous (gloo)."""
    out, port = tmp_path / "two-nodes", free_port()
    args = meta_train_args(tiny_sd_dir, out, "meta.max_meta_steps=6")
    run_side_by_side([torchrun("meta_train.py", *args, nnodes=2, node_rank=rank, port=port) for rank in (0, 1)],
                     env={"ACCELERATE_USE_CPU": "1"})
    _assert_same_weights(out, reference_run)


def test_checkpoints_hold_no_pickles_and_only_what_trains(reference_run):
    """safetensors for tensors, JSON for the rest: loading a shared checkpoint runs no code."""
    import json

    from safetensors import safe_open

    checkpoint = reference_run / "checkpoint-6"
    assert sorted(p.name for p in checkpoint.iterdir()) == [
        "optimizer.safetensors", "trained_parameters.safetensors", "training_state.json"]
    state = json.loads((checkpoint / "training_state.json").read_text())
    assert state["step"] == 6
    with safe_open(str(checkpoint / "trained_parameters.safetensors"), "pt") as f:
        assert sorted(f.keys()) == sorted(state["parameters"]) == sorted(_weights(reference_run))


def test_sigkill_then_resume_equals_uninterrupted(reference_run, tiny_sd_dir, tmp_path):
    """A run that cannot end before the kill (100000 meta-steps; the constant schedule does not depend on the
    length), killed once checkpoint-2 is complete, then resumed from checkpoint-2 for the reference's 6 steps."""
    out = tmp_path / "killed"
    args = [PYTHON, "meta_train.py", *meta_train_args(tiny_sd_dir, out, "checkpointing_steps=1",
                                                      "checkpoints_total_limit=null")]
    proc = subprocess.Popen([*args, "meta.max_meta_steps=100000"], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=script_env())
    deadline = time.time() + 240
    while not (out / "checkpoint-2").is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / "checkpoint-2").is_dir(), "no checkpoint-2 was written"
    run_script([*args, "meta.max_meta_steps=6", f"resume_from_checkpoint={out / 'checkpoint-2'}",
                "dataloader_num_workers=2"])  # read-ahead from the resumed step on, by two workers in turn
    _assert_same_weights(out, reference_run)


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tiny_sd_dir, tmp_path):
    out = tmp_path / "nan"
    run_script([PYTHON, "meta_train.py", *meta_train_args(tiny_sd_dir, out, "meta.max_meta_steps=2")])
    digest = _digest(out / "checkpoint-2")
    result = run_script([PYTHON, "meta_train.py", *meta_train_args(
        tiny_sd_dir, out, "meta.max_meta_steps=4", "resume_from_checkpoint=latest", "meta.inner_optimizer=sgd", "meta.inner_learning_rate=1e30",
        "meta.max_grad_norm=0")], check=False)  # fmt: skip
    assert result.returncode != 0
    assert re.search(r"meta_train: loss is \S+ at meta-step 2, task '\w+'", result.stderr), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert _digest(out / "checkpoint-2") == digest
    assert not (out / "checkpoint-3").exists() and not (out / "checkpoint-4").exists()


@pytest.mark.parametrize("overrides", [
    ["meta.algorithm=fomaml", "meta.outer_optimizer=adamw", "meta.outer_learning_rate=1e-3"],
    ["meta.algorithm=joint", "meta.outer_optimizer=adamw", "meta.outer_learning_rate=1e-3", "use_8bit_adam=true"],
], ids=["fomaml", "joint-8bit-adam"])  # fmt: skip
def test_algorithms_train(tiny_sd_dir, tmp_path, overrides):
    out = tmp_path / "run"
    run_script([PYTHON, "meta_train.py", *meta_train_args(tiny_sd_dir, out, "meta.max_meta_steps=2", *overrides)])
    trained, initial = _weights(out), _initial_controlnet(tiny_sd_dir).state_dict()
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in trained.values())
    assert any(not torch.equal(trained[k], initial[k]) for k in trained)


def test_paper_freeze_leaves_last_encoder_block_and_middle_untouched(tiny_sd_dir, tmp_path):
    out = tmp_path / "frozen"
    result = run_script([PYTHON, "meta_train.py", *meta_train_args(
        tiny_sd_dir, out, "meta.max_meta_steps=2", "freeze.inner=paper", "freeze.outer=paper")])  # fmt: skip
    assert "inner train" in result.stderr and "mid_block" in result.stderr  # the start-up table
    trained, initial = _weights(out), _initial_controlnet(tiny_sd_dir).state_dict()
    frozen = [k for k in trained if k.startswith(("down_blocks.1.", "mid_block."))]
    assert frozen
    assert all(torch.equal(trained[k], initial[k]) for k in frozen)
    assert any(not torch.equal(trained[k], initial[k]) for k in trained if k.startswith("controlnet_down_blocks"))


def test_partial_adaptation_moves_only_the_condition_embedding_and_zero_convs(tiny_sd_dir, tmp_path):
    """ANIL / CAVIA-style partial adaptation (``embedding_and_zero_convs``): the inner loop and the outer step
    change the condition's embedding and the zero convolutions, every other weight stays as it started."""
    out = tmp_path / "partial"
    run_script([PYTHON, "meta_train.py", *meta_train_args(tiny_sd_dir, out, "meta.max_meta_steps=2",
                                                          "freeze.inner=embedding_and_zero_convs",
                                                          "freeze.outer=embedding_and_zero_convs")])
    trained, initial = _weights(out), _initial_controlnet(tiny_sd_dir).state_dict()
    moved = {k for k in trained if not torch.equal(trained[k], initial[k])}
    adapted = ("controlnet_cond_embedding.", "controlnet_down_blocks.", "controlnet_mid_block.")
    assert moved and all(k.startswith(adapted) for k in moved)
    assert any(k.startswith("controlnet_cond_embedding.") for k in moved)


def test_bf16_run_starts_from_the_fp32_unet_bit_for_bit(tiny_sd_dir, tmp_path):
    """The ControlNet is copied from the UNet before the base is cast to bf16, not from a rounded copy."""
    from accelerate.state import AcceleratorState
    from diffusers import UNet2DConditionModel

    from metacontrol.config import MetaTrainConfig
    from metacontrol.config_loader import load_config
    from metacontrol.run import set_up_run

    cfg = load_config(MetaTrainConfig, None, meta_train_args(tiny_sd_dir, tmp_path / "o", "mixed_precision=bf16"))
    try:
        run = set_up_run(cfg)
    finally:
        AcceleratorState._reset_state(True)
    assert run.base.denoiser.dtype == torch.bfloat16
    assert run.base.vae.dtype == run.base.text_encoder.dtype == torch.float32  # encoders: fp32, cache-stable

    built = run.controlnet.state_dict()
    unet = UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet").state_dict()  # fp32
    copied = [k for k in built if k in unet]  # the encoder, time embedding and conv_in that from_unet copies
    assert len(copied) > len(built) // 2
    assert all(built[k].dtype == torch.float32 and torch.equal(built[k], unet[k]) for k in copied)


def test_meta_training_lowers_the_loss_on_its_tasks(reference_run, tiny_sd_dir):
    """The ControlNet loss on the tasks' own scenes, same batches and noise, before and after 6 Reptile steps."""
    from diffusers import ControlNetModel

    from metacontrol.data.pools import synthetic_pools
    from metacontrol.models.base import load_base_model
    from metacontrol.objective import ControlNetObjective
    from metacontrol.world import WorldConfig

    base = load_base_model(str(tiny_sd_dir)).freeze()
    pools = synthetic_pools(WorldConfig(resolution=32), ["canny", "hed", "depth", "pose"], 8, show_progress=False)

    @torch.no_grad()
    def mean_loss(controlnet) -> float:
        objective = ControlNetObjective(base, controlnet.eval())
        return sum(float(objective.loss(pool.batch(range(8)), torch.Generator().manual_seed(seed)))
                   for pool in pools.values() for seed in range(4)) / (4 * len(pools))

    before, after = mean_loss(_initial_controlnet(tiny_sd_dir)), mean_loss(ControlNetModel.from_pretrained(reference_run))
    assert after < before, (before, after)


def test_bf16_under_accelerate_launch_trains_and_says_which_precision_applies(tiny_sd_dir, tmp_path):
    """`accelerate launch` announces mixed precision 'no' (its default); the config's bf16 is what runs, and
    the log says so once, without diffusers' empty "should be kept in float32: []" warnings."""
    out = tmp_path / "bf16"
    result = run_script([*ACCELERATE_LAUNCH, "meta_train.py", *meta_train_args(
        tiny_sd_dir, out, "meta.max_meta_steps=2", "mixed_precision=bf16")])  # fmt: skip
    assert "mixed precision: bf16 (the config's mixed_precision; accelerate launch's 'no' does not apply)" \
        in result.stderr
    assert "kept in float32" not in result.stderr
    assert "mixed precision | bf16 |" in (out / "README.md").read_text()
    trained, initial = _weights(out), _initial_controlnet(tiny_sd_dir).state_dict()
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in trained.values())
    assert any(not torch.equal(trained[k], initial[k]) for k in trained if k.startswith("controlnet_down_blocks"))
