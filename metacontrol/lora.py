"""LoRA on a ControlNet: which layers get adapters, adding or loading them, saving the result.

Used by fine-tuning (``mode: lora``) and by meta-training a LoRA start (``meta.lora_rank``), where the
inner loop trains only the adapters and the zero convolutions.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import torch
from diffusers import ControlNetModel
from peft import LoraConfig, PeftModel, get_peft_model

from metacontrol.atomic import atomic_directory
from metacontrol.config_loader import ConfigError
from metacontrol.controlnet import save_controlnet
from metacontrol.families import family_of_controlnet
from metacontrol.freezing import matches

ADAPTER_FOLDER = "lora"  # a saved LoRA model keeps its adapter here, beside the merged ControlNet


def matching_layers(controlnet: ControlNetModel, patterns: list[str], key: str) -> list[str]:
    """Linear/Conv2d layers matching any pattern (``freezing.matches``); a pattern matching none is an error."""
    layers = [n for n, m in controlnet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    found: set[str] = set()
    for pattern in patterns:
        hits = {n for n in layers if matches(n, pattern)}
        if not hits:
            raise ConfigError(f"{key}: pattern {pattern!r} matches no Linear/Conv2d layer of the ControlNet")
        found |= hits
    return [n for n in layers if n in found]


def add_lora(controlnet: ControlNetModel, *, rank: int, alpha: float | None = None,
             target_modules: list[str] | None = None, modules_to_save: list[str] | None = None) -> PeftModel:
    """LoRA on ``target_modules``; the layers of ``modules_to_save`` train fully (peft copies them). None: the
    ControlNet's family's (``ModelFamily.lora_target_modules`` / ``lora_fully_trained``).

    Those are the zero convolutions, and they must train fully: with the standard initialisation their
    weight is 0, so no gradient reaches any layer before them (LoRA included) until they have moved,
    and a LoRA on one (W + BA with W = 0) could only ever learn a rank-r map. They are 1x1 convs (plus
    the condition encoder's last conv): about 3% of an SD-1.5 ControlNet.
    """
    family = family_of_controlnet(controlnet)
    full = matching_layers(controlnet, modules_to_save or family.lora_fully_trained, "lora_modules_to_save")
    targets = matching_layers(controlnet, target_modules or family.lora_target_modules, "lora_target_modules")
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, modules_to_save=full,
                        # a regex, so that exactly these layers get an adapter (a name is also a suffix)
                        target_modules="|".join(re.escape(n) for n in targets if n not in full))
    return get_peft_model(controlnet, config)


def load_lora(controlnet: ControlNetModel, folder: str | Path) -> PeftModel:
    """A saved adapter (e.g. a meta-learned LoRA start's ``lora/``) on ``controlnet``, trainable."""
    if not (Path(folder) / "adapter_config.json").is_file():
        raise ConfigError(f"lora_init: {folder} has no adapter_config.json; expected the '{ADAPTER_FOLDER}' folder "
                          "of a LoRA fine-tune or of a meta-learned LoRA start")
    return PeftModel.from_pretrained(controlnet, str(folder), is_trainable=True)


def controlnet_of(model: torch.nn.Module) -> ControlNetModel:
    """The ControlNetModel inside a LoRA model (adapters active), or the model itself: what pipelines take."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def save_adapted(model: torch.nn.Module, folder: Path, card: str) -> Path:
    """A plain diffusers ControlNet in ``folder``. LoRA: the adapter goes to ``folder/lora`` and the folder
    holds it merged into (a copy of) the initialisation, so pipelines need neither peft nor the init."""
    if isinstance(model, PeftModel):
        with atomic_directory(Path(folder) / ADAPTER_FOLDER) as tmp:
            model.save_pretrained(tmp)
        model = copy.deepcopy(model).merge_and_unload()
    return save_controlnet(model, folder, card)
