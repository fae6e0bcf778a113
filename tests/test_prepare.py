"""`metacontrol prepare` on real photos: shards diffusers can read, exact maps and encodings, resume, processes."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from conftest import PYTHON, run_script, torchrun
from PIL import Image

from metacontrol.conditions import get_condition
from metacontrol.config import SourceConfig
from metacontrol.config_loader import ConfigError
from metacontrol.data.encoding_cache import encode_images
from metacontrol.data.images import load_rgb
from metacontrol.data.sample_photos import random_hed_annotators, write_photo_folder
from metacontrol.data.shards import PreparedTaskData
from metacontrol.data.sources import MAX_UNPREPARED, load_task_data
from metacontrol.models.base import load_base_model

PREPARE = [PYTHON, "-m", "metacontrol.cli", "prepare"]


def _prepare_args(photos: Path, out: Path, *overrides: str) -> list[str]:
    return [f"train_data_dir={photos}", f"output_dir={out}", "resolution=32", "shard_size=3",
            "dataloader_num_workers=1", *overrides]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_sd_dir) -> tuple[Path, Path, Path]:
    """Eight photos prepared for canny and HED (random weights), with encodings: (photos, annotators, out)."""
    root = tmp_path_factory.mktemp("prepare")
    photos, annotators = write_photo_folder(root / "photos"), random_hed_annotators(root / "annotators")
    out = root / "out"
    run_script([*PREPARE, *_prepare_args(photos, out, "conditions=[canny, hed]", f"annotators={annotators}",
                                         "encode=true", f"pretrained_model_name_or_path={tiny_sd_dir}")])
    return photos, annotators, out


def test_prepared_shards_hold_the_photos_their_maps_and_encodings(prepared, tiny_sd_dir):
    photos, annotators, out = prepared
    lines = [json.loads(line) for line in (photos / "metadata.jsonl").read_text().splitlines()]
    table = datasets.load_dataset(str(out / "hed"), split="train")  # as diffusers' train_controlnet.py reads it
    assert table.column_names == ["image", "conditioning_image", "text"] and len(table) == len(lines) == 8
    base = load_base_model(str(tiny_sd_dir))
    encodings = PreparedTaskData(out, "hed", 32).stored_encodings(_model_key(base), base.family.text_keys)
    for i, line in enumerate(lines):
        image = load_rgb(photos / line["file_name"], 32)
        assert np.array_equal(np.asarray(table[i]["image"]), image) and table[i]["text"] == line["text"]
        assert np.array_equal(np.asarray(table[i]["conditioning_image"]),
                              get_condition("hed").annotate(image, str(annotators)))
        mean, std = encode_images(base, torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1)
        index = torch.tensor([i])
        torch.testing.assert_close(encodings["latent_mean"][index], mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(encodings["latent_std"][index], std, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(encodings["text_embeds"][index], base.encode_prompts([line["text"]])["text_embeds"])
    canny = datasets.Dataset.from_file(str(out / "canny" / "shard-00001.arrow"))
    image = load_rgb(photos / lines[3]["file_name"], 32)
    assert np.array_equal(np.asarray(canny[0]["conditioning_image"]), get_condition("canny").annotate(image))


def _model_key(base) -> str:
    from metacontrol.data.encoding_cache import cache_key, model_material

    return cache_key(model_material(base))


def test_an_interrupted_prepare_resumes_without_redoing_finished_shards(prepared, tmp_path):
    photos, annotators, done = prepared
    out = tmp_path / "out"
    args = _prepare_args(photos, out, "conditions=[canny]")
    run_script([*PREPARE, *args])
    before = {p.name: p.stat().st_mtime_ns for p in (out / "canny").iterdir()}
    (out / "shards" / "shard-00001.json").unlink()  # as if killed while shard 1 was being written
    (out / "index.json").unlink()
    with pytest.raises(ConfigError, match="incomplete"):
        PreparedTaskData(out, "canny", 32)
    result = run_script([*PREPARE, *args])
    assert "1 shard(s) prepared now, 2 done before" in result.stdout
    after = {p.name: p.stat().st_mtime_ns for p in (out / "canny").iterdir()}
    assert after["shard-00000.arrow"] == before["shard-00000.arrow"] != after["shard-00001.arrow"]
    assert PreparedTaskData(out, "canny", 32).captions == PreparedTaskData(done, "canny", 32).captions
    changed = run_script([*PREPARE, *args[:-1], "resolution=48", "dataloader_num_workers=1"], check=False)
    assert changed.returncode != 0
    assert changed.stderr.strip().splitlines()[-1].endswith(
        f"resolution: 48, but {out} was prepared with 32 (recorded in {out}/prepared.json); use another "
        "output_dir, or the same settings to resume")


def test_two_processes_prepare_the_same_set_as_one(prepared, tmp_path):
    photos, _, one = prepared
    two = tmp_path / "two"
    result = run_script(torchrun("-m", "metacontrol.cli", "prepare", *_prepare_args(photos, two, "conditions=[canny]"),
                                 nproc=2), env={"ACCELERATE_USE_CPU": "1"}, timeout=240)
    assert result.stdout.count("prepare: 8 of 8 samples kept") == 1
    shards = [json.loads(p.read_text()) for p in sorted((two / "shards").glob("*.json"))]
    assert [m["kept"] for m in shards] == [3, 3, 2]
    for column in ("image", "conditioning_image", "text"):
        assert datasets.load_dataset(str(two / "canny"), split="train")[column] == \
            datasets.load_dataset(str(one / "canny"), split="train")[column]


def test_bad_photos_are_skipped_and_counted_or_stop_the_run_naming_them(tmp_path):
    photos = write_photo_folder(tmp_path / "photos", names=["astronaut.png", "coffee.png", "chelsea.png"])
    (photos / "coffee.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    result = run_script([*PREPARE, *_prepare_args(photos, out, "on_bad_sample=skip")])
    assert "2 of 3 samples kept, 1 skipped as bad" in result.stdout
    (skipped,) = json.loads((out / "shards" / "shard-00000.json").read_text())["skipped"]
    assert "coffee.png: cannot be decoded as an image" in skipped[1]
    assert PreparedTaskData(out, "canny", 32).captions == ["an astronaut in front of a flag", "a cat looking to the side"]
    failed = run_script([*PREPARE, *_prepare_args(photos, tmp_path / "strict")], check=False)
    assert failed.returncode != 0 and "coffee.png: cannot be decoded as an image" in failed.stderr.splitlines()[-1]


def test_a_saved_dataset_with_its_own_maps_and_a_stream_prepare_alike(tmp_path):
    photos = write_photo_folder(tmp_path / "photos", names=["astronaut.png", "rocket.jpg"])
    stream_out, hf_out = tmp_path / "stream", tmp_path / "hf"
    # `datasets` streams the image folder itself: image + text columns from metadata.jsonl
    run_script([*PREPARE, *_prepare_args(photos, stream_out, "source=stream")])
    images = [Image.open(photos / n) for n in ("astronaut.png", "rocket.png")]
    maps = [Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)) for i in range(2)]
    datasets.Dataset.from_dict({"image": images, "conditioning_image": maps, "text": ["a", "b"]}).cast_column(
        "image", datasets.Image()).cast_column("conditioning_image", datasets.Image()).save_to_disk(str(tmp_path / "saved"))
    run_script([*PREPARE, *_prepare_args(tmp_path / "saved", hf_out, "source=hf", "conditions=[depth]",
                                         "conditioning_image_column=conditioning_image")])
    streamed, saved = PreparedTaskData(stream_out, "canny", 32), PreparedTaskData(hf_out, "depth", 32)
    assert torch.equal(streamed.item_tensors([0, 1])["pixel_values"], saved.item_tensors([0, 1])["pixel_values"])
    assert torch.equal(saved.item_tensors([1])["conditioning_pixel_values"], torch.full((1, 3, 32, 32), 40 / 255))


def test_training_reads_a_prepared_set_memory_mapped_with_its_encodings(prepared, tiny_sd_dir):
    _, _, out = prepared
    base = load_base_model(str(tiny_sd_dir))
    source = SourceConfig(source="prepared", train_data_dir=str(out))
    data = load_task_data(source, ["canny", "hed"], 32, base, cache="latents", cache_dir=None, show_progress=False,
                          count=4, start=2)
    batch = data["hed"].batch([0, 3])
    assert "pixel_values" not in batch  # the encodings stand in: no image decoded
    whole = PreparedTaskData(out, "hed", 32)
    full = whole.stored_encodings(_model_key(base), base.family.text_keys)
    assert torch.equal(batch["latent_mean"], full["latent_mean"][torch.tensor([2, 5])])
    assert batch["caption"] == [whole.captions[2], whole.captions[5]]
    assert isinstance(full["latent_mean"].arrays[0], np.memmap)
    with pytest.raises(ConfigError, match="resolution: 64, but .* was prepared at 32 px"):
        load_task_data(source, ["canny"], 64, base, cache="none", cache_dir=None, show_progress=False)
    with pytest.raises(ConfigError, match="prepared for canny, hed, not 'depth'"):
        load_task_data(source, ["depth"], 32, base, cache="none", cache_dir=None, show_progress=False)


def test_a_large_unprepared_folder_is_sent_to_prepare(tiny_sd_dir, tmp_path):
    photos = write_photo_folder(tmp_path / "photos", names=["astronaut.png"])
    line = (photos / "metadata.jsonl").read_text()
    (photos / "metadata.jsonl").write_text(line * (MAX_UNPREPARED + 1))
    base = load_base_model(str(tiny_sd_dir))
    with pytest.raises(ConfigError, match=f"lists {MAX_UNPREPARED + 1} samples; past {MAX_UNPREPARED}, prepare them "
                                          f"once with `metacontrol prepare source=imagefolder train_data_dir={photos}"):
        load_task_data(SourceConfig(source="imagefolder", train_data_dir=str(photos)), ["canny"], 32, base,
                       cache="none", cache_dir=None, show_progress=False)


def test_prepare_help_names_its_settings():
    result = run_script([*PREPARE, "--help"])
    assert "metacontrol prepare" in result.stdout and "source=prepared" in result.stdout
