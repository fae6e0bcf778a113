"""``metacontrol prepare``: a source's examples resized, annotated per condition and optionally encoded, on disk.

Training on a large set should not start by annotating and encoding it on one process behind a barrier.
This stage does that work once, split across every process of the launch, and leaves (``output_dir``):

    prepared.json                  the settings that made these files (a resumed run must repeat them)
    <condition>/shard-00000.arrow  image, conditioning_image (PNG), text: 🤗 datasets' Arrow format, so
                                   ``datasets.load_dataset("<output_dir>/<condition>")`` and diffusers'
                                   ``train_controlnet.py --train_data_dir`` read it as it is
    encodings/shard-00000/         latent_mean.npy, latent_std.npy (VAE posterior), text_embeds.npy (and
                                   SDXL's pooled_text_embeds.npy: one row per distinct caption of the shard),
                                   caption_index.npy (row -> caption)
    shards/shard-00000.json        written last for a shard: it is done (rows, kept, skipped, seconds)
    index.json                     written last of all: the set is complete (``metacontrol.data.shards`` reads it)

Shard ``s`` (``shard_size`` consecutive source rows) is prepared by process ``s % num_processes``; a shard
with its ``shards/`` file is never prepared again, so an interrupted run continues where it stopped. Every
file is written to a temporary name and renamed. Images are decoded and resized by DataLoader workers;
annotators (controlnet-aux, one image a call as their API takes them) and encoders run on the process's
device. Several nodes need ``output_dir`` on a shared file system.
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator, InitProcessGroupKwargs
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from metacontrol.atomic import atomic_write, atomic_write_bytes
from metacontrol.conditions import get_condition
from metacontrol.config import PrepareConfig
from metacontrol.config_loader import ConfigError, to_dict
from metacontrol.data.datasets import HuggingFaceDataset, caption_keys_for, is_text, read_metadata
from metacontrol.data.images import BLACK, WHITE, BadSampleError, BadSamplePolicy, load_rgb, pil_to_rgb
from metacontrol.processes import agreed

logger = logging.getLogger(__name__)

PREPARED_FILE = "prepared.json"
INDEX_FILE = "index.json"
SHARDS_FOLDER = "shards"
ENCODINGS_FOLDER = "encodings"
# Settings that change how fast the files are made, not what is in them: a resumed run may change them.
UNRECORDED = ("output_dir", "dataloader_num_workers", "encode_batch_size")
# Every process waits at the end for the slowest one: longer than NCCL's default ten minutes.
PROCESS_GROUP_TIMEOUT = timedelta(hours=6)

Row = tuple[np.ndarray, "np.ndarray | None", str]  # image, given condition map (None: annotate), caption


def shard_name(number: int) -> str:
    return f"shard-{number:05d}"


def arrow_features() -> Any:
    """The columns of diffusers' ControlNet example: ``image``, ``conditioning_image``, ``text``."""
    import datasets

    return datasets.Features({"image": datasets.Image(), "conditioning_image": datasets.Image(),
                              "text": datasets.Value("string")})


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


# -- reading the source --------------------------------------------------------------------------------
class FolderRows:
    """An image folder's listed samples, read one at a time (in DataLoader workers)."""

    def __init__(self, cfg: PrepareConfig, policy: BadSamplePolicy) -> None:
        self.root = Path(cfg.train_data_dir)  # type: ignore[arg-type]
        self.resolution, self.given_maps = cfg.resolution, cfg.conditioning_image_column is not None
        self.samples = read_metadata(self.root, caption_keys_for(cfg.caption_column), policy)

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, index: int) -> Row:
        sample = self.samples[index]
        image = load_rgb(sample.image, self.resolution)
        if not self.given_maps:
            return image, None, sample.caption
        if sample.conditioning is None:
            raise BadSampleError(f"{sample.where}: no conditioning_file_name (conditioning_image_column is set, "
                                 "so every sample needs its map)", sample.image)
        return image, load_rgb(sample.conditioning, self.resolution, background=BLACK), sample.caption


class RowReader(Dataset):
    """Map-style over the rows this process prepares: (row index, row or None, error or None)."""

    def __init__(self, rows: FolderRows | HuggingFaceDataset, indices: list[int]) -> None:
        self.rows, self.indices = rows, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[int, Row | None, BadSampleError | None]:
        index = self.indices[position]
        try:
            return index, self.rows.read(index), None
        except BadSampleError as err:
            return index, None, err


