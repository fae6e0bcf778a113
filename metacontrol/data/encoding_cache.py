"""Precomputed VAE posteriors and text embeddings for training data (``cache: latents``), kept on disk.

The VAE and text encoder are frozen, so their outputs for a given image or caption are the same in
every task, inner step, epoch and run: compute them once. The posterior is kept as (mean, std), so the
latents used in training are still *sampled* exactly as without the cache.

On disk an entry is ``<cache_dir>/<key>/`` with ``shard-00000.safetensors``... (``latent_mean``,
``latent_std`` and the family's prompt encodings, ``text_embeds`` and for SDXL ``pooled_text_embeds``, of
``shard_size`` consecutive samples each) and ``index.json`` (the key
material in readable form, each shard's sample range and sha256, the per-sample tensor shapes). The key
is the sha256 of everything the encodings depend on: the base model (location, VAE and text-encoder
configs, a hash of all their weights, the tokenizer, the weight dtype, the library versions that run
them), the image resolution, the data's content fingerprint and ``FORMAT_VERSION``; a change to any of
them selects another entry. Every file is written to a temporary name and ``os.replace``d, the index
last: a killed run leaves a complete entry, or shards without an index, which are encoded again. On
load every shard's sha256 and shapes are checked; a shard that fails is re-encoded (and rewritten)
with a warning naming it, never used.

Only the local main process writes; the others wait for it and read (``local_main_process_first``).
Stale entries of old keys are left in place: deleting a cache folder is always safe.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from accelerate import PartialState
from tqdm.auto import tqdm

from metacontrol.atomic import atomic_write_bytes
from metacontrol.conditions import task_list
from metacontrol.data.datasets import CACHE_FOLDER
from metacontrol.data.pools import TaskData, cached_keys
from metacontrol.models.base import BaseModel, Encoders

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when what is stored, or how it is computed, changes meaning
INDEX_FILE = "index.json"
DEFAULT_CACHE_DIR = Path(".cache/metacontrol")  # relative to the working directory, for in-memory pools
LIBRARIES = ("torch", "diffusers", "transformers")  # they run the encoders: their versions are in the key
DEFAULT_SHARD_SIZE = 1024  # samples per shard: ~370 MB at SD 1.5's 512 px, a few MB for the tiny model
ENCODE_PIXELS = 64 * 128 * 128  # pixels per encoding batch: 64 images at 128 px, 4 at 512 px


# -- key material --------------------------------------------------------------------------------------
def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """Raw bytes of any dtype (bf16 too, which numpy lacks) and any device."""
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data


def _weights_sha256(modules: Iterable[torch.nn.Module]) -> str:
    """Hash of every parameter and buffer, named: ~0.4 s for SD 1.5-sized VAE + text encoder on one core.

    Hashing a few sampled tensors would miss a fine-tuned layer; the full hash costs less than loading.
    """
    digest = hashlib.sha256()
    for module in modules:
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
            digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()


def _config(config: Any) -> dict[str, Any]:
    """A model config without bookkeeping entries (``_name_or_path``, ``_use_default_values``...)."""
    items = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {k: v for k, v in items.items() if not k.startswith("_")}


def _tokenizer_sha256(tokenizer: Any) -> str:
    """Vocabulary, merges and text processing of the tokenizer, and the length prompts are padded to.

    A fast tokenizer's full spec, less its ``padding``/``truncation`` state: every call sets those.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("padding", "truncation")}
    else:
        spec = sorted(tokenizer.get_vocab().items())
    head = [type(tokenizer).__name__, tokenizer.model_max_length, tokenizer.padding_side]
    return hashlib.sha256(json.dumps([head, spec], sort_keys=True).encode()).hexdigest()


def model_material(base: Encoders) -> dict[str, Any]:
    """What identifies the encoders of ``base``, for the cache key (computed once per run). A second text
    and third text encoder (SDXL, SD3, Flux) add their configs and tokenizers; SD 1.x/2.x's material is what it always was."""
    material = {
        "location": base.location,
        "vae_config": _config(base.vae.config),
        "text_encoder_config": _config(base.text_encoder.config),
        "weights_sha256": _weights_sha256([base.vae, *base.text_modules]),
        "tokenizer_sha256": _tokenizer_sha256(base.tokenizer),
        "dtype": str(base.vae.dtype),
        "versions": {name: importlib.metadata.version(name) for name in LIBRARIES},
    }
    for n in (2, 3):
        if (encoder := getattr(base, f"text_encoder_{n}")) is not None:
            material[f"text_encoder_{n}_config"] = _config(encoder.config)
            material[f"tokenizer_{n}_sha256"] = _tokenizer_sha256(getattr(base, f"tokenizer_{n}"))
    return material


