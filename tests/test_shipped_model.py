"""The embedded base model in checkpoints/tiny-sd: loads offline in the standard pipelines and works."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from metacontrol.models.tiny import TinySDConfig, build_unet, build_vae
from metacontrol.world import WorldConfig, vocabulary

TINY_SD = Path(__file__).resolve().parents[1] / "checkpoints" / "tiny-sd"


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(TINY_SD, local_files_only=True)


def test_folder_is_a_complete_small_diffusers_pipeline():
    for part in ("model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                 "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                 "tokenizer/tokenizer.json", "scheduler/scheduler_config.json", "README.md"):
        assert (TINY_SD / part).is_file(), part
    size = sum(f.stat().st_size for f in TINY_SD.rglob("*") if f.is_file())
    assert size <= 25 * 2**20, f"{size / 2**20:.1f} MB"


def _plain(value):
    """Configs hold tuples when built and lists when loaded from JSON."""
    return list(value) if isinstance(value, (list, tuple)) else value


def test_builder_gives_the_shipped_architecture(pipe):
    cfg = TinySDConfig()
    for built, shipped in ((build_unet(cfg), pipe.unet), (build_vae(cfg), pipe.vae)):
        keys = ("block_out_channels", "down_block_types", "up_block_types", "layers_per_block", "sample_size")
        assert {k: _plain(built.config.get(k)) for k in keys} == {k: _plain(shipped.config.get(k)) for k in keys}
        assert {k: v.shape for k, v in built.state_dict().items()} == {k: v.shape for k, v in shipped.state_dict().items()}


def test_tokenizer_round_trips_and_covers_the_world(pipe, tmp_path):
    from transformers import AutoTokenizer

    tok = pipe.tokenizer
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again.model_max_length == tok.model_max_length == 32
    caption = "a red ball and an orange person in front of a blue wall on a gray floor"
    assert again(caption).input_ids == tok(caption).input_ids
    assert tok.unk_token_id not in tok(" ".join(vocabulary())).input_ids


def test_generates_non_degenerate_images(pipe):
    pipe.set_progress_bar_config(disable=True)
    out = pipe(["a red ball in front of a blue wall on a gray floor", "a yellow box in front of a green wall on a "
                "white floor"], num_inference_steps=10, guidance_scale=4.0, output_type="np",
               generator=[torch.Generator().manual_seed(i) for i in range(2)]).images
    assert out.shape == (2, 64, 64, 3) and np.isfinite(out).all()
    assert out.std() > 0.05 and not np.allclose(out[0], out[1], atol=0.05)


def test_quality_tolerances_catch_a_broken_model():
    """Measured on 16 held-out scenes; bounds sit well below the recorded numbers (see the model card)."""
    from metacontrol.eval.base_quality import base_model_quality
    from metacontrol.models.base import load_base_model

    quality = base_model_quality(load_base_model(str(TINY_SD)).freeze(), WorldConfig(), num_samples=16, steps=12)
    assert quality["vae_psnr_db"] > 25.0
    assert quality["background_colour_accuracy"] >= 0.3  # random weights: ~1/8
    assert quality["main_object_colour_accuracy"] >= 0.35
