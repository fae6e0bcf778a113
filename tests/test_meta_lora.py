"""A meta-learned LoRA start: only adapters and zero convolutions move, and fine-tuning starts exactly from it."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.conftest import PYTHON, finetune_args, meta_train_args, run_script

WEIGHTS = "diffusion_pytorch_model.safetensors"


def test_meta_lora_start_moves_only_adapters_and_reloads_exactly_for_finetuning(tiny_sd_dir, tmp_path):
    from diffusers import ControlNetModel
    from peft import PeftModel

    from metacontrol.controlnet import create_controlnet
    from metacontrol.models.base import load_base_model

    init = tmp_path / "init"
    create_controlnet(load_base_model(str(tiny_sd_dir))).save_pretrained(init)
    out = tmp_path / "meta-lora"
    result = run_script([PYTHON, "meta_train.py", *meta_train_args(
        tiny_sd_dir, out, "meta.max_meta_steps=2", "meta.lora_rank=2", "meta.inner_betas=[0.0, 0.999]",
        f"controlnet_model_name_or_path={init}")])  # fmt: skip
    assert "LoRA rank 2" in result.stderr
    card = (out / "README.md").read_text()
    assert "LoRA start (rank 2" in card and "samples" in card and str(init) in card

    # The merged start = the initialisation + the saved adapter; nothing else moved.
    start, merged = load_file(str(init / WEIGHTS)), load_file(str(out / WEIGHTS))
    reloaded = PeftModel.from_pretrained(ControlNetModel.from_pretrained(init), out / "lora").merge_and_unload()
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, merged[key]), key
    changed = {k for k in start if not torch.equal(start[k], merged[k])}
    assert any(k.startswith("controlnet_down_blocks") for k in changed)  # zero convolutions trained
    assert any(k.startswith("down_blocks") for k in changed)  # adapters merged into the encoder
    assert not any(k.endswith(".bias") and not k.startswith("controlnet_") for k in changed)  # LoRA leaves biases
    assert not any(re.search(r"norm\d*\.", k) for k in changed)  # no adapter on norms, and they are not trained

    # Fine-tuning from the start (lora_init) for 0 steps saves exactly the start.
    tuned = tmp_path / "tuned"
    run_script(finetune_args(tiny_sd_dir, tuned, "mode=lora", "max_train_steps=0", f"lora_init={out / 'lora'}",
                             f"controlnet_model_name_or_path={init}"))  # fmt: skip
    saved = load_file(str(tuned / WEIGHTS))
    assert saved.keys() == merged.keys() and all(torch.equal(saved[k], merged[k]) for k in merged)


def test_lora_init_needs_lora_mode(tiny_sd_dir, tmp_path: Path):
    result = run_script(finetune_args(tiny_sd_dir, tmp_path / "x", f"lora_init={tmp_path}"), check=False)
    assert result.returncode != 0 and "lora_init" in result.stderr and "mode is 'lora'" in result.stderr
