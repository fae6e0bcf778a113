"""train/finetune.py end to end on the tiny random model: real subprocesses, real files, real pipelines."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.conftest import REPO, finetune_args, run_script, torchrun
from tests.test_captions import caption_folder

WEIGHTS = "diffusion_pytorch_model.safetensors"
PROMPT = "a red ball in front of a blue wall on a gray floor"


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / WEIGHTS))


def _card_row(folder: Path, row: str) -> str:
    match = re.search(rf"^\| {row} \| (.*) \|$", (folder / "README.md").read_text(), re.MULTILINE)
    assert match, f"no {row!r} row in {folder / 'README.md'}"
    return match.group(1)


def _generate(tiny_sd_dir: Path, folder: Path) -> np.ndarray:
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        tiny_sd_dir, controlnet=ControlNetModel.from_pretrained(folder), safety_checker=None)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, image=torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)),
                num_inference_steps=2, height=32, width=32, output_type="np").images


def test_output_folder_is_named_after_condition_and_mode():
    """A LoRA run after the README's full one must not overwrite it; an explicit output_dir still wins."""
    from metacontrol.config import FinetuneConfig
    from metacontrol.config_loader import load_config

    config = REPO / "configs/finetune_tiny.yaml"
    assert load_config(FinetuneConfig, config).output_dir == "outputs/finetune-normal-full"
    assert load_config(FinetuneConfig, config, ["mode=lora", "condition=seg"]).output_dir == "outputs/finetune-seg-lora"
    assert load_config(FinetuneConfig, config, ["mode=lora", "output_dir=elsewhere"]).output_dir == "elsewhere"


def test_image_folder_caches_next_to_the_data_and_reads_caption_column(tiny_sd_dir, tmp_path):
    """Run from another folder: nothing may land in it (the shots are a Subset of the folder's dataset)."""
    from metacontrol.data.datasets import CACHE_FOLDER

    folder = caption_folder(tmp_path / "photos", ["an astronaut", "a red ball"] * 4, key="prompt")
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    python, script, *overrides = finetune_args(tiny_sd_dir, tmp_path / "out", "source=imagefolder",
                                               f"train_data_dir={folder}", "caption_column=prompt", "max_train_steps=2")
    result = run_script([python, str(REPO / script), "--config", str(REPO / "configs/finetune_tiny.yaml"), *overrides],
                        cwd=workdir)  # fmt: skip
    assert list(workdir.iterdir()) == []
    assert len(list((folder / CACHE_FOLDER / "encodings").glob("*/index.json"))) == 1
    assert "4 of 8 captions of normal contain words unknown to the tokenizer (e.g. 'astronaut')" in result.stderr


@pytest.fixture(scope="module")
def full_run(tiny_sd_dir, tmp_path_factory) -> Path:
    """Full fine-tuning from the standard init: 30 steps at a high learning rate, so learning shows."""
    out = tmp_path_factory.mktemp("full")
    run_script(finetune_args(tiny_sd_dir, out, "max_train_steps=30", "learning_rate=2e-3", "save_steps=[1,2]",
                             "checkpointing_steps=15", "checkpoints_total_limit=2"))  # fmt: skip
    return out


def test_full_mode_learns_and_runs_in_the_pipeline(full_run, tiny_sd_dir):
    from diffusers import ControlNetModel

    from metacontrol.controlnet import create_controlnet
    from metacontrol.data.pools import synthetic_pools
    from metacontrol.models.base import load_base_model
    from metacontrol.objective import ControlNetObjective
    from metacontrol.world import WorldConfig

    image = _generate(tiny_sd_dir, full_run)
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()
    assert _card_row(full_run, "initialisation").startswith("from_unet")
    assert (_card_row(full_run, "condition"), _card_row(full_run, "mode")) == ("normal", "full")
    assert _card_row(full_run, "steps") == "30 of 30" and _card_row(full_run, "shots").startswith("8 ")

    # The loss on all 8 shots, averaged over 4 noise draws, before (any from_unet init: its zero
    # convolutions make it the plain UNet) and after fine-tuning.
    base = load_base_model(str(tiny_sd_dir)).freeze()
    pool = synthetic_pools(WorldConfig(resolution=32), ["normal"], 8, "train", show_progress=False)["normal"]
    batch = pool.batch(range(8))
    initial = create_controlnet(load_base_model(str(tiny_sd_dir)))

    @torch.no_grad()
    def mean_loss(controlnet) -> float:
        objective = ControlNetObjective(base, controlnet.eval())
        return sum(objective.loss(batch, torch.Generator().manual_seed(s)).item() for s in range(4)) / 4

    before, after = mean_loss(initial), mean_loss(ControlNetModel.from_pretrained(full_run))
    assert after < 0.95 * before, (before, after)  # measured: 1.10 -> 0.95


