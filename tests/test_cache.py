"""The on-disk encoding cache: exact training losses, reuse across runs, invalidation, corruption."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset

from metacontrol.controlnet import create_controlnet
from metacontrol.data.datasets import CACHE_FOLDER, ImageFolderDataset
from metacontrol.data.encoding_cache import (
    DEFAULT_CACHE_DIR,
    INDEX_FILE,
    EncodingStore,
    attach_encodings,
    cache_key,
    default_cache_dir,
    encode_samples,
    key_material,
    model_material,
)
from metacontrol.data.pools import DatasetTaskData, TensorPool, cached_keys, synthetic_pools
from metacontrol.families import SD
from metacontrol.meta.algorithms import MetaLearner
from metacontrol.meta.episodes import TaskSampler
from metacontrol.models.base import BaseModel, load_base_model
from metacontrol.objective import ControlNetObjective
from metacontrol.world import WorldConfig

RES = 32  # the tiny_sd_dir model's resolution
POOL = 8
TASKS = ["canny", "depth"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: one thread is as fast, and far faster on a CPU shared with other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base(tiny_sd_dir: Path) -> BaseModel:
    return load_base_model(str(tiny_sd_dir)).freeze()


def _pools(resolution: int = RES) -> dict[str, TensorPool]:
    return synthetic_pools(WorldConfig(resolution=resolution), TASKS, POOL, show_progress=False)


class EncoderCalls:
    """Counts forward calls of the real VAE encoder and text encoder (observation, not mocking)."""

    def __init__(self, base: BaseModel) -> None:
        self.count = 0
        self.handles = [m.register_forward_hook(self._hook) for m in (base.vae.encoder, base.text_encoder)]

    def _hook(self, *_: object) -> None:
        self.count += 1

    def __enter__(self) -> EncoderCalls:
        return self

    def __exit__(self, *_: object) -> None:
        for handle in self.handles:
            handle.remove()


def _attach(pools, base, cache_dir, **kwargs) -> tuple[dict[str, EncodingStore], int]:
    with EncoderCalls(base) as calls:
        stores = attach_encodings(pools, base, cache_dir=cache_dir, show_progress=False, **kwargs)
    return stores, calls.count


def _meta_train(base: BaseModel, data: dict[str, TensorPool], meta_steps: int = 2) -> tuple[list, list]:
    """A few Reptile meta-steps as meta_train.py takes them: the inner losses and the final weights."""
    torch.manual_seed(0)
    controlnet = create_controlnet(base)
    objective = ControlNetObjective(base, controlnet)
    params = list(controlnet.parameters())
    # SGD, not meta_train's Adam: Adam's normalised steps turn last-bit gradient differences of
    # near-zero gradients into step-sized weight differences, which would say nothing about the cache.
    learner = MetaLearner(params, params, algorithm="reptile", inner_optimizer="sgd", inner_learning_rate=0.1)
    sampler = TaskSampler(tasks=TASKS, pool_sizes={t: len(d) for t, d in data.items()}, tasks_per_step=2, inner_steps=2,
                          support_batch_size=2, query_batch_size=2)
    outer = torch.optim.SGD(params, lr=1.0)

    def batch_loss(episode, indices, phase):
        return lambda: objective.loss(data[episode.task].batch(indices),
                                      torch.Generator().manual_seed(episode.seed(phase)))

    losses = []
    for step in range(meta_steps):
        learner.begin()
        for e in sampler.episodes(step):
            losses += learner.adapt([batch_loss(e, batch, k) for k, batch in enumerate(e.support)])
            learner.accumulate()
        learner.finish(2)
        outer.step()
        outer.zero_grad(set_to_none=True)
    return losses, [p.detach().clone() for p in params]


def test_cached_and_uncached_training_give_the_same_losses(base, tmp_path):
    uncached = _pools()
    cached = _pools()
    attach_encodings(cached, base, cache_dir=tmp_path, show_progress=False)
    batch = cached["canny"].batch([0, 3])
    assert set(cached_keys(SD)) <= set(batch) and not set(cached_keys(SD)) & set(uncached["canny"].batch([0, 3]))
    losses, weights = _meta_train(base, uncached)
    cached_losses, cached_weights = _meta_train(base, cached)
    # Same RNG draws either way; only the VAE's batch size (8 when caching, 2 per step) moves the last bits.
    torch.testing.assert_close(cached_losses, losses, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(cached_weights, weights, rtol=1e-4, atol=1e-6)
    untrained = _meta_train(base, cached, meta_steps=0)[1]
    assert max((w - w0).abs().max() for w, w0 in zip(weights, untrained)) > 1e-3  # the steps did train


def test_second_run_reads_disk_and_shared_images_are_encoded_once(base, tmp_path):
    first_pools = _pools()
    stores, calls = _attach(first_pools, base, tmp_path, shard_size=3)
    store = stores["canny"]
    assert stores["depth"] is store and first_pools["canny"].cached is first_pools["depth"].cached
    assert (store.loaded, store.encoded) == (0, 3)  # 8 samples in shards of 3, written once for both tasks
    assert calls == 2 * 3  # one VAE-encoder and one text-encoder call per shard
    assert sorted(p.name for p in store.directory.iterdir()) == [INDEX_FILE] + [
        f"shard-0000{i}.safetensors" for i in range(3)]
    assert json.loads((store.directory / INDEX_FILE).read_text())["material"]["resolution"] == [RES, RES]

    second_pools = _pools()  # a new run: same content, new objects
    stores, calls = _attach(second_pools, base, tmp_path, shard_size=3)
    assert calls == 0 and (stores["canny"].loaded, stores["canny"].encoded) == (3, 0)
    for key in cached_keys(SD):
        assert torch.equal(second_pools["canny"].cached[key], first_pools["canny"].cached[key])


def _changed(what: str, base: BaseModel, tiny_sd_dir: Path) -> tuple[dict[str, TensorPool], BaseModel]:
    """The pools and base model of a run that differs from the default in ``what`` alone."""
    if what == "resolution":
        return _pools(resolution=16), base
    if what == "data":
        pools = _pools()
        captions = [*pools["canny"].captions[:-1], "a different caption"]
        return {t: TensorPool(p.images, p.conditions, captions) for t, p in pools.items()}, base
    other = load_base_model(str(tiny_sd_dir)).freeze()
    if what == "weights":  # one fine-tuned layer of the text encoder
        with torch.no_grad():
            next(other.text_encoder.parameters()).add_(1e-3)
    else:  # the same weights elsewhere
        other.location = str(tiny_sd_dir) + "/"
    return _pools(), other


@pytest.mark.parametrize("what", ["resolution", "data", "weights", "location"])
def test_a_changed_key_reencodes_into_a_new_entry(base, tiny_sd_dir, tmp_path, what):
    stores, _ = _attach(_pools(), base, tmp_path)
    old = stores["canny"].directory
    pools, other_base = _changed(what, base, tiny_sd_dir)
    stores, calls = _attach(pools, other_base, tmp_path)
    assert stores["canny"].directory != old and old.is_dir()
    assert calls > 0 and stores["canny"].loaded == 0
    again, calls = _attach(pools, other_base, tmp_path)  # and the new entry is reused in turn
    assert calls == 0 and again["canny"].directory == stores["canny"].directory


def _flip_bytes(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2 : len(raw) // 2 + 16] = bytes(16)  # zeros in the middle of the float data
    path.write_bytes(bytes(raw))


CORRUPTIONS = {
    "overwritten": _flip_bytes,
    "truncated": lambda p: p.write_bytes(p.read_bytes()[:100]),
    "deleted": Path.unlink,
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_a_corrupt_shard_is_detected_warned_about_and_rebuilt(base, tmp_path, caplog, corruption):
    pools = _pools()
    stores, _ = _attach(pools, base, tmp_path, shard_size=4)
    shard = stores["canny"].directory / "shard-00001.safetensors"
    CORRUPTIONS[corruption](shard)

    reloaded = _pools()
    with caplog.at_level(logging.WARNING, logger="metacontrol.data.encoding_cache"):
        stores, calls = _attach(reloaded, base, tmp_path, shard_size=4)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(shard) in warnings[0] and "samples 4-7" in warnings[0]
    assert (stores["canny"].loaded, stores["canny"].encoded) == (1, 1) and calls == 2
    fresh = encode_samples(reloaded["canny"], base, show_progress=False)
    for key in cached_keys(SD):
        torch.testing.assert_close(reloaded["canny"].cached[key], fresh[key], rtol=1e-5, atol=1e-6)

    caplog.clear()
    stores, calls = _attach(_pools(), base, tmp_path, shard_size=4)  # the rebuilt shard is good again
    assert calls == 0 and stores["canny"].loaded == 2 and not caplog.records


def test_an_unreadable_index_reencodes_everything(base, tmp_path, caplog):
    stores, _ = _attach(_pools(), base, tmp_path)
    (stores["canny"].directory / INDEX_FILE).write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="metacontrol.data.encoding_cache"):
        stores, calls = _attach(_pools(), base, tmp_path)
    assert calls > 0 and stores["canny"].loaded == 0 and "index" in caplog.records[0].getMessage()
    json.loads((stores["canny"].directory / INDEX_FILE).read_text())  # rewritten


def test_a_reader_process_encodes_in_memory_without_writing(base, tmp_path):
    pools = _pools()
    material = key_material(model_material(base), pools["canny"])
    store = EncodingStore(tmp_path / "entry", cache_key(material), material, cached_keys(SD), write=False)
    encoded = store.load_or_encode(pools["canny"], base, show_progress=False)
    assert store.encoded == 1 and encoded["latent_mean"].shape[0] == POOL
    assert not (tmp_path / "entry").exists()


class _Items(Dataset):
    """A dataset without a file list: fingerprinted from its decoded items."""

    def __init__(self, pool: TensorPool) -> None:
        self.pool = pool

    def __len__(self) -> int:
        return len(self.pool)

    def __getitem__(self, index: int) -> dict:
        return {k: v[0] for k, v in self.pool.item_tensors([index]).items()}


def test_image_folders_cache_next_to_the_data_and_are_keyed_by_file_content(tmp_path):
    pool = _pools()["canny"]
    root = tmp_path / "folder"
    root.mkdir()
    entries = []
    for i in range(3):
        Image.fromarray(pool.images[i].permute(1, 2, 0).numpy()).save(root / f"{i}.png")
        Image.fromarray(pool.conditions[i].permute(1, 2, 0).numpy()).save(root / f"{i}_map.png")
        entries.append({"file_name": f"{i}.png", "text": pool.captions[i],
                        "conditioning_file_name": f"{i}_map.png"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    folder = DatasetTaskData(ImageFolderDataset(root, "canny", RES))
    assert default_cache_dir(folder) == root / CACHE_FOLDER / "encodings"
    # Fine-tuning's shots are a Subset: seen through, so its cache still goes next to the data.
    shots = DatasetTaskData(Subset(Subset(ImageFolderDataset(root, "canny", RES), [2, 0, 1]), [0, 1]))
    assert default_cache_dir(shots) == root / CACHE_FOLDER / "encodings"
    assert shots.captions == [pool.captions[2], pool.captions[0]]
    assert default_cache_dir(pool) == DEFAULT_CACHE_DIR and not DEFAULT_CACHE_DIR.is_absolute()

    before = folder.fingerprint()
    assert before == DatasetTaskData(ImageFolderDataset(root, "canny", RES)).fingerprint()
    pixels = np.array(Image.open(root / "2.png"))
    pixels[0, 0] ^= 1
    Image.fromarray(pixels).save(root / "2.png")
    assert DatasetTaskData(ImageFolderDataset(root, "canny", RES)).fingerprint() != before

    items = DatasetTaskData(_Items(pool))
    assert items.fingerprint() == DatasetTaskData(_Items(pool)).fingerprint() != pool.fingerprint()
    changed = TensorPool(pool.images.clone(), pool.conditions, pool.captions)
    changed.images[0, 0, 0, 0] ^= 1
    assert DatasetTaskData(_Items(changed)).fingerprint() != items.fingerprint()
    # Condition maps do not change the encodings, so they do not change the key either.
    flipped_maps = TensorPool(pool.images, pool.conditions.flip(-1), pool.captions)
    assert flipped_maps.fingerprint() == pool.fingerprint()


def test_the_cache_does_not_depend_on_the_runs_precision(base, tiny_sd_dir, tmp_path):
    """Under bf16 only the UNet is cast: the encoders stay fp32 (SD VAEs are ``force_upcast``), so a bf16 run
    reads the entry an fp32 run wrote, and it holds what the fp32 encoders compute."""
    stores, _ = _attach(_pools(), base, tmp_path)
    bf16 = load_base_model(str(tiny_sd_dir)).freeze(torch.bfloat16)
    assert bf16.denoiser.dtype == torch.bfloat16 and bf16.vae.dtype == bf16.text_encoder.dtype == torch.float32
    pools = _pools()
    again, calls = _attach(pools, bf16, tmp_path)
    assert again["canny"].directory == stores["canny"].directory and again["canny"].encoded == calls == 0
    fresh = encode_samples(_pools()["canny"], base, show_progress=False)
    for key in cached_keys(SD):
        assert torch.equal(pools["canny"].cached[key], fresh[key])
