"""One way from a configured source to task data: fine-tuning reads a saved 🤗 dataset as meta-training does."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from metacontrol.config import FinetuneConfig, SourceConfig
from metacontrol.config_loader import ConfigError
from metacontrol.data.images import BadSampleError
from metacontrol.data.pools import DatasetTaskData
from metacontrol.data.sources import load_task_data
from metacontrol.models.base import load_base_model
from tests.conftest import finetune_args, run_script
from tests.test_finetune import _card_row

CAPTIONS = ["a red ball", "a blue box", "a green triangle", "a white person", "a red box", "a blue ball"]


def _hf_dataset(root: Path, size: int = 32, captions: list[str | None] = CAPTIONS) -> Path:
    """A saved DatasetDict whose image i is a flat grey of level 40 * i, with a map and a caption."""
    import datasets

    images = [Image.fromarray(np.full((size, size, 3), 40 * i, np.uint8)) for i in range(len(captions))]
    maps = [Image.fromarray(np.full((size, size, 3), 255 - 40 * i, np.uint8)) for i in range(len(captions))]
    table = datasets.Dataset.from_dict({"image": images, "conditioning_image": maps, "text": captions})
    table = table.cast_column("image", datasets.Image()).cast_column("conditioning_image", datasets.Image())
    datasets.DatasetDict({"train": table}).save_to_disk(str(root))
    return root


def test_shots_of_a_saved_dataset_start_at_shot_offset(tiny_sd_dir, tmp_path):
    root = _hf_dataset(tmp_path / "hf")
    base = load_base_model(str(tiny_sd_dir)).freeze()
    source = SourceConfig(source="hf", train_data_dir=str(root))
    data = load_task_data(source, ["normal"], 32, base, cache="none", cache_dir=None, show_progress=False,
                          count=3, start=2)["normal"]
    assert len(data) == 3
    batch = data.item_tensors([0, 2])
    assert list(batch["caption"]) == [CAPTIONS[2], CAPTIONS[4]]
    levels = ((batch["pixel_values"][:, 0, 0, 0] + 1) * 127.5).round().tolist()
    assert levels == [80.0, 160.0]
    with pytest.raises(ConfigError, match=r"shots: 5 examples from shot_offset 2 asked for, but \S+ has only 6"):
        load_task_data(source, ["normal"], 32, base, cache="none", cache_dir=None, show_progress=False, count=5,
                       start=2)


def test_on_bad_sample_reaches_a_saved_dataset(tiny_sd_dir, tmp_path):
    root = _hf_dataset(tmp_path / "hf", captions=[*CAPTIONS[:2], None, *CAPTIONS[3:]])
    base = load_base_model(str(tiny_sd_dir)).freeze()
    with pytest.raises(BadSampleError, match=rf"{re.escape(str(root))}\[2\]: empty or non-text caption None"):
        load_task_data(SourceConfig(source="hf", train_data_dir=str(root)), ["normal"], 32, base, cache="none",
                       cache_dir=None, show_progress=False)  # fmt: skip
    source = SourceConfig(source="hf", train_data_dir=str(root), on_bad_sample="skip")
    data = load_task_data(source, ["normal"], 32, base, cache="none", cache_dir=None, show_progress=False)["normal"]
    assert data.captions == [*CAPTIONS[:2], *CAPTIONS[3:]]
    levels = ((data.item_tensors([2])["pixel_values"][:, 0, 0, 0] + 1) * 127.5).round().tolist()
    assert levels == [120.0]  # row 3: the kept rows are indexed, the bad one left out
    with pytest.raises(ConfigError, match=r"has only 5 usable samples \(1 skipped as bad\)"):
        load_task_data(source, ["normal"], 32, base, cache="none", cache_dir=None, show_progress=False, count=6)


def test_an_image_folder_run_with_cache_dir_writes_nothing_into_its_data_folder(tiny_sd_dir, tmp_path):
    """The data may be read-only: annotations go to cache_dir/annotations/, encodings to cache_dir/<key>/."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        image = np.zeros((32, 32, 3), np.uint8)
        image[8 + i : 24, 8 : 24 - i] = 200  # a square: canny finds its edges
        Image.fromarray(image).save(folder / f"{i}.png")
    (folder / "metadata.jsonl").write_text(
        "".join(json.dumps({"file_name": f"{i}.png", "text": c}) + "\n" for i, c in enumerate(CAPTIONS[:3])))
    data_files = sorted(folder.rglob("*"))
    base = load_base_model(str(tiny_sd_dir)).freeze()
    source = SourceConfig(source="imagefolder", train_data_dir=str(folder))
    cache = tmp_path / "cache"

    def load() -> DatasetTaskData:
        data = load_task_data(source, ["canny"], 32, base, cache="latents", cache_dir=str(cache),
                              show_progress=False)["canny"]  # fmt: skip
        data.item_tensors(range(len(data)))  # annotates every image
        return data

    first = load()
    assert sorted(folder.rglob("*")) == data_files
    assert len(list((cache / "annotations" / "canny").rglob("*.png"))) == 3
    assert first.dataset.cache.misses == 3
    assert load().dataset.cache.misses == 0  # the next run (or step) reads them back
    assert sorted(folder.rglob("*")) == data_files


def test_finetune_on_a_saved_dataset(tiny_sd_dir, tmp_path):
    root = _hf_dataset(tmp_path / "hf")
    out = tmp_path / "out"
    run_script(finetune_args(tiny_sd_dir, out, "source=hf", f"train_data_dir={root}", "shots=4", "max_train_steps=2",
                             "train_batch_size=2", f"cache_dir={tmp_path / 'cache'}"))
    assert _card_row(out, "shots") == f"4 ({root})" and _card_row(out, "steps") == "2 of 2"
    assert any((tmp_path / "cache").rglob("*.safetensors"))  # the encodings cache honoured cache_dir
    assert (out / "checkpoint-2").is_dir()


def test_a_source_other_than_synthetic_needs_train_data_dir():
    with pytest.raises(ConfigError, match="train_data_dir: None is not valid; expected a path when source is 'hf'"):
        FinetuneConfig(source="hf")

