"""Evaluate ControlNet checkpoints on held-out conditions: fidelity, image agreement, control score.

    python train/evaluate.py --config configs/evaluate_tiny.yaml [key=value ...]
    metacontrol evaluate --config configs/evaluate_tiny.yaml [key=value ...]
    python train/evaluate.py controlnets='[checkpoints/meta-controlnet-tiny, outputs/finetune-normal-full]'
    accelerate launch train/evaluate.py --config configs/evaluate_sd15.yaml data.train_data_dir=held-out-photos

Held-out samples are synthetic test scenes (``data.source: synthetic``, the default) or the first
``settings.num_samples`` photos of any training source (``imagefolder``, ``hf``, ``prepared``), annotated,
generated from and re-annotated (see ``metacontrol/eval/harness.py``). It runs on the accelerator in the
``mixed_precision`` weight dtype; under several processes the batches are split and the results gathered,
equal to one process's; the main process writes the files.

Writes to ``output_dir``: report.html (one self-contained page: metric tables, plot, sample grids
with prompts, settings), metrics.json (every setting that fixed the generation, floor, ceiling and
per-checkpoint metrics), metrics.csv (a row per checkpoint and condition), a PNG grid per checkpoint
(condition | generated | ground truth, with prompts) and, for several checkpoints, control_scores.png.
The previous run's files of these names are removed first, so old grids never mix with new ones.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from accelerate import Accelerator
from tqdm.auto import tqdm

from metacontrol.conditions import get_condition
from metacontrol.config import SourceConfig
from metacontrol.config_loader import ConfigError, check, config_argument_parser, load_config
from metacontrol.controlnet import create_controlnet
from metacontrol.eval.harness import EvalSettings, Evaluator, check_held_out_source, held_out_sets
from metacontrol.eval.report import (
    Sample,
    bounds_table,
    clear_stale_outputs,
    control_score_figure,
    metrics_table,
    save_figure,
    write_report,
)
from metacontrol.models.base import load_base_model
from metacontrol.run import weight_dtype_of
from metacontrol.visual import save_grid
from metacontrol.world import WorldConfig

logger = logging.getLogger("evaluate")
OUTPUTS = ("report.html", "metrics.json", "metrics.csv", "grid_*.png", "control_scores.png")


@dataclass
class EvaluateConfig:
    pretrained_model_name_or_path: str = "checkpoints/tiny-sd"
    controlnets: list[str] = field(default_factory=lambda: ["checkpoints/joint-3x-controlnet-tiny"])
    conditions: list[str] = field(default_factory=lambda: ["scribble", "lineart", "normal", "seg"])
    world: WorldConfig = field(default_factory=WorldConfig)  # the synthetic scenes (data.source: synthetic)
    data: SourceConfig = field(default_factory=SourceConfig)  # or photos: the training sources' keys
    resolution: int | None = None  # of photos; null: world.resolution
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"  # the UNet's and ControlNets' weight dtype
    settings: EvalSettings = field(default_factory=EvalSettings)
    output_dir: str = "outputs/eval"
    grid_samples: int = 4

    def __post_init__(self) -> None:
        check(len(self.controlnets) >= 1, "controlnets", self.controlnets, "at least one ControlNet folder")
        for name in self.conditions:
            get_condition(name)  # unknown names fail here, naming the known ones
        check_held_out_source(self.data)
        check(self.resolution is None or self.resolution >= 8, "resolution", self.resolution, "null or >= 8")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return config_argument_parser(__doc__, None, "settings.num_samples=8").parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = load_config(EvaluateConfig, args.config, args.overrides)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision)
    if cfg.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise ConfigError("mixed_precision: 'fp16' needs a GPU; use bf16 or no on the CPU")
    dtype = weight_dtype_of(cfg.mixed_precision)

    base = load_base_model(cfg.pretrained_model_name_or_path).freeze(dtype, accelerator.device)
    # Every checkpoint is loaded and checked against the base model before any generation starts.
    controlnets = {Path(p).name: create_controlnet(base, p).to(accelerator.device, dtype)
                   .eval() for p in cfg.controlnets}
    if len(controlnets) != len(cfg.controlnets):
        raise ConfigError(f"controlnets: folder names must be unique (they label the results): {cfg.controlnets}")
    eval_sets = held_out_sets(cfg.conditions, cfg.world, cfg.data, cfg.resolution, cfg.settings, base)
    evaluator = Evaluator(base, eval_sets, cfg.settings, accelerator)

    out = Path(cfg.output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        if stale := clear_stale_outputs(out, OUTPUTS):
            logger.info("removed %d file(s) of the previous run in %s", len(stale), out)
    results: dict[str, dict[str, dict[str, float]]] = {}
    samples: dict[str, list[Sample]] = {}
    checkpoints = tqdm(controlnets.items(), desc="evaluate", disable=not accelerator.is_main_process)
    for label, controlnet in checkpoints:
        results[label], rows, row_labels, prompts = {}, [], [], []
        for condition in cfg.conditions:
            metrics, images = evaluator.evaluate(controlnet, condition)
            results[label][condition] = metrics
            logger.info("%s on %s: control score %.3f (%s)", label, condition, metrics["control_score"],
                        ", ".join(f"{m} {metrics.get(m, float('nan')):.3f}" for m in eval_sets[condition].control_metrics))
            eval_set = eval_sets[condition]
            shown = range(min(cfg.grid_samples, len(images)))
            rows += [[eval_set.maps[i], images[i], eval_set.images[i]] for i in shown]
            row_labels += [condition] * len(shown)
            prompts += [eval_set.captions[i] for i in shown]
            samples[f"{label} / {condition}"] = [
                Sample(eval_set.captions[i], eval_set.maps[i], images[i], eval_set.images[i]) for i in shown]
        if accelerator.is_main_process:
            save_grid(out / f"grid_{label}.png", rows, row_labels, ["condition", "generated", "ground truth"],
                      row_captions=prompts)

    report = {
        "base_model": cfg.pretrained_model_name_or_path,
        "settings": asdict(cfg.settings),
        "world": asdict(cfg.world),
        "data": asdict(cfg.data) if cfg.data.source != "synthetic" else None,
        "mixed_precision": cfg.mixed_precision,
        "control_metrics": {c: list(eval_sets[c].control_metrics) for c in cfg.conditions},
        "floor": {c: evaluator.floor(c) for c in cfg.conditions},
        "ceiling": {c: evaluator.ceiling(c) for c in cfg.conditions},
        "results": results,
    }
    if not accelerator.is_main_process:
        return report
    (out / "metrics.json").write_text(json.dumps(report, indent=2))
    keys = sorted({k for per in results.values() for m in per.values() for k in m})
    with open(out / "metrics.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["checkpoint", "condition", *keys])
        for label, per in results.items():
            for condition, metrics in per.items():
                writer.writerow([label, condition, *(f"{metrics.get(k, float('nan')):.4f}" for k in keys)])
    figures = {}
    if len(results) > 1:
        figures["control score per condition"] = save_figure(control_score_figure(results), out / "control_scores.png")
    bounds = bounds_table(report["control_metrics"], report["floor"], report["ceiling"])
    html = write_report(out, "evaluation", settings={"base_model": cfg.pretrained_model_name_or_path,
                                                     "controlnets": cfg.controlnets, "settings": report["settings"],
                                                     "world": report["world"]},
                        tables=[metrics_table("metrics", results), bounds], samples=samples, figures=figures)
    print(f"evaluate: {len(results)} checkpoint(s) x {len(cfg.conditions)} condition(s); results in "
          f"{out}/metrics.json; open {html}")
    return report

