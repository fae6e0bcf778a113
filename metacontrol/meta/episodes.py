"""Episodes for meta-training: which task each process adapts on, with which support and query samples.

Everything is a pure function of ``(seed, meta_step, slot)``. That makes the sampler's "position"
just the meta-step (resume needs nothing else), and lets N processes split one meta-step's task
slots between them and see exactly the episodes a single process would see.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from metacontrol.config_loader import ConfigError
from metacontrol.data.loader import StepPlan
from metacontrol.objective import ControlNetObjective, check_finite


@dataclass(frozen=True)
class Episode:
    """One task of one meta-step: ``support[k]`` are the sample indices of inner step k."""

    meta_step: int
    slot: int
    task: str
    support: tuple[tuple[int, ...], ...]
    query: tuple[int, ...]
    run_seed: int = 0

    def indices(self, phase: int) -> tuple[int, ...]:
        """The sample indices of inner step ``phase`` (-1: the query batch)."""
        return self.query if phase < 0 else self.support[phase]

    def seed(self, phase: int) -> int:
        """A seed for the noise/timestep RNG of inner step ``phase`` (-1: the query batch)."""
        return int(np.random.SeedSequence([self.run_seed, self.meta_step, self.slot, phase + 1]).generate_state(1)[0])


class TaskSampler:
    """Draws ``tasks_per_step`` tasks per meta-step and the batches of each, deterministically."""

    def __init__(self, *, tasks: list[str], pool_sizes: dict[str, int], tasks_per_step: int, inner_steps: int,
                 support_batch_size: int, query_batch_size: int, seed: int = 0, process_index: int = 0,
                 num_processes: int = 1) -> None:
        if tasks_per_step % num_processes:
            raise ConfigError(f"meta.tasks_per_meta_step ({tasks_per_step}) must be a multiple of the number of "
                              f"processes ({num_processes}) so every process adapts on the same number of tasks")
        missing = [t for t in tasks if t not in pool_sizes]
        if missing:
            raise ConfigError(f"no data for task(s) {', '.join(missing)}")
        small = [f"{t} ({n})" for t, n in pool_sizes.items() if n < max(support_batch_size, query_batch_size)]
        if small:
            raise ConfigError(f"too few samples for a batch in task(s) {', '.join(small)}; need at least "
                              f"{max(support_batch_size, query_batch_size)}")
        self.tasks = list(tasks)
        self.pool_sizes = dict(pool_sizes)
        self.tasks_per_step = tasks_per_step
        self.inner_steps = inner_steps
        self.support_batch_size = support_batch_size
        self.query_batch_size = query_batch_size
        self.seed = seed
        self.process_index = process_index
        self.num_processes = num_processes

    def tasks_for_step(self, meta_step: int) -> list[str]:
        """All processes' tasks of a meta-step: a shuffled round over the task list, repeated as needed."""
        rng = np.random.default_rng([self.seed, meta_step])
        rounds = -(-self.tasks_per_step // len(self.tasks))
        order = [t for _ in range(rounds) for t in rng.permutation(self.tasks)]
        return [str(t) for t in order[: self.tasks_per_step]]

    def episode(self, meta_step: int, slot: int, task: str) -> Episode:
        rng = np.random.default_rng([self.seed, meta_step, slot, 1])
        size = self.pool_sizes[task]
        support = tuple(tuple(int(i) for i in rng.choice(size, self.support_batch_size, replace=False))
                        for _ in range(self.inner_steps))  # fmt: skip
        used = {i for batch in support for i in batch}
        rest = [i for i in range(size) if i not in used]
        pool = rest if len(rest) >= self.query_batch_size else list(range(size))  # query disjoint when possible
        query = tuple(int(i) for i in rng.choice(pool, self.query_batch_size, replace=False))
        return Episode(meta_step, slot, task, support, query, self.seed)

    def episodes(self, meta_step: int) -> list[Episode]:
        """This process's episodes: slots ``process_index, process_index + P, ...``."""
        tasks = self.tasks_for_step(meta_step)
        return [self.episode(meta_step, slot, tasks[slot])
                for slot in range(self.process_index, self.tasks_per_step, self.num_processes)]

    def batches_of_step(self, meta_step: int, query: bool = True) -> StepPlan:
        """The batches this process reads in a meta-step, keyed ``(slot, phase)`` (phase -1: the query batch),
        for ``planned_batches`` to read ahead; ``query=False`` when the algorithm never uses one (Reptile, joint)."""
        return {(e.slot, phase): (e.task, e.indices(phase))
                for e in self.episodes(meta_step)
                for phase in (*range(self.inner_steps), *((-1,) if query else ()))}


def episode_loss(objective: ControlNetObjective, batch: dict, episode: Episode, phase: int) -> Callable[[], torch.Tensor]:
    """The loss of an episode's ``batch`` of ``phase`` (k: support batch k; -1: the query batch), as a closure.

    ``MetaLearner`` takes closures so it can compute a loss again (after an fp16 overflow) and get the same
    one: the noise is seeded by (seed, meta-step, slot, phase). A NaN/inf names where it happened.
    """
    indices = episode.indices(phase)
    where = "query batch" if phase < 0 else f"inner step {phase}"

    def compute() -> torch.Tensor:
        generator = torch.Generator().manual_seed(episode.seed(phase))
        loss = objective.loss(batch, generator)
        return check_finite(loss, f"meta-step {episode.meta_step}, task {episode.task!r}, {where}, "
                                  f"sample indices {list(indices)}")

    return compute
