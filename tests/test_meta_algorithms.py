"""The meta-updates against hand computations on a model small enough to follow by hand."""

from __future__ import annotations

import pytest
import torch

from metacontrol.freezing import set_requires_grad, trainable_parameters
from metacontrol.meta.algorithms import MetaLearner, ParameterSnapshot, outer_step


def _quadratic(params, target: torch.Tensor) -> torch.Tensor:
    """L(w, b) = sum((w - target)^2) + b^2: gradient 2 (w - target), 2 b."""
    w, b = params
    return ((w - target) ** 2).sum() + (b**2).sum()


def _model() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5])), torch.nn.Parameter(torch.tensor([0.25]))]


TARGETS = [torch.tensor([3.0, 0.0, -1.0]), torch.tensor([-1.0, 1.0, 2.0])]
QUERY_TARGETS = [torch.tensor([2.0, 2.0, 2.0]), torch.tensor([0.0, -3.0, 1.0])]
LR, STEPS = 0.1, 2


def _sgd_by_hand(theta: list[torch.Tensor], target: torch.Tensor) -> list[torch.Tensor]:
    w, b = theta[0].clone(), theta[1].clone()
    for _ in range(STEPS):
        w, b = w - LR * 2 * (w - target), b - LR * 2 * b
    return [w, b]


def _run(algorithm: str) -> tuple[list[torch.nn.Parameter], MetaLearner]:
    params = _model()
    learner = MetaLearner(params, params, algorithm=algorithm, inner_optimizer="sgd", inner_learning_rate=LR, max_grad_norm=None)
    learner.begin()
    for target, query_target in zip(TARGETS, QUERY_TARGETS):
        learner.adapt([lambda t=target: _quadratic(params, t)] * STEPS)
        learner.accumulate(lambda q=query_target: _quadratic(params, q))
    learner.finish(total_tasks=len(TARGETS))
    return params, learner


def test_reptile_meta_gradient_is_mean_of_theta_minus_phi():
    theta = [p.detach().clone() for p in _model()]
    params, _ = _run("reptile")
    phis = [_sgd_by_hand(theta, t) for t in TARGETS]
    expected = [sum(theta[i] - phi[i] for phi in phis) / len(phis) for i in range(2)]
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, e, rtol=0, atol=1e-6)
    # Before the outer step the live weights are theta again, not the last task's phi.
    for p, t in zip(params, theta):
        assert torch.equal(p.detach(), t)


def test_reptile_outer_step_moves_theta_towards_mean_phi():
    theta = [p.detach().clone() for p in _model()]
    params, _ = _run("reptile")
    torch.optim.SGD(params, lr=1.0).step()  # meta step size 1: theta <- mean(phi)
    phis = [_sgd_by_hand(theta, t) for t in TARGETS]
    for i, p in enumerate(params):
        torch.testing.assert_close(p.detach(), sum(phi[i] for phi in phis) / 2, rtol=0, atol=1e-6)


def test_fomaml_meta_gradient_is_mean_query_gradient_at_phi():
    theta = [p.detach().clone() for p in _model()]
    params, _ = _run("fomaml")
    expected_w, expected_b = torch.zeros(3), torch.zeros(1)
    for target, query in zip(TARGETS, QUERY_TARGETS):
        w, b = _sgd_by_hand(theta, target)
        expected_w += 2 * (w - query) / 2
        expected_b += 2 * b / 2
    torch.testing.assert_close(params[0].grad, expected_w, rtol=0, atol=1e-6)
    torch.testing.assert_close(params[1].grad, expected_b, rtol=0, atol=1e-6)
    for p, t in zip(params, theta):
        assert torch.equal(p.detach(), t)


def test_inner_adam_state_is_fresh_per_task():
    """Two identical tasks must give identical phi: no optimiser state leaks from task 1 into task 2."""
    params = _model()
    learner = MetaLearner(params, params, algorithm="reptile", inner_optimizer="adam", inner_learning_rate=0.05, max_grad_norm=None)
    learner.begin()
    phis = []
    for _ in range(2):
        learner.adapt([lambda: _quadratic(params, TARGETS[0])] * 3)
        phis.append([p.detach().clone() for p in params])
        learner.accumulate()
    for a, b in zip(*phis):
        assert torch.equal(a, b)


def test_joint_step_is_gradient_of_mean_loss():
    params = _model()
    learner = MetaLearner(params, params, algorithm="joint", inner_optimizer="sgd", inner_learning_rate=LR, max_grad_norm=None)
    learner.joint_gradients([lambda t=t: _quadratic(params, t) for t in TARGETS])
    learner.finish(total_tasks=2)
    w = params[0].detach()
    expected = sum(2 * (w - t) for t in TARGETS) / 2
    torch.testing.assert_close(params[0].grad, expected, rtol=0, atol=1e-6)


