"""The steps-to-control benchmark: how fast does each initialisation learn a held-out condition?

    python bench/adaptation.py --config configs/bench_adaptation_tiny.yaml [--quick] [--shard K/N] [key=value ...]

For every shot regime, held-out condition, initialisation (standard ``from_unet``, joint multi-task,
Reptile, FOMAML, ...) and fine-tuning seed it fine-tunes with the same data, seeds and budget
(``train/finetune.py`` in a subprocess, saving the ControlNet at every evaluated step count; seed s
trains on its own shots, scenes ``s * shots ..``, and its own noise), then scores every saved step
on the same held-out scenes with the same generation noise (step 0 = the initialisation itself,
zero-shot). With ``data.source`` a photo source (``imagefolder``, ``hf``, ``prepared``: the training
sources' keys) the held-out samples are its first ``settings.num_samples`` photos and seed s trains on
the photos from ``num_samples + s * shots`` on, so no held-out photo is ever a shot. Per point it
reports the mean control score with a 95% bootstrap interval over scenes and seeds; per pair of
initialisations the paired difference with its interval; per curve the steps to fixed absolute
control scores and the area under the curve over the first ``auc_budget`` steps.
The tables go to ``output_dir/adaptation-<name>.md`` (and .json, .png), and with the plot and every
setting to a self-contained ``output_dir/adaptation-<name>/report.html``.

Work is cached per run under ``work_dir`` (scores as JSON next to the fine-tuned checkpoints), so an
interrupted benchmark resumes where it stopped, and ``--shard K/N`` splits the runs across processes
(one per core): run the shards side by side, then once more without ``--shard`` to write the report.
``--only LABEL,...`` runs some starts as soon as they exist; the report run then reuses their cache.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from metacontrol.atomic import atomic_files  # noqa: E402
from metacontrol.config import SourceConfig  # noqa: E402
from metacontrol.config_loader import ConfigError, check, config_argument_parser, load_config  # noqa: E402
from metacontrol.controlnet import create_controlnet  # noqa: E402
from metacontrol.errors import run_main  # noqa: E402
from metacontrol.eval.harness import EvalSettings, Evaluator, check_held_out_source, held_out_sets  # noqa: E402
from metacontrol.eval.report import (  # noqa: E402
    Table,
    bounds_table,
    markdown_table,
    pyplot,
    save_figure,
    write_report,
)
from metacontrol.eval.statistics import Interval, Resampler, mean_curve, paired_difference, summarise  # noqa: E402
from metacontrol.models.base import load_base_model  # noqa: E402
from metacontrol.world import SceneOptions, WorldConfig  # noqa: E402

logger = logging.getLogger("bench.adaptation")


@dataclass
class AdaptationBenchConfig:
    name: str = "default-split"
    pretrained_model_name_or_path: str = "checkpoints/tiny-sd"
    # label -> ControlNet folder; null is the standard initialisation (ControlNetModel.from_unet).
    initialisations: dict = field(default_factory=lambda: {
        "standard": None, "joint": "checkpoints/joint-controlnet-tiny",
        "reptile": "checkpoints/meta-controlnet-tiny", "joint-3x": "checkpoints/joint-3x-controlnet-tiny"})
    # label -> extra train/finetune.py key=value overrides for that initialisation's runs (after the common
    # ones), e.g. a LoRA start: [mode=lora, lora_init=.../lora, controlnet_model_name_or_path=<its base>].
    finetune_overrides: dict = field(default_factory=dict)
    conditions: list[str] = field(default_factory=lambda: ["scribble", "normal", "seg"])
    steps: list[int] = field(default_factory=lambda: [0, 25, 50, 100, 200])
    shots: list[int] = field(default_factory=lambda: [16])  # shot regimes; 16 is the few-shot recipe users run
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # fine-tuning seeds (shots and noise)
    train_batch_size: int = 8
    learning_rate: float = 5e-4
    world: WorldConfig = field(default_factory=WorldConfig)  # synthetic scenes: the shots' and the held-out ones
    data: SourceConfig = field(default_factory=SourceConfig)  # or photos: the training sources' keys
    resolution: int | None = None  # of photos; null: world.resolution
    settings: EvalSettings = field(default_factory=EvalSettings)
    thresholds: list[float] = field(default_factory=lambda: [0.3, 0.5])  # absolute control scores
    auc_budget: int = 100  # the mission's budget: mean control score over steps 0..100
    # paired differences against this label (or these labels) only; null: every pair
    paired_reference: str | list[str] | None = None
    bootstrap_resamples: int = 2000
    output_dir: str = "bench/results"
    work_dir: str = "outputs/bench-adaptation"
    num_threads: int = 1  # per process: a shared CPU slows multi-threaded torch far more than one thread

    def __post_init__(self) -> None:
        check_held_out_source(self.data)
        check(self.steps == sorted(set(self.steps)) and self.steps[0] == 0, "steps", self.steps,
              "an increasing list starting at 0")
        check(self.auc_budget in self.steps[1:], "auc_budget", self.auc_budget, f"one of the steps {self.steps[1:]}")
        check(len(self.seeds) >= 1 and len(set(self.seeds)) == len(self.seeds), "seeds", self.seeds,
              "a list of distinct integers")
        check(len(self.shots) >= 1 and all(s >= self.train_batch_size for s in self.shots), "shots", self.shots,
              f"a list of regimes, each >= train_batch_size ({self.train_batch_size})")
        check(all(0 < t <= 1 for t in self.thresholds), "thresholds", self.thresholds, "control scores in (0, 1]")
        check(len(self.initialisations) >= 1, "initialisations", self.initialisations, "at least one label: folder")
        check(set(self.references()) <= set(self.initialisations), "paired_reference", self.paired_reference,
              f"null, or one or a list of {', '.join(self.initialisations)}")
        check(set(self.finetune_overrides) <= set(self.initialisations), "finetune_overrides",
              sorted(set(self.finetune_overrides) - set(self.initialisations)), "labels of initialisations only")
        check(all(isinstance(v, list) and all(isinstance(o, str) and "=" in o for o in v)
                  for v in self.finetune_overrides.values()), "finetune_overrides", self.finetune_overrides,
              "a mapping of label -> list of key=value strings")

    def references(self) -> list[str]:
        """The labels paired differences are taken against (none: every pair)."""
        return [self.paired_reference] if isinstance(self.paired_reference, str) else list(self.paired_reference or [])


QUICK = ["steps=[0, 5, 10]", "shots=[8]", "seeds=[0, 1]", "conditions=[scribble, pose]", "settings.num_samples=4",
         "settings.num_inference_steps=4", "auc_budget=10", "bootstrap_resamples=200", "name=quick",
         "output_dir=outputs/bench-quick", "work_dir=outputs/bench-quick/work"]


def finetune(cfg: AdaptationBenchConfig, label: str, condition: str, shots: int, seed: int, out: Path) -> None:
    """One fine-tuning run in its own process, saving the ControlNet at every evaluated step count."""
    init = cfg.initialisations[label]
    save_steps = [s for s in cfg.steps if s > 0]
    first_shot = (0 if cfg.data.source == "synthetic" else cfg.settings.num_samples) + seed * shots
    args = [
        sys.executable, str(REPO / "train/finetune.py"), "--config", str(REPO / "configs/finetune_tiny.yaml"),
        f"pretrained_model_name_or_path={cfg.pretrained_model_name_or_path}",
        f"controlnet_model_name_or_path={init if init is not None else 'null'}",
        f"output_dir={out}", f"condition={condition}", f"shots={shots}", f"shot_offset={first_shot}",
        f"max_train_steps={cfg.steps[-1]}", f"train_batch_size={cfg.train_batch_size}",
        f"learning_rate={cfg.learning_rate}", f"seed={seed}", f"save_steps={json.dumps(save_steps)}",
        "validation_steps=0", "report_to=none", "mode=full", f"checkpointing_steps={cfg.steps[-1]}",
        f"resolution={cfg.resolution or cfg.world.resolution}", *source_overrides(cfg),
        f"num_threads={cfg.num_threads}", *cfg.finetune_overrides.get(label, []),
    ]  # fmt: skip
    subprocess.run(args, cwd=REPO, check=True, env={**os.environ, "PYTHONPATH": str(REPO)})


def source_overrides(cfg: AdaptationBenchConfig) -> list[str]:
    """train/finetune.py's source keys (top-level there) for the bench's source and scene options."""
    source = {key: value for key, value in asdict(cfg.data).items() if key != "world"}
    source["annotators"] = cfg.data.annotators or cfg.settings.annotators
    scene = {f"world.{key}": getattr(cfg.world, key) for key in SceneOptions.__dataclass_fields__}
    return [f"{key}={json.dumps(value)}" for key, value in (source | scene).items()]


def score_folder(evaluator: Evaluator, base, folder: str | None, condition: str, path: Path) -> dict[str, list]:
    """Per-sample scores of one ControlNet folder on one condition, cached as JSON at ``path``."""
    if path.is_file():
        return json.loads(path.read_text())
    controlnet = create_controlnet(base, folder).eval()
    scores, _ = evaluator.evaluate_samples(controlnet, condition)
    result = {k: [None if not np.isfinite(x) else float(x) for x in v] for k, v in scores.items()}
    with atomic_files(path.parent) as tmp:
        (tmp / path.name).write_text(json.dumps(result))
    return result


def run_key(shots: int, condition: str, label: str, seed: int) -> str:
    return f"shots-{shots}/{condition}/{label}/seed-{seed}"


def as_array(rows: list) -> np.ndarray:
    return np.array([np.nan if x is None else x for x in rows], np.float64)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = config_argument_parser(__doc__, None, "conditions=[normal]")
    parser.add_argument("--quick", action="store_true", help="a smoke run (tiny budget, written under outputs/)")
    parser.add_argument("--shard", default=None, help="K/N: do only runs K, K+N, ...; write no report")
    parser.add_argument("--only", default=None,
                        help="LABEL[,LABEL...]: run only these starts (as soon as they exist); write no report")
    parser.add_argument("--card", default=None, help="LABEL[,LABEL...]: with the report, write the measured scores "
                        "into these starts' model cards (README.md of their folders; e.g. a checkpoint to ship)")
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = load_config(AdaptationBenchConfig, args.config, (QUICK if args.quick else []) + args.overrides)
    shard, shards = parse_shard(args.shard)
    labels = parse_only(args.only, cfg)
    import torch

    torch.set_num_threads(cfg.num_threads)
    work, out = Path(cfg.work_dir) / cfg.name, Path(cfg.output_dir)

    base = load_base_model(cfg.pretrained_model_name_or_path).freeze()
    for label in labels:  # every initialisation must fit the base before any work
        if cfg.initialisations[label] is not None:
            create_controlnet(base, cfg.initialisations[label])
    start = time.time()
    eval_sets = held_out_sets(cfg.conditions, cfg.world, cfg.data, cfg.resolution, cfg.settings, base)
    evaluator = Evaluator(base, eval_sets, cfg.settings)
    zero_shot = list(itertools.product(cfg.conditions, labels))
    runs = list(itertools.product(cfg.shots, cfg.conditions, labels, cfg.seeds))
    jobs = [("zero", j) for j in zero_shot] + [("run", j) for j in runs]
    for number, (kind, job) in enumerate(jobs):
        if number % shards != shard:
            continue
        if kind == "zero":
            condition, label = job
            score_folder(evaluator, base, cfg.initialisations[label], condition, work / f"zero-shot/{condition}/{label}.json")
            continue
        shots, condition, label, seed = job
        run_dir = work / run_key(*job)
        if not all((run_dir / f"scores-{s}.json").is_file() for s in cfg.steps[1:]):
            if not all((run_dir / f"step-{s}" / "config.json").is_file() for s in cfg.steps[1:]):
                t = time.time()
                finetune(cfg, label, condition, shots, seed, run_dir)
                logger.info("fine-tuned %s in %.1f min", run_key(*job), (time.time() - t) / 60)
            for step in cfg.steps[1:]:
                s = score_folder(evaluator, base, str(run_dir / f"step-{step}"), condition, run_dir / f"scores-{step}.json")
                logger.info("%s / step %d: control score %.3f", run_key(*job), step, np.nanmean(as_array(s["control_score"])))
    if shards > 1 or args.only:
        logger.info("shard %d/%d of %s done in %.1f min; run without --shard and --only to write the report", shard,
                    shards, ", ".join(labels), (time.time() - start) / 60)
        return None
    results = analyse(cfg, evaluator, work)
    results["wall_clock_minutes_this_invocation"] = (time.time() - start) / 60
    out.mkdir(parents=True, exist_ok=True)
    (out / f"adaptation-{cfg.name}.json").write_text(json.dumps(results, indent=2))
    plot = plot_curves(results, cfg, out / f"adaptation-{cfg.name}.png")
    tables = report_tables(results, cfg)
    report = markdown_report(tables, cfg, plot)
    (out / f"adaptation-{cfg.name}.md").write_text(report + "\n")
    html = write_report(out / f"adaptation-{cfg.name}", f"steps to control: {cfg.name}", settings=results["config"],
                        tables=[*tables, bounds_table(results["control_metrics"], results["floor"], results["ceiling"])],
                        figures={"control score per fine-tuning step (95% bootstrap band)": plot})
    print(f"{report}\nReport: {html}")
    command = f"python bench/adaptation.py --config {args.config}" if args.config else "python bench/adaptation.py"
    for label in parse_only(args.card, cfg) if args.card else []:
        card = write_card_section(cfg.initialisations[label], card_section(results, cfg, label, command))
        print(f"measured scores of {label!r} written into {card}")
    return results


def card_section(results: dict, cfg: AdaptationBenchConfig, label: str, command: str) -> str:
    """A model card's "Measured" section: this start's curve per held-out condition, as the benchmark measured it."""
    shots = cfg.shots[0]
    regime = results["regimes"][str(shots)]
    reference = next((r for r in cfg.references() if r != label), None)
    header = ["held-out condition", *(f"{s} steps" + (" (zero-shot)" if s == 0 else "") for s in cfg.steps),
              f"AUC 0-{cfg.auc_budget}", *([f"AUC - {reference} (paired)"] if reference else [])]
    rows = []
    for condition in cfg.conditions:
        curve = regime[condition]["curves"][label]
        paired = [regime[condition]["paired_differences"][f"{label} - {reference}"]["auc"]] if reference else []
        rows.append([condition, *map(_cell, curve["points"]), _cell(curve["auc"]), *map(_cell, paired)])
    return (f"## Measured (metacontrol `{command}`)\n\n"
            f"Control score (0 = base model without ControlNet, 1 = ground truth through the VAE), mean [95% CI] over "
            f"{len(cfg.seeds)} fine-tuning seeds x {cfg.settings.num_samples} test scenes, after fine-tuning on "
            f"{shots} examples of a held-out condition (AdamW {cfg.learning_rate:g}, batch {cfg.train_batch_size}"
            + (f"; {' '.join(cfg.finetune_overrides[label])}" if label in cfg.finetune_overrides else "") + "):\n\n"
            + markdown_table(Table("", header, rows)).split("\n", 2)[2] + "\n\n")


def write_card_section(folder: str | None, section: str) -> Path:
    """Replace (or add, before "## Load") the "## Measured" section of a ControlNet folder's README.md."""
    if folder is None:
        raise ConfigError("--card: the standard initialisation has no folder, so no model card to write")
    card = Path(folder) / "README.md"
    text = card.read_text() if card.is_file() else ""
    start = text.find("## Measured")
    end = text.find("## Load")
    if start < 0:
        start = end if end >= 0 else len(text)
    text = text[:start] + section + (text[end:] if end >= start else "")
    with atomic_files(card.parent) as tmp:
        (tmp / card.name).write_text(text)
    return card


