"""metacontrol: meta-learned ControlNet initialisations for diffusers, under Accelerate."""

import logging

# bitsandbytes (installed for use_8bit_adam, and imported by diffusers, transformers and peft when present) warns at
# import on the CPU that its 4-bit matmul kernel is not cached: 4-bit is never used here, so every script would
# start with a warning about nothing. Set before anything imports it.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(lambda record: "gemm_4bit" not in record.getMessage())
