"""One meta-step against one plain step for SDXL, SD3 and Flux at their published widths, on the CPU, with memory.

    python bench/family_shapes.py [--families sdxl sd3 flux] [--resolution 64]

Why: the tiny family tests pass at widths of 16 or 32, where head sizes, 1280-, 1536- and 3072-wide blocks, 4096-wide
T5 tokens, 16-channel latents and packed Flux latents cannot go wrong. Here each family's denoiser and ControlNet are
built from the published configs (SDXL base 1.0, SD3 medium, Flux.1-dev) with random weights, but with fewer blocks,
as many as this 24 GB machine holds beside other jobs (``DEPTHS``; the full-depth memory is on paper in
BENCHMARKS.md). The denoiser runs in bf16 and the ControlNet trains in fp32 under bf16 autocast, with gradient
checkpointing, as the family recipes (``configs/meta_*.yaml``) set it. Prompt encodings are random tensors in the
shapes the family's encoders give (tokens x width, pooled): what the encoding cache hands the loop, so the text
encoders are not loaded (T5-XXL alone is 19 GB in fp32). Latents likewise come as cached posteriors; the VAE
(published widths) encodes the condition map where the family needs it (SD3, Flux).

Per family, in a subprocess of its own (so each peak is its own), at batch 1:

(a) ``plain``: one fine-tuning step (the family's loss, AdamW on the ControlNet, clipping);
(b) ``meta``: one Reptile meta-step of ``meta_train.py``'s loop body: 2 tasks x 2 inner steps (``MetaLearner``,
    inner Adam for SDXL and SD3, inner SGD for Flux as ``configs/meta_flux.yaml``), then the outer SGD step.

Each is run once to warm up and once timed, then (a) once more after (b), so that a change in the machine's load
shows. The ratio is (b) per inner step against the mean of the two (a): what the meta-learner costs beyond the
steps themselves. Memory is each variant's peak RSS (its warm-up, where its state is allocated) above the
RSS with the models loaded: gradients, optimiser moments, the Reptile snapshot and meta-gradient, and activations.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # before torch is imported

import argparse  # noqa: E402
import ctypes  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import metacontrol  # noqa: E402, F401, I001  (before diffusers: it quiets bitsandbytes' 4-bit kernel warning)
from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel  # noqa: E402
from throughput import _status_kb, measure_peak  # noqa: E402

from metacontrol.families import FAMILIES  # noqa: E402
from metacontrol.meta.algorithms import MetaLearner, outer_step  # noqa: E402
from metacontrol.models.base import BaseModel  # noqa: E402
from metacontrol.models.random_bases import SDXL_UNET_BLOCKS, sdxl_unet  # noqa: E402
from metacontrol.objective import ControlNetObjective  # noqa: E402

# The published denoisers (SD3 medium's and Flux.1-dev's transformer configs) and VAEs.
SD3_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
                  num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                  pooled_projection_dim=2048, pos_embed_max_size=192)
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
VAE_BLOCKS = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
VAES = {"sdxl": dict(latent_channels=4, scaling_factor=0.13025),
        "sd3": dict(latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609),
        "flux": dict(latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159)}
# Fewer blocks than published, so that each fits here: SDXL's deepest level 2 transformer layers instead of 10;
# SD3 6 of 24 layers (its ControlNet then takes 5); Flux 1 double and 2 single blocks of 19 and 38 (ControlNet the same).
DEPTHS = {"sdxl": {"transformer_layers_per_block": (1, 2, 2)}, "sd3": {"num_layers": 6},
          "flux": {"num_layers": 1, "num_single_layers": 2}}
# What the encoding cache holds per prompt: (tokens, width) per token, and the pooled width.
TEXT_SHAPES = {"sdxl": ((77, 2048), 1280), "sd3": ((77 + 256, 4096), 2048), "flux": ((512, 4096), 768)}
INNER_OPTIMIZER = {"sdxl": "adam", "sd3": "adam", "flux": "sgd"}
TASKS, INNER_STEPS = 2, 2


def build(family_name: str) -> BaseModel:
    """The family's base in fp32 (no text encoders), random weights."""
    torch.manual_seed(0)
    if family_name == "sdxl":
        denoiser = sdxl_unet({**SDXL_UNET_BLOCKS, **DEPTHS["sdxl"]}, 2048, 1280, 256)
        from metacontrol.models.tiny import build_noise_scheduler

        scheduler = build_noise_scheduler()
    else:
        from diffusers import FlowMatchEulerDiscreteScheduler

        cls, config = (SD3Transformer2DModel, SD3_MEDIUM) if family_name == "sd3" else (FluxTransformer2DModel, FLUX_DEV)
        denoiser = cls(**{**config, **DEPTHS[family_name]})
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    vae = AutoencoderKL(**VAE_BLOCKS, **VAES[family_name])
    return BaseModel(vae=vae, denoiser=denoiser, text_encoder=None, tokenizer=None, noise_scheduler=scheduler,
                     location=f"random:{family_name}",
                     family=next(f for f in FAMILIES.values() if f.name == family_name))


