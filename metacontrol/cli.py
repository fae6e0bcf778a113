"""``metacontrol <command> [args]``: the repository's scripts and the small commands under one name.

The scripts live in the repository (``meta_train.py``, ``train/``) so they stay readable top to
bottom; this entry point runs them from an editable install (``pip install -e .``). The small
commands (``condition-map``, ``annotate``, ``generate``) are functions of ``metacontrol.commands``.
Nothing heavy is imported before a command is chosen, so ``metacontrol --help`` answers at once.
"""

from __future__ import annotations

import importlib
import runpy
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROG = "metacontrol"


@dataclass(frozen=True)
class Command:
    """A subcommand: its line in ``metacontrol --help`` and what runs it with the remaining arguments."""

    summary: str
    run: Callable[[list[str]], object]


def _script(path: Path) -> Callable[[list[str]], None]:
    """Run a repository script as ``python <script> args`` would, in this process."""

    def run(args: list[str]) -> None:
        if not path.is_file():
            raise SystemExit(f"{PROG}: {path} not found; the scripts ship with the repository, so install it "
                             "editable (`pip install -e .`) from a clone")
        sys.argv = [str(path), *args]
        runpy.run_path(str(path), run_name="__main__")

    return run


def _function(name: str) -> Callable[[list[str]], object]:
    """``metacontrol.commands.<name>``, imported only when its command runs."""
    return lambda args: getattr(importlib.import_module("metacontrol.commands"), name)(args)


COMMANDS = {
    "meta-train": Command("meta-train a ControlNet initialisation (meta_train.py)", _script(REPO / "meta_train.py")),
    "finetune": Command("fine-tune a ControlNet on a new condition, full or LoRA (train/finetune.py)",
                        _script(REPO / "train" / "finetune.py")),
    "evaluate": Command("score ControlNets on held-out conditions; writes report.html (train/evaluate.py)",
                        _script(REPO / "train" / "evaluate.py")),
    "pretrain-base": Command("train the tiny base model on the synthetic world (train/pretrain_base.py)",
                             _script(REPO / "train" / "pretrain_base.py")),
    "condition-map": Command("render a condition map of a synthetic scene and print its caption",
                             _function("condition_map_main")),
    "annotate": Command("turn a photo into a condition map with controlnet-aux", _function("annotate_main")),
    "generate": Command("generate an image from a prompt and a condition map with a ControlNet",
                        _function("generate_main")),
}


def usage() -> str:
    """The top-level help: every command with its one line."""
    width = max(map(len, COMMANDS))
    lines = [f"usage: {PROG} <command> [args...]    ({PROG} <command> --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {command.summary}" for name, command in COMMANDS.items()]
    lines += ["", "For multi-process training use `accelerate launch <script>` directly."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(usage())
        return
    if not argv:
        print(usage(), file=sys.stderr)
        raise SystemExit(2)
    command = COMMANDS.get(argv[0])
    if command is None:
        print(f"{PROG}: unknown command {argv[0]!r}; expected one of {', '.join(COMMANDS)} (see {PROG} --help)",
              file=sys.stderr)
        raise SystemExit(2)
    command.run(argv[1:])


if __name__ == "__main__":
    main()
