"""Training state on disk: ``checkpoint-N`` folders (``TrainingState``: safetensors and JSON, no pickles),
written atomically, found again for ``resume_from_checkpoint``, rotated; the loop position they hold
(``TrainingProgress``); and Ctrl-C, which stops a loop with a message naming the last checkpoint."""

from __future__ import annotations

import json
import logging
import re
import shutil
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from safetensors.torch import load_file, save_file

from metacontrol.atomic import atomic_directory, set_aside
from metacontrol.config_loader import ConfigError
from metacontrol.processes import agreed

logger = logging.getLogger(__name__)
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
INTERRUPT_SIGNALS = (signal.SIGINT, signal.SIGTERM)
CHECKPOINT_FORMAT = 1  # bump when what a checkpoint holds changes meaning
PARAMETERS_FILE = "trained_parameters.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "training_state.json"  # written last: its presence marks a complete checkpoint
CHECKPOINT_FILES = (PARAMETERS_FILE, OPTIMIZER_FILE, STATE_FILE)


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM in a training loop; the message says where it stopped and how to go on."""

    def __init__(self, signum: int, step: int, unit: str, output_dir: Path) -> None:
        complete, _ = list_checkpoints(output_dir)
        saved = f"the last checkpoint is {complete[-1]}" if complete else "no checkpoint yet: resuming starts over"
        super().__init__(f"interrupted at {unit} {step} ({saved}); resume with resume_from_checkpoint=latest")
        self.exit_code = 128 + signum  # 130 for Ctrl-C, as shells report it


@dataclass
class TrainingProgress:
    """The loop position (meta-steps or fine-tuning steps), saved in every checkpoint: episodes and batches
    are functions of it, so no random-number state needs saving."""

    step: int = 0


def stop_on_signals(progress: TrainingProgress, output_dir: Path, unit: str) -> Callable[[], None]:
    """Until the returned function is called, Ctrl-C and SIGTERM raise ``TrainingInterrupted`` at the current step.

    After the first signal both do nothing: ``accelerate launch`` answers a Ctrl-C by sending the
    script SIGTERM at once, and that must not cut the message short. (A handler that does nothing,
    not ``SIG_IGN``: a signal already on its way when ``SIG_IGN`` is set makes Python print a
    traceback.) Off the main thread, where Python cannot set handlers, this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def interrupt(signum: int, frame: object) -> None:
        for number in INTERRUPT_SIGNALS:
            signal.signal(number, lambda *_: None)
        raise TrainingInterrupted(signum, progress.step, unit, output_dir)

    previous = {number: signal.signal(number, interrupt) for number in INTERRUPT_SIGNALS}

    def restore() -> None:
        for number, handler in previous.items():
            signal.signal(number, handler)

    return restore


def incomplete_reason(checkpoint: Path) -> str | None:
    """Why ``checkpoint`` cannot be resumed from (None: it can).

    Our own writes are atomic, so this catches folders made, copied or emptied by hand.
    """
    if not any(checkpoint.iterdir()):
        return "empty"
    missing = [name for name in CHECKPOINT_FILES if not (checkpoint / name).is_file()]
    if missing:
        return f"no {', '.join(missing)}"
    return None


