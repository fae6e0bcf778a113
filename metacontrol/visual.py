"""Image grids people would rather look at than read: rows of labelled tiles saved as PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def image_grid(rows: list[list[np.ndarray]], row_labels: list[str] | None = None,
               column_labels: list[str] | None = None, scale: int = 2) -> Image.Image:
    """Tile uint8 (H, W, 3) images row by row, upscaled ``scale`` x (nearest) with text labels."""
    h, w = rows[0][0].shape[:2]
    th, tw = h * scale, w * scale
    left = 70 if row_labels else 0
    top = 14 if column_labels else 0
    ncols = max(len(r) for r in rows)
    canvas = Image.new("RGB", (left + ncols * (tw + 2), top + len(rows) * (th + 2)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, label in enumerate(column_labels or []):
        draw.text((left + c * (tw + 2) + 2, 1), label, fill=(0, 0, 0))
    for r, row in enumerate(rows):
        y = top + r * (th + 2)
        if row_labels:
            draw.text((2, y + th // 2 - 5), row_labels[r], fill=(0, 0, 0))
        for c, tile in enumerate(row):
            img = Image.fromarray(tile).resize((tw, th), Image.NEAREST)
            canvas.paste(img, (left + c * (tw + 2), y))
    return canvas


def save_grid(path: str | Path, rows: list[list[np.ndarray]], row_labels: list[str] | None = None,
              column_labels: list[str] | None = None, scale: int = 2) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(rows, row_labels, column_labels, scale).save(path)
    return path
