"""Which ControlNet parameters train in which phase (inner loop, outer update, fine-tuning), and the
one pattern dialect for naming parameters and layers (freezing here, LoRA targets in ``lora.py``).

A phase's setting is a preset name or a list of glob patterns (see ``matches``); matching parameters
are *frozen*. A pattern that matches nothing is an error: a silent typo would train what was meant
to be frozen.
"""

from __future__ import annotations

import fnmatch
from collections import OrderedDict

import torch

from metacontrol.config_loader import ConfigError
from metacontrol.layer_sets import PRESETS


def matches(name: str, pattern: str) -> bool:
    """Whether a dotted parameter or layer name is covered by a glob ``pattern``.

    A pattern may start at any component and covers everything inside what it names, so ``to_q`` is
    every ``*.to_q`` (as peft reads ``target_modules``), ``mid_block`` is everything in ``mid_block``
    and ``down_blocks.3.*`` is the last encoder block of SD 1.x.
    """
    return any(fnmatch.fnmatchcase(name, p) for p in (pattern, f"{pattern}.*", f"*.{pattern}", f"*.{pattern}.*"))


def preset_patterns(preset: str, model: torch.nn.Module) -> list[str]:
    """Frozen-name patterns of a preset for this ControlNet, as its family defines them
    (``ModelFamily.freeze_patterns``).

    ``paper`` (UNet ControlNets): Meta ControlNet freezes encoder block 4 and the middle block of SD 1.x; in
    diffusers names that is the *last* ``down_blocks`` entry (``down_blocks.3`` for SD 1.x) and ``mid_block``.
    ``later_blocks`` (transformer ControlNets): the second half of each kind of transformer block.
    ``zero_convs_only``: everything but the zero-initialised output layers is frozen.
    ``embedding_and_zero_convs`` (partial adaptation): those and the condition's embedding train, nothing else.
    """
    if preset == "none":
        return []
    if preset not in PRESETS:
        raise ConfigError(f"unknown freeze preset {preset!r}; expected one of {', '.join(PRESETS)} or a list of patterns")
    from metacontrol.families import family_of_controlnet

    return family_of_controlnet(model).freeze_patterns(preset, model)


def frozen_names(model: torch.nn.Module, spec: str | list[str], phase: str = "freeze") -> set[str]:
    """Resolve a preset or a pattern list to the set of frozen parameter names."""
    patterns = preset_patterns(spec, model) if isinstance(spec, str) else list(spec)
    names = [n for n, _ in model.named_parameters()]
    frozen: set[str] = set()
    for pattern in patterns:
        hits = {n for n in names if matches(n, pattern)}
        if not hits:
            blocks = sorted({n.split(".")[0] for n in names})
            raise ConfigError(f"{phase}: pattern {pattern!r} matches no ControlNet parameter; top-level blocks are "
                              f"{', '.join(blocks)}")
        frozen |= hits
    return frozen


def trainable_parameters(model: torch.nn.Module, spec: str | list[str], phase: str) -> list[torch.nn.Parameter]:
    """Parameters that train in ``phase``, in ``named_parameters`` order (stable across processes)."""
    frozen = frozen_names(model, spec, phase)
    return [p for n, p in model.named_parameters() if n not in frozen]


def set_requires_grad(model: torch.nn.Module, trainable: list[torch.nn.Parameter]) -> None:
    """Only ``trainable`` keep ``requires_grad``: frozen weights then get no gradient and no optimiser slot."""
    keep = {id(p) for p in trainable}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)


def freeze_table(model: torch.nn.Module, phases: dict[str, str | list[str]]) -> str:
    """A start-up table: trainable / total parameters per top-level block, for each phase."""
    frozen = {phase: frozen_names(model, spec, phase) for phase, spec in phases.items()}
    rows: OrderedDict[str, dict[str, int]] = OrderedDict()
    for name, p in model.named_parameters():
        row = rows.setdefault(name.split(".")[0], {"total": 0, **{ph: 0 for ph in phases}})
        row["total"] += p.numel()
        for phase in phases:
            if name not in frozen[phase]:
                row[phase] += p.numel()
    header = f"{'block':<28}{'params':>12}" + "".join(f"{ph + ' train':>16}" for ph in phases)
    lines = [header, "-" * len(header)]
    totals = {"total": 0, **{ph: 0 for ph in phases}}
    for block, row in rows.items():
        lines.append(f"{block:<28}{row['total']:>12,}" + "".join(f"{row[ph]:>16,}" for ph in phases))
        for key in totals:
            totals[key] += row[key]
    lines.append(f"{'all':<28}{totals['total']:>12,}" + "".join(f"{totals[ph]:>16,}" for ph in phases))
    return "\n".join(lines)
