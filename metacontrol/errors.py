"""What every script does with the errors a user can fix: one line on stderr and an exit code.

Every script runs through ``run_main(main, "<name>")`` (``cli.run_script``: its shim in the checkout, and
``metacontrol <command>``),
so a mistyped path, a bad sample, a non-finite loss or
Ctrl-C reads the same in all of them: ``<name>: <what is wrong and what to do>``, no traceback, printed
once. Under several processes every process meets a configuration error and Ctrl-C alike, so only the
main one (``RANK`` 0) prints those; errors that can be one process's own (a bad sample read lazily, a
non-finite loss) print wherever they happen, never silently. Anything else is a bug and keeps its
traceback. This module imports nothing heavy: a configuration error is reported before torch is loaded.

``accelerate launch`` repeats a failed script's stderr inside its own traceback unless it is given
``-q`` (``--quiet``); the README's commands pass it, so the line is printed once there too.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from tqdm import tqdm

from metacontrol.config_loader import ConfigError
from metacontrol.data.images import BadSampleError

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C


class FailedElsewhere(RuntimeError):
    """Another process failed in this step: this one stops too, pointing at that process's own message."""


def error_line(err: BaseException) -> tuple[str, int, bool] | None:
    """(message, exit code, same on every process) for an error a user can act on; None for a bug."""
    if isinstance(err, KeyboardInterrupt):  # checkpointing.TrainingInterrupted says where, and how to resume
        return str(err) or "interrupted (Ctrl-C)", getattr(err, "exit_code", EXIT_INTERRUPTED), True
    if isinstance(err, ConfigError):  # AnnotatorUnavailable too: missing weights are missing on every process
        return f"configuration error: {err}", EXIT_ERROR, True
    if isinstance(err, BadSampleError):
        return f"bad data: {err}", EXIT_ERROR, False
    if isinstance(err, FailedElsewhere):  # this process stopped because another one failed in the same step
        return str(err), EXIT_ERROR, False
    if isinstance(err, OSError):  # a full disk, a folder that is a file, a permission: the path says which
        return f"cannot read or write a file: {err}", EXIT_ERROR, False
    if isinstance(err, FloatingPointError):  # a NonFiniteLossError, or MetaLearner's gradient overflow at scale 1
        return str(err), EXIT_ERROR, False
    return None


def run_main(main: Callable[[], object], name: str) -> None:
    """Run a script's ``main()``; map the errors of ``error_line`` to ``SystemExit`` after one line on stderr."""
    try:
        main()
    except (Exception, KeyboardInterrupt) as err:
        mapped = error_line(err)
        if mapped is None:
            raise
        message, code, replicated = mapped
        if not replicated or os.environ.get("RANK", "0") == "0":
            tqdm.write(f"{name}: {message}", file=sys.stderr)  # on a line of its own, not after a progress bar
        raise SystemExit(code) from None
