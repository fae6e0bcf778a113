"""metacontrol: meta-learned ControlNet initialisations for diffusers, under Accelerate."""

import logging


def _not_about_bitsandbytes_kernels(record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return "gemm_4bit" not in message and "quantization-bitsandbytes" not in message


# bitsandbytes (installed for use_8bit_adam, and imported by diffusers, transformers and peft when present) looks up
# its 4-bit kernels at import and says so on the CPU, offline: 4-bit is never used here, so every script would start
# with two warnings about nothing. Set before anything imports it.
for _name in ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub"):
    logging.getLogger(_name).addFilter(_not_about_bitsandbytes_kernels)