def list_checkpoints(output_dir: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """``checkpoint-N`` folders of ``output_dir`` by step: the complete ones, and (folder, why) of the others."""
    found = sorted((int(m.group(1)), p) for p in output_dir.glob("checkpoint-*")
                   if (m := CHECKPOINT_PATTERN.match(p.name)) and p.is_dir())
    complete, incomplete = [], []
    for _, path in found:
        reason = incomplete_reason(path)
        if reason is None:
            complete.append(path)
        else:
            incomplete.append((path, reason))
    return complete, incomplete


def resolve_resume_path(resume: str | None, output_dir: Path) -> Path | None:
    """The checkpoint to resume from: a given folder, or the newest complete one for ``latest``."""
    if resume is None:
        return None
    if resume != "latest":
        path = Path(resume)
        if not path.is_dir():
            raise ConfigError(f"resume_from_checkpoint: {resume} is not a checkpoint folder")
        if reason := incomplete_reason(path):
            raise ConfigError(f"resume_from_checkpoint: {resume} is not a complete checkpoint ({reason})")
        return path
    complete, incomplete = list_checkpoints(output_dir)
    if incomplete:
        logger.warning("resume_from_checkpoint=latest: skipping incomplete checkpoint(s) %s",
                       "; ".join(f"{path} ({reason})" for path, reason in incomplete))
    if not complete:
        logger.info("resume_from_checkpoint=latest: no complete checkpoint in %s, starting fresh", output_dir)
        return None
    return complete[-1]


NESTED = "/"  # joins the keys of an optimiser state kept in a nested mapping (bitsandbytes' 8-bit quantisation state)


def _flat(entry: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """A parameter's optimiser state as (key, value) pairs, a nested mapping's keys joined by ``NESTED``."""
    return [pair for key, value in entry.items()
            for pair in (_flat(value, f"{prefix}{key}{NESTED}") if isinstance(value, dict) else [(prefix + key, value)])]


@dataclass
class TrainingState:
    """What a ``checkpoint-N`` holds, so that resuming continues bit for bit: the parameters that train
    (by name; frozen ones are rebuilt from the initialisation), the optimiser, the learning-rate schedule,
    the loop position and each process's loss scale (fp16).

    Tensors go to safetensors and the rest to JSON: nothing in a checkpoint is a pickle, so loading one
    that somebody shared runs no code. (Episodes and batches are functions of the step and seed, so there
    is no random-number state to keep.)
    """

    model: torch.nn.Module  # unwrapped (no DDP): names as the user's model has them
    params: list[torch.nn.Parameter]  # the parameters that train (in any phase)
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    progress: TrainingProgress
    grad_scaler: torch.amp.GradScaler | None = None

    def named_params(self) -> dict[str, torch.nn.Parameter]:
        names = {id(p): name for name, p in self.model.named_parameters()}
        return {names[id(p)]: p for p in self.params}

    def process_state(self) -> dict[str, Any] | None:
        """This process's own part (the loss scale), gathered to the main process for writing."""
        return self.grad_scaler.state_dict() if self.grad_scaler is not None and self.grad_scaler.is_enabled() else None

    def write(self, folder: Path, process_states: list[dict[str, Any] | None]) -> None:
        named = self.named_params()
        save_file({n: p.detach().cpu().contiguous() for n, p in named.items()}, str(folder / PARAMETERS_FILE))
        optimizer = self.optimizer.state_dict()
        tensors, scalars, stored = {}, {}, set()
        for index, entry in optimizer["state"].items():
            for key, value in _flat(entry):
                if torch.is_tensor(value):
                    tensor = value.detach().cpu().contiguous()
                    if tensor.untyped_storage().data_ptr() in stored:  # shared (bitsandbytes' code books): a copy each
                        tensor = tensor.clone()
                    stored.add(tensor.untyped_storage().data_ptr())
                    tensors[f"{index}.{key}"] = tensor
                else:
                    scalars[f"{index}.{key}"] = value
        save_file(tensors, str(folder / OPTIMIZER_FILE))
        state = {"format": CHECKPOINT_FORMAT, "step": self.progress.step, "parameters": list(named),
                 "optimizer": {"param_groups": optimizer["param_groups"], "scalars": scalars},
                 "lr_scheduler": self.lr_scheduler.state_dict(), "process_states": process_states}
        (folder / STATE_FILE).write_text(json.dumps(state, indent=1))

    def read(self, folder: Path, process_index: int) -> None:
        state = json.loads((folder / STATE_FILE).read_text())
        named = self.named_params()
        if state.get("format") != CHECKPOINT_FORMAT or state["parameters"] != list(named):
            raise ConfigError(f"resume_from_checkpoint: {folder} was saved by another version or with other "
                              "trainable parameters (freeze, LoRA or algorithm settings differ from this run's)")
        with torch.no_grad():
            for name, tensor in load_file(str(folder / PARAMETERS_FILE)).items():
                named[name].copy_(tensor)
        entries: dict[int, dict[str, Any]] = {}
        for flat, value in [*load_file(str(folder / OPTIMIZER_FILE)).items(),
                            *state["optimizer"]["scalars"].items()]:
            index, key = flat.split(".", 1)
            *within, name = key.split(NESTED)
            entry = entries.setdefault(int(index), {})
            for part in within:
                entry = entry.setdefault(part, {})
            entry[name] = value
        self.optimizer.load_state_dict({"state": entries, "param_groups": state["optimizer"]["param_groups"]})
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.progress.step = int(state["step"])
        scales = state["process_states"]
        own = scales[process_index] if process_index < len(scales) else scales[0]
        if self.grad_scaler is not None and own is not None:
            self.grad_scaler.load_state_dict(own)


def save_training_state(accelerator: Accelerator, output_dir: Path, state: TrainingState,
                        total_limit: int | None) -> Path:
    """Write ``checkpoint-{step}`` atomically (a temporary folder renamed into place) and prune old ones.

    Every process hands its own small state to the main process, which writes everything; a failed write
    (a full disk) stops every process at once, not just the main one.
    """
    target = output_dir / f"checkpoint-{state.progress.step}"
    process_states = gather_object([state.process_state()])
    with agreed(accelerator, f"saving {target}"):
        if accelerator.is_main_process:
            with atomic_directory(target) as tmp:
                state.write(tmp, process_states)
            if total_limit is not None:  # incomplete folders are not ours to delete (and were warned about)
                for old in list_checkpoints(output_dir)[0][:-total_limit]:
                    shutil.rmtree(set_aside(old), ignore_errors=True)
    return target