def parse_only(text: str | None, cfg: AdaptationBenchConfig) -> list[str]:
    """The starts to run: all, or the ``--only`` subset (each must be a label of ``initialisations``)."""
    if text is None:
        return list(cfg.initialisations)
    labels = [label.strip() for label in text.split(",") if label.strip()]
    unknown = [label for label in labels if label not in cfg.initialisations]
    if not labels or unknown:
        raise ConfigError(f"--only: {text!r} names {', '.join(unknown) or 'no label'}; expected labels of "
                          f"initialisations: {', '.join(cfg.initialisations)}")
    return labels


def parse_shard(text: str | None) -> tuple[int, int]:
    if text is None:
        return 0, 1
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard: expected K/N with integers 0 <= K < N, got {text!r}") from None
    if not 0 <= k < n:
        raise ConfigError(f"--shard: expected K/N with integers 0 <= K < N, got {text!r}")
    return k, n


def score_matrix(cfg: AdaptationBenchConfig, work: Path, shots: int, condition: str, label: str,
                 metric: str = "control_score") -> np.ndarray:
    """scores[seed, scene, step] of one curve; step 0 (the initialisation) is the same for every seed."""
    zero = as_array(json.loads((work / f"zero-shot/{condition}/{label}.json").read_text())[metric])
    rows = []
    for seed in cfg.seeds:
        run_dir = work / run_key(shots, condition, label, seed)
        later = [as_array(json.loads((run_dir / f"scores-{s}.json").read_text())[metric]) for s in cfg.steps[1:]]
        rows.append(np.stack([zero, *later], axis=1))
    return np.stack(rows)


