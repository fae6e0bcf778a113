"""The steps-to-control benchmark: how fast does each initialisation learn a held-out condition?

    python bench/adaptation.py --config configs/bench_adaptation_tiny.yaml [--quick] [key=value ...]

For every held-out condition and every initialisation (standard ``from_unet``, joint multi-task,
Reptile, FOMAML) it fine-tunes with the same data, seeds and budget (``train/finetune.py`` in a
subprocess, saving the ControlNet at each evaluated step count), evaluates each saved step with the
evaluation harness (step 0 = zero-shot), and reports learning curves of the control score, the
zero-shot score, and the steps each initialisation needs to reach ``threshold_fraction`` of the best
score any initialisation reached at the last step, with the ratio standard / meta.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from metacontrol.configuration import check, load_config  # noqa: E402
from metacontrol.controlnet import create_controlnet  # noqa: E402
from metacontrol.data.world import WorldConfig  # noqa: E402
from metacontrol.eval.harness import EvalSettings, Evaluator, synthetic_eval_sets  # noqa: E402
from metacontrol.models.base import load_base_model  # noqa: E402

logger = logging.getLogger("bench.adaptation")


@dataclass
class AdaptationBenchConfig:
    name: str = "default-split"
    pretrained_model_name_or_path: str = "checkpoints/tiny-sd"
    # label -> ControlNet folder; null is the standard initialisation (ControlNetModel.from_unet).
    initialisations: dict = field(default_factory=lambda: {
        "standard": None, "joint": "checkpoints/joint-controlnet-tiny",
        "reptile": "checkpoints/meta-controlnet-tiny", "fomaml": "checkpoints/fomaml-controlnet-tiny"})
    conditions: list[str] = field(default_factory=lambda: ["scribble", "normal", "seg"])
    steps: list[int] = field(default_factory=lambda: [0, 25, 50, 100, 200, 400, 800])
    shots: int = 256
    train_batch_size: int = 8
    learning_rate: float = 5e-4
    seed: int = 0
    world: WorldConfig = field(default_factory=WorldConfig)
    settings: EvalSettings = field(default_factory=EvalSettings)
    threshold_fraction: float = 0.8
    output_dir: str = "bench/results"
    work_dir: str = "outputs/bench-adaptation"
    num_threads: int = 1  # per process: a shared CPU slows multi-threaded torch far more than one thread

    def __post_init__(self) -> None:
        check(self.steps == sorted(self.steps) and self.steps[0] == 0, "steps", self.steps,
              "an increasing list starting at 0")
        check(0 < self.threshold_fraction <= 1, "threshold_fraction", self.threshold_fraction, "in (0, 1]")


QUICK = ["steps=[0, 5, 10]", "shots=16", "conditions=[scribble, normal]", "settings.num_samples=4",
         "settings.num_inference_steps=8", "name=quick"]


def finetune(cfg: AdaptationBenchConfig, label: str, init: str | None, condition: str, out: Path) -> None:
    """One fine-tuning run in its own process, saving the ControlNet at every evaluated step count."""
    if (out / "config.json").is_file():
        logger.info("reusing %s", out)
        return
    save_steps = [s for s in cfg.steps if s > 0]
    args = [
        sys.executable, str(REPO / "train/finetune.py"), "--config", str(REPO / "configs/finetune_tiny.yaml"),
        f"pretrained_model_name_or_path={cfg.pretrained_model_name_or_path}",
        f"controlnet_model_name_or_path={init if init is not None else 'null'}",
        f"output_dir={out}", f"condition={condition}", f"shots={cfg.shots}", f"max_train_steps={cfg.steps[-1]}",
        f"train_batch_size={cfg.train_batch_size}", f"learning_rate={cfg.learning_rate}", f"seed={cfg.seed}",
        f"save_steps={json.dumps(save_steps)}", "validation_steps=0", "report_to=none", "mode=full",
        f"checkpointing_steps={cfg.steps[-1]}", f"resolution={cfg.world.resolution}",
        f"world.resolution={cfg.world.resolution}", f"num_threads={cfg.num_threads}",
    ]  # fmt: skip
    start = time.time()
    subprocess.run(args, cwd=REPO, check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    logger.info("fine-tuned %s on %s for %d steps in %.1f min", label, condition, cfg.steps[-1], (time.time() - start) / 60)


def steps_to_threshold(curve: dict[int, float], threshold: float) -> int | None:
    return next((step for step, score in sorted(curve.items()) if score >= threshold), None)


def plot_curves(results: dict, cfg: AdaptationBenchConfig, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(cfg.conditions), figsize=(4 * len(cfg.conditions), 3.4), squeeze=False)
    for ax, condition in zip(axes[0], cfg.conditions):
        for label in cfg.initialisations:
            curve = results["curves"][condition][label]
            xs = [max(s, 1) for s in cfg.steps]  # step 0 drawn at 1 on the log axis
            ax.plot(xs, [curve[str(s)]["control_score"] for s in cfg.steps], marker="o", label=label)
        ax.axhline(results["thresholds"][condition], color="grey", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_title(condition)
        ax.set_xlabel("fine-tuning steps (0 plotted at 1)")
        ax.set_ylim(-0.05, 1.0)
    axes[0][0].set_ylabel("control score")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(f"steps to control: {cfg.name}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None)
    parser.add_argument("--quick", action="store_true", help="a minutes-long smoke run (tiny budget)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = load_config(AdaptationBenchConfig, args.config, (QUICK if args.quick else []) + args.overrides)
    import torch

    torch.set_num_threads(cfg.num_threads)
    work, out = Path(cfg.work_dir) / cfg.name, Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    base = load_base_model(cfg.pretrained_model_name_or_path).freeze()
    for init in cfg.initialisations.values():  # every initialisation must fit the base before any work
        if init is not None:
            create_controlnet(base.unet, base.vae_scale_factor, init)
    evaluator = Evaluator(base, synthetic_eval_sets(cfg.conditions, cfg.world, cfg.settings), cfg.settings)
    curves: dict = {}
    start = time.time()
    for condition in cfg.conditions:
        curves[condition] = {}
        for label, init in cfg.initialisations.items():
            run_dir = work / condition / label
            finetune(cfg, label, init, condition, run_dir)
            curve = {}
            for step in cfg.steps:
                folder = init if step == 0 else str(run_dir / f"step-{step}")
                controlnet = create_controlnet(base.unet, base.vae_scale_factor, folder).eval()
                metrics, _ = evaluator.evaluate(controlnet, condition)
                curve[str(step)] = metrics
                logger.info("%s / %s / step %d: control score %.3f", condition, label, step, metrics["control_score"])
            curves[condition][label] = curve

    last = str(cfg.steps[-1])
    thresholds = {c: cfg.threshold_fraction * max(curves[c][lab][last]["control_score"] for lab in cfg.initialisations)
                  for c in cfg.conditions}
    reached = {c: {lab: steps_to_threshold({int(s): m["control_score"] for s, m in curves[c][lab].items()},
                                           thresholds[c]) for lab in cfg.initialisations} for c in cfg.conditions}
    results = {"config": asdict(cfg), "floor": {c: evaluator.floor(c) for c in cfg.conditions},
               "ceiling": {c: evaluator.ceiling(c) for c in cfg.conditions}, "curves": curves,
               "thresholds": thresholds, "steps_to_threshold": reached,
               "wall_clock_minutes": (time.time() - start) / 60}
    (out / f"adaptation-{cfg.name}.json").write_text(json.dumps(results, indent=2))
    plot = plot_curves(results, cfg, out / f"adaptation-{cfg.name}.png")
    print(markdown_report(results, cfg, plot))
    return results


def speedup(standard: int | None, meta: int | None, budget: int) -> str:
    """standard / meta steps to threshold, with the cases where one of them never got there."""
    if meta is None:
        return "n/a: meta did not reach it"
    if meta == 0:
        return "meta zero-shot" if standard != 0 else "both zero-shot"
    if standard is None:
        return f"> {budget / meta:.1f}x (standard did not reach it)"
    return f"{standard / meta:.1f}x"


def markdown_report(results: dict, cfg: AdaptationBenchConfig, plot: Path) -> str:
    labels = list(cfg.initialisations)
    lines = [f"### {cfg.name}: control score (0 = base model without ControlNet, 1 = ground truth through the VAE)",
             "", "| condition | step | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
    for c in cfg.conditions:
        for step in cfg.steps:
            scores = [f"{results['curves'][c][lab][str(step)]['control_score']:.3f}" for lab in labels]
            lines.append(f"| {c} | {step} | " + " | ".join(scores) + " |")
    lines += ["", f"Steps to reach {cfg.threshold_fraction:.0%} of the best final score (none: not within "
              f"{cfg.steps[-1]}):", "", "| condition | threshold | " + " | ".join(labels) + " | standard / reptile |",
              "|---|---|" + "---|" * (len(labels) + 1)]
    for c in cfg.conditions:
        reached = results["steps_to_threshold"][c]
        ratio = speedup(reached.get("standard"), reached.get("reptile"), cfg.steps[-1])
        lines.append(f"| {c} | {results['thresholds'][c]:.3f} | " + " | ".join(str(reached[lab]) for lab in labels)
                     + f" | {ratio} |")
    lines += ["", f"Plot: {plot}"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
