"""Atomic writes: a checkpoint, a cache entry or a saved model is either completely there or not at all.

The one implementation every writer uses (checkpoints, the encoding and annotation caches, the base
model's pre-training state, saved ControlNets). Everything is written into a temporary sibling and renamed into place, so a run killed mid-write
(SIGKILL, a full disk, a pre-empted node) leaves the previous checkpoint intact. What such a run leaves
behind instead, temporary siblings, is removed by ``remove_stale_writes`` when the next run starts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import torch

logger = logging.getLogger(__name__)
TMP_MARK, OLD_MARK = ".tmp-", ".old-"  # in the names of the temporary siblings of atomic writes


def remove_stale_writes(folder: str | Path) -> list[Path]:
    """Delete what interrupted atomic writes left in ``folder``; return them.

    Only for a folder no other process is writing into (a training ``output_dir`` at start-up, main
    process): at SD scale each leftover ``.checkpoint-N.tmp-*`` holds gigabytes.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    patterns = (f".*{TMP_MARK}*", f".*{OLD_MARK}*", f"{TMP_MARK}*")
    stale = sorted({path for pattern in patterns for path in folder.glob(pattern)})
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    if stale:
        logger.warning("removed %d leftover(s) of an interrupted write in %s: %s", len(stale), folder,
                       ", ".join(p.name for p in stale))
    return stale


def set_aside(folder: Path) -> Path:
    """Rename ``folder`` to a hidden sibling (one ``os.replace``) and return it, for deleting at leisure.

    A delete cut short then leaves that sibling, which ``remove_stale_writes`` finishes off, never a
    half-deleted folder under the real name.
    """
    old = folder.with_name(f".{folder.name}{OLD_MARK}{os.getpid()}")
    os.replace(folder, old)
    return old


@contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``target`` when the block exits without error."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}{TMP_MARK}", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
    try:
        yield tmp
        old = set_aside(target) if target.exists() else None
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_files(target: str | Path) -> Iterator[Path]:
    """Yield a temporary directory whose files are moved into ``target`` one ``os.replace`` each.

    For folders that also hold other things (a training ``output_dir`` with its ``checkpoint-N``
    subfolders): each file appears complete or not at all.
    """
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=TMP_MARK, dir=target))
    try:
        yield tmp
        for item in sorted(tmp.iterdir()):
            os.replace(item, target / item.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    """``write(file)`` into a uniquely named temporary sibling, then ``os.replace`` it onto ``path``.

    Safe for several processes writing the same cache entry at once (the last rename wins, readers see
    one whole file). The temporary file is opened like any new file, so its mode follows the umask and a
    shared cache stays shared (``mkstemp`` would make it private).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as file:
            write(file)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda file: file.write(data))


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` through a temporary file and ``os.replace``."""
    return atomic_write(path, lambda file: torch.save(obj, file))
