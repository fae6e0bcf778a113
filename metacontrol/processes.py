"""What every process of a run must agree on: that a step failed somewhere, and the values it logs.

Under several processes a failure on one (a NaN, a bad sample, a full disk, a bug) must reach the others
before the step's next collective, or they wait in it forever; and a logged loss must be every process's
mean, not the main process's own tasks'. Both cost one small all-reduce.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from accelerate import Accelerator

from metacontrol.errors import FailedElsewhere


@contextmanager
def agreed(accelerator: Accelerator, where: str) -> Iterator[None]:
    """Run this process's part of a step; whatever it raises (a non-finite loss, a bad sample, a failed
    validation or checkpoint write, a bug) is raised once every process knows the step failed somewhere,
    and the others raise ``FailedElsewhere`` naming the processes that failed.

    One all-reduce of a flag per process, at the same point on all of them. Everything up to the step's
    next collective belongs inside: a process that raised on its own would leave the others waiting in it.
    """
    failure: Exception | None = None
    try:
        yield
    except Exception as err:
        failure = err
    failed = torch.zeros(accelerator.num_processes, device=accelerator.device)
    failed[accelerator.process_index] = failure is not None
    if accelerator.num_processes > 1:
        failed = accelerator.reduce(failed, reduction="sum")
    if failure is not None:
        raise failure
    if ranks := [str(rank) for rank, flag in enumerate(failed.tolist()) if flag]:
        raise FailedElsewhere(f"stopped at {where}: process {', '.join(ranks)} failed there (see its message)")


def mean_over_processes(accelerator: Accelerator, values: dict[str, list[float]]) -> dict[str, float]:
    """The mean of each key's values over every process (one all-reduce); keys nobody saw are left out.

    Every process passes the same keys, each with its own values (often none).
    """
    totals = torch.tensor([[sum(v), len(v)] for v in values.values()], dtype=torch.float64,
                          device=accelerator.device)
    if accelerator.num_processes > 1:
        totals = accelerator.reduce(totals, reduction="sum")
    return {key: total / count for key, (total, count) in zip(values, totals.tolist()) if count}
