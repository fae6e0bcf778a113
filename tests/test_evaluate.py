"""train/evaluate.py on a tiny random model: the files it promises, and floor/ceiling logic that can fail;
the harness in-process: per-sample scores, the configured scheduler, settings checked at load."""

from __future__ import annotations

import csv
import json
from dataclasses import replace

import numpy as np
import pytest
from accelerate.state import AcceleratorState

from metacontrol.config_loader import ConfigError, load_config
from metacontrol.eval.harness import EvalSettings, Evaluator, synthetic_eval_sets
from metacontrol.scripts.evaluate import EvaluateConfig
from metacontrol.world import WorldConfig
from tests.browser import render_in_chromium
from tests.conftest import PYTHON, REPO, run_script


def two_controlnets(base):
    """The standard initialisation (zero convolutions: identical to no ControlNet) and a perturbed one."""
    import torch

    from metacontrol.controlnet import create_controlnet

    torch.manual_seed(0)
    standard, perturbed = create_controlnet(base), create_controlnet(base)
    with torch.no_grad():
        for name, p in perturbed.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block")):
                p.normal_(0, 0.5)
    return standard.eval(), perturbed.eval()


@pytest.fixture(scope="module")
def evaluation(tiny_sd_dir, tmp_path_factory):
    """The script on two checkpoints (see ``two_controlnets``)."""
    from metacontrol.models.base import load_base_model

    root = tmp_path_factory.mktemp("eval")
    standard, perturbed = two_controlnets(load_base_model(str(tiny_sd_dir)))
    standard.save_pretrained(root / "standard")
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
    """Zero convolutions add nothing: in metrics.json the standard init's means are the floor's."""
    report = json.loads((evaluation / "metrics.json").read_text())
    for condition in ("canny", "seg"):
        metrics, floor = report["results"]["standard"][condition], report["floor"][condition]
        assert metrics.keys() - floor.keys() == {"control_score"}
        for key, value in floor.items():
            assert metrics[key] == pytest.approx(value, abs=1e-6, nan_ok=True), key
    perturbed = report["results"]["perturbed"]["canny"]
    assert perturbed["edge_f1"] != pytest.approx(report["floor"]["canny"]["edge_f1"], abs=1e-9)


@pytest.fixture(scope="module")
def harness(tiny_sd_dir):
    """The frozen tiny base, 2 held-out scenes per condition at 32 px, and the two ControlNets."""
    from metacontrol.models.base import load_base_model

    base = load_base_model(str(tiny_sd_dir)).freeze()
    settings = EvalSettings(num_samples=2, num_inference_steps=2)
    eval_sets = synthetic_eval_sets(["canny", "seg"], WorldConfig(resolution=32), settings)
    return base, eval_sets, settings, two_controlnets(base)


def test_standard_initialisation_is_the_floor_sample_by_sample(harness):
    """Per sample, on every metric: the standard init generates the floor's images, so scores what the floor
    itself scores (control score included: the floor against its own mean); a perturbed one does not."""
    base, eval_sets, settings, (standard, perturbed) = harness
    evaluator = Evaluator(base, eval_sets, settings)
    for condition in ("canny", "seg"):
        scores, images = evaluator.evaluate_samples(standard, condition)
        np.testing.assert_array_equal(images, evaluator.generate(None, condition))
        floor = evaluator.floor_scores(condition)
        assert scores.keys() == floor.keys() | {"control_score"}
        for key, values in floor.items():
            np.testing.assert_array_equal(scores[key], values, err_msg=key)
        np.testing.assert_array_equal(scores["control_score"], evaluator.control_scores(condition, floor))
        assert not np.array_equal(evaluator.evaluate_samples(perturbed, condition)[1], images)


def test_the_scheduler_setting_chooses_the_sampler(harness):
    """Same seeds, another scheduler: other images, with and without a ControlNet; the same one repeats exactly.
    (DDIM, because at 2 steps its timesteps differ from DPM-Solver's; UniPC's 2 first-order steps equal them.)"""
    base, eval_sets, settings, (_, perturbed) = harness
    default = Evaluator(base, eval_sets, settings)
    ddim = Evaluator(base, eval_sets, replace(settings, scheduler="DDIMScheduler"))
    assert settings.scheduler == "DPMSolverMultistepScheduler"
    for controlnet in (None, perturbed):
        reference = default.generate(controlnet, "canny")
        np.testing.assert_array_equal(default.generate(controlnet, "canny"), reference)
        assert not np.array_equal(ddim.generate(controlnet, "canny"), reference)


@pytest.mark.parametrize("override, words", [
    ("settings.scheduler=DPMSolverMultistep", ["settings.scheduler: 'DPMSolverMultistep'", "DDIMScheduler",
                                               "DPMSolverMultistepScheduler, "]),
    ("settings.split=tset", ["settings.split: 'tset'", "one of train, val, test"]),
])  # fmt: skip
def test_a_bad_setting_fails_at_load_in_one_line(override, words):
    with pytest.raises(ConfigError) as err:
        load_config(EvaluateConfig, REPO / "configs/evaluate_tiny.yaml", [override])
    assert "\n" not in str(err.value) and all(w in str(err.value) for w in words), str(err.value)


def test_clip_score_is_the_cosine_of_clip_embeddings_times_100(harness, tmp_path):
    """settings.clip_model adds clip_score per sample: checked against CLIP's own logits (logit_scale x cosine),
    a separate path through the model; the control score does not change."""
    import torch
    from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel

    base, eval_sets, settings, (_, perturbed) = harness
    torch.manual_seed(0)
    text = dict(vocab_size=len(base.tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=base.tokenizer.model_max_length)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(base.location, subfolder="tokenizer").save_pretrained(tmp_path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    with_clip = Evaluator(base, eval_sets, replace(settings, clip_model=str(tmp_path)))
    scores, images = with_clip.evaluate_samples(perturbed, "canny")
    model, processor = with_clip.clip.model, with_clip.clip.processor
    captions = eval_sets["canny"].captions

    def cosines() -> np.ndarray:
        with torch.no_grad():
            inputs = processor(text=captions, images=list(images), return_tensors="pt", padding=True)
            return np.diag(model(**inputs).logits_per_image.numpy()) / model.logit_scale.exp().item()

    np.testing.assert_allclose(scores["clip_score"], np.maximum(100 * cosines(), 0), rtol=1e-5, atol=1e-4)
    with torch.no_grad():  # the image embeddings negated: every cosine changes sign, so both sides of 0 are seen
        model.visual_projection.weight.neg_()
    flipped = cosines()
    np.testing.assert_allclose(with_clip.clip(images, captions), np.maximum(100 * flipped, 0), rtol=1e-5, atol=1e-4)
    assert (np.maximum(scores["clip_score"], with_clip.clip(images, captions)) > 0).all()  # each sample seen > 0
    plain, _ = Evaluator(base, eval_sets, settings).evaluate_samples(perturbed, "canny")
    np.testing.assert_array_equal(scores["control_score"], plain["control_score"])
