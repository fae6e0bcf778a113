"""Loading real images into square uint8 RGB arrays, under one documented policy for bad input.

Conversion rules (``pil_to_rgb``, shared by image folders and Hugging Face datasets):

* EXIF orientation is applied, so phone photos are upright as their viewers show them.
* Grayscale, palette, CMYK, YCbCr... are converted to RGB; anything with transparency (RGBA, LA,
  palette or RGB with a transparent colour) is composited over a background: white for photos (as
  viewers show them), black for condition maps (whose background is black).
* 16-bit and 32-bit integer images (I;16*, I) are scaled from 0..65535 to 0..255, because Pillow's own
  ``convert`` clips them and turns almost every 16-bit photo white; float images (F) are taken as 0..1.
* The shorter side is resized to ``resolution`` (Lanczos) and the centre is cropped to a square, as
  diffusers' ControlNet example does. Smaller images are upscaled, with one warning per file.
  ``resolution=None`` keeps the image's own size (a photo annotated as it is).

Bad samples (``on_bad_sample``), the same for image folders and saved Hugging Face datasets: under
``"error"`` the first bad file or row raises a ``BadSampleError`` naming it (``<path>[i]`` for a row);
under ``"skip"`` bad ones are left out when a dataset is indexed, counted, logged and kept in
``dataset.skipped``. Either way this happens at construction, never deep in a training step.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageOps

from metacontrol.config_loader import check

logger = logging.getLogger(__name__)

OnBadSample = Literal["error", "skip"]
WHITE = (255, 255, 255)
BLACK = (0, 0, 0)
_WIDE_INTEGER_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})
_SKIPPED_SHOWN = 20  # skipped samples listed in the log; all of them are in ``skipped``
_warned_small: set[str] = set()  # sources already warned about being upscaled


class BadSampleError(ValueError):
    """A sample cannot be used; the message names the file (and metadata line) and what is wrong.

    ``path`` is the offending file, or ``"<metadata> line N"`` when the problem is in the metadata.
    """

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        super().__init__(message)  # one positional argument, so DataLoader workers can re-raise it
        self.path = str(path) if path is not None else None


class BadSamplePolicy:
    """Applies ``on_bad_sample`` while a dataset is indexed: raise at once, or record and go on."""

    def __init__(self, on_bad_sample: OnBadSample) -> None:
        check(on_bad_sample in ("error", "skip"), "on_bad_sample", on_bad_sample, "'error' or 'skip'")
        self.mode = on_bad_sample
        self.skipped: list[tuple[str, str]] = []  # (path, reason)

    def reject(self, error: BadSampleError) -> None:
        if self.mode == "error":
            raise error
        self.skipped.append((error.path or "", str(error)))

    def report(self, total: int, source: str | Path) -> None:
        """Log how many of ``total`` samples of ``source`` were skipped, and which."""
        if not self.skipped:
            return
        shown = "; ".join(reason for _, reason in self.skipped[:_SKIPPED_SHOWN])
        more = len(self.skipped) - _SKIPPED_SHOWN
        if more > 0:
            shown += f"; and {more} more (see dataset.skipped)"
        logger.warning("skipped %d of %d samples in %s: %s", len(self.skipped), total, source, shown)


def _to_rgb(image: Image.Image, source: str, background: tuple[int, int, int]) -> Image.Image:
    """Any Pillow mode -> RGB, following the rules in the module docstring."""
    if image.mode in _WIDE_INTEGER_MODES or image.mode == "F":
        full_scale = 1.0 if image.mode == "F" else 65535.0
        values = np.asarray(image, dtype=np.float64) * (255.0 / full_scale)
        return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8)).convert("RGB")
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (*background, 255)), rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as err:  # modes Pillow cannot convert, e.g. LAB
        raise BadSampleError(
            f"{source}: cannot convert image mode {image.mode} to RGB ({err})", source
        ) from err


def pil_to_rgb(
    image: Image.Image, resolution: int | None, source: str = "<image>", background: tuple[int, int, int] = WHITE
) -> np.ndarray:
    """A decoded Pillow image -> (resolution, resolution, 3) uint8 RGB; ``source`` names it in messages."""
    rgb = _to_rgb(ImageOps.exif_transpose(image), source, background)
    if resolution is None:
        return np.array(rgb)
    if min(rgb.size) < resolution and source not in _warned_small:
        _warned_small.add(source)
        logger.warning(
            "%s: %dx%d is smaller than the resolution %d; upscaling it", source, *rgb.size, resolution
        )
    return np.array(ImageOps.fit(rgb, (resolution, resolution), method=Image.Resampling.LANCZOS))


def decode(open_image: Callable[[], Image.Image], source: str) -> Image.Image:
    """``open_image()`` decoded fully, so truncated data fails here, or a BadSampleError naming ``source``."""
    try:
        image = open_image()
        image.load()
    except Exception as err:  # Pillow's decoders raise OSError, SyntaxError, ValueError, zlib.error...
        raise BadSampleError(
            f"{source}: cannot be decoded as an image ({type(err).__name__}: {err})", source
        ) from err
    return image


def load_rgb(path: str | Path, resolution: int | None, background: tuple[int, int, int] = WHITE) -> np.ndarray:
    """Decode ``path`` (with ``decode``) and convert it with ``pil_to_rgb``."""
    if not Path(path).is_file():
        raise BadSampleError(f"{path}: no such file", path)
    image = decode(lambda: Image.open(io.BytesIO(Path(path).read_bytes())), str(path))
    return pil_to_rgb(image, resolution, str(path), background)
