"""Datasets, image loading and the annotation cache, on real files written to ``tmp_path``."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from metacontrol.conditions import AnnotatorUnavailable, get_condition
from metacontrol.config_loader import ConfigError
from metacontrol.data.annotation_cache import AnnotationCache
from metacontrol.data.datasets import (
    SPLIT_SEED_OFFSETS,
    HuggingFaceDataset,
    ImageFolderDataset,
    SyntheticDataset,
    to_example,
)
from metacontrol.data.images import BadSampleError, load_rgb, pil_to_rgb
from metacontrol.world import WorldConfig

RES = 64


def _picture(seed: int, height: int = 80, width: int = 96) -> np.ndarray:
    """An RGB image with a few flat shapes: clear edges for canny, texture for lineart."""
    rng = np.random.default_rng(seed)
    image = np.full((height, width, 3), rng.integers(0, 256, 3), np.uint8)
    for _ in range(3):
        colour = [int(c) for c in rng.integers(0, 256, 3)]
        x, y = int(rng.integers(0, width - 20)), int(rng.integers(0, height - 20))
        cv2.rectangle(image, (x, y), (x + 20, y + 15), colour, thickness=-1)
        cv2.circle(
            image, (int(rng.integers(10, width - 10)), int(rng.integers(10, height - 10))), 8, colour, -1
        )
    return image


def _write_folder(root: Path, entries: list[dict | str], images: dict[str, Image.Image | bytes]) -> Path:
    """Write ``images`` (PIL images or raw bytes) and a metadata.jsonl of ``entries`` (dicts or raw lines)."""
    root.mkdir(parents=True, exist_ok=True)
    for name, content in images.items():
        if isinstance(content, bytes):
            (root / name).write_bytes(content)
        else:
            content.save(root / name)
    lines = [e if isinstance(e, str) else json.dumps(e) for e in entries]
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _rgb_folder(root: Path, count: int = 3) -> Path:
    names = [f"{i:03d}.png" for i in range(count)]
    # One line uses the alternative `caption` key.
    entries = [
        {"file_name": n, ("caption" if i == 1 else "text"): f"picture {i}"} for i, n in enumerate(names)
    ]
    return _write_folder(root, entries, {n: Image.fromarray(_picture(i)) for i, n in enumerate(names)})


def _canny(path: Path) -> torch.Tensor:
    return torch.from_numpy(cv2.Canny(load_rgb(path, RES), 100, 200).astype(np.float32) / 255.0)


# -- synthetic -----------------------------------------------------------------------------------


def test_synthetic_items_are_training_tensors_and_deterministic() -> None:
    world = WorldConfig(resolution=RES, supersample=1)
    train = SyntheticDataset(world, "depth", "train", size=3)
    item = train[1]
    assert item["pixel_values"].shape == item["conditioning_pixel_values"].shape == (3, RES, RES)
    assert item["pixel_values"].dtype == item["conditioning_pixel_values"].dtype == torch.float32
    assert -1.0 <= item["pixel_values"].min() and item["pixel_values"].max() <= 1.0
    assert 0.0 <= item["conditioning_pixel_values"].min() and item["conditioning_pixel_values"].max() <= 1.0
    scene = train.scene(1)
    assert scene.seed == 1 and item["caption"] == scene.caption
    expected_image = torch.from_numpy(scene.image.astype(np.float32)).permute(2, 0, 1) / 127.5 - 1.0
    assert torch.equal(item["pixel_values"], expected_image)
    depth_map = get_condition("depth").render(scene)
    assert torch.equal(
        item["conditioning_pixel_values"],
        torch.from_numpy(depth_map.astype(np.float32)).permute(2, 0, 1) / 255,
    )

    again = SyntheticDataset(world, "depth", "train", size=3)[1]
    assert torch.equal(again["pixel_values"], item["pixel_values"])
    assert torch.equal(again["conditioning_pixel_values"], item["conditioning_pixel_values"])

    splits = {s: SyntheticDataset(world, "depth", s, size=3) for s in SPLIT_SEED_OFFSETS}
    seeds = {s: {d.seed(i) for i in range(len(d))} for s, d in splits.items()}
    assert not (seeds["train"] & seeds["val"]) and not (seeds["val"] & seeds["test"])
    assert splits["val"].scene(0).seed == SPLIT_SEED_OFFSETS["val"]
    firsts = [splits[s][0]["pixel_values"] for s in ("train", "val", "test")]
    assert not torch.equal(firsts[0], firsts[1]) and not torch.equal(firsts[1], firsts[2])
    with pytest.raises(IndexError):
        train[3]


def test_synthetic_rejects_bad_split_size_and_condition() -> None:
    with pytest.raises(ConfigError, match="split"):
        SyntheticDataset(WorldConfig(), "depth", "validation")
    with pytest.raises(ConfigError, match="size"):
        SyntheticDataset(WorldConfig(), "depth", "train", size=1_000_000_001)
    with pytest.raises(ConfigError, match="unknown condition 'cany'"):
        SyntheticDataset(WorldConfig(), "cany")


def test_to_example_rejects_mismatched_maps() -> None:
    with pytest.raises(ValueError, match="differ in size"):
        to_example(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 16, 3), np.uint8), "x")
    with pytest.raises(ValueError, match="uint8"):
        to_example(np.zeros((8, 8, 3), np.float32), np.zeros((8, 8, 3), np.uint8), "x")


# -- image folder and annotation cache -----------------------------------------------------------


def test_image_folder_canny_matches_cv2_and_cache_is_reused(tmp_path: Path, caplog) -> None:
    root = _rgb_folder(tmp_path / "folder")
    dataset = ImageFolderDataset(root, "canny", RES)
    assert len(dataset) == 3 and dataset.skipped == []
    items = [dataset[i] for i in range(3)]
    for i, item in enumerate(items):
        path = root / f"{i:03d}.png"
        assert item["caption"] == f"picture {i}"
        assert item["pixel_values"].shape == item["conditioning_pixel_values"].shape == (3, RES, RES)
        expected = torch.from_numpy(load_rgb(path, RES).astype(np.float32)).permute(2, 0, 1) / 127.5 - 1
        assert torch.equal(item["pixel_values"], expected)
        edges = _canny(path)
        assert edges.sum() > 0
        for channel in item["conditioning_pixel_values"]:
            assert torch.equal(channel, edges)
    # Construction annotates one sample up front (a miss), iterating computes the other two.
    assert (dataset.cache.misses, dataset.cache.hits) == (3, 1)
    cached = sorted((root / ".metacontrol_cache" / "canny").rglob("*.png"))
    assert len(cached) == 3

    second = ImageFolderDataset(root, "canny", RES)
    second_items = [second[i] for i in range(3)]
    assert (second.cache.misses, second.cache.hits) == (0, 4)
    for a, b in zip(items, second_items, strict=True):
        assert torch.equal(a["conditioning_pixel_values"], b["conditioning_pixel_values"])

    # Another annotator over the same images and cache folder is a miss, and gives another map.
    lineart = ImageFolderDataset(root, "lineart", RES)
    lineart_items = [lineart[i] for i in range(3)]
    assert (lineart.cache.misses, lineart.cache.hits) == (3, 1)
    assert not torch.equal(
        lineart_items[0]["conditioning_pixel_values"], items[0]["conditioning_pixel_values"]
    )

    # A corrupt cache file is recomputed (with a warning) and rewritten.
    cached[0].write_bytes(b"not a png at all")
    caplog.set_level(logging.WARNING)
    third = ImageFolderDataset(root, "canny", RES)
    third_items = [third[i] for i in range(3)]
    assert (third.cache.misses, third.cache.hits) == (1, 3)
    assert "unreadable" in caplog.text and cached[0].name in caplog.text
    for a, b in zip(items, third_items, strict=True):
        assert torch.equal(a["conditioning_pixel_values"], b["conditioning_pixel_values"])
    with Image.open(cached[0]) as rewritten:
        assert rewritten.mode == "RGB" and rewritten.size == (RES, RES)


def test_cache_key_follows_image_and_condition_settings(tmp_path: Path) -> None:
    cache = AnnotationCache(tmp_path)
    canny = get_condition("canny")
    image = _picture(0, RES, RES)
    key = cache.key(image, canny, None)
    assert cache.key(image.copy(), canny, None) == key
    assert cache.key(image, canny, "some/annotators") == key  # canny uses no annotator weights
    changed = type(canny)()
    changed.low_threshold = 50
    assert cache.key(image, changed, None) != key
    other = image.copy()
    other[0, 0, 0] ^= 1
    assert cache.key(other, canny, None) != key
    assert cache.key(image.reshape(32, 128, 3), canny, None) != key  # same bytes, other shape
    hed = get_condition("hed")
    assert cache.key(image, hed, "a/folder") != cache.key(image, hed, "b/folder")

    calls = []
    first = cache.get_or_compute(image, canny, None, lambda: calls.append(1) or canny.annotate(image))
    again = cache.get_or_compute(image, canny, None, lambda: calls.append(1) or canny.annotate(image))
    assert calls == [1] and np.array_equal(first, again)
    assert cache.path(key, canny).is_file() and not list(tmp_path.rglob("*.tmp"))


def test_precomputed_condition_files_are_used_instead_of_annotating(tmp_path: Path) -> None:
    condition_map = np.zeros((80, 96, 3), np.uint8)
    condition_map[20:60, 30:70] = (255, 0, 163)  # a "ball" in the ADE20K palette
    root = _write_folder(
        tmp_path / "seg",
        [{"file_name": "a.png", "conditioning_file_name": "a_seg.png", "text": "a ball"}],
        {"a.png": Image.fromarray(_picture(1)), "a_seg.png": Image.fromarray(condition_map)},
    )
    dataset = ImageFolderDataset(root, "seg", RES)  # seg has no annotator: only precomputed maps work
    item = dataset[0]
    expected = load_rgb(root / "a_seg.png", RES)
    assert torch.equal(
        item["conditioning_pixel_values"],
        torch.from_numpy(expected.astype(np.float32)).permute(2, 0, 1) / 255,
    )
    assert dataset.cache.misses == dataset.cache.hits == 0


def test_condition_without_weights_fails_at_construction(tmp_path: Path) -> None:
    root = _rgb_folder(tmp_path / "folder", count=1)
    with pytest.raises(AnnotatorUnavailable, match="ControlNetHED.pth"):
        ImageFolderDataset(root, "hed", RES)
    with pytest.raises(AnnotatorUnavailable, match="no controlnet-aux annotator"):
        ImageFolderDataset(root, "seg", RES)
    with pytest.raises(ConfigError, match="unknown condition"):
        ImageFolderDataset(root, "edges", RES)


# -- bad input -----------------------------------------------------------------------------------


def _messy_folder(root: Path) -> Path:
    rgba = np.zeros((80, 80, 4), np.uint8)
    rgba[:, :40] = (200, 10, 10, 255)  # left half opaque red, right half fully transparent
    gradient = np.tile(np.linspace(0, 65535, 128).astype(np.uint16), (128, 1))
    valid = Image.fromarray(_picture(5))
    valid.save(root.parent / "full.png")
    truncated = (root.parent / "full.png").read_bytes()
    images = {
        "corrupt.png": np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes(),
        "good.png": valid,
        "gray.png": Image.fromarray(_picture(2)[:, :, 0]),
        "rgba.png": Image.fromarray(rgba),
        "deep.png": Image.fromarray(gradient),
        "small.png": Image.fromarray(_picture(3, 32, 32)),
        "truncated.png": truncated[: len(truncated) * 2 // 3],
        "uncaptioned.png": Image.fromarray(_picture(4)),
    }
    entries = [{"file_name": name, "text": "" if name == "uncaptioned.png" else name} for name in images]
    return _write_folder(root, entries, images)


def test_bad_samples_are_skipped_at_indexing_and_odd_modes_convert(tmp_path: Path, caplog) -> None:
    root = _messy_folder(tmp_path / "messy")
    caplog.set_level(logging.WARNING)
    dataset = ImageFolderDataset(root, "canny", RES, on_bad_sample="skip")
    skipped = {Path(path).name: reason for path, reason in dataset.skipped}
    assert sorted(skipped) == ["corrupt.png", "truncated.png", "uncaptioned.png"]
    assert "cannot be decoded" in skipped["corrupt.png"] and "line 1" in skipped["corrupt.png"]
    assert "truncated" in skipped["truncated.png"]
    assert "empty" in skipped["uncaptioned.png"] and "line 8" in skipped["uncaptioned.png"]
    assert "skipped 3 of 8 samples" in caplog.text
    assert "small.png: 32x32 is smaller than the resolution 64" in caplog.text

    items = {dataset[i]["caption"]: dataset[i] for i in range(len(dataset))}
    assert sorted(items) == ["deep.png", "good.png", "gray.png", "rgba.png", "small.png"]
    for item in items.values():
        assert item["pixel_values"].shape == (3, RES, RES) and item["pixel_values"].dtype == torch.float32
    gray = items["gray.png"]["pixel_values"]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    rgba = items["rgba.png"]["pixel_values"]
    assert torch.allclose(rgba[:, :, -8:], torch.ones(3, RES, 8))  # transparent -> white
    assert rgba[0, 0, 0] > 0.5 and rgba[1, 0, 0] < -0.5  # opaque red stays red
    # The 16-bit gradient keeps its range: ~0..255 from left to right, not clipped to white.
    deep = load_rgb(root / "deep.png", RES)[:, :, 0].astype(int)
    assert deep[:, 0].max() <= 3 and deep[:, -1].min() >= 252 and np.all(np.diff(deep[0]) >= 0)
    assert torch.equal(
        items["deep.png"]["pixel_values"][0], torch.from_numpy(deep.astype(np.float32)) / 127.5 - 1
    )


def test_first_bad_sample_raises_under_error(tmp_path: Path) -> None:
    root = _messy_folder(tmp_path / "messy")
    with pytest.raises(BadSampleError, match=r"corrupt\.png: cannot be decoded as an image .*line 1"):
        ImageFolderDataset(root, "canny", RES)
    with pytest.raises(ConfigError, match="on_bad_sample"):
        ImageFolderDataset(root, "canny", RES, on_bad_sample="ignore")


def test_metadata_problems_name_the_line(tmp_path: Path) -> None:
    root = _write_folder(
        tmp_path / "meta",
        ["{not json", '{"text": "no file"}', '{"file_name": "gone.png", "text": "x"}',
         '["a list"]', '{"file_name": "ok.png"}', "", '{"file_name": "ok.png", "text": "fine"}'],
        {"ok.png": Image.fromarray(_picture(6))},
    )  # fmt: skip
    dataset = ImageFolderDataset(root, "canny", RES, on_bad_sample="skip")
    assert len(dataset) == 1 and dataset[0]["caption"] == "fine"
    reasons = [reason for _, reason in dataset.skipped]
    assert len(reasons) == 5
    expected = ["not valid JSON", "missing file_name", "gone.png is listed but does not exist",
                "expected a JSON object", "no caption for ok.png"]  # fmt: skip
    for number, text in enumerate(expected, 1):
        assert f"metadata.jsonl line {number}: " in reasons[number - 1] and text in reasons[number - 1]

    (root / "metadata.jsonl").write_text("{not json}\n")
    with pytest.raises(BadSampleError, match="no usable samples"):
        ImageFolderDataset(root, "canny", RES, on_bad_sample="skip")
    (root / "metadata.jsonl").unlink()
    with pytest.raises(BadSampleError, match=r"metadata\.jsonl: not found"):
        ImageFolderDataset(root, "canny", RES, on_bad_sample="skip")


# -- Hugging Face datasets -----------------------------------------------------------------------


def test_hugging_face_dataset_from_disk(tmp_path: Path) -> None:
    import datasets

    pictures = [Image.fromarray(_picture(i)) for i in range(2)]
    maps = [Image.fromarray(cv2.Canny(_picture(i), 100, 200)) for i in range(2)]  # mode L
    table = datasets.Dataset.from_dict({"image": pictures, "conditioning_image": maps, "text": ["a", "b"]})
    table = table.cast_column("image", datasets.Image()).cast_column("conditioning_image", datasets.Image())
    datasets.DatasetDict({"train": table}).save_to_disk(str(tmp_path / "hf"))

    dataset = HuggingFaceDataset(tmp_path / "hf", RES)
    assert len(dataset) == 2
    item = dataset[1]
    assert item["caption"] == "b"
    assert item["pixel_values"].shape == item["conditioning_pixel_values"].shape == (3, RES, RES)
    expected = torch.from_numpy(pil_to_rgb(pictures[1], RES).astype(np.float32)).permute(2, 0, 1) / 127.5 - 1
    assert torch.equal(item["pixel_values"], expected)
    condition = item["conditioning_pixel_values"]
    assert condition.min() == 0.0 and condition.max() > 0.5 and torch.equal(condition[0], condition[2])

    with pytest.raises(
        ConfigError, match=r"column 'prompt' \(caption_column\) not found; available columns: image"
    ):
        HuggingFaceDataset(tmp_path / "hf", RES, caption_column="prompt")
    with pytest.raises(ConfigError, match="no split 'validation'; available splits: train"):
        HuggingFaceDataset(tmp_path / "hf", RES, split="validation")
    with pytest.raises(ConfigError, match="not decoded images"):
        HuggingFaceDataset(tmp_path / "hf", RES, conditioning_image_column="text")
