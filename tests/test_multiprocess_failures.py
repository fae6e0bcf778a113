"""A failure on one process stops every process within that step, each with its one line: never a hang.

Two gloo processes under torchrun, each rank's stderr in its own file; every run has a timeout, so a
deadlock fails the test instead of stalling the suite.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metacontrol.meta.episodes import TaskSampler
from tests.conftest import REPO, meta_train_args, rank_stderr, script_env, torchrun

TASKS = ["canny", "depth"]
TIMEOUT = 240


def _task_folders(root: Path, maps: dict[str, int], count: int = 8) -> Path:
    """One image folder per task with precomputed condition maps of one grey level each (no annotator)."""
    rng = np.random.default_rng(0)
    for task, level in maps.items():
        folder = root / task
        folder.mkdir(parents=True)
        lines = []
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
            Image.fromarray(np.full((32, 32, 3), level, np.uint8)).save(folder / f"{i}_map.png")
            lines.append(json.dumps({"file_name": f"{i}.png", "text": "a red ball",
                                     "conditioning_file_name": f"{i}_map.png"}))
        (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _seed_giving_rank_1(task: str) -> int:
    """A run seed whose first meta-step gives ``task`` to slot 1, the second process's."""
    def first_tasks(seed: int) -> list[str]:
        return TaskSampler(tasks=TASKS, pool_sizes=dict.fromkeys(TASKS, 8), tasks_per_step=2, inner_steps=1,
                           support_batch_size=2, query_batch_size=2, seed=seed).tasks_for_step(0)

    return next(seed for seed in range(100) if first_tasks(seed)[1] == task)


def _launch(args: list[str], log_dir: Path) -> subprocess.Popen:
    return subprocess.Popen(torchrun("meta_train.py", *args, nproc=2, log_dir=log_dir), cwd=REPO,
                            env=script_env({"ACCELERATE_USE_CPU": "1"}), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, log_dir: Path) -> dict[int, list[str]]:
    """Wait (a hang fails the test); the one-line messages (``meta_train: ...``) each rank printed."""
    try:
        proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"the run hung: {rank_stderr(log_dir)}")
    assert proc.returncode != 0
    logs = rank_stderr(log_dir)
    assert sorted(logs) == [0, 1]
    for rank, text in logs.items():
        assert "Traceback" not in text, f"rank {rank}:\n{text[-3000:]}"
    return {rank: [line for line in re.split(r"[\r\n]", text) if line.startswith("meta_train:")]
            for rank, text in logs.items()}


@pytest.fixture(scope="module")
def exploding_start(tiny_sd_dir, tmp_path_factory) -> Path:
    """A ControlNet whose condition encoder overflows on a white map (weights 1e38) and not on a black one:
    the task with white maps has a NaN loss, the other trains."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    controlnet = ControlNetModel.from_unet(UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet"),
                                           conditioning_embedding_out_channels=(16, 32, 96))
    with torch.no_grad():
        controlnet.controlnet_cond_embedding.conv_in.weight.fill_(1e38)
    path = tmp_path_factory.mktemp("exploding")
    controlnet.save_pretrained(path)
    return path


@pytest.mark.parametrize("algorithm", ["reptile", "fomaml", "joint"])
def test_a_nan_on_rank_1_stops_both_processes(algorithm, tiny_sd_dir, exploding_start, tmp_path):
    data = _task_folders(tmp_path / "data", {"canny": 0, "depth": 255})
    args = meta_train_args(tiny_sd_dir, tmp_path / "out", "data.source=imagefolder", f"data.train_data_dir={data}",
                           "data.tasks=[canny, depth]", f"controlnet_model_name_or_path={exploding_start}",
                           f"seed={_seed_giving_rank_1('depth')}", f"meta.algorithm={algorithm}")
    lines = _finish(_launch(args, tmp_path / "logs"), tmp_path / "logs")
    assert len(lines[1]) == 1 and re.match(r"meta_train: loss is nan at meta-step 0, task 'depth'", lines[1][0]), lines
    assert lines[0] == ["meta_train: stopped at meta-step 0: process 1 failed there (see its message)"]
    assert not list((tmp_path / "out").glob("checkpoint-*"))


def test_a_bad_sample_read_during_training_stops_both_processes(tiny_sd_dir, tmp_path):
    """A file of one task breaks after start-up (the data is read lazily, batch by batch, here by a DataLoader
    worker): whichever process reads it next says so in one line, the other stops in the same meta-step."""
    data = _task_folders(tmp_path / "data", {"canny": 0, "depth": 0})
    out = tmp_path / "out"
    proc = _launch(meta_train_args(tiny_sd_dir, out, "data.source=imagefolder", f"data.train_data_dir={data}",
                                   "data.tasks=[canny, depth]", "meta.max_meta_steps=100000", "checkpointing_steps=1",
                                   "cache=none", "dataloader_num_workers=1"), tmp_path / "logs")  # fmt: skip
    deadline = time.monotonic() + TIMEOUT
    while not list(out.glob("checkpoint-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    for image in (data / "depth").glob("*.png"):
        image.write_bytes(b"\x89PNG truncated")
    lines = _finish(proc, tmp_path / "logs")
    [failed] = [rank for rank, said in lines.items() if any("bad data" in line for line in said)]
    assert len(lines[failed]) == 1 and re.match(r"meta_train: bad data: \S+/depth/\d+(_map)?\.png", lines[failed][0])
    [stopped] = lines[1 - failed]
    assert re.fullmatch(rf"meta_train: stopped at meta-step \d+: process {failed} failed there \(see its message\)",
                        stopped)


def test_a_failing_validation_on_rank_0_stops_both_processes(tiny_sd_dir, tmp_path):
    """Only rank 0 draws the validation grid; here it cannot write it (``validation`` is a file)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "validation").write_text("not a folder")
    args = meta_train_args(tiny_sd_dir, out, "validation_steps=2", "num_validation_images=1",
                           "validation_inference_steps=1")
    lines = _finish(_launch(args, tmp_path / "logs"), tmp_path / "logs")
    assert len(lines[0]) == 1 and "validation" in lines[0][0], lines
    assert lines[1] == ["meta_train: stopped at the validation of step 2: process 0 failed there (see its message)"]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]  # saved before validating
