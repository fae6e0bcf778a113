"""Batches read ahead of the training loop, by DataLoader workers, in the order the loop will use them.

A training loop's batches are known in advance: the episode sampler and fine-tuning's ``step_batch`` are
pure functions of (seed, step, process). So the loop plans its steps and a ``DataLoader`` over that plan
decodes and collates them in worker processes while the model trains. Each planned step becomes one item;
the batch of every request is ``data[task].batch(indices)``, as without workers, so what the loop sees is
the same bytes whichever ``dataloader_num_workers`` is set (tested: 2 processes == 1, resume is exact).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Sequence

from torch.utils.data import DataLoader, Dataset

from metacontrol.data.pools import TaskData

Request = tuple[str, Sequence[int]]  # (task, sample indices) of one batch
StepPlan = dict[Hashable, Request]  # a step's batches by the key the loop asks for them with


class PlannedSteps(Dataset):
    """Item i: the batches of planned step ``first + i``, as ``{key: batch}``."""

    def __init__(self, data: dict[str, TaskData], plan: Callable[[int], StepPlan], first: int, end: int) -> None:
        self.data, self.plan, self.first, self.end = data, plan, first, end

    def __len__(self) -> int:
        return max(self.end - self.first, 0)

    def __getitem__(self, i: int) -> dict[Hashable, dict] | ReadFailure:
        try:
            return {key: self.data[task].batch(indices) for key, (task, indices) in self.plan(self.first + i).items()}
        except Exception as err:  # handed to the loop as it is: a worker's own re-raise adds its traceback
            return ReadFailure(err)


class ReadFailure:
    """A step whose read raised, carried out of the worker so the loop raises the original error (one clean
    line, e.g. the ``BadSampleError`` naming the file) inside its ``agreed`` step, where every process stops."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _as_is(item: dict) -> dict:
    """The collate function: the batches are collated already (a module-level function, so workers can pickle it)."""
    return item


def planned_batches(data: dict[str, TaskData], plan: Callable[[int], StepPlan], first: int, end: int,
                    num_workers: int = 0, prefetch_factor: int = 2) -> Iterator[dict[Hashable, dict]]:
    """The batches of steps ``first .. end - 1``, one ``{key: batch}`` per step.

    ``num_workers`` 0 reads each step in the loop's own thread when it is asked for (no read-ahead); with
    workers, ``prefetch_factor`` steps per worker are read ahead. A failed read raises its own error when
    its step is asked for.
    """
    loader = DataLoader(PlannedSteps(data, plan, first, end), batch_size=None, shuffle=False, collate_fn=_as_is,
                        num_workers=num_workers, prefetch_factor=prefetch_factor if num_workers else None,
                        persistent_workers=False)
    for item in loader:
        if isinstance(item, ReadFailure):
            raise item.error
        yield item