def _as_is(item: Any) -> Any:
    """The DataLoader's collate: rows stay numpy arrays (its default would turn them into tensors)."""
    return item


def _stream_rows(cfg: PrepareConfig, wanted: _StreamShards) -> Iterator[tuple[int, Row | None, BadSampleError | None]]:
    """A streamed 🤗 dataset, row by row, decoded here (rows of shards not in ``wanted`` are passed over).

    Every process reads the stream once; only the rows of its own shards are decoded and annotated."""
    import datasets

    stream = datasets.load_dataset(cfg.train_data_dir, split=cfg.split, streaming=True)
    for index, row in enumerate(stream):
        if cfg.max_samples is not None and index >= cfg.max_samples:
            return
        if index // cfg.shard_size not in wanted:
            yield index, None, None
            continue
        where = f"{cfg.train_data_dir}[{index}]"
        try:
            image = _stream_image(row, cfg.image_column, cfg.resolution, where, WHITE)
            given = (_stream_image(row, cfg.conditioning_image_column, cfg.resolution, where, BLACK)
                     if cfg.conditioning_image_column is not None else None)
            caption = row.get(cfg.caption_column)
            if not is_text(caption):
                raise BadSampleError(f"{where}: empty or non-text caption {caption!r}", where)
        except BadSampleError as err:
            yield index, None, err
        else:
            yield index, (image, given, caption), None


def _stream_image(row: dict, column: str, resolution: int, where: str, background: tuple[int, int, int]) -> np.ndarray:
    if column not in row:
        raise ConfigError(f"{where}: column {column!r} not found; available columns: {', '.join(row)}")
    if not isinstance(row[column], Image.Image):
        raise BadSampleError(f"{where}.{column}: not an image ({type(row[column]).__name__})", where)
    return pil_to_rgb(row[column], resolution, f"{where}.{column}", background)


