"""`evaluate` on a folder of real photos: annotate -> generate -> re-annotate, the floor and ceiling by hand,
two processes equal to one, and the one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PYTHON, run_script, torchrun

from metacontrol.conditions import get_condition
from metacontrol.data.images import load_rgb
from metacontrol.data.sample_photos import random_hed_annotators, write_photo_folder
from metacontrol.eval.metrics import canny_edges, edge_f1, ssim
from metacontrol.models.base import load_base_model
from metacontrol.pipelines import vae_roundtrip

NAMES = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg"]


def _evaluate_args(tiny_sd_dir: Path, controlnet: Path, photos: Path, annotators: Path, out: Path) -> list[str]:
    return [f"pretrained_model_name_or_path={tiny_sd_dir}", f"controlnets=[{controlnet}]", "conditions=[canny, hed]",
            "data.source=imagefolder", f"data.train_data_dir={photos}", f"settings.annotators={annotators}",
            "resolution=32", "settings.num_samples=4", "settings.num_inference_steps=2", "settings.batch_size=2",
            f"output_dir={out}", "grid_samples=1"]


@pytest.fixture(scope="module")
def photo_run(tiny_sd_dir, tmp_path_factory):
    """The script on 4 photos with the standard initialisation (zero convolutions: exactly the floor)."""
    from metacontrol.controlnet import create_controlnet
    from metacontrol.models.base import load_base_model

    root = tmp_path_factory.mktemp("photo-eval")
    photos, annotators = write_photo_folder(root / "photos", names=NAMES), random_hed_annotators(root / "annotators")
    create_controlnet(load_base_model(str(tiny_sd_dir))).save_pretrained(
        root / "standard")
    args = _evaluate_args(tiny_sd_dir, root / "standard", photos, annotators, root / "one")
    run_script([PYTHON, "train/evaluate.py", *args])
    return root, args


def test_photos_are_scored_by_reannotation_against_a_hand_computed_ceiling(photo_run, tiny_sd_dir):
    root, _ = photo_run
    report = json.loads((root / "one" / "metrics.json").read_text())
    assert report["control_metrics"] == {"canny": ["canny_f1"], "hed": ["hed_ssim"]}
    base = load_base_model(str(tiny_sd_dir)).freeze()
    photos = [load_rgb(root / "photos" / f"{Path(n).stem}.png", 32) for n in NAMES]
    with torch.no_grad():
        through_vae = vae_roundtrip(base, photos)
    hed = get_condition("hed")
    annotators = str(root / "annotators")
    canny = np.mean([edge_f1(canny_edges(r), get_condition("canny").annotate(p)) for r, p in zip(through_vae, photos)])
    soft = np.mean([ssim(hed.annotate(r, annotators), hed.annotate(p, annotators)) for r, p in zip(through_vae, photos)])
    assert report["ceiling"]["canny"]["canny_f1"] == pytest.approx(canny, abs=1e-9)
    assert report["ceiling"]["hed"]["hed_ssim"] == pytest.approx(soft, abs=1e-9)
    standard = report["results"]["standard"]
    for condition, metric in (("canny", "canny_f1"), ("hed", "hed_ssim")):
        assert standard[condition][metric] == pytest.approx(report["floor"][condition][metric], abs=1e-9)
        assert standard[condition]["control_score"] == pytest.approx(0.0, abs=1e-9)  # the floor itself
    assert (root / "one" / "report.html").is_file() and (root / "one" / "grid_standard.png").is_file()


def test_two_processes_evaluate_the_photos_as_one(photo_run):
    root, args = photo_run
    two = root / "two"
    run_script(torchrun("train/evaluate.py", *[a for a in args if not a.startswith("output_dir=")],
                        f"output_dir={two}", nproc=2), env={"ACCELERATE_USE_CPU": "1"}, timeout=300)
    one, both = (json.loads((folder / "metrics.json").read_text()) for folder in (root / "one", two))
    assert both["results"] == one["results"] and both["floor"] == one["floor"] and both["ceiling"] == one["ceiling"]


@pytest.mark.parametrize("override, line", [
    ("conditions=[seg]", "conditions: 'seg' has no controlnet-aux annotator to re-run on generated images, so "
                         "photos cannot score it; evaluate it on the synthetic world"),
    ("mixed_precision=fp16", "mixed_precision: 'fp16' needs a GPU; use bf16 or no on the CPU"),
])  # fmt: skip
def test_what_photos_cannot_do_is_one_line(photo_run, override, line):
    root, args = photo_run
    result = run_script([PYTHON, "train/evaluate.py", *args, f"output_dir={root / 'bad'}", override], check=False)
    assert result.returncode != 0 and result.stderr.strip().splitlines()[-1].endswith(line), result.stderr[-2000:]


def test_photos_evaluate_in_bf16(photo_run):
    """The UNet and ControlNet in bf16 read the fp32 text encoder's embeddings (autocast), as on a GPU."""
    root, args = photo_run
    run_script([PYTHON, "train/evaluate.py", *args, f"output_dir={root / 'bf16'}", "mixed_precision=bf16"])
    report = json.loads((root / "bf16" / "metrics.json").read_text())
    assert report["mixed_precision"] == "bf16"
    assert all(np.isfinite(m["canny_f1"]) for m in (report["floor"]["canny"], report["results"]["standard"]["canny"]))
