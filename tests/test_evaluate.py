"""train/evaluate.py on a tiny random model: the files it promises, and floor/ceiling logic that can fail."""

from __future__ import annotations

import csv
import json

import pytest
from accelerate.state import AcceleratorState

from tests.browser import render_in_chromium
from tests.conftest import PYTHON, run_script


@pytest.fixture(scope="module")
def evaluation(tiny_sd_dir, tmp_path_factory):
    """Two checkpoints: the standard initialisation (identical to no ControlNet) and a perturbed one."""
    import torch
    from diffusers import UNet2DConditionModel

    from metacontrol.controlnet import create_controlnet

    root = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet")
    create_controlnet(unet, 4).save_pretrained(root / "standard")
    perturbed = create_controlnet(unet, 4)
    with torch.no_grad():
        for name, p in perturbed.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block")):
                p.normal_(0, 0.5)
    perturbed.save_pretrained(root / "perturbed")
    out = root / "out"
    out.mkdir()
    (out / "grid_previous-run.png").write_bytes(b"stale")  # a grid of a previous run must not survive
    run_script([PYTHON, "train/evaluate.py", f"pretrained_model_name_or_path={tiny_sd_dir}",
                f"controlnets=[{root / 'standard'}, {root / 'perturbed'}]", "conditions=[canny, seg]",
                "world.resolution=32", "settings.num_samples=2", "settings.num_inference_steps=2",
                f"output_dir={out}", "grid_samples=1"])  # fmt: skip
    yield out
    AcceleratorState._reset_state(True)


def test_outputs_are_written(evaluation):
    report = json.loads((evaluation / "metrics.json").read_text())
    assert report["settings"]["num_inference_steps"] == 2 and report["settings"]["seed"] == 1234
    assert set(report["results"]) == {"standard", "perturbed"}
    for name in ("grid_standard.png", "grid_perturbed.png", "control_scores.png"):
        assert (evaluation / name).is_file()
    rows = list(csv.DictReader(open(evaluation / "metrics.csv")))
    assert [(r["checkpoint"], r["condition"]) for r in rows] == [
        ("standard", "canny"), ("standard", "seg"), ("perturbed", "canny"), ("perturbed", "seg")]
    assert "canny_f1" in report["results"]["standard"]["canny"]


def test_report_opens_in_chromium(evaluation):
    """report.html is self-contained: every image decodes in a real browser, and the tables are there."""
    assert not (evaluation / "grid_previous-run.png").exists()
    page = render_in_chromium(evaluation / "report.html")
    # the control-score plot, then per checkpoint and condition 1 sample x (condition, generated, truth)
    assert len(page["images"]) == 1 + 2 * 2 * 3
    assert all(img["loaded"] for img in page["images"]), page["images"]
    classes = [t["cls"] for t in page["tables"]]
    assert classes.count("metrics") == 2 and classes.count("samples") == 4 and "settings" in classes
    assert page["tables"][0]["rows"] == 4  # a row per checkpoint and condition


def test_standard_initialisation_scores_exactly_the_floor(evaluation):
    """Zero convolutions add nothing: the standard init's images, hence metrics, equal the floor's."""
    report = json.loads((evaluation / "metrics.json").read_text())
    for condition in ("canny", "seg"):
        metrics, floor = report["results"]["standard"][condition], report["floor"][condition]
        for key, value in floor.items():
            assert metrics[key] == pytest.approx(value, abs=1e-6), key
        ranges = [report["ceiling"][condition][m] - floor[m] for m in report["control_metrics"][condition]]
        if any(r > 1e-9 for r in ranges):
            assert metrics["control_score"] == pytest.approx(0.0, abs=1e-12)  # mean of per-sample normalised values
    perturbed = report["results"]["perturbed"]["canny"]
    assert perturbed["edge_f1"] != pytest.approx(report["floor"]["canny"]["edge_f1"], abs=1e-9)
