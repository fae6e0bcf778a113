"""train/pretrain_base.py with a tiny model: it writes outputs/, not the shipped checkpoints/tiny-sd, unless asked;
its work_dir resumes only the configuration that made its files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from metacontrol.config_loader import ConfigError, load_config
from metacontrol.scripts.pretrain_base import PretrainConfig, claim_work_dir
from tests.conftest import PYTHON, REPO, TINY_TEST_MODEL, run_script

# Seconds-long: 64 scenes at 32 px, the test-sized model, 2 steps per stage (configs/pretrain_tiny.yaml otherwise).
TINY = [
    "num_images=64", "world.resolution=32", *(f"model.{k}={json.dumps(v)}" for k, v in TINY_TEST_MODEL.items()),
    *(f"{stage}.{key}" for stage in ("vae", "unet")
      for key in ("max_train_steps=2", "train_batch_size=4", "lr_warmup_steps=0", "checkpointing_steps=1")),
]  # fmt: skip
SCRIPT = [PYTHON, str(REPO / "train/pretrain_base.py")]


def unet_weights(pipeline: Path) -> bytes:
    return (pipeline / "unet/diffusion_pytorch_model.safetensors").read_bytes()


def test_default_output_is_not_the_shipped_model_and_a_work_dir_keeps_its_configuration(tmp_path):
    """From a folder with no checkpoints/: the defaults write outputs/; asking for checkpoints/tiny-sd resumes the
    same work (only output_dir and num_threads differ); another num_images stops in one line, touching nothing."""
    run_script([*SCRIPT, *TINY], cwd=tmp_path)
    assert (tmp_path / "outputs/tiny-sd/model_index.json").is_file()
    assert not (tmp_path / "checkpoints").exists()
    work = tmp_path / "outputs/pretrain"
    record = (work / "config.yaml").read_text()
    assert yaml.safe_load(record)["num_images"] == 64

    asked = run_script([*SCRIPT, *TINY, "output_dir=checkpoints/tiny-sd", "num_threads=2"], cwd=tmp_path)
    assert "vae: resumed at step 2" in asked.stderr and "unet: resumed at step 2" in asked.stderr
    assert unet_weights(tmp_path / "checkpoints/tiny-sd") == unet_weights(tmp_path / "outputs/tiny-sd")

    stale = run_script([*SCRIPT, *TINY, "num_images=128"], cwd=tmp_path, check=False)
    assert stale.returncode == 1
    assert stale.stderr.strip().splitlines() == [
        "pretrain_base: configuration error: work_dir: outputs/pretrain holds files made with num_images=64, "
        "this run has num_images=128; use another work_dir or delete it"]
    assert np.load(work / "images.npy").shape[0] == 64 and (work / "config.yaml").read_text() == record


@pytest.mark.parametrize("overrides, difference", [
    (["world.resolution=64", "model.resolution=64"], "world.resolution=32, this run has world.resolution=64"),
    (["model.unet_channels=[16, 16]"], "model.unet_channels=[16, 32], this run has model.unet_channels=[16, 16]"),
    (["unet.learning_rate=1e-4"], "unet.learning_rate=0.0005, this run has unet.learning_rate=0.0001"),
    (["seed=1"], "seed=0, this run has seed=1"),
])  # fmt: skip
def test_the_first_differing_key_is_named(tmp_path, overrides, difference):
    tiny = [*TINY, f"work_dir={tmp_path}", f"output_dir={tmp_path / 'out'}"]
    claim_work_dir(load_config(PretrainConfig, REPO / "configs/pretrain_tiny.yaml", tiny), tmp_path)
    same = load_config(PretrainConfig, REPO / "configs/pretrain_tiny.yaml", [*tiny, "output_dir=elsewhere"])
    claim_work_dir(same, tmp_path)  # where the result goes shapes nothing in work_dir
    changed = load_config(PretrainConfig, REPO / "configs/pretrain_tiny.yaml", [*tiny, *overrides])
    with pytest.raises(ConfigError) as err:
        claim_work_dir(changed, tmp_path)
    assert str(err.value) == (f"work_dir: {tmp_path} holds files made with {difference}; "
                              "use another work_dir or delete it")


def test_the_shipped_config_writes_outputs():
    assert load_config(PretrainConfig).output_dir == "outputs/tiny-sd"
    assert load_config(PretrainConfig, REPO / "configs/pretrain_tiny.yaml").output_dir == "outputs/tiny-sd"
