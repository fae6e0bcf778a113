"""``metacontrol <command> [args]``: the repository's scripts under one name.

The scripts live in the repository (``meta_train.py``, ``train/``) so they stay readable top to
bottom; this entry point runs them from an editable install (``pip install -e .``).
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMANDS = {
    "meta-train": REPO / "meta_train.py",
    "finetune": REPO / "train" / "finetune.py",
    "evaluate": REPO / "train" / "evaluate.py",
    "pretrain-base": REPO / "train" / "pretrain_base.py",
}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        raise SystemExit(f"usage: metacontrol {{{','.join(COMMANDS)}}} [args...]\n"
                         "for multi-process runs use `accelerate launch <script>` directly")
    script = COMMANDS[argv[0]]
    if not script.is_file():
        raise SystemExit(f"metacontrol: {script} not found; the scripts ship with the repository, so install it "
                         "editable (`pip install -e .`) from a clone")
    sys.argv = [str(script), *argv[1:]]
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
