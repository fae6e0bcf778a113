"""Image grids people would rather look at than read: rows of labelled tiles saved as PNG."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

LINE_HEIGHT = 11  # PIL's default bitmap font is ~6 x 11 px


def image_grid(rows: list[list[np.ndarray]], row_labels: list[str] | None = None,
               column_labels: list[str] | None = None, scale: int = 2,
               row_captions: list[str] | None = None) -> Image.Image:
    """Tile uint8 (H, W, 3) images row by row, upscaled ``scale`` x (nearest) with text labels.

    ``row_captions`` (the prompt of each row) are wrapped under the row's tiles, so a grid says what
    the model was asked for, not only what it drew.
    """
    h, w = rows[0][0].shape[:2]
    th, tw = h * scale, w * scale
    left = 70 if row_labels else 0
    top = 14 if column_labels else 0
    ncols = max(len(r) for r in rows)
    width = left + ncols * (tw + 2)
    wrapped = [textwrap.wrap(c, max(10, (width - left) // 6)) for c in row_captions] if row_captions else None
    caption_h = LINE_HEIGHT * max(len(lines) for lines in wrapped) + 2 if wrapped else 0
    row_h = th + 2 + caption_h
    canvas = Image.new("RGB", (width, top + len(rows) * row_h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, label in enumerate(column_labels or []):
        draw.text((left + c * (tw + 2) + 2, 1), label, fill=(0, 0, 0))
    for r, row in enumerate(rows):
        y = top + r * row_h
        if row_labels:
            draw.text((2, y + th // 2 - 5), row_labels[r], fill=(0, 0, 0))
        for c, tile in enumerate(row):
            img = Image.fromarray(tile).resize((tw, th), Image.NEAREST)
            canvas.paste(img, (left + c * (tw + 2), y))
        for i, line in enumerate(wrapped[r] if wrapped else []):
            draw.text((left + 2, y + th + 1 + i * LINE_HEIGHT), line, fill=(60, 60, 60))
    return canvas


def save_grid(path: str | Path, rows: list[list[np.ndarray]], row_labels: list[str] | None = None,
              column_labels: list[str] | None = None, scale: int = 2,
              row_captions: list[str] | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(rows, row_labels, column_labels, scale, row_captions).save(path)
    return path