def analyse(cfg: AdaptationBenchConfig, evaluator: Evaluator, work: Path) -> dict:
    """Every curve's summary and every pair's paired difference, from the cached per-sample scores."""
    labels = list(cfg.initialisations)
    resampler = Resampler.draw(len(cfg.seeds), cfg.settings.num_samples, cfg.bootstrap_resamples)
    regimes = {}
    for shots in cfg.shots:
        per_condition = {}
        for condition in cfg.conditions:
            matrices = {lab: score_matrix(cfg, work, shots, condition, lab) for lab in labels}
            curves = {lab: asdict(summarise(m, cfg.steps, cfg.thresholds, cfg.auc_budget, resampler))
                      for lab, m in matrices.items()}
            pairs = {f"{a} - {b}": asdict(paired_difference(matrices[a], matrices[b], cfg.steps, cfg.auc_budget,
                                                            resampler))
                     for a, b in compared_pairs(cfg)}
            # the colour-based layout mIoU, a secondary column kept for comparison with earlier results
            layout = {lab: mean_curve(score_matrix(cfg, work, shots, condition, lab, "layout_miou")).tolist()
                      for lab in labels} if evaluator.eval_sets[condition].scenes else {}  # photos: no layout
            per_condition[condition] = {"curves": curves, "paired_differences": pairs, "layout_miou": layout}
        regimes[str(shots)] = per_condition
    return {"config": asdict(cfg), "control_metrics": {c: list(evaluator.eval_sets[c].control_metrics) for c in cfg.conditions},
            "floor": {c: evaluator.floor(c) for c in cfg.conditions},
            "ceiling": {c: evaluator.ceiling(c) for c in cfg.conditions}, "regimes": regimes}


