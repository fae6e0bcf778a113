"""Do SD 1.x/2.x runs give the same bytes as an earlier revision? Meta-training, fine-tuning and evaluation on the
shipped tiny model, each run by this checkout and by ``--before`` (a git worktree), then compared file by file.

    python bench/sd_reproduces.py [--before bc8175e] [--work-dir /tmp/sd-reproduces]     # ~3 min on 2 CPU cores

bc8175e is the last commit before ``metacontrol/families``. Prints one line per file (sha256 equal or not) and exits
1 if any differs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUNS = {  # name -> script and overrides; every run writes only under the work folder
    "meta": ["meta_train.py", "meta.max_meta_steps=3", "data.pool_size=16", "validation_steps=0", "report_to=none"],
    "finetune": ["train/finetune.py", "max_train_steps=3", "validation_steps=0", "report_to=none"],
    "evaluate": ["train/evaluate.py", "conditions=[scribble]", "settings.num_samples=4"],
}
COMPARED = {"meta": ["diffusion_pytorch_model.safetensors"], "finetune": ["diffusion_pytorch_model.safetensors"],
            "evaluate": ["grid_joint-3x-controlnet-tiny.png"]}


def run_all(checkout: Path, out: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(checkout), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    for name, (script, *overrides) in RUNS.items():
        extra = [] if name == "evaluate" else [f"cache_dir={out / 'cache'}", "num_threads=1"]
        subprocess.run([sys.executable, script, f"output_dir={out / name}", *overrides, *extra], cwd=checkout,
                       env=env, check=True, capture_output=True)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default="bc8175e")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/sd-reproduces"))
    args = parser.parse_args()
    before = args.work_dir / f"checkout-{args.before}"
    if not before.is_dir():
        subprocess.run(["git", "worktree", "add", "--detach", str(before), args.before], cwd=REPO, check=True,
                       capture_output=True)
    outs = {"before": args.work_dir / "before", "now": args.work_dir / "now"}
    run_all(before, outs["before"])
    run_all(REPO, outs["now"])
    same = True
    for name, files in COMPARED.items():
        for file in files:
            a, b = (sha256(outs[k] / name / file) for k in ("before", "now"))
            same &= a == b
            print(f"{name}/{file}: {'identical' if a == b else 'DIFFERENT'} ({b[:16]})")
    metrics = [json.loads((outs[k] / "evaluate/metrics.json").read_text())["results"] for k in ("before", "now")]
    same &= metrics[0] == metrics[1]
    print(f"evaluate/metrics.json results: {'identical' if metrics[0] == metrics[1] else 'DIFFERENT'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
