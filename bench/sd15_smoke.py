"""The real path end to end at SD-1.5 shapes: photos -> prepare -> meta-train (2 processes) -> finetune -> evaluate
-> generate, on random weights in the real SD 1.5 configs, on the CPU.

    python bench/sd15_smoke.py [--work-dir DIR] [--keep] [--timeout SECONDS] [--processes N] [--meta-processes N]

Why: ``bench/real_shapes.py`` runs the training scripts at these shapes on synthetic scenes; a user brings
photos. This one builds the SD 1.5 architecture with random weights (UNet 320/640/1280/1280, CLIP-L text
encoder, the SD VAE; ``real_shapes.build_base``), writes scikit-image's 8 photos as an image folder, gives HED
random weights, and runs every stage as a user would, as real subprocesses at 64 px in bf16:

1. ``metacontrol prepare`` (canny + HED, encodings by the SD VAE and CLIP-L) on ``--processes`` processes;
2. Reptile meta-training on the prepared set (2 meta-steps of 2 tasks, batch 1) on ``--processes`` processes;
3. full fine-tuning of the meta-trained ControlNet on the prepared canny maps (2 steps);
4. evaluation of both on the photos (canny + HED: annotate -> generate -> re-annotate; 2 inference steps);
5. ``metacontrol generate`` from one prepared canny map.

It prints a markdown table (wall time and peak resident memory of each stage's processes, outcome) and the
command line that reproduces it, as ``bench/real_shapes.py`` does (its runner, not a copy of it).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_shapes  # noqa: E402  (bench/real_shapes.py: its runner, base builder and table)

REPO = real_shapes.REPO
RESOLUTION = 64
PYTHON = sys.executable


def launch(processes: int, *args: str) -> list[str]:
    """``python -m ...`` on one process, else torchrun on this machine (gloo on the CPU)."""
    if processes == 1:
        return [PYTHON, *args]
    return [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), *args]


def check_file(path: Path, what: str) -> Callable[[], str]:
    def check() -> str:
        assert path.is_file(), f"no {what} at {path}"
        return f"{what}: {path.name}"

    return check


def check_prepared(out: Path) -> Callable[[], str]:
    def check() -> str:
        index = json.loads((out / "index.json").read_text())
        assert index["kept"] == 8 and index["encodings"], f"index.json: {index['kept']} kept, encodings {index['encodings']}"
        mb = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / real_shapes.MB
        return f"8 photos x canny, hed + SD-VAE latents and CLIP-L embeddings; {mb:.1f} MB on disk"

    return check


def check_evaluation(out: Path) -> Callable[[], str]:
    def check() -> str:
        report = json.loads((out / "metrics.json").read_text())
        scores = {label: {c: round(m["control_score"], 3) for c, m in per.items()} for label, per in report["results"].items()}
        assert (out / "report.html").is_file(), "no report.html"
        return f"control scores (random weights: meaningless, but finite and written) {scores}"

    return check


def run_all(work: Path, timeout_s: float, processes: int, meta_processes: int) -> real_shapes.Runner:
    logs = work / "logs"
    logs.mkdir()
    runner = real_shapes.Runner(logs, timeout_s)
    base, photos, annotators = work / "sd15-random", work / "photos", work / "annotators"
    prepared, meta, full, evaluation = (work / n for n in ("prepared", "meta", "finetune-full", "eval"))
    from metacontrol.data.sample_photos import random_hed_annotators, write_photo_folder

    write_photo_folder(photos, size=96)
    random_hed_annotators(annotators)
    common = [f"pretrained_model_name_or_path={base}"]
    stages = [
        ("build SD-1.5-shaped base (random weights)",
         [PYTHON, str(REPO / "bench/real_shapes.py"), "--build-base", str(base)],
         real_shapes.check_base(base, logs / "build-sd-1-5-shaped-base-random-weights.out")),
        (f"prepare canny + hed, encode ({processes} processes)",
         launch(processes, "-m", "metacontrol.cli", "prepare", *common, f"train_data_dir={photos}",
                "conditions=[canny, hed]", f"annotators={annotators}", f"resolution={RESOLUTION}", "shard_size=2",
                "encode=true", "encode_batch_size=2", f"output_dir={prepared}", "dataloader_num_workers=1"),
         check_prepared(prepared)),
        (f"meta-train on the prepared set (reptile, bf16, {meta_processes} process(es))",
         launch(meta_processes, "meta_train.py", *common, f"output_dir={meta}", f"resolution={RESOLUTION}",
                "data.source=prepared", f"data.train_data_dir={prepared}", "data.tasks=[canny, hed]",
                "meta.max_meta_steps=2", f"meta.tasks_per_meta_step={max(2, meta_processes)}", "meta.inner_steps=2",
                "meta.support_batch_size=1", "meta.query_batch_size=1", "mixed_precision=bf16",
                "gradient_checkpointing=true", "checkpointing_steps=2", "validation_steps=0", "report_to=none",
                "num_threads=1", f"cache_dir={work / 'cache'}"),
         check_file(meta / "diffusion_pytorch_model.safetensors", "ControlNet")),
        ("finetune full on prepared canny (bf16)",
         [PYTHON, "train/finetune.py", *common, f"controlnet_model_name_or_path={meta}", f"output_dir={full}",
          f"resolution={RESOLUTION}", "source=prepared", f"train_data_dir={prepared}", "condition=canny", "shots=4",
          "train_batch_size=1", "max_train_steps=2", "mixed_precision=bf16", "validation_steps=0",
          "report_to=none", "num_threads=1", f"cache_dir={work / 'cache'}"],
         check_file(full / "diffusion_pytorch_model.safetensors", "ControlNet")),
        ("evaluate on the photos (canny, hed; bf16)",
         [PYTHON, "train/evaluate.py", *common, f"controlnets=[{meta}, {full}]", "conditions=[canny, hed]",
          "data.source=imagefolder", f"data.train_data_dir={photos}", f"settings.annotators={annotators}",
          f"resolution={RESOLUTION}", "settings.num_samples=4", "settings.num_inference_steps=2",
          "settings.batch_size=2", "mixed_precision=bf16", f"output_dir={evaluation}", "grid_samples=1"],
         check_evaluation(evaluation)),
    ]
    for name, command, check in stages:
        if not runner.run(name, command, check):
            return runner
    canny_map = work / "canny.png"
    from metacontrol.data.shards import PreparedTaskData

    batch = PreparedTaskData(prepared, "canny", RESOLUTION).item_tensors([0])
    from PIL import Image

    Image.fromarray((batch["conditioning_pixel_values"][0] * 255).round().byte().permute(1, 2, 0).numpy()).save(canny_map)
    runner.run("generate from a prepared canny map",
               [PYTHON, "-m", "metacontrol.cli", "generate", "--controlnet", str(full), "--image", str(canny_map),
                "--prompt", batch["caption"][0], "-o", str(work / "generated.png"), "--base", str(base),
                "--steps", "2", "--resolution", str(RESOLUTION)],
               check_file(work / "generated.png", "image"))
    return runner


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=None, help="where the temporary folder goes")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (base, outputs, logs)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds each stage may take (default 3600)")
    parser.add_argument("--processes", type=int, default=2, help="processes of prepare (default 2)")
    parser.add_argument("--meta-processes", type=int, default=None,
                        help="processes of meta-training (default --processes; each needs ~11.6 GB here)")
    args = parser.parse_args(argv)
    os.environ.update(real_shapes.child_env(), ACCELERATE_USE_CPU="1")
    started = time.perf_counter()
    with real_shapes.work_folder(args.work_dir, "metacontrol-sd15-smoke-", args.keep) as work:
        runner = run_all(work, args.timeout, args.processes, args.meta_processes or args.processes)
    command = shlex.join(["python", "bench/sd15_smoke.py", *(argv if argv is not None else sys.argv[1:])])
    print(f"\n### SD-1.5 smoke: random weights, 8 photos, {RESOLUTION} px, CPU, bf16, prepare on {args.processes} "
          f"process(es), meta-training on {args.meta_processes or args.processes}\n")
    print("\n".join(real_shapes.table(runner.results)))
    print(f"\nPeak RSS: per stage, of its largest process (GNU time; under torchrun, the launcher's own children "
          f"count). Total {(time.perf_counter() - started) / 60:.1f} min; {os.cpu_count()} CPUs."
          f"\nReproduce (from the repository root, in .venv): {command}")
    return 1 if any(r.ok is False for r in runner.results) else 0


if __name__ == "__main__":
    sys.exit(main())
