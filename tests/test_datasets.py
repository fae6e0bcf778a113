"""Datasets, image loading and the annotation cache, on real files written to ``tmp_path``."""

from __future__ import annotations

import io
import json
import logging
import re
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
from metacontrol.data.images import BadSampleError, load_rgb
from metacontrol.world import WorldConfig

RES = 64


def _picture(seed: int, height: int = 2 * RES, width: int = 3 * RES) -> np.ndarray:
    """An RGB image with a few flat shapes: clear edges for canny, texture for lineart.

    The default size is twice the resolution on the shorter side, so ``_fit_by_hand`` is exact."""
    rng = np.random.default_rng(seed)
    image = np.full((height, width, 3), rng.integers(0, 256, 3), np.uint8)
    box_w, box_h, radius = width // 5, height // 5, min(height, width) // 10  # shapes scale with the image
    for _ in range(3):
        colour = [int(c) for c in rng.integers(0, 256, 3)]
        x, y = int(rng.integers(0, width - box_w)), int(rng.integers(0, height - box_h))
        cv2.rectangle(image, (x, y), (x + box_w, y + box_h), colour, thickness=-1)
        centre = (int(rng.integers(radius, width - radius)), int(rng.integers(radius, height - radius)))
        cv2.circle(image, centre, radius, colour, -1)
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


def _fit_by_hand(image: np.ndarray, size: int = RES) -> np.ndarray:
    """What a dataset must make of ``image``, as diffusers' ControlNet example does it, with plain Pillow:
    resize the whole image so its shorter side is ``size`` (Lanczos), then cut out the centre square.
    Only for sizes where that is exact: the resized sides and both margins are whole numbers of pixels."""
    height, width = image.shape[:2]
    scale = size / min(height, width)
    new_width, new_height = round(width * scale), round(height * scale)
    assert (new_width, new_height) == (width * scale, height * scale), "pick a size that scales exactly"
    assert (new_width - size) % 2 == 0 and (new_height - size) % 2 == 0, "pick a size with even margins"
    resized = np.array(Image.fromarray(image).resize((new_width, new_height), Image.Resampling.LANCZOS))
    top, left = (new_height - size) // 2, (new_width - size) // 2
    return resized[top : top + size, left : left + size]


def _pixel_values(image: np.ndarray) -> torch.Tensor:
    """An (H, W, 3) uint8 image as a dataset item's ``pixel_values``: channels first, in [-1, 1]."""
    return torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1) / 127.5 - 1


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
        assert item["caption"] == f"picture {i}"
        assert item["pixel_values"].shape == item["conditioning_pixel_values"].shape == (3, RES, RES)
        expected = _fit_by_hand(_picture(i))
        assert torch.equal(item["pixel_values"], _pixel_values(expected))
        edges = torch.from_numpy(cv2.Canny(expected, 100, 200).astype(np.float32) / 255.0)
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
    condition_map = np.zeros((2 * RES, 3 * RES, 3), np.uint8)
    condition_map[40:88, 60:132] = (255, 0, 163)  # a "ball" in the ADE20K palette
    root = _write_folder(
        tmp_path / "seg",
        [{"file_name": "a.png", "conditioning_file_name": "a_seg.png", "text": "a ball"}],
        {"a.png": Image.fromarray(_picture(1)), "a_seg.png": Image.fromarray(condition_map)},
    )
    dataset = ImageFolderDataset(root, "seg", RES)  # seg has no annotator: only precomputed maps work
    conditioning = dataset[0]["conditioning_pixel_values"]
    expected = _fit_by_hand(condition_map)
    assert torch.equal(conditioning, torch.from_numpy(expected.astype(np.float32)).permute(2, 0, 1) / 255)
    # Halved and shifted left by the 16-pixel crop: rows 20..44, columns 14..50, flat well inside the edges.
    ball = torch.tensor([1.0, 0.0, 163 / 255])[:, None, None]
    assert torch.equal(conditioning[:, 24:40, 18:46], ball.expand(3, 16, 28))
    assert conditioning[:, :16].max() == 0 and conditioning[:, :, 54:].max() == 0
    assert dataset.cache.misses == dataset.cache.hits == 0


