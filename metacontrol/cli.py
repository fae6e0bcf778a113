"""``metacontrol <command> [args]``: the training scripts and the small commands under one name.

The scripts' bodies are ``metacontrol.scripts.<name>.main`` (``meta_train.py`` and ``train/*.py`` in a
checkout are thin shims over them), so this works from an installed wheel too; the small commands
(``condition-map``, ``annotate``, ``generate``) are functions of ``metacontrol.commands``. Nothing heavy
is imported before a command is chosen, so ``metacontrol --help`` answers at once.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass

PROG = "metacontrol"


@dataclass(frozen=True)
class Command:
    """A subcommand: its line in ``metacontrol --help`` and what runs it with the remaining arguments."""

    summary: str
    run: Callable[[list[str]], object]


def run_script(name: str, args: list[str]) -> None:
    """``metacontrol.scripts.<name>.main(args)``, with the errors a user can fix as one line (``run_main``).

    A training script's configuration is loaded and checked first, before the script imports torch and
    diffusers: a typo then costs a fraction of a second, not ten seconds of imports (on every process).
    """
    from metacontrol.config import SCRIPT_CONFIGS, check_script_config
    from metacontrol.errors import run_main

    if name in SCRIPT_CONFIGS and not {"-h", "--help"} & set(args):
        run_main(lambda: check_script_config(name, args), name)
    main = importlib.import_module(f"metacontrol.scripts.{name}").main
    run_main(lambda: main(args), name)


def _script(name: str) -> Callable[[list[str]], None]:
    """The command that runs script ``name``, named in --help and errors as ``metacontrol <name>``."""

    def run(args: list[str]) -> None:
        sys.argv = [f"{PROG} {name.replace('_', '-')}", *args]  # what --help and errors call it
        run_script(name, args)

    return run


def _function(name: str) -> Callable[[list[str]], object]:
    """``metacontrol.commands.<name>``, imported only when its command runs."""
    return lambda args: getattr(importlib.import_module("metacontrol.commands"), name)(args)


COMMANDS = {
    "prepare": Command("resize, annotate and encode photos into shards for training (train/prepare.py)",
                       _script("prepare")),
    "meta-train": Command("meta-train a ControlNet initialisation (meta_train.py)", _script("meta_train")),
    "finetune": Command("fine-tune a ControlNet on a new condition, full or LoRA (train/finetune.py)",
                        _script("finetune")),
    "evaluate": Command("score ControlNets on held-out conditions; writes report.html (train/evaluate.py)",
                        _script("evaluate")),
    "pretrain-base": Command("train the tiny base model on the synthetic world (train/pretrain_base.py)",
                             _script("pretrain_base")),
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
