"""Measure the embedded base model: VAE PSNR and prompt following on held-out synthetic scenes.

    python bench/base_quality.py [--model checkpoints/tiny-sd] [--samples 48]

Prints a markdown table and writes bench/results/base_quality.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from metacontrol.errors import run_main  # noqa: E402
from metacontrol.eval.base_quality import base_model_quality  # noqa: E402
from metacontrol.models.base import load_base_model  # noqa: E402
from metacontrol.world import WorldConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="checkpoints/tiny-sd")
    parser.add_argument("--samples", type=int, default=48)
    parser.add_argument("--output", default="bench/results/base_quality.json")
    args = parser.parse_args()
    start = time.time()
    base = load_base_model(args.model).freeze()
    quality = base_model_quality(base, WorldConfig(resolution=base.denoiser.config.sample_size * base.vae_scale_factor),
                                 num_samples=args.samples)
    quality["seconds"] = round(time.time() - start, 1)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(quality, indent=2))
    print("| metric | value |\n|---|---|")
    for key, value in quality.items():
        print(f"| {key} | {value:.3f} |" if isinstance(value, float) else f"| {key} | {value} |")


if __name__ == "__main__":
    run_main(main, "bench/base_quality.py")
