"""Loading controlnet-aux annotators from a local folder (a copy of ``lllyasviel/Annotators``) or a Hub id.

controlnet-aux is imported lazily: importing it costs seconds and it is only needed for real images.
A missing weight file is reported with its name and the folder it was looked for in, before
controlnet-aux gets a chance to fail deep inside ``torch.load`` or a Hub download.
"""

from __future__ import annotations

import importlib
import os
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any


class AnnotatorUnavailable(RuntimeError):
    """An annotator cannot be built: weights missing, or the condition has no annotator at all."""


@dataclass(frozen=True)
class AnnotatorSpec:
    """Which controlnet-aux detector a condition uses and which weight files it needs."""

    module: str  # e.g. "controlnet_aux.hed"
    class_name: str  # e.g. "HEDdetector"
    weight_files: tuple[str, ...] = ()  # files ``from_pretrained`` reads from the folder

    @property
    def needs_weights(self) -> bool:
        return bool(self.weight_files)


# What importing controlnet-aux prints that is not ours to fix and says nothing about this run: its
# optional mediapipe extra, its re-registration of timm's tiny_vit models, timm's and torch's
# deprecations of APIs that controlnet-aux (not this project) calls.
_IMPORT_NOISE = (
    (UserWarning, r"The module 'mediapipe' is not installed"),
    (UserWarning, r"Overwriting tiny_vit_"),
    (FutureWarning, r"Importing from timm\.models\.\w+ is deprecated"),
    (FutureWarning, r"`torch\.jit\.script` is deprecated"),
    (DeprecationWarning, r"Please import `\w+` from the `scipy\.ndimage` namespace"),
)


def _detector_class(spec: AnnotatorSpec) -> Any:
    """Import the detector's class, silencing only controlnet-aux's known import-time warnings."""
    with warnings.catch_warnings():
        for category, message in _IMPORT_NOISE:
            warnings.filterwarnings("ignore", message=message, category=category)
        module = importlib.import_module(spec.module)
    return getattr(module, spec.class_name)


@lru_cache(maxsize=16)
def load_annotator(spec: AnnotatorSpec, location: str | None) -> Any:
    """Build the detector of ``spec``; ``location`` is a local folder or a Hub id (None: no weights given)."""
    cls = _detector_class(spec)
    if not spec.needs_weights:
        return cls()
    wanted = ", ".join(spec.weight_files)
    if location is None:
        raise AnnotatorUnavailable(
            f"{spec.class_name} needs weights ({wanted}); set `annotators` to a local folder holding them "
            "(for example a copy of lllyasviel/Annotators) or to a Hub id"
        )
    folder = Path(location)
    if folder.is_dir():
        missing = [f for f in spec.weight_files if not (folder / f).is_file()]
        if missing:
            raise AnnotatorUnavailable(
                f"{spec.class_name}: weight file(s) {', '.join(missing)} not found in {folder.resolve()} "
                f"(looked for {', '.join(str(folder / f) for f in missing)})"
            )
        return cls.from_pretrained(str(folder))
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.sep in location and not folder.exists():
        raise AnnotatorUnavailable(
            f"{spec.class_name}: annotator folder {location} does not exist "
            f"(and the Hub is offline or the name is a path); it must hold {wanted}"
        )
    try:
        return cls.from_pretrained(location)
    except Exception as err:  # hub errors come in many types; re-raise with what was asked for
        raise AnnotatorUnavailable(
            f"{spec.class_name}: could not fetch {wanted} from Hub repo {location!r}: {err}"
        ) from err
