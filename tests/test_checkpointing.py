"""``TrainingState``: a checkpoint is safetensors and JSON, and reading it back restores the run bit for bit."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from metacontrol.checkpointing import CHECKPOINT_FILES, TrainingProgress, TrainingState
from metacontrol.config_loader import ConfigError


def _state(trained: str = "1") -> TrainingState:
    """A two-layer model of which one layer trains, under AdamW, a decaying schedule and a loss scaler."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    params = list(model[int(trained)].parameters())  # what trains; the rest is rebuilt from the start
    optimizer = torch.optim.AdamW(params, lr=1e-2, betas=(0.8, 0.99))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (1 + step))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    return TrainingState(model, params, optimizer, schedule, TrainingProgress(), scaler)


def _train(state: TrainingState, steps: int) -> None:
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(state.progress.step))
    for _ in range(steps):
        state.grad_scaler.scale(state.model(x).pow(2).mean()).backward()
        state.grad_scaler.step(state.optimizer)
        state.grad_scaler.update(state.grad_scaler.get_scale() * 2)  # a scale the next run must read back
        state.lr_scheduler.step()
        state.optimizer.zero_grad()
        state.progress.step += 1


def test_write_then_read_restores_what_trains_the_optimiser_schedule_step_and_loss_scale(tmp_path):
    written = _state()
    _train(written, 3)
    written.write(tmp_path, [written.process_state(), {"scale": 8.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                                                       "growth_interval": 2000, "_growth_tracker": 0}])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(CHECKPOINT_FILES)
    assert set(load_file(str(tmp_path / "trained_parameters.safetensors"))) == {"1.weight", "1.bias"}
    assert json.loads((tmp_path / "training_state.json").read_text())["step"] == 3

    read = _state()  # the same start for what does not train; fresh optimiser state, as a new process has
    with torch.no_grad():
        for p in read.params:
            p.add_(1.0)
    read.read(tmp_path, process_index=0)
    assert read.progress.step == 3 and read.grad_scaler.get_scale() == written.grad_scaler.get_scale()
    assert read.lr_scheduler.get_last_lr() == written.lr_scheduler.get_last_lr()
    for a, b in zip(written.params, read.params):
        assert torch.equal(a, b)
    _train(written, 2)
    _train(read, 2)
    for a, b in zip(written.params, read.params):
        assert torch.equal(a, b)  # Adam moments, step counts and schedule came back exactly

    other = _state(1)
    other.read(tmp_path, process_index=1)  # each process reads its own loss scale
    assert other.grad_scaler.get_scale() == 8.0


def test_a_checkpoint_of_other_trainable_parameters_is_refused(tmp_path):
    written = _state(trained="1")
    written.write(tmp_path, [None])
    with pytest.raises(ConfigError, match="other trainable parameters"):
        _state(trained="0").read(tmp_path, process_index=0)


def test_8bit_adam_state_with_shared_code_books_round_trips_exactly(tmp_path):
    """bitsandbytes' AdamW8bit (``use_8bit_adam``) keeps its state in a nested mapping, with code books shared by
    every parameter: the checkpoint stores each as safetensors, and training goes on from it bit for bit."""
    from metacontrol.optimizers import adam_class

    def state() -> TrainingState:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.Linear(64, 80))  # 8-bit from 4096 elements
        optimizer = adam_class(True, True)(model.parameters(), lr=1e-2)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        return TrainingState(model, list(model.parameters()), optimizer, schedule, TrainingProgress())

    def train(s: TrainingState, steps: int) -> None:
        for _ in range(steps):
            x = torch.randn(4, 128, generator=torch.Generator().manual_seed(s.progress.step))
            s.model(x).pow(2).mean().backward()
            s.optimizer.step()
            s.optimizer.zero_grad()
            s.progress.step += 1

    written = state()
    train(written, 3)
    written.write(tmp_path, [None])
    stored = load_file(str(tmp_path / "optimizer.safetensors"))
    assert stored["0.__bnb_optimizer_quant_state__/state1"].dtype == torch.uint8
    read = state()
    read.read(tmp_path, process_index=0)
    train(written, 2)
    train(read, 2)
    for a, b in zip(written.params, read.params):
        assert torch.equal(a, b)
