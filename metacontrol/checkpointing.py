"""Training state on disk: ``checkpoint-N`` folders of accelerate state, written atomically, found again
for ``resume_from_checkpoint``, rotated; the loop position they hold (``TrainingProgress``); and Ctrl-C,
which stops a loop with a message naming the last checkpoint."""

from __future__ import annotations

import logging
import re
import shutil
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils.constants import RNG_STATE_NAME

from metacontrol.atomic import SAVING_MARKER, atomic_directory, set_aside
from metacontrol.config_loader import ConfigError

logger = logging.getLogger(__name__)
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
INTERRUPT_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM in a training loop; the message says where it stopped and how to go on."""

    def __init__(self, signum: int, step: int, unit: str, output_dir: Path) -> None:
        complete, _ = list_checkpoints(output_dir)
        saved = f"the last checkpoint is {complete[-1]}" if complete else "no checkpoint yet: resuming starts over"
        super().__init__(f"interrupted at {unit} {step} ({saved}); resume with resume_from_checkpoint=latest")
        self.exit_code = 128 + signum  # 130 for Ctrl-C, as shells report it


@dataclass
class TrainingProgress:
    """The loop position (meta-steps or fine-tuning steps), saved with the accelerate state: episodes and
    batches are functions of it, so resuming needs nothing else."""

    step: int = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step = int(state["step"])


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
    """Why accelerate cannot resume from ``checkpoint`` (None: it can): its RNG state and loop position.

    Our own writes are atomic, so this catches folders made, copied or emptied by hand.
    """
    if not any(checkpoint.iterdir()):
        return "empty"
    if not (checkpoint / f"{RNG_STATE_NAME}_0.pkl").is_file():
        return f"no {RNG_STATE_NAME}_0.pkl"
    if not any(checkpoint.glob("custom_checkpoint_*.pkl")):
        return "no custom_checkpoint_*.pkl (the loop position)"
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
            raise ConfigError(f"resume_from_checkpoint: {resume} is not a complete accelerate checkpoint ({reason})")
        return path
    complete, incomplete = list_checkpoints(output_dir)
    if incomplete:
        logger.warning("resume_from_checkpoint=latest: skipping incomplete checkpoint(s) %s",
                       "; ".join(f"{path} ({reason})" for path, reason in incomplete))
    if not complete:
        logger.info("resume_from_checkpoint=latest: no complete checkpoint in %s, starting fresh", output_dir)
        return None
    return complete[-1]


def save_training_state(accelerator: Accelerator, output_dir: Path, step: int, total_limit: int | None) -> Path:
    """``accelerator.save_state`` into a temporary folder that is renamed into ``checkpoint-{step}``.

    Every process calls ``save_state`` (each writes its own RNG state) into the *same* temporary folder;
    only the main process renames it and prunes old checkpoints, after everyone has written.
    """
    target = output_dir / f"checkpoint-{step}"
    if accelerator.is_main_process:
        with atomic_directory(target) as tmp:
            accelerator.wait_for_everyone()
            (output_dir / SAVING_MARKER).write_text(str(tmp))
            accelerator.wait_for_everyone()
            accelerator.save_state(str(tmp))
            accelerator.wait_for_everyone()
        (output_dir / SAVING_MARKER).unlink()
        if total_limit is not None:  # incomplete folders are not ours to delete (and were warned about)
            for old in list_checkpoints(output_dir)[0][:-total_limit]:
                shutil.rmtree(set_aside(old), ignore_errors=True)
    else:
        accelerator.wait_for_everyone()
        accelerator.wait_for_everyone()
        tmp = Path((output_dir / SAVING_MARKER).read_text())
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
    accelerator.wait_for_everyone()
    return target
