"""planned_batches: DataLoader workers hand the loop exactly the batches it would read itself, in its order,
and a failed read reaches the loop as the original one-line error."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import pytest
import torch

from metacontrol.data.images import BadSampleError
from metacontrol.data.loader import planned_batches
from metacontrol.data.pools import TensorPool
from metacontrol.meta.episodes import TaskSampler

TASKS = ("canny", "depth", "hed")


def _pools(size: int = 12) -> dict[str, TensorPool]:
    generator = torch.Generator().manual_seed(0)
    return {task: TensorPool(torch.randint(0, 256, (size, 3, 8, 8), dtype=torch.uint8, generator=generator),
                             torch.randint(0, 256, (size, 3, 8, 8), dtype=torch.uint8, generator=generator),
                             [f"{task} {i}" for i in range(size)]) for task in TASKS}


def _sampler(pools: dict[str, TensorPool], process_index: int = 0) -> TaskSampler:
    return TaskSampler(tasks=TASKS, pool_sizes={t: len(p) for t, p in pools.items()}, tasks_per_step=2,
                       inner_steps=2, support_batch_size=3, query_batch_size=2, process_index=process_index,
                       num_processes=2)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


@pytest.mark.parametrize("workers", [0, 2])
def test_workers_yield_the_loops_own_batches_in_order(workers):
    pools = _pools()
    sampler = _sampler(pools, process_index=1)
    plan = partial(sampler.batches_of_step, query=True)
    read = list(planned_batches(pools, plan, 3, 9, num_workers=workers, prefetch_factor=2))
    assert len(read) == 6
    for step, batches in zip(range(3, 9), read):
        episodes = sampler.episodes(step)
        assert set(batches) == {(e.slot, phase) for e in episodes for phase in (0, 1, -1)}
        for e in episodes:
            for phase in (0, 1, -1):
                assert _same(batches[e.slot, phase], pools[e.task].batch(e.indices(phase)))


def test_reptile_plans_no_query_batch():
    pools = _pools()
    assert {phase for _, phase in _sampler(pools).batches_of_step(0, query=False)} == {0, 1}


class _BrokenFrom(TensorPool):
    """A pool whose samples from ``first`` on cannot be read, as a truncated image file would be."""

    def __init__(self, pool: TensorPool, first: int) -> None:
        super().__init__(pool.images, pool.conditions, pool.captions)
        self.first = first

    def item_tensors(self, indices: Sequence[int], pixels: bool = True) -> dict:
        if bad := [i for i in indices if i >= self.first]:
            raise BadSampleError(f"bad data: sample {bad[0]} is truncated", path=f"sample-{bad[0]}.png")
        return super().item_tensors(indices, pixels)


@pytest.mark.parametrize("workers", [0, 1])
def test_a_failed_read_raises_the_original_error_when_its_step_is_asked_for(workers):
    pools = {"canny": _BrokenFrom(_pools()["canny"], first=0)}
    reads = planned_batches(pools, lambda step: {"batch": ("canny", [step])}, 0, 4, num_workers=workers)
    with pytest.raises(BadSampleError) as raised:
        next(reads)
    assert str(raised.value) == "bad data: sample 0 is truncated" and raised.value.path == "sample-0.png"
