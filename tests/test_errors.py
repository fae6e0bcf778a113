"""What a user sees when something goes wrong: one line, printed once, and an exit code; real subprocesses."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from metacontrol.config_loader import ConfigError
from metacontrol.data.images import BadSampleError
from metacontrol.errors import run_main
from tests.conftest import (
    ACCELERATE_LAUNCH,
    PYTHON,
    REPO,
    finetune_args,
    meta_train_args,
    run_script,
    script_env,
)

INTERRUPTED = r"{name}: interrupted at {unit} (\d+) \(the last checkpoint is \S+checkpoint-(\d+)\); resume with " \
              r"resume_from_checkpoint=latest"  # fmt: skip


@pytest.mark.parametrize(("error", "rank", "printed", "code"), [
    (ConfigError("resolution: 30 is not valid"), "0", "demo: configuration error: resolution: 30 is not valid", 1),
    (ConfigError("resolution: 30 is not valid"), "1", "", 1),  # every process has it; the main one says it
    (BadSampleError("x.png: cannot be decoded"), "1", "demo: bad data: x.png: cannot be decoded", 1),  # maybe its own
    (KeyboardInterrupt(), "0", "demo: interrupted (Ctrl-C)", 130),
    (FloatingPointError("non-finite gradient of a finite loss (0.1) even at loss scale 1"), "1",
     "demo: non-finite gradient of a finite loss (0.1) even at loss scale 1", 1),  # fp16 overflow, MetaLearner
])  # fmt: skip
def test_run_main_prints_one_line_on_the_process_that_should(error, rank, printed, code, monkeypatch, capsys):
    def main() -> None:
        raise error

    monkeypatch.setenv("RANK", rank)
    with pytest.raises(SystemExit) as exit_info:
        run_main(main, "demo")
    assert exit_info.value.code == code
    assert capsys.readouterr().err == (printed + "\n" if printed else "")
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        run_main(lambda: 1 / 0, "demo")


def test_mistyped_base_path_is_one_line_once_under_accelerate_launch_without_the_hub():
    """`checkpoints/tiny-sdd` has the Hub's org/name shape, but `checkpoints/` is a folder here: local."""
    result = run_script([*ACCELERATE_LAUNCH, "train/finetune.py", "pretrained_model_name_or_path=checkpoints/tiny-sdd"],
                        env={"HF_HUB_OFFLINE": "0"}, check=False)  # fmt: skip
    assert result.returncode == 1
    assert [line for line in result.stderr.splitlines() if "tiny-sdd" in line] == [
        "finetune: configuration error: pretrained_model_name_or_path: base model folder checkpoints/tiny-sdd "
        "does not exist; did you mean checkpoints/tiny-sd?"]
    assert "Traceback" not in result.stderr  # and no Hub retries: they would have printed their own


@pytest.mark.parametrize(("command", "name"), [("meta-train", "meta_train"), ("evaluate", "evaluate")])
def test_a_script_under_the_metacontrol_command_fails_in_one_line(command, name, tmp_path):
    missing = tmp_path / "nope.yaml"
    result = run_script([str(Path(PYTHON).parent / "metacontrol"), command, "--config", str(missing)], check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"{name}: configuration error: config file {missing} does not exist"]


def test_a_bad_sample_in_meta_training_is_one_line(tiny_sd_dir, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(folder / "good.png")
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    (folder / "metadata.jsonl").write_text(
        "".join(json.dumps({"file_name": name, "text": "a ball"}) + "\n" for name in ("good.png", "broken.png")))
    result = run_script([PYTHON, "meta_train.py", *meta_train_args(
        tiny_sd_dir, tmp_path / "out", "data.source=imagefolder", f"data.train_data_dir={folder}",
        "data.tasks=[canny]")], check=False)  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if "broken.png" in line]
    assert len(lines) == 1 and lines[0].startswith("meta_train: bad data: ") and "cannot be decoded" in lines[0]


