"""Model families on tiny random-weight bases (SDXL, SD3, Flux): the family read from model_index.json, prompt
encodings and added conditions equal to what the family's own diffusers pipeline computes, the flow-matching loss
against a hand computation, freezing presets, and meta-training (Reptile and joint; 2 processes == 1 for SDXL and
Flux), fine-tuning (full and LoRA), evaluation and reloading in the family's ControlNet pipeline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from metacontrol.config_loader import ConfigError
from metacontrol.controlnet import create_controlnet
from metacontrol.families import FAMILIES
from metacontrol.models.base import load_base_model
from tests.conftest import PYTHON, finetune_args, meta_train_args, run_script, run_side_by_side, torchrun
from tests.test_meta_train import _assert_same_weights

PROMPTS = ["a red ball in front of a blue wall", "a green cube on a gray floor"]
FAMILY_NAMES = ["sdxl", "sd3", "flux"]
TWO_PROCESSES = {"sdxl", "flux"}  # the multi-process families (SD 1.x: tests/test_meta_train.py)


def test_the_family_comes_from_model_index_and_a_missing_part_is_named(tiny_sd_dir, tiny_family_dir, tmp_path):
    assert load_base_model(str(tiny_sd_dir)).family.name == "sd"
    for name in FAMILY_NAMES:
        assert load_base_model(str(tiny_family_dir(name))).family.name == name
    other = shutil.copytree(tiny_sd_dir, tmp_path / "other")
    index = json.loads((other / "model_index.json").read_text())
    (other / "model_index.json").write_text(json.dumps({**index, "_class_name": "KandinskyPipeline"}))
    with pytest.raises(ConfigError, match=r"is a KandinskyPipeline; metacontrol trains ControlNets for "
                                          r"StableDiffusionPipeline \(sd\), StableDiffusionXLPipeline \(sdxl\)"):
        load_base_model(str(other))
    partial = shutil.copytree(tiny_family_dir("sd3"), tmp_path / "partial")
    shutil.rmtree(partial / "text_encoder_3")
    with pytest.raises(ConfigError, match="lacks text_encoder_3; expected a diffusers StableDiffusion3Pipeline"):
        load_base_model(str(partial))


def _pipeline_encodings(pipe, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token, pooled) prompt encodings as the family's own diffusers pipeline computes them."""
    if name == "flux":
        per_token, pooled, _ = pipe.encode_prompt(PROMPTS, prompt_2=None)
        return per_token, pooled
    out = pipe.encode_prompt(PROMPTS, *([None, None] if name == "sd3" else []), do_classifier_free_guidance=False)
    return out[0], out[2]


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_encodings_are_the_pipelines(tiny_family_dir, name):
    from metacontrol.pipelines import base_pipeline

    base = load_base_model(str(tiny_family_dir(name))).freeze()
    pipe = base_pipeline(base)
    assert type(pipe).__name__ == base.family.pipeline_class
    embeds = base.encode_prompts(PROMPTS)
    per_token, pooled = _pipeline_encodings(pipe, name)
    torch.testing.assert_close(embeds["text_embeds"], per_token, rtol=0, atol=0)
    torch.testing.assert_close(embeds["pooled_text_embeds"], pooled, rtol=0, atol=0)


