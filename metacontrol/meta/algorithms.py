"""Reptile, first-order MAML and the joint multi-task baseline, over a list of parameters.

One meta-step, per process:

    learner.begin()                         # snapshot theta (trainable params only), zero meta-grad
    for task in my_tasks:
        learner.adapt(support_losses)       # inner optimiser (fresh state) takes theta to phi_task
        learner.accumulate(query_loss)      # add theta - phi (Reptile) or grad L_query(phi) (FOMAML),
                                            # then RESTORE theta: the outer step starts from theta,
                                            # not from the last task's phi (the reference code's bug)
    learner.finish(all_reduce_sum, n)       # p.grad = meta-gradient averaged over all n tasks

Snapshots, restores and deltas are fused ``torch._foreach_*`` ops into preallocated buffers: no
``deepcopy``, no copy of frozen weights. The meta-gradient lives in one flat buffer so processes
average it with a single all-reduce.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch

from metacontrol.optimizers import adam_class, reset_state

Algorithm = Literal["reptile", "fomaml", "joint"]
InnerOptimizer = Literal["sgd", "adam"]


class ParameterSnapshot:
    """A preallocated copy of some parameters that can be re-taken and restored in place."""

    def __init__(self, params: Sequence[torch.Tensor]) -> None:
        self.params = list(params)
        self.buffers = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def take(self) -> None:
        torch._foreach_copy_(self.buffers, [p.detach() for p in self.params])

    @torch.no_grad()
    def restore(self) -> None:
        torch._foreach_copy_([p.data for p in self.params], self.buffers)


def flat_buffer_views(params: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One zeroed fp32 buffer plus a view shaped like each parameter (one all-reduce for all)."""
    device = params[0].device if params else torch.device("cpu")
    flat = torch.zeros(sum(p.numel() for p in params), dtype=torch.float32, device=device)
    views, offset = [], 0
    for p in params:
        views.append(flat[offset : offset + p.numel()].view_as(p))
        offset += p.numel()
    return flat, views


