"""Bad configurations fail before training starts, with errors that name what to fix."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from accelerate.state import AcceleratorState

from metacontrol.config_loader import ConfigError
from metacontrol.meta.episodes import TaskSampler
from metacontrol.scripts import meta_train
from tests.conftest import REPO, meta_train_args


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    yield
    AcceleratorState._reset_state(True)


def _run(tiny_sd_dir, tmp_path, *overrides):
    return meta_train.main(["--config", "configs/meta_tiny.yaml", *meta_train_args(tiny_sd_dir, tmp_path / "o", *overrides)])


def test_resolution_not_divisible_by_vae_factor(tiny_sd_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"resolution: 30 is not divisible .* factor 4"):
        _run(tiny_sd_dir, tmp_path, "resolution=30")


def test_missing_base_model_folder(tiny_sd_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"base model folder .*nowhere does not exist"):
        _run(tiny_sd_dir, tmp_path, f"pretrained_model_name_or_path={tmp_path / 'nowhere'}")


@pytest.mark.parametrize(("location", "message"), [
    ("checkpoints/tiny-sdd", "checkpoints/tiny-sdd does not exist; did you mean checkpoints/tiny-sd?"),  # org = folder
    ("tiny-sd", "tiny-sd does not exist"),  # not org/name
    ("./org/name", "./org/name does not exist"),
    ("~/org/name/", "~/org/name/ does not exist"),
    ("org\\name", "org\\name does not exist"),
])  # fmt: skip
def test_local_looking_paths_that_do_not_exist_never_reach_the_hub(location, message, monkeypatch):
    from metacontrol.models.base import local_folder

    monkeypatch.chdir(REPO)
    with pytest.raises(ConfigError, match=re.escape(f"ControlNet folder {message}")):
        local_folder(location, "ControlNet folder")
    assert local_folder("lllyasviel/sd-controlnet-canny", "ControlNet folder") is None  # a Hub id
    assert local_folder("checkpoints/tiny-sd", "base model folder") == Path("checkpoints/tiny-sd")


def test_missing_controlnet_folder(tiny_sd_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"ControlNet folder .*nowhere does not exist"):
        _run(tiny_sd_dir, tmp_path, f"controlnet_model_name_or_path={tmp_path / 'nowhere'}")


def test_base_model_folder_without_unet(tiny_sd_dir, tmp_path):
    partial = tmp_path / "partial"
    (partial / "vae").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"lacks unet"):
        _run(tiny_sd_dir, tmp_path, f"pretrained_model_name_or_path={partial}")


def test_controlnet_for_another_base_model(tiny_sd_dir, tmp_path):
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet")
    other = UNet2DConditionModel.from_config({**unet.config, "cross_attention_dim": 24})
    ControlNetModel.from_unet(other, conditioning_embedding_out_channels=(16, 32, 96)).save_pretrained(tmp_path / "cn")
    with pytest.raises(ConfigError, match=r"cross_attention_dim: ControlNet has 24, base UNet has 16"):
        _run(tiny_sd_dir, tmp_path, f"controlnet_model_name_or_path={tmp_path / 'cn'}")


def test_freeze_pattern_matching_nothing(tiny_sd_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"freeze.inner: pattern 'down_blocks.7.\*' matches no ControlNet parameter"):
        _run(tiny_sd_dir, tmp_path, "freeze.inner=[down_blocks.7.*]")


def test_unknown_algorithm_names_key_and_choices(tiny_sd_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"meta.algorithm: 'maml' is not allowed; expected one of 'reptile'"):
        _run(tiny_sd_dir, tmp_path, "meta.algorithm=maml")


def test_tasks_must_split_evenly_over_processes():
    with pytest.raises(ConfigError, match=r"tasks_per_meta_step \(3\) must be a multiple of the number of processes \(2\)"):
        TaskSampler(tasks=["canny", "hed"], pool_sizes={"canny": 8, "hed": 8}, tasks_per_step=3, inner_steps=1,
                    support_batch_size=2, query_batch_size=2, num_processes=2)


def test_sampler_processes_partition_the_single_process_episodes():
    sizes = {t: 32 for t in ("canny", "hed", "depth", "pose")}
    shape = dict(tasks=list(sizes), pool_sizes=sizes, tasks_per_step=4, inner_steps=3, support_batch_size=4,
                 query_batch_size=4, seed=7)
    one = TaskSampler(**shape)
    two = [TaskSampler(**shape, process_index=i, num_processes=2) for i in (0, 1)]
    for step in range(5):
        merged = sorted(two[0].episodes(step) + two[1].episodes(step), key=lambda e: e.slot)
        assert merged == one.episodes(step)
        assert sorted(one.tasks_for_step(step)) == sorted(sizes)  # a full round of distinct tasks per step
        for e in one.episodes(step):
            assert not set(e.query) & {i for b in e.support for i in b}  # query disjoint from support


def test_resuming_from_an_incomplete_checkpoint_names_what_is_missing(tmp_path):
    from metacontrol.checkpointing import resolve_resume_path

    checkpoint = tmp_path / "checkpoint-3"
    checkpoint.mkdir()
    (checkpoint / "trained_parameters.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"checkpoint-3 is not a complete checkpoint \(no optimizer.safetensors, "
                                          r"training_state.json\)"):
        resolve_resume_path(str(checkpoint), tmp_path)
    assert resolve_resume_path("latest", tmp_path) is None  # skipped, with a warning naming it