def compared_pairs(cfg: AdaptationBenchConfig) -> list[tuple[str, str]]:
    """(A, B) pairs whose paired difference A - B is reported: against each ``paired_reference`` (a pair of two
    references once), or all of them."""
    labels = list(cfg.initialisations)
    if cfg.paired_reference is None:
        return list(itertools.combinations(labels, 2))
    pairs: list[tuple[str, str]] = []
    for reference in cfg.references():
        pairs += [(label, reference) for label in labels if label != reference and (reference, label) not in pairs]
    return pairs


def plot_curves(results: dict, cfg: AdaptationBenchConfig, path: Path) -> Path:
    """One panel per (regime, condition): mean control score per initialisation, its 95% interval as a band."""
    rows, cols = len(cfg.shots), len(cfg.conditions)
    fig, axes = pyplot().subplots(rows, cols, figsize=(4 * cols, 3.3 * rows), squeeze=False)
    for r, shots in enumerate(cfg.shots):
        for ax, condition in zip(axes[r], cfg.conditions):
            for label in cfg.initialisations:
                points = results["regimes"][str(shots)][condition]["curves"][label]["points"]
                ax.plot(cfg.steps, [p["estimate"] for p in points], marker="o", ms=3, label=label)
                ax.fill_between(cfg.steps, [p["low"] for p in points], [p["high"] for p in points], alpha=0.2)
            for t in cfg.thresholds:
                ax.axhline(t, color="grey", ls=":", lw=1)
            ax.set_title(f"{condition}, {shots} shots", fontsize=10)
            ax.set_xlabel("fine-tuning steps")
            ax.set_ylim(-0.1, 1.0)
        axes[r][0].set_ylabel("control score")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(f"steps to control: {cfg.name} (mean over {len(cfg.seeds)} seeds x {cfg.settings.num_samples} "
                 "scenes, 95% bootstrap band)", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def _cell(interval: dict, digits: int = 3) -> str:
    return Interval(**interval).format(digits)


def report_tables(results: dict, cfg: AdaptationBenchConfig) -> list[Table]:
    """Per shot regime: every curve (points, steps to the thresholds, AUC) and the paired differences."""
    labels = list(cfg.initialisations)
    n = f"{len(cfg.seeds)} seeds x {cfg.settings.num_samples} scenes"
    shown = [k for k, s in enumerate(cfg.steps) if s <= cfg.auc_budget]
    tables = []
    for shots in cfg.shots:
        regime, name = results["regimes"][str(shots)], f"{cfg.name}, {shots} shots"
        curves = []
        for c in cfg.conditions:
            for lab in labels:
                curve = regime[c]["curves"][lab]
                curves.append([c, lab, *map(_cell, curve["points"]),
                               *(_cell(curve["steps_to"][t], 0) for t in cfg.thresholds), _cell(curve["auc"])])
        tables.append(Table(f"{name}: control score, mean [95% CI over {n}]",
                            ["condition", "start", *(f"step {s}" for s in cfg.steps),
                             *(f"steps to {t:g}" for t in cfg.thresholds), f"AUC 0-{cfg.auc_budget}"], curves,
                            f"Steps to a threshold: none = not within {cfg.steps[-1]}. AUC = mean score over steps "
                            f"0-{cfg.auc_budget}."))
        pairs = [[c, pair, *(_cell(x) + ("*" if Interval(**x).excludes_zero() else "")
                             for x in [*(diff["points"][k] for k in shown), diff["auc"]])]
                 for c in cfg.conditions for pair, diff in regime[c]["paired_differences"].items()]
        tables.append(Table(f"{name}: paired differences A - B (same seeds, scenes and noise), mean [95% CI]",
                            ["condition", "A - B", *(f"step {cfg.steps[k]}" for k in shown), f"AUC 0-{cfg.auc_budget}"],
                            pairs, "Starred (*) cells: the interval excludes 0."))
    return tables


def markdown_report(tables: list[Table], cfg: AdaptationBenchConfig, plot: Path) -> str:
    """The tables as markdown, then the starts fine-tuned with their own recipe, then where the plot is."""
    parts = [markdown_table(table) for table in tables]
    if cfg.finetune_overrides:
        parts.append("Fine-tuning differs from the common recipe for: " + "; ".join(
            f"{label}: {' '.join(o for o in overrides if not o.startswith('controlnet_model_name_or_path'))}"
            for label, overrides in cfg.finetune_overrides.items()))
    parts.append(f"Plot: {plot}")
    return "\n\n".join(parts)

if __name__ == "__main__":
    run_main(main, "bench/adaptation.py")
