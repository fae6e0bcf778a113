"""Loading controlnet-aux annotators from a local folder (a copy of ``lllyasviel/Annotators``) or a Hub id.

controlnet-aux is imported lazily: importing it costs seconds and it is only needed for real images.
Which of the two a location is follows the project's one rule (``metacontrol.models.base.local_folder``).
A missing weight file is reported with its name and the folder it was looked for in, before
controlnet-aux gets a chance to fail deep inside ``torch.load``; a Hub id is always tried, since the
local Hub cache may hold it even offline.
"""

from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from metacontrol.config_loader import ConfigError


class AnnotatorUnavailable(ConfigError):
    """An annotator cannot be built: weights missing, or the condition has no annotator at all.

    A configuration error (every process meets it alike), so scripts print it as one line.
    """


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
    # imports diffusers (seconds): only when weights are loaded
    from metacontrol.models.base import load_failure, local_folder

    try:
        folder = local_folder(location, f"{spec.class_name}: annotator folder")
    except ConfigError as err:
        raise AnnotatorUnavailable(f"{err}; it must hold {wanted}") from None
    if folder is None:  # a Hub id
        try:
            return cls.from_pretrained(location)
        except OSError as err:  # the Hub cannot be reached (or is offline) and the local Hub cache lacks the files
            raise AnnotatorUnavailable(
                f"{spec.class_name}: cannot load {wanted} from the Hub repo {location}: {load_failure(err)}"
            ) from None
    missing = [f for f in spec.weight_files if not (folder / f).is_file()]
    if missing:
        raise AnnotatorUnavailable(
            f"{spec.class_name}: weight file(s) {', '.join(missing)} not found in {folder.resolve()} "
            f"(looked for {', '.join(str(folder / f) for f in missing)})"
        )
    return cls.from_pretrained(str(folder))
