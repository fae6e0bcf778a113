"""Training throughput on the CPU: a plain ControlNet loop vs meta-training, without and with the cache.

    python bench/throughput.py [--quick] [--configs tiny sd15 scaling] [--rounds N] [--threads N]

Three variants train the same ControlNet on the same synthetic images, the same number of samples per
round, interleaved a, b, c, a, b, c... in one process, so that load from other jobs hits all of them
alike; ratios are taken per round (rounds run back to back), then the median over rounds:

(a) ``plain``: single-task ControlNet training written the way diffusers' ``train_controlnet.py`` does
    it: the VAE encodes and the text encoder embeds every batch; AdamW; gradient clipping;
(b) ``meta``: the loop body of ``meta_train.py`` (Reptile: TaskSampler episodes, ControlNetObjective,
    MetaLearner with a fresh inner Adam per task, outer SGD), reading images and captions;
(c) ``meta+cache``: the same with cached encodings (``metacontrol.data.encoding_cache``); building the cache is
    timed separately, as the one-off cost it is.

Configurations: ``tiny``, the embedded default architecture (TinySDConfig, random weights) at 64 px
with the default meta settings; ``sd15``, random weights in real SD 1.5 shapes (UNet widths
320/640/1280/1280, 4 down blocks of 2 layers, cross-attention 768; VAE 128/256/512/512; a CLIP
ViT-L-shaped text encoder: 768 wide, 12 layers, 77 tokens, 49408-word vocabulary) at 64 px, batch 1,
so the cost structure of the real model shows on a CPU in seconds per step; ``scaling``: the tiny
model as tasks per meta-step, inner steps and resolution grow.

Memory is the peak resident set of a variant's first round (its optimiser or meta-learner state is
allocated inside it) above the resident set before it, after returning freed memory to the OS; that
round is also the warm-up. The meta-update (begin / accumulate / finish and the outer step) is timed
and its buffers are counted against the trainable parameters. One torch thread by default: on a CPU
shared with other jobs, OpenMP threads that wait for each other at every op make two threads slower
than one, and far noisier.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # before torch is imported, or its pools are already sized

import argparse  # noqa: E402
import ctypes  # noqa: E402
import gc  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, replace  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

from metacontrol.config import MetaConfig  # noqa: E402
from metacontrol.controlnet import create_controlnet  # noqa: E402
from metacontrol.data.encoding_cache import attach_encodings, model_material  # noqa: E402
from metacontrol.data.pools import TaskData, TensorPool, synthetic_pools  # noqa: E402
from metacontrol.meta.algorithms import MetaLearner  # noqa: E402
from metacontrol.meta.episodes import TaskSampler, episode_loss  # noqa: E402
from metacontrol.models.base import BaseModel  # noqa: E402
from metacontrol.models.tiny import (  # noqa: E402
    TinySDConfig,
    build_noise_scheduler,
    build_tokenizer,
    tiny_pipeline,
)
from metacontrol.objective import ControlNetObjective  # noqa: E402
from metacontrol.world import WorldConfig, vocabulary  # noqa: E402

VARIANTS = {"a": "plain (VAE + text encoder every step)", "b": "meta, no cache", "c": "meta + cache"}
TASKS = ["canny", "hed", "depth", "pose"]
MB = 2**20
Memory = tuple[float, float] | None  # (peak above start, peak) in MB


@dataclass(frozen=True)
class Setting:
    """One measured workload: the model, the data resolution, and the meta-step's shape."""

    model: str  # "tiny" or "sd15"
    resolution: int
    batch_size: int
    tasks_per_meta_step: int
    inner_steps: int
    pool_size: int

    @property
    def steps_per_round(self) -> int:
        return self.tasks_per_meta_step * self.inner_steps

    @property
    def samples_per_round(self) -> int:
        return self.steps_per_round * self.batch_size


SETTINGS = {"tiny": Setting("tiny", 64, 8, 2, 4, 64), "sd15": Setting("sd15", 64, 1, 2, 4, 4)}