def test_save_steps_and_resume(full_run, tiny_sd_dir, tmp_path):
    from diffusers import ControlNetModel

    step1, step2, final = (_weights(full_run / name) for name in ("step-1", "step-2", "."))
    for name in ("step-1", "step-2"):
        ControlNetModel.from_pretrained(full_run / name)
    assert _card_row(full_run / "step-2", "steps") == "2 of 30"
    assert any(not torch.equal(step1[k], step2[k]) for k in step1)
    assert any(not torch.equal(step2[k], final[k]) for k in step2)

    # Batches and noise are functions of (seed, step): resuming at step 15 elsewhere gives the same weights,
    # also with the batches read ahead by a DataLoader worker.
    out = tmp_path / "resumed"
    run_script(finetune_args(tiny_sd_dir, out, "max_train_steps=30", "learning_rate=2e-3", "dataloader_num_workers=1",
                             f"resume_from_checkpoint={full_run / 'checkpoint-15'}"))  # fmt: skip
    resumed = _weights(out)
    assert all(torch.equal(resumed[k], final[k]) for k in final)


def test_starts_from_the_given_controlnet(full_run, tiny_sd_dir, tmp_path):
    out = tmp_path / "zero-steps"
    run_script(finetune_args(tiny_sd_dir, out, "max_train_steps=0",
                             f"controlnet_model_name_or_path={full_run}"))  # fmt: skip
    given, saved = _weights(full_run), _weights(out)
    assert given.keys() == saved.keys() and all(torch.equal(given[k], saved[k]) for k in given)
    assert _card_row(out, "initialisation") == str(full_run)


def test_lora_trains_adapters_and_zero_convs_and_saves_merged(full_run, tiny_sd_dir, tmp_path):
    from diffusers import ControlNetModel
    from peft import PeftModel

    out = tmp_path / "lora"
    run_script(finetune_args(tiny_sd_dir, out, "mode=lora", "lora_rank=2", "learning_rate=2e-3",
                             f"controlnet_model_name_or_path={full_run}"))  # fmt: skip
    adapter = json.loads((out / "lora" / "adapter_config.json").read_text())
    assert (out / "lora" / "adapter_model.safetensors").is_file()
    image = _generate(tiny_sd_dir, out)
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()

    init, merged = _weights(full_run), _weights(out)
    assert init.keys() == merged.keys()
    changed = {k for k in init if not torch.equal(init[k], merged[k])}
    layer = {k: k.rsplit(".", 1)[0] for k in init}
    with_lora = {k for k in init if re.fullmatch(adapter["target_modules"], layer[k])}
    lora_weights = {k for k in with_lora if k.endswith(".weight")}  # LoRA leaves biases alone
    fully_trained = {k for k in init if layer[k] in adapter["modules_to_save"]}
    assert changed <= lora_weights | fully_trained, sorted(changed - lora_weights - fully_trained)
    assert changed & lora_weights
    assert changed & {k for k in fully_trained if k.startswith("controlnet_down_blocks")}
    assert "controlnet_cond_embedding.conv_out.weight" in fully_trained

    def trainable(folder: Path) -> int:
        return int(_card_row(folder, "trainable parameters").split(" of ")[0].replace(",", ""))

    assert trainable(out) < 0.25 * trainable(full_run)
    # Its checkpoint holds what trains (adapters, zero convolutions), not the whole ControlNet.
    with safe_open(str(out / "checkpoint-4" / "trained_parameters.safetensors"), "pt") as f:
        assert sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys()) == trainable(out)
    # The adapter applied to the initialisation is the merged folder.
    reloaded = PeftModel.from_pretrained(ControlNetModel.from_pretrained(full_run), out / "lora")
    reloaded = reloaded.merge_and_unload()
    for key, value in reloaded.state_dict().items():
        torch.testing.assert_close(value, merged[key], rtol=0, atol=1e-6, msg=key)


