"""bench/adaptation.py --quick on a tiny random model: sharded runs, cached resume, statistics that add up,
and a report.html that a real headless browser renders."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from metacontrol.eval.statistics import Interval
from tests.browser import render_in_chromium
from tests.conftest import PYTHON, run_script, run_side_by_side


@pytest.fixture(scope="module")
def bench(tiny_sd_dir, tmp_path_factory):
    import torch

    from metacontrol.controlnet import create_controlnet
    from metacontrol.models.base import load_base_model

    root = tmp_path_factory.mktemp("bench")
    torch.manual_seed(0)
    perturbed = create_controlnet(load_base_model(str(tiny_sd_dir)))
    with torch.no_grad():
        for name, p in perturbed.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block")):
                p.normal_(0, 0.5)
    perturbed.save_pretrained(root / "perturbed")
    args = [PYTHON, "bench/adaptation.py", "--quick", f"pretrained_model_name_or_path={tiny_sd_dir}",
            f"initialisations={{standard: null, perturbed: {root / 'perturbed'}}}", "conditions=[seg]",
            "steps=[0, 2]", "auc_budget=2", "shots=[4]", "train_batch_size=2", "world.resolution=32",
            f"output_dir={root / 'out'}", f"work_dir={root / 'work'}"]  # fmt: skip
    shards = run_side_by_side([[*args, "--shard", f"{k}/2"] for k in range(2)])  # as the bench's docstring says
    (root / "perturbed" / "README.md").write_text("# perturbed\n\n## Load\n\nload it\n")
    report = run_script([*args, "--card", "perturbed"])
    return root, shards, report


def test_shards_split_the_runs_and_the_report_reuses_them(bench):
    root, shards, report = bench
    fine_tuned = [s.stderr.count("fine-tuned shots-4/") for s in shards]
    assert sum(fine_tuned) == 4 and min(fine_tuned) >= 1  # 2 initialisations x 2 seeds, split across shards
    assert "fine-tuned" not in report.stderr  # everything came from the shards' cache
    scores = sorted((root / "work/quick").rglob("scores-2.json"))
    assert len(scores) == 4
    for label in ("standard", "perturbed"):  # each seed trained on its own shots and noise: the runs differ
        runs = [root / f"work/quick/shots-4/seg/{label}/seed-{seed}" for seed in (0, 1)]
        assert [len(json.loads((r / "scores-2.json").read_text())["control_score"]) for r in runs] == [4, 4]
        configs = [yaml.safe_load((r / "finetune_config.yaml").read_text()) for r in runs]
        assert [(c["seed"], c["shot_offset"]) for c in configs] == [(0, 0), (1, 4)]
        weights = [load_file(r / "step-2/diffusion_pytorch_model.safetensors") for r in runs]
        assert weights[0].keys() == weights[1].keys()
        assert not all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0]), f"{label}: seeds trained alike"
    assert (root / "out/adaptation-quick.md").read_text().startswith("### quick, 4 shots")
    assert (root / "out/adaptation-quick.png").stat().st_size > 10_000


def test_intervals_bracket_means_and_pairs_are_paired(bench):
    root, _, _ = bench
    results = json.loads((root / "out/adaptation-quick.json").read_text())
    seg = results["regimes"]["4"]["seg"]
    work = root / "work/quick"

    def matrix(label):  # scores[seed, scene, step], rebuilt from the cached per-sample files
        zero = json.loads((work / f"zero-shot/seg/{label}.json").read_text())["control_score"]
        return np.array([[zero, json.loads((work / f"shots-4/seg/{label}/seed-{s}/scores-2.json").read_text())
                          ["control_score"]] for s in (0, 1)], np.float64).transpose(0, 2, 1)

    means = {lab: matrix(lab).mean(axis=(0, 1)) for lab in ("standard", "perturbed")}
    for lab, mean in means.items():
        for k, point in enumerate(seg["curves"][lab]["points"]):
            assert point["estimate"] == pytest.approx(mean[k])
            assert point["low"] <= point["estimate"] + 1e-12 and point["estimate"] <= point["high"] + 1e-12
        assert seg["curves"][lab]["auc"]["estimate"] == pytest.approx((mean[0] + mean[1]) / 2)
    # The standard initialisation adds nothing before training: exactly the floor, normalised to 0.
    assert means["standard"][0] == pytest.approx(0.0, abs=1e-12)
    diff = seg["paired_differences"]["standard - perturbed"]["points"]
    assert [d["estimate"] for d in diff] == pytest.approx(list(means["standard"] - means["perturbed"]))


def test_paired_reference_only_and_overrides_name_known_labels():
    import sys

    from metacontrol.config_loader import ConfigError, load_config
    from tests.conftest import REPO

    sys.path.insert(0, str(REPO / "bench"))
    from adaptation import AdaptationBenchConfig, compared_pairs, parse_only

    three = "initialisations={a: null, b: x, c: y}"
    assert compared_pairs(load_config(AdaptationBenchConfig, None, [three])) == [("a", "b"), ("a", "c"), ("b", "c")]
    assert compared_pairs(load_config(AdaptationBenchConfig, None, [three, "paired_reference=b"])) == [
        ("a", "b"), ("c", "b")]
    assert compared_pairs(load_config(AdaptationBenchConfig, None, [three, "paired_reference=[b, c]"])) == [
        ("a", "b"), ("c", "b"), ("a", "c")]  # b - c is c - b's negative: once
    with pytest.raises(ConfigError, match="paired_reference"):
        load_config(AdaptationBenchConfig, None, [three, "paired_reference=d"])
    with pytest.raises(ConfigError, match="finetune_overrides"):
        load_config(AdaptationBenchConfig, None, [three, "finetune_overrides={d: [mode=lora]}"])
    assert parse_only(None, load_config(AdaptationBenchConfig, None, [three])) == ["a", "b", "c"]
    assert parse_only("c, a", load_config(AdaptationBenchConfig, None, [three])) == ["c", "a"]
    with pytest.raises(ConfigError, match="--only: 'a,z' names z"):
        parse_only("a,z", load_config(AdaptationBenchConfig, None, [three]))
    recipes = load_config(AdaptationBenchConfig, REPO / "configs/bench_recipes_default_split.yaml")
    assert ("meta-lora", "joint") in compared_pairs(recipes)


def test_report_html_beside_the_markdown_renders_the_plot_and_every_table(bench):
    root, _, report = bench
    path = root / "out/adaptation-quick/report.html"
    assert f"Report: {path}" in report.stdout
    page = render_in_chromium(path)
    assert page["title"] == "steps to control: quick"
    assert [(img["loaded"], img["width"] > 300) for img in page["images"]] == [(True, True)]  # the curves, embedded
    metrics = [t for t in page["tables"] if t["cls"] == "metrics"]
    # 1 condition x 2 starts; their 1 pair; seg's 2 control metrics with floor and ceiling
    assert [t["rows"] for t in metrics] == [2, 1, 2]
    assert metrics[0]["header"] == ["condition", "start", "step 0", "step 2", "steps to 0.3", "steps to 0.5", "AUC 0-2"]
    assert metrics[1]["header"] == ["condition", "A - B", "step 0", "step 2", "AUC 0-2"]
    settings = next(t for t in page["tables"] if t["cls"] == "settings")
    assert settings["rows"] > 20  # every setting, nested ones flattened
    results = json.loads((root / "out/adaptation-quick.json").read_text())
    auc = Interval(**results["regimes"]["4"]["seg"]["curves"]["perturbed"]["auc"]).format(3)
    html, markdown = path.read_text(), (root / "out/adaptation-quick.md").read_text()
    assert f"<td>{auc}</td>" in html and f" | {auc} |" in markdown  # one table, two renderings
    assert "initialisations.perturbed" in html and "settings.num_inference_steps" in html


def test_card_gets_the_measured_curve_of_its_start(bench):
    root, _, report = bench
    seg = json.loads((root / "out/adaptation-quick.json").read_text())["regimes"]["4"]["seg"]
    card = (root / "perturbed" / "README.md").read_text()
    assert card.startswith("# perturbed\n\n## Measured (metacontrol `python bench/adaptation.py`)")
    assert card.endswith("## Load\n\nload it\n")  # the rest of the card is kept
    row = next(line for line in card.splitlines() if line.startswith("| seg |"))
    zero, two = seg["curves"]["perturbed"]["points"]
    assert row.startswith(f"| seg | {zero['estimate']:.3f} [{zero['low']:.3f}, {zero['high']:.3f}] | {two['estimate']:.3f}")
    assert "measured scores of 'perturbed' written" in report.stdout


def test_photo_source_holds_out_the_first_photos_and_trains_each_seed_on_later_ones(tiny_sd_dir, tmp_path):
    from metacontrol.data.sample_photos import write_photo_folder

    photos = write_photo_folder(tmp_path / "photos", size=32)
    args = [PYTHON, "bench/adaptation.py", "--quick", f"pretrained_model_name_or_path={tiny_sd_dir}",
            "initialisations={standard: null}", "conditions=[canny]", "data.source=imagefolder",
            f"data.train_data_dir={photos}", "resolution=32", "settings.num_samples=2", "steps=[0, 1]",
            "auc_budget=1", "shots=[2]", "train_batch_size=2", f"output_dir={tmp_path / 'out'}",
            f"work_dir={tmp_path / 'work'}"]  # fmt: skip
    run_script(args)
    runs = [tmp_path / f"work/quick/shots-2/canny/standard/seed-{seed}" for seed in (0, 1)]
    configs = [yaml.safe_load((r / "finetune_config.yaml").read_text()) for r in runs]
    # 2 held-out photos, then 2 shots a seed: photos 2-3 and 4-5, never a held-out one
    assert [(c["source"], c["train_data_dir"], c["shot_offset"], c["resolution"]) for c in configs] == [
        ("imagefolder", str(photos), 2, 32), ("imagefolder", str(photos), 4, 32)]
    zero = json.loads((tmp_path / "work/quick/zero-shot/canny/standard.json").read_text())
    assert len(zero["canny_f1"]) == 2 and "layout_miou" not in zero  # photos: the fidelity metric, no scene metrics
    results = json.loads((tmp_path / "out/adaptation-quick.json").read_text())
    assert results["control_metrics"] == {"canny": ["canny_f1"]}
    # The standard initialisation adds nothing before training: the floor's images, so the floor's canny F1.
    assert np.mean(zero["canny_f1"]) == pytest.approx(results["floor"]["canny"]["canny_f1"])
