"""One way from a configured source to task data, for every script: the synthetic world, an image folder
(annotated per task), a saved 🤗 dataset or a prepared set (``metacontrol prepare``); then the unknown-word
check and, with ``cache: latents``, the encodings (a prepared set's own when its encoders are the run's)."""

from __future__ import annotations

from pathlib import Path

from metacontrol.config import SourceConfig
from metacontrol.config_loader import ConfigError
from metacontrol.data.datasets import METADATA_FILE, HuggingFaceDataset, ImageFolderDataset
from metacontrol.data.encoding_cache import attach_encodings, cache_key, model_material
from metacontrol.data.pools import DatasetTaskData, TaskData, synthetic_pools, warn_unknown_words
from metacontrol.data.shards import PreparedTaskData
from metacontrol.models.base import BaseModel

ANNOTATIONS_FOLDER = "annotations"  # under a run's cache_dir, beside the encodings' <key>/ folders
# Unprepared data is read, annotated and encoded at start-up, by one process while the others wait: past this
# many samples that wait nears NCCL's ten-minute watchdog, and `metacontrol prepare` is the way.
MAX_UNPREPARED = 2000


def task_root(source: SourceConfig, task: str) -> Path:
    """``{train_data_dir}/{task}`` if that folder exists, else the shared ``train_data_dir``."""
    root = Path(source.train_data_dir)
    return root / task if (root / task).is_dir() else root


def load_task_data(source: SourceConfig, tasks: list[str], resolution: int, base: BaseModel, *, cache: str,
                   cache_dir: str | None, show_progress: bool, count: int | None = None,
                   start: int = 0) -> dict[str, TaskData]:
    """Per task, ``count`` examples from index ``start`` on (None: all of a dataset; the synthetic world
    needs a count). Too few examples fail here, before any training work."""
    if source.source == "synthetic":
        if count is None:
            raise ValueError("the synthetic world is endless: give a count")
        data: dict[str, TaskData] = dict(synthetic_pools(source.world_at(resolution), tasks, count, "train", show_progress,
                                                         start=start))
    elif source.source == "prepared":
        data = {task: _prepared_task_data(source, task, resolution, count, start) for task in tasks}
    else:
        data = {task: _dataset_task_data(source, task, resolution, cache_dir, count, start) for task in tasks}
    warn_unknown_words(data, base.tokenizer)
    if cache == "latents":
        key = cache_key(model_material(base)) if source.source == "prepared" else None
        stored = {task: d.stored_encodings(key, base.family.text_keys) for task, d in data.items() if isinstance(d, PreparedTaskData)}
        for task, encodings in stored.items():
            if encodings is not None:
                data[task].cached = encodings  # type: ignore[assignment]
        rest = {task: d for task, d in data.items() if stored.get(task) is None}
        if rest:
            attach_encodings(rest, base, cache_dir=cache_dir, show_progress=show_progress)
    return data


def _shots(data: DatasetTaskData | PreparedTaskData, where: object, count: int | None, start: int, skipped: int = 0) -> TaskData:
    """``count`` samples from ``start`` on (None: all), or one line saying there are too few."""
    if count is None:
        return data
    if len(data) < start + count:
        raise ConfigError(f"shots: {count} examples from shot_offset {start} asked for, but {where} has only "
                          f"{len(data)} usable samples ({skipped} skipped as bad); lower shots or shot_offset")
    return data.subset(range(start, start + count))


def _prepared_task_data(source: SourceConfig, task: str, resolution: int, count: int | None,
                        start: int) -> TaskData:
    data = PreparedTaskData(source.train_data_dir, task, resolution)  # type: ignore[arg-type]
    return _shots(data, source.train_data_dir, count, start)


def _listed(source: SourceConfig, root: Path) -> int:
    """How many samples an unprepared source lists, counted without decoding any."""
    if source.source == "imagefolder":
        metadata = root / METADATA_FILE
        return sum(1 for line in metadata.read_bytes().splitlines() if line.strip()) if metadata.is_file() else 0
    import datasets

    try:
        loaded = datasets.load_from_disk(str(root))
    except FileNotFoundError:
        return 0  # HuggingFaceDataset says what is missing
    if isinstance(loaded, datasets.DatasetDict):
        return len(loaded["train"]) if "train" in loaded else 0
    return len(loaded)


def _dataset_task_data(source: SourceConfig, task: str, resolution: int, cache_dir: str | None,
                       count: int | None, start: int) -> TaskData:
    """``cache_dir`` set: annotations go under it too, so a read-only data folder is annotated only once."""
    root = task_root(source, task)
    if (listed := _listed(source, root)) > MAX_UNPREPARED:
        raise ConfigError(f"train_data_dir: {root} lists {listed} samples; past {MAX_UNPREPARED}, prepare them once "
                          f"with `metacontrol prepare source={source.source} train_data_dir={root} "
                          f"conditions=[{task}]` and train with source=prepared train_data_dir=<its output_dir>")
    if source.source == "imagefolder":
        annotations = Path(cache_dir) / ANNOTATIONS_FOLDER if cache_dir is not None else None
        dataset = ImageFolderDataset(root, task, resolution, source.annotators, cache_dir=annotations,
                                     on_bad_sample=source.on_bad_sample, caption_column=source.caption_column)
    else:
        dataset = HuggingFaceDataset(root, resolution, source.image_column, source.conditioning_image_column,
                                     source.caption_column, on_bad_sample=source.on_bad_sample)
    return _shots(DatasetTaskData(dataset), root, count, start, len(dataset.skipped))
