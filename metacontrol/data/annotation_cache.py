"""On-disk cache of annotated condition maps, so each real image is run through a detector only once.

Annotating with a neural detector (HED, MiDaS, OpenPose) costs far more than a training step on a
small ControlNet, and every epoch and every meta-task would otherwise redo it. A map is keyed by
everything that can change it: the image's pixels and shape, the condition's class and settings
(thresholds included), the detector's keyword arguments at that resolution, and for conditions with a
controlnet-aux annotator its spec, the controlnet-aux version and which weights were used. Maps are
stored as lossless PNGs, written atomically so that DataLoader workers and parallel processes sharing
a cache never read a half-written file.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from metacontrol.atomic import atomic_write
from metacontrol.conditions import AnnotatorSpec, Condition

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the stored format or the key changes meaning


@lru_cache(maxsize=1)
def _controlnet_aux_version() -> str:
    try:
        return importlib.metadata.version("controlnet-aux")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _weights_fingerprint(spec: AnnotatorSpec | None, annotators: str | None) -> str:
    """Which detector and weights produce the maps; ``annotators`` is irrelevant without a spec."""
    if spec is None:
        return "no annotator"
    parts = [repr(spec), f"controlnet-aux {_controlnet_aux_version()}"]
    folder = Path(annotators) if annotators is not None else None
    if folder is not None and folder.is_dir():
        # A relative folder means different weights from different working directories, and a
        # replaced weight file must not reuse maps of the old one: use the absolute path, size, mtime.
        parts.append(str(folder.resolve()))
        for name in spec.weight_files:
            weight = folder / name
            stat = weight.stat() if weight.is_file() else None
            parts.append(f"{name}:{stat.st_size}:{stat.st_mtime_ns}" if stat else f"{name}:missing")
    else:
        parts.append(repr(annotators))  # a Hub id or None
    return "|".join(parts)


def condition_fingerprint(condition: Condition, annotators: str | None, resolution: int) -> str:
    """Everything about how ``condition`` annotates a ``resolution``-sized image, as one string."""
    settings = {
        name: getattr(condition, name)
        for name in dir(condition)
        if not name.startswith("_") and not callable(getattr(condition, name))
    }
    return "\n".join([
        f"format {CACHE_FORMAT}",
        f"class {type(condition).__module__}.{type(condition).__qualname__}",
        f"settings {sorted(settings.items())!r}",
        f"detector_kwargs {sorted(condition.detector_kwargs(resolution).items())!r}",
        f"annotator {_weights_fingerprint(condition.annotator, annotators)}",
    ])  # fmt: skip


class AnnotationCache:
    """Condition maps keyed by image content and annotation settings, under ``cache_dir/<condition>/``.

    ``hits`` and ``misses`` count lookups in this process (each DataLoader worker has its own).
    """

    def __init__(self, cache_dir: str | Path) -> None:
        self.cache_dir = Path(cache_dir)
        self.hits = 0
        self.misses = 0
        self._write_failed = False

    def key(self, image: np.ndarray, condition: Condition, annotators: str | None) -> str:
        digest = hashlib.sha256()
        digest.update(condition_fingerprint(condition, annotators, max(image.shape[:2])).encode())
        digest.update(f"\n{image.shape} {image.dtype}\n".encode())
        digest.update(np.ascontiguousarray(image).data)
        return digest.hexdigest()

    def path(self, key: str, condition: Condition) -> Path:
        return self.cache_dir / condition.name / key[:2] / f"{key}.png"

    def get_or_compute(
        self,
        image: np.ndarray,
        condition: Condition,
        annotators: str | None,
        compute: Callable[[], np.ndarray],
    ) -> np.ndarray:
        """The cached map of ``image``, or ``compute()`` stored for next time."""
        path = self.path(self.key(image, condition, annotators), condition)
        if path.is_file():
            try:
                cached = _read_map(path, image.shape[:2])
            except Exception as err:  # a corrupt cache file must cost a recomputation, not the run
                logger.warning("annotation cache file %s is unreadable (%s); recomputing it", path, err)
            else:
                self.hits += 1
                return cached
        self.misses += 1
        result = compute()
        self._store(path, result)
        return result

    def _store(self, path: Path, condition_map: np.ndarray) -> None:
        try:
            atomic_write(path, lambda file: Image.fromarray(condition_map).save(file, format="PNG"))
        except OSError as err:  # a read-only or full disk slows training down but must not stop it
            if not self._write_failed:
                self._write_failed = True
                logger.warning("cannot write to the annotation cache %s (%s); maps will not be cached",
                               self.cache_dir, err)  # fmt: skip


def _read_map(path: Path, size: tuple[int, int]) -> np.ndarray:
    with Image.open(path) as stored:
        stored.load()
        if stored.mode != "RGB" or stored.size[::-1] != tuple(size):
            raise ValueError(f"expected an RGB map of {size[1]}x{size[0]}, found {stored.mode} {stored.size}")
        return np.array(stored)