def _unique(params: Sequence[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    seen: set[int] = set()
    return [p for p in params if not (id(p) in seen or seen.add(id(p)))]


class MetaLearner:
    """Runs the inner loop and forms the meta-gradient for one of the three algorithms."""

    def __init__(
        self,
        inner_params: Sequence[torch.nn.Parameter],
        outer_params: Sequence[torch.nn.Parameter],
        *,
        algorithm: Algorithm = "reptile",
        inner_optimizer: InnerOptimizer = "adam",
        inner_learning_rate: float = 1e-4,
        max_grad_norm: float | None = 1.0,
        grad_scaler: torch.amp.GradScaler | None = None,
        inner_betas: tuple[float, float] = (0.9, 0.999),
        use_8bit_adam: bool = False,
    ) -> None:
        if algorithm not in ("reptile", "fomaml", "joint"):
            raise ValueError(f"unknown algorithm {algorithm!r}; expected reptile, fomaml or joint")
        self.algorithm = algorithm
        self.inner_params = list(inner_params)
        self.outer_params = list(outer_params)
        self.inner_optimizer = inner_optimizer
        self.inner_learning_rate = inner_learning_rate
        self.inner_betas = tuple(inner_betas)  # Reptile's authors use beta1 = 0: no momentum across inner steps
        self.max_grad_norm = max_grad_norm
        self.grad_scaler = grad_scaler
        self.use_8bit_adam = use_8bit_adam
        # theta of every parameter that can move during a meta-step, and the meta-gradient buffer.
        self.snapshot = ParameterSnapshot(_unique(self.inner_params + self.outer_params))
        index = {id(p): i for i, p in enumerate(self.snapshot.params)}
        self.outer_theta = [self.snapshot.buffers[index[id(p)]] for p in self.outer_params]
        self.meta_grad_flat, self.meta_grad = flat_buffer_views(self.outer_params)
        self.tasks_seen = 0
        self._inner: torch.optim.Optimizer | None = None  # built on first use, then reset per task

    # -- helpers -------------------------------------------------------------------------------------
    def _fresh_inner_optimizer(self) -> torch.optim.Optimizer:
        """The inner optimiser with the state of a new one, reusing its buffers.

        Zeroed Adam moments and step counts make the next step exactly a fresh optimiser's first, while
        allocating the state once instead of per task (two parameter-sized buffers each time).
        """
        if self._inner is None:
            if self.inner_optimizer == "sgd":
                self._inner = torch.optim.SGD(self.inner_params, lr=self.inner_learning_rate)
            else:
                self._inner = adam_class(self.use_8bit_adam, decoupled_weight_decay=False)(
                    self.inner_params, lr=self.inner_learning_rate, betas=self.inner_betas)
        else:
            reset_state(self._inner)
        return self._inner

    def _add_gradient(self, loss_fn: Callable[[], torch.Tensor]) -> float:
        """Add the loss's fp32 gradient w.r.t. the outer parameters to the meta-gradient; return the loss. Parameters
        the loss does not reach add nothing (no zero tensor is made for them: a LoRA-ML step reaches 2 tasks'
        adapters of hundreds).

        Under fp16 the backward goes through the GradScaler, as the inner loop's does, so small gradients
        do not flush to zero; the gradient is unscaled here, exactly (the scale is a power of two). On an
        overflow the scale backs off and the loss is recomputed: the closures are seeded, so the retry sees
        the same batch and noise. A gradient still non-finite at scale <= 1 is a real failure.
        """
        while True:
            loss = loss_fn()
            scaler = self.grad_scaler
            scaled = scaler.scale(loss) if scaler is not None else loss
            grads = torch.autograd.grad(scaled, self.outer_params, allow_unused=True)
            inv_scale = 1.0 / scaler.get_scale() if scaler is not None else 1.0
            used = [(m, g.float() * inv_scale) for g, m in zip(grads, self.meta_grad) if g is not None]
            if scaler is None or all(torch.isfinite(g).all() for _, g in used):
                if used:
                    torch._foreach_add_([m for m, _ in used], [g for _, g in used])
                return float(loss.detach())
            if scaler.get_scale() <= 1.0:
                raise FloatingPointError(f"non-finite gradient of a finite loss ({float(loss.detach()):.4g}) "
                                         "even at loss scale 1")
            scaler.update(scaler.get_scale() * scaler.get_backoff_factor())

    def _backward(self, loss: torch.Tensor) -> None:
        (self.grad_scaler.scale(loss) if self.grad_scaler is not None else loss).backward()

    def _clip_and_step(self, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> None:
        if self.grad_scaler is not None:
            self.grad_scaler.unscale_(optimizer)
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        if self.grad_scaler is not None:
            self.grad_scaler.step(optimizer)
            self.grad_scaler.update()
        else:
            optimizer.step()

    @staticmethod
    def _require_grad(params: list[torch.nn.Parameter], everything: list[torch.nn.Parameter]) -> None:
        keep = {id(p) for p in params}
        for p in everything:
            p.requires_grad_(id(p) in keep)

    # -- the meta-step -------------------------------------------------------------------------------
    def begin(self) -> None:
        """Start a meta-step: snapshot theta and zero the meta-gradient."""
        self.snapshot.take()
        self.meta_grad_flat.zero_()
        self.tasks_seen = 0

    def adapt(self, support_losses: Sequence[Callable[[], torch.Tensor]]) -> list[float]:
        """One inner optimiser step per support loss, with fresh optimiser state for the task."""
        self._require_grad(self.inner_params, self.snapshot.params)
        optimizer = self._fresh_inner_optimizer()
        losses = []
        for support_loss in support_losses:
            optimizer.zero_grad(set_to_none=True)
            loss = support_loss()
            self._backward(loss)
            self._clip_and_step(optimizer, self.inner_params)
            losses.append(float(loss.detach()))
        optimizer.zero_grad(set_to_none=True)
        return losses

    def accumulate(self, query_loss: Callable[[], torch.Tensor] | None = None) -> float | None:
        """Add this task's contribution to the meta-gradient, then restore theta."""
        value = None
        if self.algorithm == "reptile":
            # phi - theta is formed in the live weights (restored right after), so no temporary copy is
            # needed and the delta is rounded once: per-process sums then equal one process's sum.
            live = [p.data for p in self.outer_params]
            with torch.no_grad():
                torch._foreach_sub_(live, self.outer_theta)
                torch._foreach_sub_(self.meta_grad, live)
        elif self.algorithm == "fomaml":
            if query_loss is None:
                raise ValueError("fomaml needs a query loss")
            self._require_grad(self.outer_params, self.snapshot.params)
            value = self._add_gradient(query_loss)
        else:
            raise ValueError("joint training does not accumulate meta-gradients; use joint_gradients")
        self.snapshot.restore()
        self.tasks_seen += 1
        return value

    def finish(self, total_tasks: int, all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """Average the meta-gradient over ``total_tasks`` (all processes) and store it in ``p.grad``."""
        if all_reduce_sum is not None:
            self.meta_grad_flat.copy_(all_reduce_sum(self.meta_grad_flat))
        self.meta_grad_flat.div_(total_tasks)
        self._require_grad(self.outer_params, self.snapshot.params)
        for p, g in zip(self.outer_params, self.meta_grad):
            p.grad = g.to(p.dtype)

    def joint_gradients(self, task_losses: Sequence[Callable[[], torch.Tensor]]) -> list[float]:
        """Joint baseline: this process's sum of its tasks' gradients in the meta-gradient buffer; ``finish``
        then averages over all tasks of all processes. No collective here, so a failure can be agreed on first."""
        self._require_grad(self.outer_params, self.snapshot.params)
        self.meta_grad_flat.zero_()
        losses = []
        for task_loss in task_losses:
            losses.append(self._add_gradient(task_loss))
        return losses


def outer_step(optimizer: torch.optim.Optimizer, lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
               params: Sequence[torch.nn.Parameter], max_grad_norm: float) -> float:
    """Clip the (meta-)gradient in ``p.grad`` to ``max_grad_norm`` (0: no clipping), step and schedule
    ``optimizer``; returns the gradient norm before clipping."""
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm or math.inf)
    optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(grad_norm)
