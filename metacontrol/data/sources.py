"""One way from a configured source to task data, for every script: the synthetic world, an image folder
(annotated per task) or a saved 🤗 dataset; then the unknown-word check and, with ``cache: latents``,
the cached encodings."""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Subset

from metacontrol.config import SourceConfig
from metacontrol.config_loader import ConfigError
from metacontrol.data.datasets import HuggingFaceDataset, ImageFolderDataset
from metacontrol.data.encoding_cache import attach_encodings
from metacontrol.data.pools import DatasetTaskData, TaskData, synthetic_pools, warn_unknown_words
from metacontrol.models.base import BaseModel

ANNOTATIONS_FOLDER = "annotations"  # under a run's cache_dir, beside the encodings' <key>/ folders


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
    else:
        data = {task: _dataset_task_data(source, task, resolution, cache_dir, count, start) for task in tasks}
    warn_unknown_words(data, base.tokenizer)
    if cache == "latents":
        attach_encodings(data, base, cache_dir=cache_dir, show_progress=show_progress)
    return data


def _dataset_task_data(source: SourceConfig, task: str, resolution: int, cache_dir: str | None,
                       count: int | None, start: int) -> TaskData:
    """``cache_dir`` set: annotations go under it too, so a read-only data folder is annotated only once."""
    root = task_root(source, task)
    if source.source == "imagefolder":
        annotations = Path(cache_dir) / ANNOTATIONS_FOLDER if cache_dir is not None else None
        dataset = ImageFolderDataset(root, task, resolution, source.annotators, cache_dir=annotations,
                                     on_bad_sample=source.on_bad_sample, caption_column=source.caption_column)
    else:
        dataset = HuggingFaceDataset(root, resolution, source.image_column, source.conditioning_image_column,
                                     source.caption_column, on_bad_sample=source.on_bad_sample)
    if count is None:
        return DatasetTaskData(dataset)
    if len(dataset) < start + count:
        raise ConfigError(f"shots: {count} examples from shot_offset {start} asked for, but {root} has only "
                          f"{len(dataset)} usable samples ({len(dataset.skipped)} skipped as bad); lower shots or "
                          "shot_offset")
    return DatasetTaskData(Subset(dataset, range(start, start + count)))