@pytest.mark.parametrize("landscape", [True, False])
def test_images_are_resized_on_the_shorter_side_then_centre_cropped(tmp_path: Path, landscape: bool) -> None:
    """A centre square of four flat quadrants between green margins: the margins go, the quadrants stay put."""
    quadrants = [[(200, 0, 0), (0, 0, 200)], [(250, 250, 0), (90, 90, 90)]]
    square = np.zeros((2 * RES, 2 * RES, 3), np.uint8)
    for row in (0, 1):
        for column in (0, 1):
            square[row * RES : (row + 1) * RES, column * RES : (column + 1) * RES] = quadrants[row][column]
    margin = np.full((2 * RES, RES // 2, 3), (0, 255, 0), np.uint8)
    if landscape:
        photo = np.concatenate([margin, square, margin], axis=1)
    else:
        photo = np.concatenate([margin.transpose(1, 0, 2), square, margin.transpose(1, 0, 2)], axis=0)
    Image.fromarray(photo).save(tmp_path / "photo.png")

    loaded = load_rgb(tmp_path / "photo.png", RES)
    assert np.array_equal(loaded, _fit_by_hand(photo))
    # Lanczos reaches 3 output pixels (6 source pixels at scale 1/2): 4 pixels from any edge the colours are exact.
    half, inside = RES // 2, slice(4, RES // 2 - 4)
    for row in (0, 1):
        for column in (0, 1):
            block = loaded[row * half :, column * half :][inside, inside]
            assert (block == quadrants[row][column]).all(), (row, column)
    assert not (loaded[4:-4, 4:-4] == (0, 255, 0)).all(axis=2).any()  # no margin left inside


def test_condition_without_weights_fails_at_construction(tmp_path: Path) -> None:
    root = _rgb_folder(tmp_path / "folder", count=1)
    with pytest.raises(AnnotatorUnavailable, match="ControlNetHED.pth"):
        ImageFolderDataset(root, "hed", RES)
    with pytest.raises(AnnotatorUnavailable, match="no controlnet-aux annotator"):
        ImageFolderDataset(root, "seg", RES)
    with pytest.raises(ConfigError, match="unknown condition"):
        ImageFolderDataset(root, "edges", RES)


# -- bad input -----------------------------------------------------------------------------------


def _deep_gradient() -> np.ndarray:
    """A 16-bit grey ramp from 0 (left) to 65535 (right), 128 px square."""
    return np.tile(np.linspace(0, 65535, 2 * RES).astype(np.uint16), (2 * RES, 1))


def _messy_folder(root: Path) -> Path:
    rgba = np.zeros((80, 80, 4), np.uint8)
    rgba[:, :40] = (200, 10, 10, 255)  # left half opaque red, right half fully transparent
    valid = Image.fromarray(_picture(5))
    valid.save(root.parent / "full.png")
    truncated = (root.parent / "full.png").read_bytes()
    images = {
        "corrupt.png": np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes(),
        "good.png": valid,
        "gray.png": Image.fromarray(_picture(2)[:, :, 0]),
        "rgba.png": Image.fromarray(rgba),
        "deep.png": Image.fromarray(_deep_gradient()),
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
    # The 16-bit gradient keeps its range: 0..255 from left to right (scaled by 255/65535), not clipped to white.
    eight_bit = np.rint(_deep_gradient() * (255 / 65535)).astype(np.uint8)
    deep = _fit_by_hand(np.repeat(eight_bit[:, :, None], 3, axis=2))
    assert deep[:, 0].max() <= 3 and deep[:, -1].min() >= 252 and np.all(np.diff(deep[0].astype(int), axis=0) >= 0)
    assert torch.equal(items["deep.png"]["pixel_values"], _pixel_values(deep))


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
    assert torch.equal(item["pixel_values"], _pixel_values(_fit_by_hand(_picture(1))))
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


def _saved_with_bad_rows(path: Path) -> Path:
    """A saved dataset of seven rows: 0 and 6 good; 1 no caption, 2 an empty one, 3 an image that is not
    one, 4 a conditioning image cut short (a truncated PNG), 5 no image."""
    import datasets

    buffer = io.BytesIO()
    Image.fromarray(_picture(9)).save(buffer, format="PNG")
    truncated = buffer.getvalue()[: len(buffer.getvalue()) * 2 // 3]
    good = [Image.fromarray(_picture(i)) for i in range(7)]
    images = [*good[:3], {"bytes": b"not an image", "path": None}, good[4], None, good[6]]
    maps = [*good[:4], {"bytes": truncated, "path": None}, *good[5:]]
    features = datasets.Features(
        {"image": datasets.Image(), "conditioning_image": datasets.Image(), "text": datasets.Value("string")}
    )
    table = datasets.Dataset.from_dict(
        {"image": images, "conditioning_image": maps, "text": ["a", None, " ", "d", "e", "f", "g"]}, features=features
    )
    table.save_to_disk(str(path))
    return path


def test_bad_rows_of_a_saved_dataset_follow_on_bad_sample(tmp_path: Path, caplog) -> None:
    import datasets

    path = _saved_with_bad_rows(tmp_path / "hf")
    with pytest.raises(BadSampleError, match=rf"^{re.escape(str(path))}\[1\]: empty or non-text caption None$"):
        HuggingFaceDataset(path, RES)  # on_bad_sample: error, at construction

    caplog.set_level(logging.WARNING)
    dataset = HuggingFaceDataset(path, RES, on_bad_sample="skip")
    assert [row for row, _ in dataset.skipped] == [f"{path}[1]", f"{path}[2]", f"{path}[3].image",
                                                   f"{path}[4].conditioning_image", f"{path}[5].image"]  # fmt: skip
    reasons = [reason for _, reason in dataset.skipped]
    assert "empty or non-text caption ' '" in reasons[1]
    assert "cannot be decoded as an image" in reasons[2] and "truncated" in reasons[3] and "no image" in reasons[4]
    assert f"skipped 5 of 7 samples in {path}" in caplog.text
    assert len(dataset) == 2 and dataset.captions == ["a", "g"]
    assert dataset[1]["caption"] == "g"
    assert torch.equal(dataset[1]["pixel_values"], _pixel_values(_fit_by_hand(_picture(6))))
    with pytest.raises(IndexError):
        dataset[2]

    datasets.load_from_disk(str(path)).select([1, 2, 3]).save_to_disk(str(tmp_path / "all-bad"))
    with pytest.raises(BadSampleError, match=r"all-bad: no usable samples \(3 rows, all skipped as bad\)"):
        HuggingFaceDataset(tmp_path / "all-bad", RES, on_bad_sample="skip")
