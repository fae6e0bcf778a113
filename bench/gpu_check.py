"""A GPU check at SD-1.5 shapes, ready to run on a machine with a CUDA GPU: meta-training vs a plain ControlNet
loop in fp32, bf16 and fp16 (and xformers when installed), then evaluation throughput.

    python bench/gpu_check.py                                   # CUDA, 512 px, ~5 minutes on an H100
    python bench/gpu_check.py --device cpu --resolution 64 --steps 1 --precisions fp32 bf16   # a dry run here

Random weights in the real SD 1.5 configs (``bench/throughput.py``'s ``build_base("sd15")``: UNet
320/640/1280/1280, CLIP-L-shaped text encoder, SD VAE), synthetic scenes rendered at ``--resolution``, cached
encodings (as training runs them). Per precision, side by side in one process:

- ``plain``: the loop of diffusers' ``train_controlnet.py`` through the project's ``ControlNetObjective``:
  AdamW, gradient clipping, ``--steps`` steps of batch ``--batch-size``;
- ``meta``: the body of ``meta_train.py`` (Reptile through ``MetaLearner``: a fresh inner Adam per task, 2 tasks
  x ``--steps`` inner steps, outer SGD), the same number of samples;

printing samples/s, peak GPU memory, the meta/plain time ratio and whether every loss stayed finite; then
``Evaluator`` images/s (a ControlNet pipeline, 20 DPM-Solver steps) in the weight dtype. fp16 uses autocast
and a GradScaler, as ``accelerate launch --mixed_precision fp16`` does. The table goes to stdout as markdown.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import throughput  # noqa: E402  (bench/throughput.py: the SD-1.5-shaped builder)

from metacontrol.controlnet import create_controlnet  # noqa: E402
from metacontrol.data.encoding_cache import encode_samples  # noqa: E402
from metacontrol.data.pools import synthetic_pools  # noqa: E402
from metacontrol.eval.harness import EvalSet, EvalSettings, Evaluator  # noqa: E402
from metacontrol.meta.algorithms import MetaLearner  # noqa: E402
from metacontrol.meta.episodes import TaskSampler, episode_loss  # noqa: E402
from metacontrol.objective import ControlNetObjective  # noqa: E402
from metacontrol.run import weight_dtype_of  # noqa: E402
from metacontrol.world import WorldConfig  # noqa: E402

TASKS = ["canny", "hed"]
PRECISIONS = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else math.nan


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def measure(args: argparse.Namespace, device: torch.device, precision: str, xformers: bool) -> dict:
    """One precision: plain and meta side by side on one ControlNet and one cached pool."""
    mixed = PRECISIONS[precision]
    dtype = weight_dtype_of(mixed)
    base = throughput.build_base("sd15").freeze(dtype, device)
    if xformers:
        base.denoiser.enable_xformers_memory_efficient_attention()
    pools = synthetic_pools(WorldConfig(resolution=args.resolution), TASKS, args.pool_size, show_progress=False)
    encodings = encode_samples(pools[TASKS[0]], base, show_progress=False)  # the pools share their images
    for pool in pools.values():
        pool.cached = encodings
    controlnet = create_controlnet(base).to(device).train()
    controlnet.enable_gradient_checkpointing()
    base.denoiser.enable_gradient_checkpointing()
    if xformers:
        controlnet.enable_xformers_memory_efficient_attention()
    params = list(controlnet.parameters())
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if mixed != "no" else None
    objective = ControlNetObjective(base, controlnet, dtype, autocast)
    scaler = torch.amp.GradScaler(device.type) if mixed == "fp16" else None
    losses: list[float] = []
    row = {"precision": precision + (" + xformers" if xformers else "")}

    # -- plain -----------------------------------------------------------------------------------------
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    data = pools[TASKS[0]]
    reset_peak(device)
    samples = 2 * args.steps * args.batch_size
    synchronize(device)
    started = time.perf_counter()
    for step in range(2 * args.steps):
        generator = torch.Generator().manual_seed(step)
        indices = torch.randperm(len(data), generator=generator)[: args.batch_size].tolist()
        loss = objective.loss(data.batch(indices), generator)
        losses.append(loss.detach().item())
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(optimizer) if scaler else optimizer.step()
        if scaler:
            scaler.update()
        optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    row["plain_s"], row["plain_gb"] = time.perf_counter() - started, peak_gb(device)
    row["plain_samples_s"] = samples / row["plain_s"]
    del optimizer

    # -- meta (Reptile) --------------------------------------------------------------------------------
    learner = MetaLearner(params, params, algorithm="reptile", inner_learning_rate=1e-5, grad_scaler=scaler)
    outer = torch.optim.SGD(params, lr=1.0)
    sampler = TaskSampler(tasks=TASKS, pool_sizes={t: len(p) for t, p in pools.items()}, tasks_per_step=2,
                          inner_steps=args.steps, support_batch_size=args.batch_size,
                          query_batch_size=args.batch_size)
    reset_peak(device)
    synchronize(device)
    started = time.perf_counter()
    learner.begin()
    for episode in sampler.episodes(0):
        losses += learner.adapt([episode_loss(objective, pools[episode.task].batch(episode.indices(k)), episode, k)
                                 for k in range(len(episode.support))])
        learner.accumulate(None)
    learner.finish(2)
    outer.step()
    outer.zero_grad(set_to_none=True)
    synchronize(device)
    row["meta_s"], row["meta_gb"] = time.perf_counter() - started, peak_gb(device)
    row["meta_samples_s"] = samples / row["meta_s"]
    row["ratio"] = row["meta_s"] / row["plain_s"]
    row["finite"] = all(math.isfinite(v) for v in losses) and all(torch.isfinite(p).all() for p in params)

    # -- evaluation throughput -------------------------------------------------------------------------
    controlnet.eval().to(dtype)
    pool = pools[TASKS[0]]
    n = args.eval_images
    maps = list(pool.conditions[:n].permute(0, 2, 3, 1).numpy())
    images = list(pool.images[:n].permute(0, 2, 3, 1).numpy())
    eval_set = EvalSet(TASKS[0], maps, list(pool.captions[:n]), images, [])
    evaluator = Evaluator(base, {TASKS[0]: eval_set}, EvalSettings(num_samples=n, num_inference_steps=20, batch_size=n))
    reset_peak(device)
    synchronize(device)
    started = time.perf_counter()
    evaluator.generate(controlnet, TASKS[0])
    synchronize(device)
    row["eval_images_s"], row["eval_gb"] = n / (time.perf_counter() - started), peak_gb(device)
    del base, controlnet, learner, evaluator
    reset_peak(device)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4, help="inner steps per task (plain runs 2x as many)")
    parser.add_argument("--pool-size", type=int, default=16)
    parser.add_argument("--eval-images", type=int, default=8)
    parser.add_argument("--precisions", nargs="+", choices=list(PRECISIONS), default=list(PRECISIONS))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; use --device cpu for a dry run", file=sys.stderr)
        return 2
    try:
        import xformers  # noqa: F401

        variants = [(p, False) for p in args.precisions] + [(p, True) for p in args.precisions if p != "fp32"]
    except ImportError:
        variants = [(p, False) for p in args.precisions]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"### GPU check: SD-1.5 shapes, random weights, {args.resolution} px, batch {args.batch_size}, {name}, "
          f"torch {torch.__version__}\n")
    print("| precision | plain samples/s | meta samples/s | meta/plain time | plain peak GB | meta peak GB | "
          "losses finite | eval images/s (20 steps) | eval peak GB |")
    print("|---|---:|---:|---:|---:|---:|---|---:|---:|")
    ok = True
    for precision, xformers in variants:
        if precision == "fp16" and device.type != "cuda":
            continue
        r = measure(args, device, precision, xformers)
        ok &= r["finite"]
        print(f"| {r['precision']} | {r['plain_samples_s']:.2f} | {r['meta_samples_s']:.2f} | {r['ratio']:.2f} | "
              f"{r['plain_gb']:.1f} | {r['meta_gb']:.1f} | {'yes' if r['finite'] else '**no**'} | "
              f"{r['eval_images_s']:.2f} | {r['eval_gb']:.1f} |", flush=True)
    print(f"\nReproduce: {shlex.join(['python', 'bench/gpu_check.py', *(argv if argv is not None else sys.argv[1:])])}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
