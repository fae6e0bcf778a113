"""How much a ControlNet's output depends on its condition map: the live or dead condition path of each start.

    python bench/condition_path.py FOLDER [FOLDER ...] [--base checkpoints/tiny-sd] [--condition canny] [--scenes 16]

Why: a start that fine-tunes no better than nothing in 100 steps may have learned to ignore its input. For each
ControlNet and each of ``--scenes`` test scenes it feeds the same noisy latent, timestep and prompt with two condition
maps (the scene's own ``--condition`` map and another scene's) and prints, as mean [min, max] over scenes:

- the condition embedding's output size (max |e|; it is the only path from the map into the ControlNet) and how much
  it changes between the two maps;
- the size of the residuals the ControlNet adds to the UNet, and how much they change between the two maps, relative
  to their size (0: the map does not matter).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from metacontrol.controlnet import create_controlnet  # noqa: E402
from metacontrol.data.pools import synthetic_pools  # noqa: E402
from metacontrol.models.base import load_base_model  # noqa: E402
from metacontrol.world import WorldConfig  # noqa: E402


@torch.no_grad()
def measure(base, folder: str, condition: str, scenes: int, resolution: int) -> dict[str, list[float]]:
    controlnet = create_controlnet(base, folder).eval()
    pool = synthetic_pools(WorldConfig(resolution=resolution), [condition], scenes, "test", show_progress=False)[condition]
    maps = pool.conditions.float() / 255.0
    prompts = base.encode_prompts(pool.captions)["text_embeds"]
    size = resolution // base.vae_scale_factor
    out: dict[str, list[float]] = {"embedding": [], "embedding change": [], "residual": [], "relative change": []}
    for i in range(scenes):
        g = torch.Generator().manual_seed(i)
        latent = torch.randn(1, base.denoiser.config.in_channels, size, size, generator=g)
        results = []
        for j in (i, (i + 1) % scenes):  # the scene's own map, then the next scene's
            cond = maps[j : j + 1]
            down, mid = controlnet(latent, torch.tensor([500]), prompts[i : i + 1], cond, return_dict=False)
            results.append((controlnet.controlnet_cond_embedding(cond), torch.cat([t.flatten() for t in (*down, mid)])))
        (e0, r0), (e1, r1) = results
        out["embedding"].append(float(e0.abs().max()))
        out["embedding change"].append(float((e0 - e1).abs().max()))
        out["residual"].append(float(r0.abs().max()))
        out["relative change"].append(float((r0 - r1).norm() / r0.norm().clamp_min(1e-12)))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", help="ControlNet folders (diffusers format)")
    parser.add_argument("--base", default="checkpoints/tiny-sd")
    parser.add_argument("--condition", default="canny")
    parser.add_argument("--scenes", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=64)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    base = load_base_model(args.base).freeze()
    columns = ["embedding", "embedding change", "residual", "relative change"]
    print(f"| ControlNet | {' | '.join(columns)} |\n|---|{'---:|' * len(columns)}")
    for folder in args.folders:
        values = measure(base, folder, args.condition, args.scenes, args.resolution)
        cells = [f"{np.mean(values[c]):.3g} [{np.min(values[c]):.3g}, {np.max(values[c]):.3g}]" for c in columns]
        print(f"| {folder} | {' | '.join(cells)} |", flush=True)
    print(f"\nmean [min, max] over {args.scenes} test scenes, {args.condition} maps, timestep 500; "
          f"$ python bench/condition_path.py {' '.join(argv if argv is not None else sys.argv[1:])}")


if __name__ == "__main__":
    main()