# -- models ---------------------------------------------------------------------------------------------
def build_base(model: str) -> BaseModel:
    """Random weights, built with the real diffusers / transformers classes, frozen in fp32."""
    torch.manual_seed(0)
    if model == "tiny":
        pipe = tiny_pipeline(TinySDConfig(), vocabulary())
        vae, unet, text_encoder, tokenizer = pipe.vae, pipe.unet, pipe.text_encoder, pipe.tokenizer
    else:
        tokenizer = build_tokenizer(vocabulary(), 77)
        unet = UNet2DConditionModel(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                                    cross_attention_dim=768, attention_head_dim=8)  # SD 1.5's block types
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77, projection_dim=768,
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id))  # fmt: skip
    return BaseModel(vae=vae, denoiser=unet, text_encoder=text_encoder, tokenizer=tokenizer,
                     noise_scheduler=build_noise_scheduler(), location=f"random:{model}").freeze()


def millions(module: torch.nn.Module) -> str:
    return f"{sum(p.numel() for p in module.parameters()) / 1e6:.1f} M"


# -- memory ---------------------------------------------------------------------------------------------
def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def measure_peak(run: Callable[[], None]) -> Memory:
    """(peak RSS above the starting RSS, peak RSS) in MB while ``run`` runs; None off Linux."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap back to the OS: a clean baseline
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (the peak) to the current RSS
        start = _status_kb("VmRSS")
    except OSError:
        run()
        return None
    run()
    peak = _status_kb("VmHWM")
    return (peak - start) / 1024, peak / 1024


# -- the workload ---------------------------------------------------------------------------------------
class Workload:
    """One setting's models and data, and a factory for each variant's round."""

    def __init__(self, setting: Setting, base: BaseModel, cache_dir: Path) -> None:
        self.setting, self.base = setting, base
        self.controlnet = create_controlnet(base).train()
        self.params = list(self.controlnet.parameters())
        tasks = TASKS[: max(2, setting.tasks_per_meta_step)]
        world = WorldConfig(resolution=setting.resolution)
        self.uncached: dict[str, TaskData] = dict(synthetic_pools(world, tasks, setting.pool_size,
                                                                  show_progress=False))
        self.cached, self.encode_s = self._attach(cache_dir)  # the first run encodes and writes
        _, self.load_s = self._attach(cache_dir)  # a second run reads
        started = time.perf_counter()
        model_material(base)
        self.key_s = time.perf_counter() - started  # included in both attach timings
        self.cache_bytes = sum(f.stat().st_size for f in cache_dir.rglob("*.safetensors"))
        self.objective = ControlNetObjective(base, self.controlnet)
        self.meta = MetaConfig(tasks_per_meta_step=setting.tasks_per_meta_step,
                               inner_steps=setting.inner_steps, support_batch_size=setting.batch_size)
        self.sampler = TaskSampler(tasks=tasks, pool_sizes={t: len(d) for t, d in self.uncached.items()},
                                   tasks_per_step=setting.tasks_per_meta_step, inner_steps=setting.inner_steps,
                                   support_batch_size=setting.batch_size, query_batch_size=setting.batch_size)
        self.overhead_s: dict[str, float] = {}
        self.reset_overhead()
        self.learner_bytes = 0

    def _attach(self, cache_dir: Path) -> tuple[dict[str, TaskData], float]:
        """New pool objects over the same content with encodings attached, and the seconds it took."""
        pools: dict[str, TaskData] = {t: TensorPool(p.images, p.conditions, p.captions)
                                      for t, p in self.uncached.items()}
        started = time.perf_counter()
        attach_encodings(pools, self.base, cache_dir=cache_dir, show_progress=False)
        return pools, time.perf_counter() - started

    def reset_overhead(self) -> None:
        self.overhead_s = {"begin": 0.0, "accumulate": 0.0, "finish + outer step": 0.0}

    @torch.no_grad()
    def encoder_seconds(self, repeats: int = 3) -> tuple[float, float]:
        """Median seconds of one batch's VAE and text encoding: what the cache takes out of a step."""
        batch = self.uncached[self.sampler.tasks[0]].item_tensors(range(self.setting.batch_size))
        vae, text = [], []
        for _ in range(repeats):
            started = time.perf_counter()
            self.base.vae.encode(batch["pixel_values"])
            vae.append(time.perf_counter() - started)
            started = time.perf_counter()
            self.base.encode_prompts(batch["caption"])
            text.append(time.perf_counter() - started)
        return statistics.median(vae), statistics.median(text)

    def variant(self, name: str, round_index: int) -> Callable[[], None]:
        """Set up a variant's state (optimiser, meta-learner) and return its round, to time or measure."""
        if name == "a":
            return self._plain(round_index)
        return self._meta(self.uncached if name == "b" else self.cached, round_index)

    def _plain(self, round_index: int) -> Callable[[], None]:
        base, s = self.base, self.setting
        data = self.uncached[self.sampler.tasks[0]]
        optimizer = torch.optim.AdamW(self.params, lr=self.meta.inner_learning_rate)
        # As in a loop that has been running: the optimiser state exists before the first timed step.
        for p in self.params:
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        generator = torch.Generator().manual_seed(round_index)
        num_timesteps = base.noise_scheduler.config.num_train_timesteps

        def run() -> None:
            for _ in range(s.steps_per_round):
                indices = torch.randperm(len(data), generator=generator)[: s.batch_size].tolist()
                batch = data.item_tensors(indices)
                with torch.no_grad():
                    latents = base.vae.encode(batch["pixel_values"]).latent_dist.sample(generator)
                    latents = latents * base.vae.config.scaling_factor
                    ids = base.tokenizer(batch["caption"], padding="max_length", truncation=True,
                                         max_length=base.tokenizer.model_max_length,
                                         return_tensors="pt").input_ids
                    text = base.text_encoder(ids)[0]
                noise = torch.randn(latents.shape, generator=generator)
                timesteps = torch.randint(0, num_timesteps, (latents.shape[0],), generator=generator)
                noisy = base.noise_scheduler.add_noise(latents, noise, timesteps)
                down, mid = self.controlnet(noisy, timesteps, encoder_hidden_states=text, return_dict=False,
                                            controlnet_cond=batch["conditioning_pixel_values"])
                pred = base.denoiser(noisy, timesteps, encoder_hidden_states=text,
                                 down_block_additional_residuals=down,
                                 mid_block_additional_residual=mid).sample
                F.mse_loss(pred.float(), noise.float()).backward()
                torch.nn.utils.clip_grad_norm_(self.params, self.meta.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

        return run

    def _meta(self, data: dict[str, TaskData], round_index: int) -> Callable[[], None]:
        m = self.meta
        learner = MetaLearner(self.params, self.params, algorithm="reptile", inner_optimizer=m.inner_optimizer,
                              inner_learning_rate=m.inner_learning_rate, max_grad_norm=m.max_grad_norm)
        self.learner_bytes = sum(b.numel() * b.element_size() for b in learner.snapshot.buffers)
        self.learner_bytes += learner.meta_grad_flat.numel() * learner.meta_grad_flat.element_size()
        outer = torch.optim.SGD(self.params, lr=m.outer_learning_rate)
        episodes = self.sampler.episodes(round_index)
        timed = self.overhead_s

        def run() -> None:
            started = time.perf_counter()
            learner.begin()
            timed["begin"] += time.perf_counter() - started
            for episode in episodes:
                learner.adapt([episode_loss(self.objective, data[episode.task].batch(episode.indices(k)), episode, k)
                               for k in range(len(episode.support))])
                started = time.perf_counter()
                learner.accumulate(None)
                timed["accumulate"] += time.perf_counter() - started
            started = time.perf_counter()
            learner.finish(m.tasks_per_meta_step)
            torch.nn.utils.clip_grad_norm_(self.params, m.max_grad_norm)
            outer.step()
            outer.zero_grad(set_to_none=True)
            timed["finish + outer step"] += time.perf_counter() - started

        return run


def first_rounds(workload: Workload) -> dict[str, Memory]:
    """Each variant's first round, alone and with its state created inside: its memory, and a warm-up."""
    memory = {v: measure_peak(lambda v=v: workload.variant(v, 0)()) for v in VARIANTS}
    workload.reset_overhead()
    return memory


def timed_rounds(workload: Workload, variants: str, rounds: int, first_round: int,
                 faults: dict[str, list[int]] | None = None) -> dict[str, list[float]]:
    """Seconds per round of each variant, interleaved; set-up (optimiser, learner) is not timed.

    ``faults`` collects each round's minor page faults: fresh memory touched for the first time, which
    costs a CPU far more than its size suggests.
    """
    seconds: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(rounds):
        for v in variants:
            run = workload.variant(v, first_round + r)
            faulted = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            started = time.perf_counter()
            run()
            seconds[v].append(time.perf_counter() - started)
            if faults is not None:
                faults.setdefault(v, []).append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faulted)
            del run
            gc.collect()
    return seconds


