"""The configs and checkpoints that come with the package, so the defaults run outside a checkout.

The defaults name ``configs/meta_tiny.yaml``, ``checkpoints/tiny-sd``... relative to the working directory,
as a checkout has them. An installed wheel carries the configs, the tiny base and the default start inside
the package (``pyproject.toml`` maps them to ``metacontrol/_shipped/``); a checkout (an editable install)
keeps them beside ``metacontrol/``. Plain ``Path(__file__)``, not ``importlib.resources``: the data-only
``metacontrol._shipped.*`` packages are not importable under setuptools' editable finder, and pip installs
unpacked, so these are real folders that ``from_pretrained`` can read.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
SHIPPED = _PACKAGE / "_shipped" if (_PACKAGE / "_shipped").is_dir() else _PACKAGE.parent
TOP_FOLDERS = ("configs", "checkpoints")


def shipped_path(location: str | Path) -> Path:
    """``location`` itself if it exists here, or is not a relative path under ``configs/`` or ``checkpoints/``;
    else the package's copy of it where there is one, so that ``configs/meta_tiny.yaml`` works from any folder
    while a file of the same name in the working directory always wins. Unchanged when neither exists, so the
    caller's error names the path as the user wrote it."""
    path = Path(location)
    if path.exists() or path.is_absolute() or path.parts[0] not in TOP_FOLDERS:
        return path
    copy = SHIPPED / path
    return copy if copy.exists() else path
