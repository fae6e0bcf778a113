"""Seconds per evaluation point (one checkpoint x one condition x N held-out samples) at 64 px on this CPU,
on synthetic scenes and on photos, against the evaluation of an earlier revision on synthetic scenes.

    python bench/eval_speed.py [--before ba0ba72] [--samples 48] [--work-dir /tmp/eval-speed]

Every run is ``evaluate`` in a subprocess as a user runs it. A point's cost is measured as the difference
between evaluating two checkpoints and one (the same ControlNet under two names), so loading, the floor and the
ceiling, paid once per run, are not counted in it; they are printed as the fixed cost. ``--before`` is checked
out with ``git worktree`` (its evaluation could score synthetic scenes only). Photos: scikit-image's 8, listed
``N / 8`` times in metadata.jsonl; HED with random weights from a temp folder, re-run on every generated image.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONTROLNET = "checkpoints/joint-3x-controlnet-tiny"


def evaluate_seconds(checkout: Path, controlnets: list[Path], overrides: list[str], out: Path) -> float:
    """Wall time of one ``train/evaluate.py`` run of ``checkout`` (one thread, as the suite runs scripts)."""
    args = [sys.executable, "train/evaluate.py", f"controlnets=[{', '.join(map(str, controlnets))}]",
            f"output_dir={out}", *overrides]
    env = {**os.environ, "PYTHONPATH": str(checkout), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    subprocess.run(args, cwd=checkout, env=env, check=True, capture_output=True)
    return time.perf_counter() - started


def point_cost(checkout: Path, work: Path, name: str, overrides: list[str], conditions: int) -> tuple[float, float]:
    """(seconds per point, fixed seconds per run) from a one-checkpoint and a two-checkpoint run."""
    twins = [work / "a", work / "b"]
    for twin in twins:
        if not twin.exists():
            shutil.copytree(REPO / CONTROLNET, twin)
    one = evaluate_seconds(checkout, twins[:1], overrides, work / f"{name}-1")
    two = evaluate_seconds(checkout, twins, overrides, work / f"{name}-2")
    per_point = (two - one) / conditions
    return per_point, one - conditions * per_point


def photo_folder(work: Path, samples: int) -> tuple[Path, Path]:
    from metacontrol.data.sample_photos import PHOTOS, random_hed_annotators, write_photo_folder

    photos = work / "photos"
    if not photos.is_dir():
        write_photo_folder(photos, size=64)
        lines = (photos / "metadata.jsonl").read_text().splitlines()
        (photos / "metadata.jsonl").write_text("\n".join(lines[i % len(PHOTOS)] for i in range(samples)) + "\n")
    return photos, random_hed_annotators(work / "annotators")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default="ba0ba72", help="the earlier revision (default: before issue 19)")
    parser.add_argument("--samples", type=int, default=48)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/eval-speed"))
    args = parser.parse_args()
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    before = work / f"checkout-{args.before}"
    if not before.is_dir():
        subprocess.run(["git", "worktree", "add", "--detach", str(before), args.before], cwd=REPO, check=True,
                       capture_output=True)
    photos, annotators = photo_folder(work, args.samples)
    common = [f"settings.num_samples={args.samples}", "grid_samples=1"]
    synthetic = [*common, "conditions=[canny, hed]"]
    on_photos = [*common, "conditions=[canny, hed]", "data.source=imagefolder", f"data.train_data_dir={photos}",
                 f"settings.annotators={annotators}", "resolution=64"]
    rows = [(f"before ({args.before}), synthetic scenes", *point_cost(before, work, "before", synthetic, 2)),
            ("now, synthetic scenes", *point_cost(REPO, work, "now-synthetic", synthetic, 2)),
            ("now, photos (canny, HED re-annotated)", *point_cost(REPO, work, "now-photos", on_photos, 2))]
    print(f"\n{args.samples} samples a point, 64 px, 10 DPM-Solver++ steps, one thread, fp32\n")
    print("| evaluation | s / point | fixed s / run (load, floor, ceiling) | point vs before |\n|---|---:|---:|---:|")
    for label, per_point, fixed in rows:
        print(f"| {label} | {per_point:.1f} | {fixed:.1f} | x{per_point / rows[0][1]:.2f} |")


if __name__ == "__main__":
    main()