def _interrupt(args: list[str], output_dir: Path, group: bool) -> subprocess.CompletedProcess:
    """Start ``args``, press Ctrl-C once ``output_dir`` has a checkpoint: to the whole process group, as a
    terminal does, when ``group`` (the launcher and the script both get it), else to the process."""
    proc = subprocess.Popen(args, cwd=REPO, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    deadline = time.monotonic() + 600
    while not list(output_dir.glob("checkpoint-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    if not list(output_dir.glob("checkpoint-*")):
        proc.kill()
        pytest.fail(f"no checkpoint was written (exit code {proc.poll()}): {proc.communicate()[1][-3000:]}")
    if group:
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)


def test_ctrl_c_in_meta_training_says_how_to_resume_and_latest_skips_what_is_incomplete(tiny_sd_dir, tmp_path):
    out = tmp_path / "out"
    args = [PYTHON, "meta_train.py", *meta_train_args(tiny_sd_dir, out, "meta.max_meta_steps=100000",
                                                      "checkpointing_steps=1")]  # fmt: skip
    result = _interrupt(args, out, group=False)
    assert result.returncode == 130 and "Traceback" not in result.stderr, result.stderr[-3000:]
    [(step, saved)] = re.findall(INTERRUPTED.format(name="meta_train", unit="meta-step"), result.stderr)
    assert 1 <= int(saved) <= int(step) < 100000

    # What a kill during a checkpoint write leaves, and a checkpoint folder emptied by hand.
    (out / f".checkpoint-{saved}.tmp-x1y2").mkdir()
    (out / f".checkpoint-{saved}.tmp-x1y2" / "optimizer.bin").write_bytes(b"half")
    (out / "checkpoint-99999").mkdir()
    result = run_script([*args, f"meta.max_meta_steps={int(saved) + 1}", "resume_from_checkpoint=latest"])
    assert not list(out.glob(".checkpoint-*"))
    assert ".checkpoint-" in result.stderr and "interrupted write" in result.stderr
    assert re.search(r"skipping incomplete checkpoint\(s\) \S+checkpoint-99999 \(empty\)", result.stderr)
    assert f"resumed from {out / f'checkpoint-{saved}'} at meta-step {saved}" in result.stderr
    assert (out / "checkpoint-99999").is_dir()  # not ours to delete, and not counted by checkpoints_total_limit
    assert sorted(p.name for p in out.glob("checkpoint-*")) == sorted(
        [f"checkpoint-{saved}", f"checkpoint-{int(saved) + 1}", "checkpoint-99999"])


def test_ctrl_c_under_accelerate_launch_is_one_line_and_exit_code_130(tiny_sd_dir, tmp_path):
    out = tmp_path / "out"
    args = [*ACCELERATE_LAUNCH, *finetune_args(tiny_sd_dir, out, "max_train_steps=100000", "checkpointing_steps=1")[1:]]
    result = _interrupt(args, out, group=True)
    assert result.returncode == 130 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert len(re.findall(INTERRUPTED.format(name="finetune", unit="step"), result.stderr)) == 1, result.stderr[-3000:]


@pytest.mark.parametrize(("script", "name", "config"), [("meta_train.py", "meta_train", "meta_tiny"),
                                                     ("train/finetune.py", "finetune", "finetune_tiny")])
def test_a_configuration_error_is_reported_before_torch_is_imported(script, name, config):
    """The configuration is checked first: a typo costs a fraction of a second, not the imports of torch and
    diffusers on every process (``-X importtime`` lists every module the run imported)."""
    result = run_script([PYTHON, "-X", "importtime", script, "resolution=7"], check=False)
    timing = [line for line in result.stderr.splitlines() if line.startswith("import time:")]
    said = [line for line in result.stderr.splitlines() if not line.startswith("import time:")]
    assert result.returncode == 1
    assert said == [f"{name}: configuration error: configs/{config}.yaml: resolution: 7 is not valid; expected an "
                    "integer >= 8"]
    imported = {line.rsplit("|", 1)[-1].strip() for line in timing}
    assert "metacontrol.config" in imported and not {"torch", "diffusers", "accelerate", "peft"} & imported