# -- writing shards ------------------------------------------------------------------------------------
@dataclass
class ShardWriter:
    """Collects one shard's kept rows into its Arrow files and encodings; ``finish`` writes its marker."""

    out: Path
    number: int
    cfg: PrepareConfig
    device: torch.device
    encoders: Any = None  # metacontrol.models.base.Encoders when encodings are asked for
    kept: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        from datasets.arrow_writer import ArrowWriter

        name = shard_name(self.number)
        self.paths = {c: self.out / c / f"{name}.arrow" for c in self.cfg.conditions}
        (self.out / SHARDS_FOLDER).mkdir(parents=True, exist_ok=True)
        self.writers = {}
        for condition, path in self.paths.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            self.writers[condition] = ArrowWriter(features=arrow_features(), path=str(_partial(path)))
        self.pending: list[np.ndarray] = []  # images waiting for the VAE
        self.latents: dict[str, list[np.ndarray]] = {"latent_mean": [], "latent_std": []}
        self.captions: dict[str, int] = {}  # distinct caption -> its row in text_embeds
        self.caption_index: list[int] = []

    def add(self, image: np.ndarray, given: np.ndarray | None, caption: str) -> None:
        image_png = png_bytes(image)
        for condition in self.cfg.conditions:
            cond_map = given if given is not None else get_condition(condition).annotate(
                image, self.cfg.annotators, device=str(self.device))
            self.writers[condition].write({"image": {"bytes": image_png, "path": None},
                                           "conditioning_image": {"bytes": png_bytes(cond_map), "path": None},
                                           "text": caption})
        self.kept += 1
        if self.encoders is not None:
            self.caption_index.append(self.captions.setdefault(caption, len(self.captions)))
            self.pending.append(image)
            if len(self.pending) == self.cfg.encode_batch_size:
                self._encode_pending()

    def _encode_pending(self) -> None:
        from metacontrol.data.encoding_cache import encode_images

        if not self.pending:
            return
        pixels = torch.from_numpy(np.stack(self.pending)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        mean, std = encode_images(self.encoders, pixels)
        self.latents["latent_mean"].append(mean.numpy())
        self.latents["latent_std"].append(std.numpy())
        self.pending = []

    def _write_encodings(self) -> None:
        self._encode_pending()
        folder = self.out / ENCODINGS_FOLDER / shard_name(self.number)
        folder.mkdir(parents=True, exist_ok=True)
        captions = list(self.captions)
        with torch.no_grad():
            embeds = [self.encoders.encode_prompts(captions[i:i + self.cfg.encode_batch_size])
                      for i in range(0, len(captions), self.cfg.encode_batch_size)]
        arrays = {key: np.concatenate(parts) for key, parts in self.latents.items()}
        for key in self.encoders.family.text_keys:
            arrays[key] = torch.cat([e[key] for e in embeds]).float().cpu().numpy() if embeds else np.zeros((0,), np.float32)
        arrays["caption_index"] = np.asarray(self.caption_index, np.int64)
        for key, array in arrays.items():
            atomic_write(folder / f"{key}.npy", lambda f, a=array: np.save(f, a))

    def finish(self) -> dict[str, Any]:
        """Move the shard's files into place, the marker last; returns the marker."""
        for condition, writer in self.writers.items():
            writer.finalize()
            writer.close()
            _partial(self.paths[condition]).replace(self.paths[condition])
        if self.encoders is not None and self.kept:
            self._write_encodings()
        start = self.number * self.cfg.shard_size
        marker = {"shard": self.number, "rows": [start, start + self.kept + len(self.skipped)], "kept": self.kept,
                  "skipped": self.skipped, "seconds": round(time.perf_counter() - self.started, 3)}
        atomic_write_bytes(self.out / SHARDS_FOLDER / f"{shard_name(self.number)}.json",
                           json.dumps(marker, indent=1).encode())
        return marker


def _partial(path: Path) -> Path:
    """Where a shard's Arrow file grows until it is complete (named so ``load_dataset`` passes it over)."""
    return path.with_name(path.name + ".partial")


# -- the stage -----------------------------------------------------------------------------------------
def _record(cfg: PrepareConfig) -> dict[str, Any]:
    return {key: value for key, value in to_dict(cfg).items() if key not in UNRECORDED}


def _check_record(out: Path, cfg: PrepareConfig) -> None:
    """A folder prepared before must have been prepared with these settings: resuming mixes no two."""
    path = out / PREPARED_FILE
    if not path.is_file():
        return
    recorded, wanted = json.loads(path.read_text()), _record(cfg)
    for key in wanted:
        if recorded.get(key) != wanted[key]:
            raise ConfigError(f"{key}: {wanted[key]!r}, but {out} was prepared with {recorded.get(key)!r} "
                              f"(recorded in {path}); use another output_dir, or the same settings to resume")


def _open_rows(cfg: PrepareConfig, policy: BadSamplePolicy) -> FolderRows | HuggingFaceDataset | None:
    """The source's rows (None for a stream, whose length is known only at its end)."""
    if cfg.source == "imagefolder":
        return FolderRows(cfg, policy)
    if cfg.source == "hf":
        return HuggingFaceDataset(cfg.train_data_dir, cfg.resolution, cfg.image_column,  # type: ignore[arg-type]
                                  cfg.conditioning_image_column, cfg.caption_column, cfg.split,
                                  cfg.on_bad_sample, read_all=False)
    return None


def _done(out: Path) -> set[int]:
    return {int(p.stem.split("-")[1]) for p in (out / SHARDS_FOLDER).glob("shard-*.json")}


def prepare(cfg: PrepareConfig) -> dict[str, Any]:
    """Prepare this process's pending shards; on the main process, return the finished set's index."""
    accelerator = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(timeout=PROCESS_GROUP_TIMEOUT)])
    out, started = Path(cfg.output_dir), time.perf_counter()
    policy = BadSamplePolicy(cfg.on_bad_sample)
    with agreed(accelerator, "the start of prepare"):
        _check_record(out, cfg)
        rows = _open_rows(cfg, policy)
        done_before = _done(out)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / PREPARED_FILE, json.dumps(_record(cfg), indent=1).encode())
    listed_bad = list(policy.skipped)  # metadata lines rejected before any row is read
    with agreed(accelerator, "prepare"):
        encoders = _load_encoders(cfg, accelerator.device) if cfg.encode else None
        num_rows = _prepare_own_shards(cfg, accelerator, rows, done_before, policy, encoders)
    if not accelerator.is_main_process:
        return {}
    markers = [json.loads(p.read_text()) for p in sorted((out / SHARDS_FOLDER).glob("shard-*.json"))]
    index = {"num_rows": num_rows, "listed_bad": listed_bad, "conditions": cfg.conditions,
             "resolution": cfg.resolution, "shards": markers, "kept": sum(m["kept"] for m in markers),
             "encodings": _encodings_key(encoders) if encoders is not None else None}
    expected = math.ceil(num_rows / cfg.shard_size)
    if len(markers) != expected:
        raise RuntimeError(f"{out}: {len(markers)} shard(s) done, {expected} expected; run prepare again")
    atomic_write_bytes(out / INDEX_FILE, json.dumps(index, indent=1).encode())
    seconds = time.perf_counter() - started
    new = [m for m in markers if m["shard"] not in done_before]
    made = sum(m["kept"] + len(m["skipped"]) for m in new)
    skipped = len(listed_bad) + sum(len(m["skipped"]) for m in markers)
    print(f"prepare: {index['kept']} of {num_rows + len(listed_bad)} samples kept, {skipped} skipped as bad; "
          f"{len(new)} shard(s) prepared now, {len(markers) - len(new)} done before; {', '.join(cfg.conditions)}"
          f"{' + encodings' if cfg.encode else ''}; {seconds:.1f} s ({made / seconds:.2f} samples/s on "
          f"{accelerator.num_processes} process(es)); {out}")
    return index


