"""LoRA-ML: a shared ControlNet trained together with one LoRA per task (Block et al., "Provable meta-learning
with low-rank adaptations", NeurIPS 2025).

When a new condition will be learned by a LoRA on the shared weights, training the shared weights by plain
multi-task training is provably suboptimal: the shared part then also has to carry what is specific to each
task. Here every task ``t`` has its own low-rank update ``B_t A_t`` on the same layers fine-tuning's LoRA
adapts, and task ``t``'s loss is taken at ``W + (alpha / r) B_t A_t``; ``W`` (the whole ControlNet, zero
convolutions included) and every ``A_t, B_t`` train together, by the joint loop's optimiser. What ships is
``W`` alone: a plain ControlNet, to which a new condition adds a fresh LoRA (fine-tuning's ``mode: lora``).

The adapters are added by forward hooks, so the ControlNet itself stays a plain ``ControlNetModel`` (its state
dict and ``save_pretrained`` unchanged) and the adapter of the task being trained is chosen by an index, not by
swapping weights. Memory: the stacks
hold ``tasks x`` one LoRA's parameters (plus the optimiser's moments); for many tasks at SD scale choose a
small rank.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from metacontrol.families import family_of_controlnet
from metacontrol.lora import matching_layers


class TaskLoRAs(torch.nn.Module):
    """One rank-``rank`` adapter per task on the ControlNet's LoRA layers; ``active(task)`` turns one on."""

    def __init__(self, controlnet: torch.nn.Module, tasks: Sequence[str], *, rank: int, alpha: float | None = None,
                 seed: int = 0) -> None:
        super().__init__()
        family = family_of_controlnet(controlnet)
        full = set(matching_layers(controlnet, family.lora_fully_trained, "lora_modules_to_save"))
        layers = dict(controlnet.named_modules())
        self.layer_names = [n for n in matching_layers(controlnet, family.lora_target_modules, "lora_target_modules")
                            if n not in full]
        self.task_index = {task: i for i, task in enumerate(tasks)}
        self.scale = (alpha or rank) / rank
        generator = torch.Generator().manual_seed(seed)  # every process builds the same adapters
        downs: list[list[torch.Tensor]] = [[] for _ in tasks]
        for name in self.layer_names:
            layer = layers[name]
            if isinstance(layer, torch.nn.Conv2d) and (layer.groups != 1 or layer.padding_mode != "zeros"):
                raise ValueError(f"LoRA-ML: layer {name} is a grouped or padded-by-{layer.padding_mode} convolution")
            for task_downs in downs:  # as nn.Linear / nn.Conv2d (and peft's lora_A) initialise a weight
                down = torch.empty(rank, *layer.weight.shape[1:], dtype=layer.weight.dtype)
                task_downs.append(torch.nn.init.kaiming_uniform_(down, a=math.sqrt(5), generator=generator))
        # Task t's A and B of layer i are parameters t * layers + i: each adapter its own parameters, so the
        # optimiser steps (and counts the steps of) only those of the tasks drawn (``release_grads``).
        self.down = torch.nn.ParameterList(
            [torch.nn.Parameter(d.to(layers[n].weight.device)) for task_downs in downs
             for d, n in zip(task_downs, self.layer_names)])  # fmt: skip
        self.up = torch.nn.ParameterList(  # B = 0: every task starts at W
            [torch.nn.Parameter(torch.zeros(layers[n].weight.shape[0], rank, dtype=layers[n].weight.dtype,
                                            device=layers[n].weight.device))
             for _ in tasks for n in self.layer_names])  # fmt: skip
        self._active: int | None = None
        for i, name in enumerate(self.layer_names):  # with no task active a hook adds nothing: W alone
            layers[name].register_forward_hook(self._hook(i))

    def weights(self, task: int, layer: int) -> tuple[torch.nn.Parameter, torch.nn.Parameter]:
        """Task ``task``'s adapter (A, B) of layer ``layer`` (indices into the task list and ``layer_names``)."""
        k = task * len(self.layer_names) + layer
        return self.down[k], self.up[k]

    def _hook(self, i: int) -> Callable[[torch.nn.Module, tuple[torch.Tensor, ...], torch.Tensor], torch.Tensor | None]:
        def add_update(layer: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor | None:
            if self._active is None:
                return None
            down, up = self.weights(self._active, i)
            x = inputs[0]
            if isinstance(layer, torch.nn.Conv2d):  # as peft: A a conv like the layer's, B a 1x1 conv
                hidden = F.conv2d(x, down, stride=layer.stride, padding=layer.padding, dilation=layer.dilation)
                update = F.conv2d(hidden, up[:, :, None, None])
            else:
                update = F.linear(F.linear(x, down), up)
            return output + self.scale * update

        return add_update

    def release_grads(self, drawn: Collection[str]) -> None:
        """``.grad = None`` on the adapters of the tasks not ``drawn`` this step (by every process). torch's
        optimisers skip such parameters (no step count, moment decay or weight decay), so each adapter trains as
        its own Adam would on its own task's steps: a dense Adam over every adapter would move them all on stale
        momentum, and bias-correct a rarely drawn one's first moments by the global step count (an update many
        times the learning rate)."""
        keep = {self.task_index[t] for t in drawn}
        for t in set(self.task_index.values()) - keep:
            for i in range(len(self.layer_names)):
                for p in self.weights(t, i):
                    p.grad = None

    @contextmanager
    def active(self, task: str) -> Iterator[None]:
        """Within the block the ControlNet computes with ``task``'s adapter added."""
        self._active = self.task_index[task]
        try:
            yield
        finally:
            self._active = None


def with_task_adapter(adapters: TaskLoRAs | None, task: str,
                      loss: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """``loss`` computed with ``task``'s adapter on (unchanged without adapters)."""
    if adapters is None:
        return loss

    def compute() -> torch.Tensor:
        with adapters.active(task):
            return loss()

    return compute
