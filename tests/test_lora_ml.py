"""LoRA-ML (one adapter per task beside a shared ControlNet) against hand computations, then end to end."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import PYTHON, meta_train_args, run_script, run_side_by_side, torchrun

TASKS = ["a", "b", "c"]
ZERO_LAYERS = ("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")


@pytest.fixture
def controlnet_and_adapters(tiny_sd_dir):
    """The tiny ControlNet with its zero layers made non-zero (so every weight shapes the output) and task
    adapters with non-zero B (so every adapter changes it)."""
    from metacontrol.controlnet import create_controlnet
    from metacontrol.meta.task_loras import TaskLoRAs
    from metacontrol.models.base import load_base_model

    base = load_base_model(str(tiny_sd_dir))
    controlnet = create_controlnet(base)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in controlnet.named_parameters():
            if name.startswith(ZERO_LAYERS):
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))
    adapters = TaskLoRAs(controlnet, TASKS, rank=2, alpha=4.0)
    with torch.no_grad():
        for p in adapters.up:
            p.copy_(0.05 * torch.randn(p.shape, generator=generator))
    assert len(adapters.down) == len(adapters.up) == len(TASKS) * len(adapters.layer_names)
    return base, controlnet, adapters


def _inputs(controlnet) -> dict:
    generator = torch.Generator().manual_seed(2)
    size = 8  # the tiny test model's latents: 32 px through its x4 VAE
    return dict(sample=torch.randn(2, controlnet.config.in_channels, size, size, generator=generator),
                timestep=torch.tensor([10, 500]),
                encoder_hidden_states=torch.randn(2, 5, controlnet.config.cross_attention_dim, generator=generator),
                controlnet_cond=torch.rand(2, 3, 4 * size, 4 * size, generator=generator), return_dict=False)


def _outputs(controlnet, inputs: dict) -> torch.Tensor:
    down, mid = controlnet(**inputs)
    return torch.cat([t.flatten() for t in (*down, mid)])


def _merged(base, controlnet, adapters, task: str):
    """A hook-free ControlNet whose LoRA layers hold W + (alpha / r) B_task A_task, computed by hand."""
    from metacontrol.controlnet import create_controlnet

    merged = create_controlnet(base)
    merged.load_state_dict(controlnet.state_dict())
    layers = dict(merged.named_modules())
    t = TASKS.index(task)
    with torch.no_grad():
        for i, name in enumerate(adapters.layer_names):
            down, up = adapters.weights(t, i)
            weight = layers[name].weight
            weight += adapters.scale * (up @ down.flatten(1)).view_as(weight)
    return merged


def test_a_task_adapter_computes_as_its_update_merged_into_the_weights(controlnet_and_adapters):
    base, controlnet, adapters = controlnet_and_adapters
    inputs = _inputs(controlnet)
    assert adapters.scale == 2.0 and any("conv" in n for n in adapters.layer_names)  # Conv2d and Linear layers
    assert not any(n.startswith(ZERO_LAYERS) for n in adapters.layer_names)  # zero convs are shared, not adapted
    with torch.no_grad():
        plain = _outputs(controlnet, inputs)
        for task in ("a", "b"):
            with adapters.active(task):
                adapted = _outputs(controlnet, inputs)
            torch.testing.assert_close(adapted, _outputs(_merged(base, controlnet, adapters, task), inputs),
                                       rtol=1e-4, atol=1e-5)
            assert (adapted - plain).abs().max() > 1e-3  # the adapter matters
        assert torch.equal(_outputs(controlnet, inputs), plain)  # no task active: W alone


def test_one_lora_ml_step_is_the_mean_task_gradient_through_each_tasks_adapter(controlnet_and_adapters):
    """Joint loss mean_t L_t(W + s B_t A_t): dW = mean_t G_t with G_t = dL_t/dW' at the merged weights;
    dB_t = s G_t A_t^T / 2, dA_t = s B_t^T G_t / 2 (two tasks); the adapter of a task not drawn gets nothing, and
    ``release_grads`` takes its gradient away so that no optimiser steps it."""
    from metacontrol.meta.algorithms import MetaLearner
    from metacontrol.meta.task_loras import with_task_adapter

    base, controlnet, adapters = controlnet_and_adapters
    inputs = _inputs(controlnet)
    targets = {t: torch.randn(_outputs(controlnet, inputs).shape, generator=torch.Generator().manual_seed(i))
               for i, t in enumerate(("a", "b"))}

    def loss(model, task: str) -> torch.Tensor:
        return ((_outputs(model, inputs) - targets[task]) ** 2).mean()

    shared, stacks = list(controlnet.parameters()), list(adapters.parameters())
    learner = MetaLearner(shared + stacks, shared + stacks, algorithm="joint", max_grad_norm=None)
    learner.joint_gradients([with_task_adapter(adapters, t, lambda t=t: loss(controlnet, t)) for t in ("a", "b")])
    learner.finish(total_tasks=2)

    by_hand = {}
    for task in ("a", "b"):
        merged = _merged(base, controlnet, adapters, task)
        loss(merged, task).backward()
        by_hand[task] = dict(merged.named_parameters())
    for name, p in controlnet.named_parameters():
        expected = (by_hand["a"][name].grad + by_hand["b"][name].grad) / 2
        torch.testing.assert_close(p.grad, expected, rtol=1e-4, atol=1e-7, msg=name)
    for i, name in enumerate(adapters.layer_names):
        for t, task in enumerate(TASKS):
            down, up = adapters.weights(t, i)
            if task == "c":
                assert not down.grad.any() and not up.grad.any()
                continue
            g = by_hand[task][f"{name}.weight"].grad.flatten(1) / 2
            torch.testing.assert_close(up.grad, adapters.scale * g @ down.detach().flatten(1).T,
                                       rtol=1e-4, atol=1e-8, msg=name)
            torch.testing.assert_close(down.grad.flatten(1), adapters.scale * up.detach().T @ g,
                                       rtol=1e-4, atol=1e-8, msg=name)
    adapters.release_grads(["a", "b"])
    assert all(p.grad is None for i in range(len(adapters.layer_names)) for p in adapters.weights(2, i))
    assert all(p.grad is not None for i in range(len(adapters.layer_names)) for p in adapters.weights(0, i))


def test_an_adapter_moves_only_on_the_steps_that_draw_its_task(controlnet_and_adapters):
    """With the gradients of the other tasks' adapters released, AdamW (momentum, weight decay) leaves them as they
    are, and steps the drawn one as its own optimiser would: a dense Adam would move every adapter every step."""
    _, _, adapters = controlnet_and_adapters
    optimizer = torch.optim.AdamW(adapters.parameters(), lr=0.01, weight_decay=0.5)

    def step(drawn: str) -> list[torch.Tensor]:
        for p in adapters.parameters():
            p.grad = torch.ones_like(p)  # as MetaLearner.finish leaves them: every adapter gets a gradient tensor
        adapters.release_grads([drawn])
        optimizer.step()
        return [p.detach().clone() for p in adapters.parameters()]

    def of(task: str, values: list[torch.Tensor]) -> list[torch.Tensor]:
        k, layers = TASKS.index(task), len(adapters.layer_names)
        return [v for j in range(k * layers, (k + 1) * layers) for v in (values[j], values[len(values) // 2 + j])]

    start = [p.detach().clone() for p in adapters.parameters()]
    first, second = step("a"), step("b")
    assert all(not torch.equal(x, y) for x, y in zip(of("a", first), of("a", start)))
    assert all(torch.equal(x, y) for x, y in zip(of("a", second), of("a", first)))  # no stale momentum, no decay
    assert all(torch.equal(x, y) for x, y in zip(of("c", second), of("c", start)))
    assert optimizer.state[adapters.weights(0, 0)[0]]["step"] == 1  # its own step count: bias correction as a fresh Adam


def test_lora_ml_run_saves_the_shared_controlnet_is_the_same_on_two_processes_and_resumes_exactly(tiny_sd_dir,
                                                                                                  tmp_path):
    from metacontrol.controlnet import create_controlnet
    from metacontrol.models.base import load_base_model

    def args(out, *extra):
        return meta_train_args(tiny_sd_dir, out, "meta.algorithm=lora_ml", "meta.lora_rank=2",
                               "meta.outer_optimizer=adamw", "meta.outer_learning_rate=1e-3",
                               "meta.lora_learning_rate=1e-2", *extra)

    one, two, resumed = tmp_path / "one", tmp_path / "two", tmp_path / "resumed"
    first, _ = run_side_by_side([[PYTHON, "meta_train.py", *args(one)],
                                 torchrun("meta_train.py", *args(two), nproc=2)], env={"ACCELERATE_USE_CPU": "1"})
    assert "LoRA-ML: a rank-2 adapter per task" in first.stderr
    run_script([PYTHON, "meta_train.py", *args(resumed, f"resume_from_checkpoint={one / 'checkpoint-2'}")])

    weights = "diffusion_pytorch_model.safetensors"
    saved = load_file(str(one / weights))
    initial = create_controlnet(load_base_model(str(tiny_sd_dir))).state_dict()
    assert saved.keys() == initial.keys()  # a plain ControlNet: the task adapters are not in it
    assert any(not torch.equal(saved[k], initial[k]) for k in saved if k.startswith("down_blocks"))
    for other in (two, resumed):
        theirs = load_file(str(other / weights))
        assert all(torch.equal(saved[k], theirs[k]) for k in saved), other.name
    checkpoint = load_file(str(one / "checkpoint-4" / "trained_parameters.safetensors"))
    assert any(k.startswith("task_adapters.") for k in checkpoint)  # resuming needs the adapters too
    assert "LoRA-ML" in (one / "README.md").read_text()