def _load_encoders(cfg: PrepareConfig, device: torch.device) -> Any:
    from metacontrol.models.base import load_encoders

    encoders = load_encoders(cfg.pretrained_model_name_or_path, cfg.revision)
    for module in (encoders.vae, *encoders.text_modules):
        module.to(device).eval()
    return encoders


def _encodings_key(encoders: Any) -> str:
    """The encoders' identity (``encoding_cache.model_material``): training uses the encodings only under it."""
    from metacontrol.data.encoding_cache import cache_key, model_material

    return cache_key(model_material(encoders))


def _prepare_own_shards(cfg: PrepareConfig, accelerator: Accelerator, rows: FolderRows | HuggingFaceDataset | None,
                        done_before: set[int], policy: BadSamplePolicy, encoders: Any) -> int:
    """Write this process's shards that are not done; returns the number of source rows."""
    rank, world = accelerator.process_index, accelerator.num_processes
    total = None if rows is None else min(len(rows), cfg.max_samples or len(rows))
    if total is not None:
        mine = [s for s in range(math.ceil(total / cfg.shard_size)) if s % world == rank and s not in done_before]
        indices = [i for s in mine for i in range(s * cfg.shard_size, min((s + 1) * cfg.shard_size, total))]
        items: Iterator = iter(DataLoader(RowReader(rows, indices), batch_size=None, collate_fn=_as_is,  # type: ignore[arg-type]
                                          num_workers=cfg.dataloader_num_workers))
    else:
        wanted = _StreamShards(rank, world, done_before)
        items = _stream_rows(cfg, wanted)
        indices = []
    writer: ShardWriter | None = None
    count = 0
    bar = tqdm(items, total=len(indices) or None, desc=f"prepare {', '.join(cfg.conditions)}", unit="image",
               disable=not accelerator.is_local_main_process)
    for index, row, error in bar:
        count = index + 1
        number = index // cfg.shard_size
        if row is None and error is None:  # a streamed row of another process's shard
            continue
        if writer is not None and writer.number != number:
            writer.finish()
            writer = None
        if writer is None:
            writer = ShardWriter(Path(cfg.output_dir), number, cfg, accelerator.device, encoders)
        if error is not None:
            policy.reject(error)  # raises under on_bad_sample: error
            writer.skipped.append((error.path or "", str(error)))
        else:
            writer.add(*row)  # type: ignore[misc]
    if writer is not None:
        writer.finish()
    return total if total is not None else count


class _StreamShards:
    """``number in shards``: a streamed shard this process prepares (any number: the stream's end is unknown)."""

    def __init__(self, rank: int, world: int, done: set[int]) -> None:
        self.rank, self.world, self.done = rank, world, done

    def __contains__(self, number: object) -> bool:
        return isinstance(number, int) and number % self.world == self.rank and number not in self.done

