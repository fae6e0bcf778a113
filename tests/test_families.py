"""Model families on tiny random-weight bases: the family read from model_index.json, prompt encodings and added
conditions equal to what the family's own diffusers pipeline computes, and meta-training (Reptile and joint, 1 and
2 processes), fine-tuning (full and LoRA), evaluation and reloading in the family's ControlNet pipeline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from metacontrol.config_loader import ConfigError
from metacontrol.families import FAMILIES
from metacontrol.models.base import load_base_model
from tests.conftest import PYTHON, finetune_args, meta_train_args, run_script, torchrun
from tests.test_meta_train import _assert_same_weights

PROMPTS = ["a red ball in front of a blue wall", "a green cube on a gray floor"]


def test_the_family_comes_from_model_index_and_a_missing_part_is_named(tiny_sd_dir, tiny_sdxl_dir, tmp_path):
    assert load_base_model(str(tiny_sd_dir)).family.name == "sd"
    assert load_base_model(str(tiny_sdxl_dir)).family.name == "sdxl"
    other = shutil.copytree(tiny_sd_dir, tmp_path / "other")
    index = json.loads((other / "model_index.json").read_text())
    (other / "model_index.json").write_text(json.dumps({**index, "_class_name": "KandinskyPipeline"}))
    with pytest.raises(ConfigError, match=r"is a KandinskyPipeline; metacontrol trains ControlNets for "
                                          r"StableDiffusionPipeline \(sd\), StableDiffusionXLPipeline \(sdxl\)"):
        load_base_model(str(other))
    partial = shutil.copytree(tiny_sdxl_dir, tmp_path / "partial")
    shutil.rmtree(partial / "text_encoder_2")
    with pytest.raises(ConfigError, match="lacks text_encoder_2; expected a diffusers StableDiffusionXLPipeline"):
        load_base_model(str(partial))


def test_sdxl_encodings_and_time_ids_are_the_pipelines(tiny_sdxl_dir):
    from metacontrol.pipelines import base_pipeline

    base = load_base_model(str(tiny_sdxl_dir)).freeze()
    pipe = base_pipeline(base)
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    embeds = base.encode_prompts(PROMPTS)
    prompt_embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
    torch.testing.assert_close(embeds["text_embeds"], prompt_embeds, rtol=0, atol=0)
    torch.testing.assert_close(embeds["pooled_text_embeds"], pooled, rtol=0, atol=0)
    added = base.family.added_conditions(embeds, (32, 48), torch.float32)["added_cond_kwargs"]
    expected = pipe._get_add_time_ids((32, 48), (0, 0), (32, 48), torch.float32,
                                      text_encoder_projection_dim=pooled.shape[-1])
    torch.testing.assert_close(added["time_ids"], expected.repeat(2, 1), rtol=0, atol=0)
    torch.testing.assert_close(added["text_embeds"], pooled, rtol=0, atol=0)


@pytest.fixture(scope="module")
def sdxl_runs(tiny_sdxl_dir, tmp_path_factory) -> Path:
    """Reptile (1 and 2 processes) and joint meta-training, then full and LoRA fine-tuning of the Reptile start."""
    root = tmp_path_factory.mktemp("sdxl")
    steps = ["meta.max_meta_steps=2", "checkpointing_steps=2"]
    run_script([PYTHON, "meta_train.py", *meta_train_args(tiny_sdxl_dir, root / "reptile", *steps)])
    run_script(torchrun("meta_train.py", *meta_train_args(tiny_sdxl_dir, root / "reptile-2", *steps,
                                                          "dataloader_num_workers=1"), nproc=2),
               env={"ACCELERATE_USE_CPU": "1"})
    run_script([PYTHON, "meta_train.py", *meta_train_args(tiny_sdxl_dir, root / "joint", *steps, "meta.algorithm=joint")])
    start = f"controlnet_model_name_or_path={root / 'reptile'}"
    for mode in ("full", "lora"):
        run_script(finetune_args(tiny_sdxl_dir, root / mode, start, f"mode={mode}", "max_train_steps=2",
                                 f"cache_dir={root / 'cache'}"))
    return root


def test_sdxl_two_processes_equal_one(sdxl_runs):
    _assert_same_weights(sdxl_runs / "reptile-2", sdxl_runs / "reptile")


@pytest.mark.parametrize("run", ["reptile", "joint", "full", "lora"])
def test_sdxl_results_load_in_the_sdxl_controlnet_pipeline_and_make_an_image(sdxl_runs, tiny_sdxl_dir, run):
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline

    folder = sdxl_runs / run
    card = (folder / "README.md").read_text()
    assert "StableDiffusionXLControlNetPipeline.from_pretrained" in card and "safety_checker" not in card
    controlnet = ControlNetModel.from_pretrained(folder)
    assert controlnet.config.addition_embed_type == "text_time"
    initial = ControlNetModel.from_pretrained(sdxl_runs / "reptile") if run in ("full", "lora") else None
    if initial is not None:  # fine-tuning moved the weights it started from
        assert any(not torch.equal(a, b) for a, b in zip(controlnet.parameters(), initial.parameters()))
    pipe = StableDiffusionXLControlNetPipeline.from_pretrained(tiny_sdxl_dir, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(PROMPTS[0], image=torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)),
                 num_inference_steps=2, height=32, width=32, output_type="np").images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()


def test_sdxl_evaluates_and_a_zero_controlnet_is_the_floor(sdxl_runs, tiny_sdxl_dir):
    from metacontrol.controlnet import create_controlnet
    from metacontrol.eval.harness import EvalSettings, Evaluator, synthetic_eval_sets
    from metacontrol.world import WorldConfig

    base = load_base_model(str(tiny_sdxl_dir))
    standard = create_controlnet(base.unet, base.vae_scale_factor).eval()  # zero convolutions: adds nothing
    base.freeze()
    settings = EvalSettings(num_samples=2, num_inference_steps=2, batch_size=2)
    evaluator = Evaluator(base, synthetic_eval_sets(["canny"], WorldConfig(resolution=32), settings), settings)
    scores, _ = evaluator.evaluate_samples(standard, "canny")
    for metric, values in evaluator.floor_scores("canny").items():
        np.testing.assert_allclose(scores[metric], values, atol=1e-6, err_msg=metric)


def test_every_family_names_its_parts():
    for name, family in FAMILIES.items():
        assert family.pipeline_class == name and family.components[:2] == ("vae", "unet")
        assert family.text_keys[0] == "text_embeds"