# -- reporting ------------------------------------------------------------------------------------------
def rate(setting: Setting, seconds: list[float]) -> float:
    return setting.samples_per_round / statistics.median(seconds)


def ratio(seconds: dict[str, list[float]], faster: str, slower: str = "a") -> float:
    """Median over rounds of the per-round speed ratio: a round's variants ran back to back."""
    return statistics.median(s / f for s, f in zip(seconds[slower], seconds[faster]))


def _mb(memory: Memory, i: int) -> str:
    return f"{memory[i]:,.0f}" if memory else "n/a"


def main_table(workload: Workload, seconds: dict[str, list[float]], memory: dict[str, Memory],
               faults: dict[str, list[int]]) -> list[str]:
    s, rounds = workload.setting, len(seconds["a"])
    lines = [f"### `{s.model}` at {s.resolution} px: batch {s.batch_size}, {s.tasks_per_meta_step} tasks x "
             f"{s.inner_steps} inner step(s) = {s.samples_per_round} samples per round, "
             f"{rounds} timed round(s)",
             "",
             "| variant | samples/s (median) | vs (a) | s/round (min-max) | page faults/round (median) "
             "| peak RSS above start (MB) | peak RSS (MB) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for v, label in VARIANTS.items():
        speedup = ratio(seconds, v) if v != "a" else 1.0
        lines.append(f"| ({v}) {label} | {rate(s, seconds[v]):.3g} | {speedup:.3f}x "
                     f"| {min(seconds[v]):.2f}-{max(seconds[v]):.2f} | {statistics.median(faults[v]):,.0f} "
                     f"| {_mb(memory[v], 0)} | {_mb(memory[v], 1)} |")
    step_s = statistics.median(seconds["a"]) / s.steps_per_round
    vae_s, text_s = workload.encoder_seconds()
    overhead = {k: t / (2 * rounds) for k, t in workload.overhead_s.items()}  # (b) and (c) rounds
    total = sum(overhead.values())
    trainable = sum(p.numel() * p.element_size() for p in workload.params)
    base = workload.base
    lines += [
        "",
        f"- Parameters: ControlNet {millions(workload.controlnet)}, UNet {millions(base.denoiser)}, "
        f"VAE {millions(base.vae)}, text encoder {millions(base.text_encoder)}.",
        f"- Cost structure: per batch of {s.batch_size}, VAE encoding {vae_s:.3f} s + text encoding "
        f"{text_s:.3f} s = {100 * (vae_s + text_s) / step_s:.0f}% of a plain step ({step_s:.2f} s): "
        f"skipping them can make a step at most {step_s / max(step_s - vae_s - text_s, 1e-9):.2f}x faster "
        f"(measured (c) vs (a): {ratio(seconds, 'c'):.2f}x).",
        "- Meta-update per meta-step: " + ", ".join(f"{k} {1000 * t:.1f} ms" for k, t in overhead.items())
        + f"; total {1000 * total:.1f} ms = {100 * total / step_s:.1f}% of one plain training step, "
        f"{100 * total / (step_s * s.steps_per_round):.1f}% of this meta-step's {s.steps_per_round} steps.",
        f"- Meta-update memory: snapshot + meta-gradient buffers {workload.learner_bytes / MB:,.1f} MB = "
        f"{workload.learner_bytes / trainable:.2f} x the trainable parameters ({trainable / MB:,.1f} MB).",
        f"- Cache: encoding the {s.pool_size}-image pool once (shared by all tasks) took "
        f"{workload.encode_s:.2f} s, reading it back {workload.load_s:.2f} s, each including "
        f"{workload.key_s:.2f} s of hashing the encoders' weights for the key; "
        f"{workload.cache_bytes / MB:.1f} MB on disk and in memory "
        f"({workload.cache_bytes / s.pool_size / 1024:.0f} KB/sample).",
    ]
    return lines


def scaling(base: BaseModel, cache_dir: Path, rounds: int, quick: bool) -> list[str]:
    """Samples/s as one knob at a time grows from one task x one inner step of batch 8 at 64 px.

    Only new resolutions get a warm-up round; the other points reuse the shapes the main table warmed up.
    """
    start = Setting("tiny", 64, 8, 1, 1, 16)
    sweeps = [("tasks_per_meta_step", "bc", (1, 2) if quick else (1, 2, 4)),
              ("inner_steps", "bc", (1, 2) if quick else (1, 2, 4, 8)),
              ("resolution", "abc", (32, 64) if quick else (32, 64, 128))]
    lines = [f"### Scaling (tiny model, batch 8; {rounds} interleaved round(s) per point)", ""]
    for knob, variants, values in sweeps:
        lines += [f"| {knob} | " + " | ".join(f"({v}) samples/s" for v in variants)
                  + " | (b) s/meta-step | (c) s/meta-step | (c) vs (b) |",
                  "|---:|" + "---:|" * (len(variants) + 3)]
        for value in values:
            setting = replace(start, **{knob: value})
            workload = Workload(setting, base, cache_dir / f"{knob}-{value}")
            if knob == "resolution":
                timed_rounds(workload, variants, 1, 0)
            seconds = timed_rounds(workload, variants, rounds, 1)
            rates = " | ".join(f"{rate(setting, seconds[v]):.3g}" for v in variants)
            lines.append(f"| {value} | {rates} | {statistics.median(seconds['b']):.2f} "
                         f"| {statistics.median(seconds['c']):.2f} | {ratio(seconds, 'c', 'b'):.2f}x |")
        lines.append("")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model only, fewer rounds and points")
    parser.add_argument("--configs", nargs="+", choices=("tiny", "sd15", "scaling"), default=None,
                        help="what to run (default: all of them; --quick: tiny and scaling)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="timed rounds per variant (default: tiny 8, sd15 2, scaling 2; --quick: 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, see above)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    configs = args.configs or (["tiny", "scaling"] if args.quick else ["tiny", "sd15", "scaling"])
    default_rounds = {"tiny": 8, "sd15": 2, "scaling": 2}
    rounds = {k: args.rounds or (1 if args.quick else n) for k, n in default_rounds.items()}
    load_before, started = os.getloadavg()[0], time.perf_counter()
    out = []
    with tempfile.TemporaryDirectory(prefix="metacontrol-bench-cache-") as tmp:
        tiny_base = build_base("tiny") if {"tiny", "scaling"} & set(configs) else None
        for name in ("tiny", "sd15"):
            if name in configs:
                base = tiny_base if name == "tiny" else build_base(name)
                workload = Workload(SETTINGS[name], base, Path(tmp) / name)
                memory = first_rounds(workload)
                faults: dict[str, list[int]] = {}
                seconds = timed_rounds(workload, "abc", rounds[name], 1, faults)
                out += main_table(workload, seconds, memory, faults) + [""]
                del workload, base
                gc.collect()
        if "scaling" in configs:
            out += scaling(tiny_base, Path(tmp) / "scaling", rounds["scaling"], args.quick)
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    load_after, minutes = os.getloadavg()[0], (time.perf_counter() - started) / 60
    print(f"python {platform.python_version()}, torch {torch.__version__}, {torch.get_num_threads()} torch "
          f"thread(s), {os.cpu_count()} CPUs, load average {load_before:.2f} before / {load_after:.2f} "
          f"after, {minutes:.1f} min\n")
    print("\n".join(out))


if __name__ == "__main__":
    main()
