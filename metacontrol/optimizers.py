"""The Adam-family optimisers the loops build: torch's, or bitsandbytes' 8-bit ones (``use_8bit_adam``: moments in
2 bytes per parameter instead of 8), and the in-place reset that makes a reused optimiser's next step exactly a
fresh one's first (the meta inner loop, once per task)."""

from __future__ import annotations

import torch

from metacontrol.config_loader import ConfigError

CODE_BOOKS = ("qmap1", "qmap2")  # bitsandbytes' 8-bit quantisation maps: constants of the optimiser, not its state


def adam_class(use_8bit: bool, decoupled_weight_decay: bool) -> type[torch.optim.Optimizer]:
    """Adam or AdamW, torch's or bitsandbytes' 8-bit one (one line naming the fix when bitsandbytes is missing)."""
    if not use_8bit:
        return torch.optim.AdamW if decoupled_weight_decay else torch.optim.Adam
    try:
        import bitsandbytes
    except ImportError:
        raise ConfigError("use_8bit_adam: true needs bitsandbytes (pip install 'metacontrol[bnb]'), which is not "
                          "installed; or set use_8bit_adam: false") from None
    return bitsandbytes.optim.AdamW8bit if decoupled_weight_decay else bitsandbytes.optim.Adam8bit


@torch.no_grad()
def reset_state(optimizer: torch.optim.Optimizer) -> None:
    """Every moment and step count zeroed in place: a fresh optimiser's state in the buffers already allocated.

    bitsandbytes keeps an 8-bit moment as codes times per-block maxima, and a fresh one has zero codes and zero
    maxima, so zeroing those is exact too; its code books stay as they are.
    """
    tensors = []
    for state in optimizer.state.values():
        for key, value in state.items():
            if torch.is_tensor(value) and key not in CODE_BOOKS:
                tensors.append(value)
            elif key == "step":  # bitsandbytes counts steps in a plain int
                state[key] = 0
    if tensors:
        torch._foreach_zero_(tensors)