def test_sdxl_time_ids_are_the_pipelines(tiny_family_dir):
    from metacontrol.pipelines import base_pipeline

    base = load_base_model(str(tiny_family_dir("sdxl"))).freeze()
    embeds = base.encode_prompts(PROMPTS)
    added = base.family.added_conditions(embeds, (32, 48), torch.float32)["added_cond_kwargs"]
    pooled = embeds["pooled_text_embeds"]
    expected = base_pipeline(base)._get_add_time_ids((32, 48), (0, 0), (32, 48), torch.float32,
                                                     text_encoder_projection_dim=pooled.shape[-1])
    torch.testing.assert_close(added["time_ids"], expected.repeat(2, 1), rtol=0, atol=0)
    torch.testing.assert_close(added["text_embeds"], pooled, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_flow_matching_loss_by_hand(tiny_family_dir, name):
    """A fresh ControlNet adds nothing (zero output layers), so the loss is the plain transformer's rectified-flow
    loss: x_t = (1 - s) x_0 + s n, target n - x_0, s and t of the base schedule at u = sigmoid(N(0, 1))."""
    from diffusers import FluxPipeline

    from metacontrol.objective import ControlNetObjective

    base = load_base_model(str(tiny_family_dir(name)))
    controlnet = create_controlnet(base)
    base.freeze()
    torch.manual_seed(0)
    batch = {"latent_mean": torch.randn(2, *((16, 8, 8) if name == "sd3" else (4, 8, 8))),
             "conditioning_pixel_values": torch.rand(2, 3, 32, 32), **base.encode_prompts(PROMPTS)}
    batch["latent_std"] = torch.zeros_like(batch["latent_mean"])  # latents = (mean - shift) * scale exactly
    loss = ControlNetObjective(base, controlnet).loss(batch, torch.Generator().manual_seed(7))

    generator = torch.Generator().manual_seed(7)
    torch.randn(batch["latent_mean"].shape, generator=generator)  # the posterior's draw (std 0: no effect)
    vae, scheduler = base.vae.config, base.noise_scheduler
    x0 = (batch["latent_mean"] - vae.shift_factor) * vae.scaling_factor
    noise = torch.randn(x0.shape, generator=generator)
    index = (torch.sigmoid(torch.randn(2, generator=generator)) * 1000).long()
    sigma = scheduler.sigmas[index].view(-1, 1, 1, 1)
    xt, t = (1 - sigma) * x0 + sigma * noise, scheduler.timesteps[index]
    text, pooled = batch["text_embeds"], batch["pooled_text_embeds"]
    if name == "sd3":
        pred = base.denoiser(hidden_states=xt, timestep=t, encoder_hidden_states=text, pooled_projections=pooled).sample
    else:
        packed = FluxPipeline._pack_latents(xt, 2, 4, 8, 8)
        pred = base.denoiser(hidden_states=packed, timestep=t / 1000, guidance=torch.full((2,), 3.5),
                             encoder_hidden_states=text, pooled_projections=pooled,
                             txt_ids=torch.zeros(text.shape[1], 3),
                             img_ids=FluxPipeline._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32)).sample
        pred = FluxPipeline._unpack_latents(pred, 32, 32, 4)
    expected = torch.nn.functional.mse_loss(pred, noise - x0)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_transformer_presets_freeze_later_blocks_or_all_but_the_zero_layers(tiny_family_dir, name):
    from metacontrol.freezing import frozen_names

    base = load_base_model(str(tiny_family_dir(name)))
    controlnet = create_controlnet(base)
    frozen = frozen_names(controlnet, "later_blocks")
    expected = set()
    for kind in ("transformer_blocks", "single_transformer_blocks"):  # the second half of each kind
        count = len(getattr(controlnet, kind, []))
        expected |= {n for n, _ in controlnet.named_parameters()
                     if n.startswith(f"{kind}.") and int(n.split(".")[1]) >= count // 2}
    assert frozen == expected and frozen
    trained = {n for n, _ in controlnet.named_parameters()} - frozen_names(controlnet, "zero_convs_only")
    assert trained and all(n.startswith(base.family.zero_layers) for n in trained)
    with pytest.raises(ConfigError, match="'paper' is SD's encoder-block preset"):
        frozen_names(controlnet, "paper")


@pytest.mark.parametrize("name", ["sd", *FAMILY_NAMES])
def test_a_pipeline_without_text_encoders_makes_the_same_images_from_the_encoded_prompts(tiny_sd_dir, tiny_family_dir,
                                                                                        name):
    """What ``free_text_encoders`` relies on: the family's pipeline given ``pipeline_embeds`` (computed while the
    encoders were there) and no text encoders makes exactly the images it makes from the prompts."""
    from metacontrol.pipelines import GUIDANCE_SCALE, base_pipeline, controlnet_pipeline, generate

    base = load_base_model(str(tiny_sd_dir if name == "sd" else tiny_family_dir(name)))
    controlnet = create_controlnet(base).eval()
    with torch.no_grad():  # zero layers made non-zero, so that the map steers the image
        for p in controlnet.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    base.freeze()
    maps = [np.random.default_rng(i).integers(0, 256, (32, 32, 3), np.uint8) for i in range(2)]
    torch.manual_seed(0)  # SD3's ControlNet pipeline samples the map's latents from the global generator
    from_prompts = generate(controlnet_pipeline(base, controlnet), PROMPTS, maps, seed=5, steps=2)
    embeds = base.family.pipeline_embeds(base_pipeline(base), PROMPTS, GUIDANCE_SCALE)
    base.text_encoder = base.text_encoder_2 = base.text_encoder_3 = None
    torch.manual_seed(0)
    without = generate(controlnet_pipeline(base, controlnet), PROMPTS, maps, seed=5, steps=2, prompt_embeds=embeds)
    np.testing.assert_array_equal(without, from_prompts)
    assert len({tuple(v.shape[:1]) for v in embeds.values()}) == 1 and len(embeds) in (2, 4)


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def family_runs(request, tiny_family_dir, tmp_path_factory) -> tuple[str, Path, Path]:
    """Reptile (and, for SDXL and Flux, on 2 processes) and joint meta-training, then full and LoRA fine-tuning
    of the Reptile start, on one family's tiny base. The joint run lets its text encoders go after the set-up
    (``free_text_encoders``) and validates at its last step; its log is kept as ``joint.log``."""
    name, base = request.param, tiny_family_dir(request.param)
    root = tmp_path_factory.mktemp(name)
    steps = ["meta.max_meta_steps=2", "checkpointing_steps=2"]
    freed = ["free_text_encoders=true", "validation_steps=2", "num_validation_images=1", "validation_inference_steps=2"]
    _, joint = run_side_by_side([[PYTHON, "meta_train.py", *meta_train_args(base, root / "reptile", *steps)],
                                 [PYTHON, "meta_train.py", *meta_train_args(base, root / "joint", *steps,
                                                                            "meta.algorithm=joint", *freed)]])
    (root / "joint.log").write_text(joint.stderr)
    if name in TWO_PROCESSES:
        run_script(torchrun("meta_train.py", *meta_train_args(base, root / "reptile-2", *steps,
                                                              "dataloader_num_workers=1"), nproc=2),
                   env={"ACCELERATE_USE_CPU": "1"})
    start = f"controlnet_model_name_or_path={root / 'reptile'}"
    run_side_by_side([finetune_args(base, root / mode, start, f"mode={mode}", "max_train_steps=2",
                                    f"cache_dir={root / 'cache'}") for mode in ("full", "lora")])
    return name, base, root


def test_free_text_encoders_lets_them_go_and_validation_still_draws(family_runs):
    """The pipeline without text encoders makes the images it makes with them (the test above); here the run
    itself: the encoders were let go, and the grid came from the captions' encodings."""
    _, _, root = family_runs
    assert "free_text_encoders: the text encoders" in (root / "joint.log").read_text()
    assert (root / "joint" / "validation" / "step-000002.png").is_file()


def test_two_processes_equal_one(family_runs):
    name, _, root = family_runs
    if name not in TWO_PROCESSES:
        pytest.skip(f"{name}: one process only")
    _assert_same_weights(root / "reptile-2", root / "reptile")


@pytest.mark.parametrize("run", ["reptile", "joint", "full", "lora"])
def test_results_load_in_the_familys_controlnet_pipeline_and_make_an_image(family_runs, run):
    import diffusers

    name, base_dir, root = family_runs
    family = next(f for f in FAMILIES.values() if f.name == name)
    folder = root / run
    card = (folder / "README.md").read_text()
    assert f"{family.controlnet_pipeline_class}.from_pretrained" in card and "safety_checker" not in card
    controlnet = getattr(diffusers, family.controlnet_class).from_pretrained(folder)
    if run in ("full", "lora"):  # fine-tuning moved the weights it started from
        initial = getattr(diffusers, family.controlnet_class).from_pretrained(root / "reptile")
        assert any(not torch.equal(a, b) for a, b in zip(controlnet.parameters(), initial.parameters()))
    pipe = getattr(diffusers, family.controlnet_pipeline_class).from_pretrained(base_dir, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    control = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    image = pipe(PROMPTS[0], num_inference_steps=2, height=32, width=32, output_type="np",
                 **{family.control_image_argument: control}).images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()


def test_a_fresh_controlnet_adds_nothing_and_evaluation_scores_it(family_runs):
    """Through the family's ControlNet pipeline a fresh ControlNet (zero output layers) makes the same images
    whatever the map; the harness scores it (on SD-style pipelines exactly as the base alone: Flux's ControlNet
    pipeline draws the map's VAE sample from the images' generators first, so its noise differs from the base's)."""
    from metacontrol.eval.harness import EvalSettings, Evaluator, synthetic_eval_sets
    from metacontrol.pipelines import controlnet_pipeline, generate
    from metacontrol.world import WorldConfig

    name, base_dir, _ = family_runs
    base = load_base_model(str(base_dir))
    fresh = create_controlnet(base).eval()
    base.freeze()
    pipe = controlnet_pipeline(base, fresh)
    maps = [np.zeros((32, 32, 3), np.uint8), np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8)]
    blank, noisy = (generate(pipe, PROMPTS[:1], [m], seed=3, steps=2) for m in maps)
    np.testing.assert_array_equal(blank, noisy)
    settings = EvalSettings(num_samples=2, num_inference_steps=2, batch_size=2)
    evaluator = Evaluator(base, synthetic_eval_sets(["canny"], WorldConfig(resolution=32), settings), settings)
    scores, images = evaluator.evaluate_samples(fresh, "canny")
    assert images.shape == (2, 32, 32, 3) and np.isfinite(scores["canny_f1"]).all()
    if name != "flux":
        for metric, values in evaluator.floor_scores("canny").items():
            np.testing.assert_allclose(scores[metric], values, atol=1e-6, err_msg=metric)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_real_scale_recipe_loads_and_its_freezing_fits_the_familys_controlnet(tiny_family_dir, name):
    from metacontrol.config import MetaTrainConfig
    from metacontrol.config_loader import load_config
    from metacontrol.freezing import trainable_parameters
    from tests.conftest import REPO

    cfg = load_config(MetaTrainConfig, REPO / f"configs/meta_{name}.yaml")
    assert (cfg.resolution, cfg.mixed_precision, cfg.gradient_checkpointing, cfg.cache) == (1024, "bf16", True, "latents")
    controlnet = create_controlnet(load_base_model(str(tiny_family_dir(name))))
    total = sum(p.numel() for p in controlnet.parameters())
    for phase in ("inner", "outer"):
        trained = sum(p.numel() for p in trainable_parameters(controlnet, getattr(cfg.freeze, phase), phase))
        assert 0 < trained <= total


@pytest.mark.parametrize("name", ["sdxl", "flux"])
def test_generate_command_makes_an_image_with_any_family(family_runs, name, tmp_path):
    from PIL import Image

    from metacontrol.commands import generate_image

    family, base_dir, root = family_runs
    if family != name:
        pytest.skip(f"runs of {family}")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "map.png")
    image = generate_image(str(root / "reptile"), tmp_path / "map.png", PROMPTS[0], base=str(base_dir), steps=2)
    assert image.size == (32, 32)
