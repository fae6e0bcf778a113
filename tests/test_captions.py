"""Captions: the key every source reads them from, and a warning when the tokenizer does not know their words."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from metacontrol.data.datasets import ImageFolderDataset
from metacontrol.data.images import BadSampleError
from metacontrol.data.pools import TensorPool, synthetic_pools, warn_unknown_words
from metacontrol.world import WorldConfig


def caption_folder(root: Path, captions: list[str], key: str = "text", size: int = 32) -> Path:
    """One random image and precomputed map per caption (no annotator needed), captions under ``key``."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = []
    for i, caption in enumerate(captions):
        for name in (f"{i}.png", f"{i}_map.png"):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / name)
        lines.append(json.dumps({"file_name": f"{i}.png", key: caption, "conditioning_file_name": f"{i}_map.png"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_caption_column_names_the_metadata_key_of_an_image_folder(tmp_path):
    root = caption_folder(tmp_path / "photos", ["a red ball", "a blue box"], key="prompt")
    dataset = ImageFolderDataset(root, "normal", 32, caption_column="prompt")
    assert [dataset[i]["caption"] for i in range(2)] == dataset.captions == ["a red ball", "a blue box"]
    with pytest.raises(BadSampleError, match=r"line 1: no caption for 0.png \(expected a 'text' or 'caption' key"):
        ImageFolderDataset(root, "normal", 32)


def _pool(captions: list[str]) -> TensorPool:
    images = torch.zeros(len(captions), 3, 8, 8, dtype=torch.uint8)
    return TensorPool(images, images, captions)


def test_unknown_words_are_counted_once_per_caption_list(tiny_sd_dir, caplog):
    tokenizer = AutoTokenizer.from_pretrained(tiny_sd_dir, subfolder="tokenizer")
    odd = ["an astronaut in front of a flag,", "a red ball", "An Astronaut on a gray floor"]
    world = synthetic_pools(WorldConfig(resolution=32), ["canny"], 16, show_progress=False)["canny"]
    with caplog.at_level(logging.WARNING, logger="metacontrol.data.pools"):
        warn_unknown_words({"canny": _pool(odd), "depth": _pool(odd), "seg": world}, tokenizer)
    assert [r.getMessage() for r in caplog.records] == [
        "2 of 3 captions of canny, depth contain words unknown to the tokenizer (e.g. 'astronaut', 'flag'); "
        "they become <|unk|>"]  # the world's own captions are all known