def _foreign_controlnet(tiny_sd_dir: Path, folder: Path) -> Path:
    """A ControlNet made for a UNet with another text width."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    config = dict(UNet2DConditionModel.load_config(tiny_sd_dir, subfolder="unet"), cross_attention_dim=24)
    ControlNetModel.from_unet(UNet2DConditionModel.from_config(config),
                              conditioning_embedding_out_channels=(16, 32, 96)).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("case", ["too_few_images", "foreign_controlnet"])
def test_bad_input_fails_before_training(case, tiny_sd_dir, tmp_path):
    out = tmp_path / "out"
    if case == "too_few_images":
        folder = caption_folder(tmp_path / "photos", ["a ball"] * 3)
        overrides, expected = ["source=imagefolder", f"train_data_dir={folder}"], [str(folder), "shots"]
    else:
        folder = _foreign_controlnet(tiny_sd_dir, tmp_path / "foreign")
        overrides = [f"controlnet_model_name_or_path={folder}"]
        expected = [str(folder), "cross_attention_dim"]
    result = run_script(finetune_args(tiny_sd_dir, out, *overrides), check=False)
    assert result.returncode != 0
    assert all(word in result.stderr for word in expected), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (out / WEIGHTS).exists() and not list(out.glob("checkpoint-*"))


def test_non_finite_loss_names_step_and_samples(full_run, tiny_sd_dir, tmp_path):
    result = run_script(finetune_args(tiny_sd_dir, tmp_path / "nan", "learning_rate=1e30", "max_grad_norm=0",
                                      f"controlnet_model_name_or_path={full_run}"), check=False)  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr
    message = re.search(r"finetune: loss is \S+ at step \d+, condition 'normal', sample indices \[", result.stderr)
    assert message, result.stderr[-2000:]


def test_two_processes_train_and_all_stop_at_a_nan_without_waiting(tiny_sd_dir, tmp_path):
    """Under torchrun (gloo) each process draws its own batch; DDP averages. A NaN stops every process at the
    same step, each saying where, instead of leaving one waiting in the next collective."""
    args = finetune_args(tiny_sd_dir, tmp_path / "two", "validation_steps=2", "num_validation_images=1",
                         "validation_inference_steps=2")[1:]
    run_script(torchrun(*args, nproc=2), env={"ACCELERATE_USE_CPU": "1"})
    assert _card_row(tmp_path / "two", "optimiser").endswith("batch 4 x 2 process(es)")
    assert sorted(p.name for p in (tmp_path / "two" / "validation").iterdir()) == ["step-000002.png", "step-000004.png"]

    nan = finetune_args(tiny_sd_dir, tmp_path / "nan", "learning_rate=1e30", "max_grad_norm=0")[1:]
    result = run_script(torchrun(*nan, nproc=2), env={"ACCELERATE_USE_CPU": "1"}, check=False, timeout=120)
    assert result.returncode != 0
    stops = re.findall(r"finetune: loss is \S+ at step (\d+), condition 'normal', sample indices \[[\d, ]+\] "
                       r"\(process (\d)\)", result.stderr)  # the two may share a line of stderr
    assert sorted(process for _, process in stops) == ["0", "1"] and len({step for step, _ in stops}) == 1, \
        result.stderr[-3000:]


def test_bf16_with_validation_runs_to_its_end_and_saves(tiny_sd_dir, tmp_path):
    """The validation pipeline gets the ControlNet without accelerate's fp32 output wrapper, so its residuals
    meet the bf16 UNet in bf16 (with the wrapper: "mixed dtype (CPU)" at the first validation)."""
    out = tmp_path / "bf16"
    run_script(finetune_args(tiny_sd_dir, out, "mixed_precision=bf16", "validation_steps=2", "num_validation_images=1",
                             "validation_inference_steps=2"))  # fmt: skip
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step-000002.png", "step-000004.png"]
    assert _card_row(out, "mixed precision") == "bf16"
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in _weights(out).values())