def batch(family_name: str, base: BaseModel, resolution: int, seed: int) -> dict[str, torch.Tensor]:
    """One cached-style sample: posterior mean/std of the latents, prompt encodings, the condition map in pixels."""
    g = torch.Generator().manual_seed(seed)
    latent = (base.vae.config.latent_channels, resolution // base.vae_scale_factor, resolution // base.vae_scale_factor)
    (tokens, width), pooled = TEXT_SHAPES[family_name]
    return {"latent_mean": torch.randn(1, *latent, generator=g), "latent_std": torch.full((1, *latent), 0.05),
            "text_embeds": torch.randn(1, tokens, width, generator=g), "pooled_text_embeds": torch.randn(1, pooled, generator=g),
            "conditioning_pixel_values": torch.rand(1, 3, resolution, resolution, generator=g)}


def measure(family_name: str, resolution: int) -> dict:
    """Build, then time and measure the plain step and the meta-step (each warmed up once)."""
    started = time.perf_counter()
    base = build(family_name)
    controlnet = base.family.new_controlnet(base).train()  # from the fp32 denoiser, as set_up_run makes it
    base.freeze(torch.bfloat16)  # then the denoiser in bf16; the VAE stays fp32
    for module in (controlnet, base.denoiser):
        module.enable_gradient_checkpointing()
    built = time.perf_counter() - started
    models_mb = resident_mb()
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    objective = ControlNetObjective(base, controlnet, torch.bfloat16, autocast)
    params = [p for p in controlnet.parameters() if p.requires_grad]
    batches = [batch(family_name, base, resolution, seed) for seed in range(TASKS * INNER_STEPS)]

    def loss(k: int) -> Callable[[], torch.Tensor]:
        return lambda: objective.loss(batches[k], torch.Generator().manual_seed(k))

    optimizer = torch.optim.AdamW(params, lr=1e-5)

    def plain() -> None:
        loss(0)().backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds: dict[str, float] = {}
    memory: dict[str, tuple[float, float] | None] = {}

    def timed(name: str, step: Callable[[], None]) -> None:
        memory[name] = measure_peak(step)  # the warm-up allocates the optimiser's or meta-learner's state
        t = time.perf_counter()
        step()
        seconds[name] = time.perf_counter() - t

    timed("plain", plain)
    optimizer.state.clear()  # its moments must not count against the meta-step
    learner = MetaLearner(params, params, algorithm="reptile", inner_optimizer=INNER_OPTIMIZER[family_name],
                          inner_learning_rate=1e-5, max_grad_norm=1.0)
    outer = torch.optim.SGD(params, lr=1.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(outer, lambda _: 1.0)

    def meta() -> None:
        learner.begin()
        for task in range(TASKS):
            learner.adapt([loss(task * INNER_STEPS + k) for k in range(INNER_STEPS)])
            learner.accumulate()
        learner.finish(TASKS)
        outer_step(outer, schedule, params, 0.0)

    timed("meta", meta)
    # The meta-learner's state freed, the plain step again: drift in the machine's load between the variants then
    # shows (the ratio takes the mean of both plain steps).
    learner = outer = None
    gc.collect()
    t = time.perf_counter()
    plain()
    seconds["plain_after"] = time.perf_counter() - t
    above = {name: peak[1] - models_mb if peak else None for name, peak in memory.items()}
    millions = lambda m: sum(p.numel() for p in m.parameters()) / 1e6  # noqa: E731
    return {"family": family_name, "denoiser_m": millions(base.denoiser), "controlnet_m": millions(controlnet),
            "vae_m": millions(base.vae), "controlnet_class": type(controlnet).__name__, "build_s": built,
            "seconds": seconds, "above_models_mb": above, "models_mb": models_mb, "inner_optimizer": INNER_OPTIMIZER[family_name],
            "depth": DEPTHS[family_name], "finite": all(torch.isfinite(p).all() for p in params)}


def resident_mb() -> float:
    """The resident set now, after returning freed heap to the OS."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return _status_kb("VmRSS") / 1024


def table(rows: list[dict], resolution: int) -> str:
    lines = ["| family | denoiser / ControlNet (M params, depth cut) | plain step, before / after (s) | meta-step (s) | "
             "meta per inner step / plain | models loaded (MB) | peak above them: plain / meta (MB) | "
             "meta: bytes per ControlNet parameter above the models |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        s, m = r["seconds"], r["above_models_mb"]
        per_step = s["meta"] / (TASKS * INNER_STEPS) / ((s["plain"] + s["plain_after"]) / 2)
        plain_mb, meta_mb = (m[k] if m[k] is not None else float("nan") for k in ("plain", "meta"))
        depth = ", ".join(f"{k} {v}" for k, v in r["depth"].items())
        lines.append(f"| {r['family']} ({r['controlnet_class']}, inner {r['inner_optimizer']}) | {r['denoiser_m']:,.0f} / "
                     f"{r['controlnet_m']:,.0f} ({depth}) | {s['plain']:.1f} / {s['plain_after']:.1f} | {s['meta']:.1f} | "
                     f"{per_step:.2f}x | {r['models_mb']:,.0f} | {plain_mb:,.0f} / {meta_mb:,.0f} | "
                     f"{meta_mb * 2**20 / (r['controlnet_m'] * 1e6):.1f} |")
    return "\n".join(lines) + (f"\n\n{resolution} px, batch 1, {TASKS} tasks x {INNER_STEPS} inner steps per meta-step, "
                               "one torch thread, bf16 autocast, gradient checkpointing.")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=["sdxl", "sd3", "flux"], choices=list(DEPTHS))
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--one", choices=list(DEPTHS), help=argparse.SUPPRESS)  # the per-family subprocess
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.one:
        print(json.dumps(measure(args.one, args.resolution)))
        return
    rows = []
    for name in args.families:
        started = time.perf_counter()
        done = subprocess.run([sys.executable, __file__, "--one", name, "--resolution", str(args.resolution)],
                              capture_output=True, text=True, cwd=REPO)
        if done.returncode != 0:
            print(f"{name}: failed ({done.returncode}):\n{done.stderr[-3000:]}", file=sys.stderr)
            sys.exit(1)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"{name}: done in {time.perf_counter() - started:.0f} s", flush=True)
    print("\n" + table(rows, args.resolution))
    bad = [r["family"] for r in rows if not r["finite"]]
    print(f"\n$ {shlex.join(['python', 'bench/family_shapes.py', *(argv if argv is not None else sys.argv[1:])])}")
    if bad:
        print(f"non-finite ControlNet weights after the steps: {', '.join(bad)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
