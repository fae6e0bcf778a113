"""Named sets of ControlNet layers that configurations default to: the freezing presets and LoRA's layers.

Plain names, free of torch and peft, so that a configuration loads and fails in a fraction of a second,
before a training script imports anything heavy. What the names mean: ``freezing.py`` and ``lora.py``.
"""

# freezing.preset_patterns; paper: UNet ControlNets (SD, SDXL), later_blocks: transformer ones (SD3, Flux);
# embedding_and_zero_convs: partial adaptation (ANIL / CAVIA style: only the condition's way in and out trains)
PRESETS = ("none", "paper", "zero_convs_only", "later_blocks", "embedding_and_zero_convs")

# Layers that get a LoRA: attention projections and the convolutions of the resnets and of the
# condition encoder. Patterns over Linear/Conv2d names (``freezing.matches``: ``to_q`` is every ``*.to_q``).
LORA_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "conv2", "conv_in",
                       "controlnet_cond_embedding.blocks.*"]  # fmt: skip
# Layers trained fully beside the adapters: every zero-initialised convolution (see ``add_lora``).
LORA_FULLY_TRAINED = ["controlnet_down_blocks.*", "controlnet_mid_block",
                      "controlnet_cond_embedding.conv_out"]  # fmt: skip