def key_material(model: dict[str, Any], data: TaskData) -> dict[str, Any]:
    """Model material plus the data's resolution (read off its first sample) and content fingerprint."""
    pixels = data.item_tensors([0])["pixel_values"]
    return {"format": FORMAT_VERSION, "model": model, "resolution": list(pixels.shape[-2:]),
            "data_sha256": data.fingerprint()}


def cache_key(material: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()


def default_cache_dir(data: TaskData) -> Path:
    """Next to an image folder (``<root>/.metacontrol_cache/encodings``), else ``.cache/metacontrol``."""
    root = getattr(data, "root", None)
    return root / CACHE_FOLDER / "encodings" if root is not None else DEFAULT_CACHE_DIR


# -- encoding ------------------------------------------------------------------------------------------
@torch.no_grad()
def encode_samples(data: TaskData, base: BaseModel, rows: range | None = None, batch_size: int | None = None,
                   show_progress: bool = True, desc: str = "encode") -> dict[str, torch.Tensor]:
    """VAE posterior mean/std and prompt encodings of samples ``rows`` (default: all), fp32 on the CPU.

    ``batch_size`` defaults to ``ENCODE_PIXELS`` worth of images, so 512 px data does not exhaust memory.
    """
    rows = range(len(data)) if rows is None else rows
    if batch_size is None:
        height, width = data.item_tensors([rows.start])["pixel_values"].shape[-2:]
        batch_size = max(1, min(64, ENCODE_PIXELS // (height * width)))
    out: dict[str, list[torch.Tensor]] = {key: [] for key in cached_keys(base.family)}
    for start in tqdm(range(rows.start, rows.stop, batch_size), desc=desc, disable=not show_progress):
        batch = data.item_tensors(range(start, min(start + batch_size, rows.stop)))
        mean, std = encode_images(base, batch["pixel_values"])
        out["latent_mean"].append(mean)
        out["latent_std"].append(std)
        for key, embeds in base.encode_prompts(list(batch["caption"])).items():
            out[key].append(embeds.float().cpu())
    return {k: torch.cat(v) for k, v in out.items()}


@torch.no_grad()
def encode_images(encoders: Encoders, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior (mean, std) of (N, 3, H, W) pixels in [-1, 1], fp32 on the CPU."""
    dist = encoders.vae.encode(pixel_values.to(encoders.vae.device, encoders.vae.dtype)).latent_dist
    return dist.mean.float().cpu(), dist.std.float().cpu()


# -- the on-disk store -----------------------------------------------------------------------------------
class CorruptShardError(ValueError):
    """A shard whose bytes or shapes are not what the index recorded."""


def _read_shard(path: Path, entry: dict[str, Any], shapes: dict[str, list[int]],
                keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The shard's tensors, after checking its sha256 against the index and every shape and dtype."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise CorruptShardError(f"unreadable ({err.strerror or err})") from None
    if hashlib.sha256(raw).hexdigest() != entry["sha256"]:
        raise CorruptShardError("its sha256 differs from the index")
    tensors = safetensors.torch.load(raw)
    rows = entry["stop"] - entry["start"]
    for key in keys:
        tensor = tensors.get(key)
        if tensor is None or tensor.dtype != torch.float32 or list(tensor.shape) != [rows, *shapes[key]]:
            found = "missing" if tensor is None else f"{tensor.dtype} {tuple(tensor.shape)}"
            raise CorruptShardError(f"{key} is {found}, expected float32 {(rows, *shapes[key])}")
    return tensors


class EncodingStore:
    """One cache entry: ``directory`` holds the encodings of one dataset under one key.

    ``write=False`` (processes other than the local main one, read-only disks) still rebuilds bad or
    missing shards, in memory only. ``loaded`` and ``encoded`` count this process's shards, for logs
    and tests. ``keys``: the tensors of a sample (``pools.cached_keys`` of the base's family).
    """

    def __init__(self, directory: Path, key: str, material: dict[str, Any], keys: tuple[str, ...],
                 write: bool = True, shard_size: int = DEFAULT_SHARD_SIZE) -> None:
        self.directory, self.key, self.material, self.keys = directory, key, material, keys
        self.write, self.shard_size = write, shard_size
        self.loaded = self.encoded = 0

    def _read_index(self, num_samples: int) -> dict[str, Any] | None:
        """The index if it is there, readable and for exactly this key and data; else None (and why)."""
        path = self.directory / INDEX_FILE
        if not path.is_file():
            return None
        try:
            index = json.loads(path.read_text())
            ranges = [(s["start"], s["stop"]) for s in index["shards"]]
            valid = (index["key"] == self.key and index["num_samples"] == num_samples
                     and ranges == self._ranges(num_samples) and set(index["shapes"]) == set(self.keys)
                     and all(isinstance(s["sha256"], str) for s in index["shards"]))
        except (OSError, ValueError, KeyError, TypeError) as err:
            logger.warning("encoding cache index %s is unreadable (%s); re-encoding everything", path, err)
            return None
        if not valid:
            logger.warning("encoding cache index %s does not match its key or data; re-encoding everything",
                           path)
            return None
        return index

    def _ranges(self, num_samples: int) -> list[tuple[int, int]]:
        return [(s, min(s + self.shard_size, num_samples)) for s in range(0, num_samples, self.shard_size)]

    def _store(self, name: str, data: bytes) -> None:
        """Write one file; a failure (full or read-only disk) costs this run the cache, not the run."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.directory / name, data)
        except OSError as err:
            logger.warning("cannot write the encoding cache %s (%s); encodings stay in memory only",
                           self.directory, err)
            self.write = False

    def load_or_encode(self, data: TaskData, base: BaseModel, show_progress: bool = True,
                       desc: str = "encode") -> dict[str, torch.Tensor]:
        """All encodings of ``data``: good shards from disk, the rest encoded (and written if allowed)."""
        num_samples = len(data)
        index = self._read_index(num_samples)
        entries: list[dict[str, Any]] = []
        out: dict[str, torch.Tensor] = {}
        for number, (start, stop) in enumerate(self._ranges(num_samples)):
            name = f"shard-{number:05d}.safetensors"
            tensors = None
            if index is not None:
                entry = index["shards"][number]
                try:
                    tensors = _read_shard(self.directory / name, entry, index["shapes"], self.keys)
                    self.loaded += 1
                    entries.append(entry)
                except CorruptShardError as err:
                    logger.warning("encoding cache shard %s is corrupt (%s); re-encoding samples %d-%d, "
                                   "not using it", self.directory / name, err, start, stop - 1)
            if tensors is None:
                tensors = encode_samples(data, base, range(start, stop), show_progress=show_progress,
                                         desc=desc)
                self.encoded += 1
                if self.write:
                    raw = safetensors.torch.save({k: tensors[k].contiguous() for k in self.keys})
                    self._store(name, raw)
                    entries.append({"file": name, "start": start, "stop": stop,
                                    "sha256": hashlib.sha256(raw).hexdigest()})
            if not out:  # allocated once the shapes are known: no concatenation, no second copy
                out = {k: v.new_empty((num_samples, *v.shape[1:])) for k, v in tensors.items()}
            for key in self.keys:
                out[key][start:stop] = tensors[key]
        if self.encoded and self.write:
            index = {"key": self.key, "material": self.material, "num_samples": num_samples,
                     "shapes": {k: list(v.shape[1:]) for k, v in out.items()}, "shards": entries}
            self._store(INDEX_FILE, json.dumps(index, indent=1, default=str).encode())
        return out


def attach_encodings(data: dict[str, TaskData], base: BaseModel, cache_dir: str | Path | None = None,
                     show_progress: bool = True,
                     shard_size: int = DEFAULT_SHARD_SIZE) -> dict[str, EncodingStore]:
    """Give each task its samples' encodings, from the disk cache where present and intact.

    Tasks whose data has the same content (synthetic pools share images) share one entry, one encoding
    pass and one set of tensors. ``cache_dir`` None: ``default_cache_dir`` of each task's data. Returns
    the store each task used, keyed by task.
    """
    state = PartialState()
    model = model_material(base)
    stores: dict[Path, EncodingStore] = {}
    used: dict[str, EncodingStore] = {}
    for task, task_data in data.items():
        material = key_material(model, task_data)
        key = cache_key(material)
        directory = Path(cache_dir if cache_dir is not None else default_cache_dir(task_data)) / key
        if directory not in stores:
            stores[directory] = EncodingStore(directory, key, material, cached_keys(base.family),
                                              write=state.is_local_main_process, shard_size=shard_size)
        used[task] = stores[directory]
    for store in stores.values():
        tasks = [task for task, used_store in used.items() if used_store is store]
        names = task_list(tasks)
        started = time.perf_counter()
        with state.local_main_process_first():
            encodings = store.load_or_encode(data[tasks[0]], base, show_progress, f"encode {names}")
        logger.info("encodings of %s: %d shard(s) read, %d encoded, %.1f s (%s)", names, store.loaded,
                    store.encoded, time.perf_counter() - started, store.directory)
        for task in tasks:
            data[task].cached = encodings
    return used
