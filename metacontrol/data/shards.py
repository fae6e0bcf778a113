"""Reading what ``metacontrol prepare`` wrote (``source: prepared``): memory-mapped, so RAM does not grow with it.

The Arrow shards are opened with ``datasets.Dataset.from_file`` (memory-mapped, nothing read until a row is);
the encodings with ``numpy.load(mmap_mode="r")``. A batch reads only its own rows: the condition maps, and the
images only when no encodings are there to stand in for them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metacontrol.config_loader import ConfigError
from metacontrol.data.datasets import to_example
from metacontrol.data.images import BLACK, pil_to_rgb
from metacontrol.data.pools import LATENT_KEYS, TaskData, captions_bytes
from metacontrol.data.prepare import ENCODINGS_FOLDER, INDEX_FILE, shard_name

logger = logging.getLogger(__name__)


def read_index(root: Path) -> dict[str, Any]:
    """The index of a complete prepared set, or one line saying what is wrong with ``root``."""
    path = root / INDEX_FILE
    if not path.is_file():
        what = "is incomplete (no index.json yet)" if root.is_dir() else "does not exist"
        raise ConfigError(f"train_data_dir: {root} {what}; run `metacontrol prepare` with output_dir={root} "
                          "(again, to finish an interrupted one)")
    return json.loads(path.read_text())


class MappedRows:
    """Rows of per-shard arrays on disk, indexed as one tensor: ``rows[LongTensor] -> torch.Tensor``.

    ``lookup`` (per shard, optional) maps a row to its line in the shard's array: the text embeddings are
    stored once per distinct caption of a shard."""

    def __init__(self, arrays: list[np.ndarray], lookups: list[np.ndarray] | None = None, start: int = 0) -> None:
        self.arrays, self.lookups, self.start = arrays, lookups, start
        counts = [len(a) for a in (lookups if lookups is not None else arrays)]
        self.offsets = np.cumsum([0, *counts])

    def __len__(self) -> int:
        return int(self.offsets[-1]) - self.start

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        rows = np.asarray(index, dtype=np.int64).reshape(-1) + self.start
        shards = np.searchsorted(self.offsets, rows, side="right") - 1
        out = []
        for row, shard in zip(rows, shards):
            line = row - self.offsets[shard]
            if self.lookups is not None:
                line = self.lookups[shard][line]
            out.append(torch.from_numpy(np.array(self.arrays[shard][line])))
        return torch.stack(out)


class PreparedTaskData(TaskData):
    """One condition's rows of a prepared set. Its encodings are used when they were made by ``model_key``'s
    encoders; otherwise (or without encodings) the run's own cache computes them as for any dataset. ``rows``
    (a range of the set's rows) keeps only those, e.g. fine-tuning's shots."""

    def __init__(self, root: str | Path, condition: str, resolution: int, rows: range | None = None) -> None:
        import datasets

        super().__init__()
        self.root, self.condition, self.resolution = Path(root), condition, resolution
        self.index = read_index(self.root)
        if condition not in self.index["conditions"]:
            raise ConfigError(f"train_data_dir: {self.root} was prepared for {', '.join(self.index['conditions'])}, "
                              f"not {condition!r}; prepare it with that condition too")
        if self.index["resolution"] != resolution:
            raise ConfigError(f"resolution: {resolution}, but {self.root} was prepared at {self.index['resolution']} "
                              "px; train at that resolution or prepare again")
        self.shards = [m for m in self.index["shards"] if m["kept"]]
        files = [self.root / condition / f"{shard_name(m['shard'])}.arrow" for m in self.shards]
        self.table = datasets.concatenate_datasets([datasets.Dataset.from_file(str(f)) for f in files])
        if len(self.table) != self.index["kept"]:
            raise ConfigError(f"train_data_dir: {self.root}/{condition} holds {len(self.table)} rows, its index "
                              f"{self.index['kept']}; prepare it again into a new output_dir")
        self._features = {column: self.table.features[column] for column in ("image", "conditioning_image")}
        self._raw = self.table.cast_column("image", datasets.Image(decode=False)).cast_column(
            "conditioning_image", datasets.Image(decode=False))
        self.rows = rows if rows is not None else range(len(self.table))

    def __len__(self) -> int:
        return len(self.rows)

    def subset(self, rows: range) -> PreparedTaskData:
        return PreparedTaskData(self.root, self.condition, self.resolution, self.rows[rows.start:rows.stop])

    @property
    def captions(self) -> list[str]:
        return self.table.select(self.rows)["text"]

    def stored_encodings(self, model_key: str, text_keys: tuple[str, ...]) -> dict[str, MappedRows] | None:
        """The prepared encodings (the VAE posterior and the prompt encodings ``text_keys``, stored once per
        distinct caption), memory-mapped, if ``model_key``'s encoders made them; else None."""
        if self.index.get("encodings") != model_key:
            if self.index.get("encodings") is not None:
                logger.warning("%s was encoded by other encoders than this run's; encoding again", self.root)
            return None
        folders = [self.root / ENCODINGS_FOLDER / shard_name(m["shard"]) for m in self.shards]
        arrays = {key: [np.load(f / f"{key}.npy", mmap_mode="r") for f in folders]
                  for key in (*LATENT_KEYS, *text_keys, "caption_index")}
        start = self.rows.start
        latents = {key: MappedRows(arrays[key], start=start) for key in LATENT_KEYS}
        return latents | {key: MappedRows(arrays[key], arrays["caption_index"], start) for key in text_keys}

    def _decoded(self, row: dict, column: str) -> np.ndarray:
        image = self._features[column].decode_example(row[column])
        return pil_to_rgb(image, None, f"{self.root}[{column}]", BLACK)

    def item_tensors(self, indices: Sequence[int], pixels: bool = True) -> dict:
        """The batch of ``indices``; ``pixels=False`` (encodings attached) leaves the images undecoded."""
        rows = self._raw[[self.rows[i] for i in indices]]
        items = []
        for i in range(len(indices)):
            row = {column: rows[column][i] for column in ("image", "conditioning_image")}
            cond_map = self._decoded(row, "conditioning_image")
            image = self._decoded(row, "image") if pixels else np.zeros_like(cond_map)
            items.append(to_example(image, cond_map, rows["text"][i]))
        batch = {key: torch.stack([item[key] for item in items]) for key in ("pixel_values", "conditioning_pixel_values")}
        if not pixels:
            del batch["pixel_values"]
        batch["caption"] = list(rows["text"])
        return batch

    def fingerprint(self) -> str:
        """Over the stored PNG bytes of every image and the captions, in order."""
        digest = hashlib.sha256(b"prepared\n")
        for raw in self._raw.select(self.rows)["image"]:
            digest.update(hashlib.sha256(raw["bytes"]).digest())
        digest.update(captions_bytes(self.captions))
        return digest.hexdigest()