def test_outer_only_parameters_get_zero_reptile_update_and_frozen_inner_stay_put():
    """A parameter frozen in the inner loop does not move during adaptation; Reptile's delta for it is 0."""
    params = _model()
    learner = MetaLearner([params[0]], params, algorithm="reptile", inner_optimizer="sgd", inner_learning_rate=LR, max_grad_norm=None)
    b_before = params[1].detach().clone()
    learner.begin()
    learner.adapt([lambda: _quadratic(params, TARGETS[0])] * STEPS)
    assert torch.equal(params[1].detach(), b_before)
    assert not torch.equal(params[0].detach(), _model()[0].detach())
    learner.accumulate()
    learner.finish(1)
    assert torch.equal(params[1].grad, torch.zeros(1))
    assert params[0].grad.abs().sum() > 0


def test_partial_adaptation_fomaml_adapts_part_and_takes_the_query_gradient_of_all():
    """ANIL-style partial adaptation (configs/recipes/partial.yaml): the inner SGD steps move only w (the adapted
    part); the meta-gradient is the query loss's gradient w.r.t. w *and* b at (phi_w, b), averaged over the tasks."""
    def coupled(params, target):  # L = sum((w - target)^2) + (b * sum(w))^2: b's gradient depends on the adapted w
        w, b = params
        return ((w - target) ** 2).sum() + (b * w.sum()) ** 2

    params = _model()
    theta_w, b = params[0].detach().clone(), params[1].detach().clone()
    learner = MetaLearner([params[0]], params, algorithm="fomaml", inner_optimizer="sgd", inner_learning_rate=LR,
                          max_grad_norm=None)
    learner.begin()
    for target, query in zip(TARGETS, QUERY_TARGETS):
        learner.adapt([lambda t=target: coupled(params, t)] * STEPS)
        learner.accumulate(lambda q=query: coupled(params, q))
    learner.finish(total_tasks=2)
    grads_w, grads_b = [], []
    for target, query in zip(TARGETS, QUERY_TARGETS):
        w = theta_w.clone()
        for _ in range(STEPS):  # dL/dw = 2 (w - target) + 2 b^2 sum(w)
            w = w - LR * (2 * (w - target) + 2 * b**2 * w.sum())
        grads_w.append(2 * (w - query) + 2 * b**2 * w.sum())
        grads_b.append(2 * b * w.sum() ** 2)
    torch.testing.assert_close(params[0].grad, sum(grads_w) / 2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(params[1].grad, sum(grads_b) / 2, rtol=1e-5, atol=1e-6)
    assert torch.equal(params[1].detach(), b) and torch.equal(params[0].detach(), theta_w)  # theta restored


def test_snapshot_restore_is_bit_exact_and_uses_preallocated_buffers():
    params = _model()
    snap = ParameterSnapshot(params)
    buffers = [b.data_ptr() for b in snap.buffers]
    with torch.no_grad():
        params[0].add_(1.2345)
    snap.restore()
    assert torch.equal(params[0].detach(), torch.tensor([1.0, -2.0, 0.5]))
    snap.take()
    assert [b.data_ptr() for b in snap.buffers] == buffers


def test_meta_gradient_is_one_flat_buffer():
    params, learner = _run("reptile")
    flat = learner.meta_grad_flat
    assert flat.numel() == sum(p.numel() for p in params)
    assert all(g.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr() for g in learner.meta_grad)


def test_8bit_inner_adam_starts_every_task_fresh():
    """bitsandbytes' 8-bit Adam (``use_8bit_adam``; 8-bit moments from 4096 elements on): the second task's phi,
    after a first task on other data, equals a new learner's phi on that task alone, bit for bit."""
    def losses(target: torch.Tensor, w: torch.nn.Parameter) -> list:
        return [lambda: ((w - target) ** 2).sum()] * 3

    targets = [torch.randn(8192, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    phis = []
    for first in (True, False):
        w = torch.nn.Parameter(torch.zeros(8192))
        learner = MetaLearner([w], [w], algorithm="reptile", inner_optimizer="adam", inner_learning_rate=0.05,
                              max_grad_norm=None, use_8bit_adam=True)
        learner.begin()
        if first:
            learner.adapt(losses(targets[0], w))
            learner.accumulate()
        learner.adapt(losses(targets[1], w))
        phis.append(w.detach().clone())
    assert learner._inner.state[w]["state1"].dtype == torch.uint8  # the moments really are 8-bit
    assert torch.equal(phis[0], phis[1]) and phis[0].abs().sum() > 0


def test_inner_adam_with_beta1_zero_matches_hand_computation():
    """Reptile's authors' inner Adam (beta1 = 0): the step is lr * g_t / (sqrt(v_t / (1 - b2^t)) + eps)."""
    lr, b2, eps = 0.05, 0.9, 1e-8
    params = _model()
    learner = MetaLearner(params, params, algorithm="reptile", inner_optimizer="adam", inner_learning_rate=lr, max_grad_norm=None, inner_betas=(0.0, b2))
    learner.begin()
    learner.adapt([lambda: _quadratic(params, TARGETS[0])] * 2)
    w, v = _model()[0].detach().clone(), torch.zeros(3)
    for t in (1, 2):
        g = 2 * (w - TARGETS[0])
        v = b2 * v + (1 - b2) * g**2
        w = w - lr * g / ((v / (1 - b2**t)).sqrt() + eps)
    torch.testing.assert_close(params[0].detach(), w, rtol=0, atol=1e-6)


def test_linear_annealed_reptile_outer_steps_match_hand_computation():
    """Meta step size annealed linearly to 0 (lr_scheduler: linear): theta_k+1 = theta_k + eps (1 - k/T) (mean phi - theta_k)."""
    from diffusers.optimization import get_scheduler

    params, total, eps = _model(), 3, 1.0
    learner = MetaLearner(params, params, algorithm="reptile", inner_optimizer="sgd", inner_learning_rate=LR, max_grad_norm=None)
    outer = torch.optim.SGD(params, lr=eps)
    schedule = get_scheduler("linear", outer, num_warmup_steps=0, num_training_steps=total)
    theta = [p.detach().clone() for p in params]
    for k in range(total):
        learner.begin()
        for target in TARGETS:
            learner.adapt([lambda t=target: _quadratic(params, t)] * STEPS)
            learner.accumulate()
        learner.finish(len(TARGETS))
        outer.step()
        schedule.step()
        phis = [_sgd_by_hand(theta, t) for t in TARGETS]
        theta = [th + eps * (1 - k / total) * (sum(phi[i] for phi in phis) / 2 - th) for i, th in enumerate(theta)]
        for p, th in zip(params, theta):
            torch.testing.assert_close(p.detach(), th, rtol=0, atol=1e-6)
    assert schedule.get_last_lr()[0] == 0.0


@pytest.mark.parametrize("algorithm", ["fomaml", "joint"])
def test_outer_gradients_through_grad_scaler_equal_unscaled_ones(algorithm):
    """fp16's GradScaler on the FOMAML query / joint backward: scaled by a power of two and unscaled exactly."""
    plain, _ = _run(algorithm) if algorithm == "fomaml" else (_joint(None), None)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    scaled = _run_fomaml_with(scaler) if algorithm == "fomaml" else _joint(scaler)
    for a, b in zip(plain, scaled):
        assert torch.equal(a.grad, b.grad)


def test_grad_scaler_overflow_backs_off_and_recomputes_the_same_gradient():
    """A query gradient that overflows at the current scale is recomputed at a lower one, not dropped."""
    def query_gradient(scaler: torch.amp.GradScaler | None) -> list[torch.Tensor]:
        params = _model()
        learner = MetaLearner(params, params, algorithm="fomaml", inner_optimizer="sgd", inner_learning_rate=LR, max_grad_norm=None, grad_scaler=scaler)
        learner.begin()
        learner.adapt([])  # no inner step: the scaler meets its first inf in the query backward
        learner.accumulate(lambda: _quadratic(params, QUERY_TARGETS[0]))
        learner.finish(1)
        return [p.grad for p in params]

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127, backoff_factor=0.5)
    scaled = query_gradient(scaler)
    assert scaler.get_scale() < 2.0**127  # 2 * |w - q| * 2^127 overflowed fp32 and the scale backed off
    for a, b in zip(query_gradient(None), scaled):
        assert torch.equal(a, b)


def _run_fomaml_with(scaler: torch.amp.GradScaler) -> list[torch.nn.Parameter]:
    params = _model()
    learner = MetaLearner(params, params, algorithm="fomaml", inner_optimizer="sgd", inner_learning_rate=LR, max_grad_norm=None, grad_scaler=scaler)
    learner.begin()
    for target, query_target in zip(TARGETS, QUERY_TARGETS):
        learner.adapt([lambda t=target: _quadratic(params, t)] * STEPS)
        learner.accumulate(lambda q=query_target: _quadratic(params, q))
    learner.finish(total_tasks=len(TARGETS))
    return params


def _joint(scaler: torch.amp.GradScaler | None) -> list[torch.nn.Parameter]:
    params = _model()
    learner = MetaLearner(params, params, algorithm="joint", inner_optimizer="sgd", inner_learning_rate=LR, max_grad_norm=None, grad_scaler=scaler)
    learner.joint_gradients([lambda t=t: _quadratic(params, t) for t in TARGETS])
    learner.finish(total_tasks=2)
    return params


def test_parameters_frozen_in_both_phases_get_no_gradient():
    """requires_grad is off for weights no phase trains: no backward into them, no .grad kept."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    inner = trainable_parameters(model, ["0.*"], "freeze.inner")
    outer = trainable_parameters(model, ["0.*"], "freeze.outer")
    set_requires_grad(model, inner + outer)
    learner = MetaLearner(inner, outer, algorithm="fomaml", inner_optimizer="sgd", inner_learning_rate=LR, max_grad_norm=None)
    x = torch.randn(4, 3)
    learner.begin()
    learner.adapt([lambda: model(x).pow(2).mean()] * 2)
    learner.accumulate(lambda: model(x).pow(2).mean())
    learner.finish(1)
    assert all(not p.requires_grad and p.grad is None for p in model[0].parameters())
    assert all(p.grad is not None for p in model[1].parameters())


def _clipped(g: torch.Tensor, max_norm: float) -> torch.Tensor:
    """g scaled to norm ``max_norm`` if longer: clip_grad_norm_ by hand (one tensor, its epsilon included)."""
    return g * min(1.0, max_norm / (float(g.norm()) + 1e-6))


def test_clipped_inner_and_outer_steps_match_hand_computation():
    """Reptile with both clips on: each inner SGD step clipped to max_grad_norm, the meta-gradient theta - mean(phi)
    clipped to outer_max_grad_norm before the outer SGD step (meta step size EPS)."""
    inner_clip, outer_clip, eps = 0.5, 0.05, 0.8
    params = [torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))]
    learner = MetaLearner(params, params, algorithm="reptile", inner_optimizer="sgd", inner_learning_rate=LR,
                          max_grad_norm=inner_clip)
    optimizer = torch.optim.SGD(params, lr=eps)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    theta = params[0].detach().clone()
    learner.begin()
    for target in TARGETS:
        learner.adapt([lambda t=target: ((params[0] - t) ** 2).sum()] * STEPS)
        learner.accumulate()
    learner.finish(len(TARGETS))
    norm = outer_step(optimizer, schedule, params, outer_clip)

    phis = []
    for target in TARGETS:
        w = theta.clone()
        for _ in range(STEPS):
            w = w - LR * _clipped(2 * (w - target), inner_clip)
        phis.append(w)
    meta_grad = theta - sum(phis) / len(phis)
    assert norm == pytest.approx(float(meta_grad.norm()), rel=1e-6)  # the norm before clipping
    assert float(meta_grad.norm()) > outer_clip  # so the outer clip acts
    torch.testing.assert_close(params[0].detach(), theta - eps * _clipped(meta_grad, outer_clip), rtol=0, atol=1e-6)


def test_outer_clipping_off_keeps_reptiles_step_size():
    params = [torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))]
    params[0].grad = torch.tensor([3.0, 4.0, 12.0])  # norm 13
    optimizer = torch.optim.SGD(params, lr=0.5)
    assert outer_step(optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0), params, 0.0) == 13.0
    torch.testing.assert_close(params[0].detach(), torch.tensor([-0.5, -4.0, -5.5]))


def test_inner_steps_through_grad_scaler_equal_unscaled_ones_and_skip_on_overflow():
    """fp16's GradScaler in the inner loop: scale, unscale (exact: a power of two), clip, step. An overflowing
    step is skipped and the scale backs off, as torch.amp does; the next one is taken."""
    def adapted(scaler: torch.amp.GradScaler | None, clip: float | None) -> torch.Tensor:
        params = [torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))]
        learner = MetaLearner(params, params, algorithm="reptile", inner_optimizer="sgd", inner_learning_rate=LR,
                              max_grad_norm=clip, grad_scaler=scaler)
        learner.begin()
        learner.adapt([lambda: ((params[0] - TARGETS[0]) ** 2).sum()] * STEPS)
        return params[0].detach().clone()

    for clip in (None, 0.5):
        assert torch.equal(adapted(torch.amp.GradScaler("cpu", init_scale=2.0**10), clip), adapted(None, clip))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127, backoff_factor=2.0**-100)
    one_step_fewer = adapted(scaler, None)  # the first step overflows at 2^127 and is skipped
    assert scaler.get_scale() == 2.0**27
    w = torch.tensor([1.0, -2.0, 0.5])
    for _ in range(STEPS - 1):
        w = w - LR * 2 * (w - TARGETS[0])
    torch.testing.assert_close(one_step_fewer, w, rtol=0, atol=1e-6)
