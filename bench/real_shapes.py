"""Run the project's real scripts on a Stable-Diffusion-1.5-shaped base with random weights, on the CPU.

    python bench/real_shapes.py [--work-dir DIR] [--keep] [--timeout SECONDS]

Why: the test suite trains tiny models, and tiny models hide the bugs that only real shapes show: attention
head sizes, 1280-wide blocks, a 77-token CLIP-L text encoder, bf16 casts of a 860 M-parameter UNet, and the
memory of 361 M ControlNet master weights with their optimiser and meta-learning state. This script builds
SD 1.5's architecture with random weights (``bench/throughput.py``'s ``build_base("sd15")``; nothing is
downloaded), saves it as a diffusers ``StableDiffusionPipeline`` folder, and runs ``meta_train.py`` and
``train/finetune.py`` on it as real subprocesses at 64 px, one torch thread, ``mixed_precision=bf16``:

1. Reptile meta-training: 2 meta-steps of 2 tasks x 2 inner steps, batch 1, gradient checkpointing, a
   checkpoint every meta-step, one validation grid (1 image, 2 inference steps);
2. the same run resumed from step 1's ``checkpoint-1``: its final ControlNet and ``checkpoint-2`` must equal
   the uninterrupted run's bit for bit;
3. full fine-tuning (2 steps, 2 shots, batch 1, one validation grid) from step 1's ControlNet;
4. LoRA fine-tuning (rank 8) from the same start;
5. every ``checkpoint-N`` folder written holds only safetensors and JSON files (no pickles).

It prints a markdown table (wall time, peak resident memory of each subprocess, outcome) and the command
line that reproduces it. A failed run prints the last lines of its stderr and the script exits 1. The work
folder (a new temporary folder under ``--work-dir``, by default the system's temp folder) is deleted at the
end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GNU_TIME = "/usr/bin/time"
RESOLUTION = 64
TAIL_LINES = 40
ALLOWED_IN_CHECKPOINTS = (".safetensors", ".json")
MB = 2**20


@dataclass
class Result:
    """One row of the table: a subprocess (or a check) and how it went; ``ok`` None means skipped."""

    name: str
    ok: bool | None
    wall_s: float | None = None
    peak_mb: float | None = None
    note: str = ""


@dataclass
class Runner:
    """Runs the steps as subprocesses from the repository root, logging each one's output under ``logs``."""

    logs: Path
    timeout_s: float
    results: list[Result] = field(default_factory=list)
    _children_maxrss_kb: int = 0

    def run(self, name: str, command: list[str], check: Callable[[], str] | None = None) -> bool:
        """Run ``command``; if it succeeds, ``check`` (which raises AssertionError on a failure) gives the note."""
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        out, err, timing = (self.logs / f"{slug}.{ext}" for ext in ("out", "err", "time"))
        timed = [GNU_TIME, "-v", "-o", str(timing), *command] if Path(GNU_TIME).exists() else command
        print(f"\n## {name}\n$ {shlex.join(command)}", flush=True)
        started = time.perf_counter()
        with out.open("w") as stdout, err.open("w") as stderr:
            # A session of its own, so that a timeout (or Ctrl-C here) stops the script and everything it started.
            process = subprocess.Popen(timed, cwd=REPO, env=child_env(), stdout=stdout, stderr=stderr,
                                       start_new_session=True)
            try:
                returncode: int | None = process.wait(timeout=self.timeout_s)
            except BaseException as stop:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                if not isinstance(stop, subprocess.TimeoutExpired):
                    raise
                returncode = None
        wall = time.perf_counter() - started
        peak = self._peak_mb(timing)
        if returncode is None:
            result = Result(name, False, wall, peak, f"timed out after {self.timeout_s:.0f} s")
        elif returncode != 0:
            result = Result(name, False, wall, peak, f"exit code {returncode}")
        else:
            try:
                result = Result(name, True, wall, peak, check() if check else "")
            except AssertionError as failure:
                result = Result(name, False, wall, peak, f"check failed: {failure}")
        self.results.append(result)
        print(f"-> {'ok' if result.ok else 'FAILED'} in {wall:.0f} s, peak RSS {fmt_mb(peak)} MB"
              + (f"; {result.note}" if result.note else ""), flush=True)
        if not result.ok:
            print(f"last {TAIL_LINES} lines of its stderr ({err}):")
            print("\n".join(err.read_text(errors="replace").splitlines()[-TAIL_LINES:]), flush=True)
        return bool(result.ok)

    def check(self, name: str, check: Callable[[], str]) -> bool:
        """A check without a subprocess of its own: a row with no time or memory."""
        try:
            result = Result(name, True, note=check())
        except AssertionError as failure:
            result = Result(name, False, note=str(failure))
        self.results.append(result)
        print(f"\n## {name}\n-> {'ok' if result.ok else 'FAILED'}: {result.note}", flush=True)
        return bool(result.ok)

    def skip(self, name: str, why: str) -> None:
        self.results.append(Result(name, None, note=f"skipped: {why}"))

    def _peak_mb(self, timing: Path) -> float | None:
        """Peak resident set of the subprocess: GNU time's report, else the growth of RUSAGE_CHILDREN's maximum
        (which only shows a subprocess that used more than every earlier one)."""
        if timing.exists():
            match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", timing.read_text())
            if match:
                return int(match.group(1)) / 1024
        maxrss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KB on Linux
        grew, self._children_maxrss_kb = maxrss > self._children_maxrss_kb, max(maxrss, self._children_maxrss_kb)
        return maxrss / 1024 if grew else None


def child_env() -> dict[str, str]:
    """This checkout importable, one OpenMP thread, no Hub."""
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def fmt_mb(value: float | None) -> str:
    return f"{value:,.0f}" if value is not None else "n/a"


def fmt_size(size: int) -> str:
    return f"{size / MB:,.1f} MB" if size >= MB // 10 else f"{size / 1024:,.1f} KB" if size >= 1024 else f"{size} B"


# -- the base model (run in a subprocess of its own, so this process stays small) ---------------------------------
def build_base(folder: Path) -> None:
    """SD-1.5-shaped random weights saved as a ``StableDiffusionPipeline`` folder (safetensors, no safety checker)."""
    sys.path.insert(0, str(REPO / "bench"))
    import throughput  # bench/throughput.py: its builder, not a copy of it
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    from metacontrol.models.tiny import build_noise_scheduler

    started = time.perf_counter()
    base = throughput.build_base("sd15")
    built = time.perf_counter() - started
    pipe = StableDiffusionPipeline(
        vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.denoiser,
        scheduler=DPMSolverMultistepScheduler.from_config(build_noise_scheduler().config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(folder, safe_serialization=True)
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    print(f"UNet {throughput.millions(base.denoiser)}, VAE {throughput.millions(base.vae)}, text encoder "
          f"{throughput.millions(base.text_encoder)} parameters; {size / 2**30:.1f} GiB on disk; "
          f"built in {built:.0f} s, saved in {time.perf_counter() - started - built:.0f} s")


def check_base(folder: Path, out_log: Path) -> Callable[[], str]:
    def check() -> str:
        for part in ("unet", "vae", "text_encoder"):
            assert list((folder / part).glob("*.safetensors")), f"no safetensors in {folder / part}"
        assert not list(folder.rglob("*.bin")), "pickled weights (.bin) in the base folder"
        return out_log.read_text().strip().splitlines()[-1]

    return check


# -- configuration keys that may or may not exist ------------------------------------------------------------------
def has_world_resolution(config_class: type) -> bool:
    """Whether ``config_class`` has a ``world`` section with its own ``resolution`` (then it must equal the run's)."""
    for f in fields(config_class):
        if f.name == "world" and f.default_factory is not MISSING:
            world = f.default_factory()
            return is_dataclass(world) and any(g.name == "resolution" for g in fields(world))
    return False


def world_keys() -> tuple[list[str], list[str]]:
    """The world-resolution overrides meta-training and fine-tuning need, read from the config dataclasses."""
    from metacontrol.config import FinetuneConfig, MetaTrainConfig

    data_class = next(f for f in fields(MetaTrainConfig) if f.name == "data").default_factory
    meta = [f"data.world.resolution={RESOLUTION}"] if has_world_resolution(type(data_class())) else []
    finetune = [f"world.resolution={RESOLUTION}"] if has_world_resolution(FinetuneConfig) else []
    return meta, finetune


# -- the runs -----------------------------------------------------------------------------------------------------
def meta_train_command(base: Path, output_dir: Path, cache_dir: Path, world: list[str], *extra: str) -> list[str]:
    return [
        sys.executable, "meta_train.py", f"pretrained_model_name_or_path={base}", f"output_dir={output_dir}",
        f"cache_dir={cache_dir}", f"resolution={RESOLUTION}", *world, "data.pool_size=8",
        "meta.algorithm=reptile", "meta.max_meta_steps=2", "meta.tasks_per_meta_step=2", "meta.inner_steps=2",
        "meta.support_batch_size=1", "meta.query_batch_size=1", "mixed_precision=bf16",
        "gradient_checkpointing=true", "checkpointing_steps=1", "checkpoints_total_limit=2", "validation_steps=2",
        "num_validation_images=1", "validation_inference_steps=2", "report_to=none", "num_threads=1", *extra,
    ]  # fmt: skip


def finetune_command(base: Path, start: Path, output_dir: Path, cache_dir: Path, world: list[str],
                     *extra: str) -> list[str]:
    return [
        sys.executable, "train/finetune.py", f"pretrained_model_name_or_path={base}",
        f"controlnet_model_name_or_path={start}", f"output_dir={output_dir}", f"cache_dir={cache_dir}",
        f"resolution={RESOLUTION}", *world, "condition=normal", "shots=2", "train_batch_size=1",
        "max_train_steps=2", "mixed_precision=bf16", "validation_steps=2", "num_validation_images=1",
        "validation_inference_steps=2", "report_to=none", "num_threads=1", *extra,
    ]  # fmt: skip


def check_output(folder: Path, checkpoints: list[str], lora: bool = False) -> Callable[[], str]:
    """The run left a ControlNet, the named checkpoints and a validation grid."""

    def check() -> str:
        assert (folder / "diffusion_pytorch_model.safetensors").is_file(), f"no ControlNet weights in {folder}"
        found = sorted(p.name for p in folder.glob("checkpoint-*"))
        assert found == checkpoints, f"checkpoints {found}, expected {checkpoints}"
        grids = sorted(p.name for p in (folder / "validation").glob("*.png"))
        assert grids, f"no validation grid in {folder / 'validation'}"
        if lora:
            assert list((folder / "lora").glob("*.safetensors")), f"no LoRA adapter in {folder / 'lora'}"
        size = (folder / "diffusion_pytorch_model.safetensors").stat().st_size / MB
        return (f"ControlNet {size:,.0f} MB; {', '.join(found)}; validation {', '.join(grids)}"
                + ("; adapter in lora/" if lora else ""))

    return check


def differences(a: Path, b: Path) -> tuple[list[str], int]:
    """Tensors of two safetensors files that differ in name, dtype, shape or any bit; and how many ``a`` holds."""
    import torch
    from safetensors import safe_open

    with safe_open(str(a), framework="pt") as fa, safe_open(str(b), framework="pt") as fb:
        names_a, names_b = set(fa.keys()), set(fb.keys())
        problems = [f"only in one file: {sorted(names_a ^ names_b)[:5]}"] if names_a != names_b else []
        for name in sorted(names_a & names_b):
            x, y = fa.get_tensor(name), fb.get_tensor(name)
            if x.dtype != y.dtype or x.shape != y.shape:
                problems.append(f"{name}: {x.dtype} {tuple(x.shape)} vs {y.dtype} {tuple(y.shape)}")
            elif not torch.equal(x.contiguous().view(-1).view(torch.uint8), y.contiguous().view(-1).view(torch.uint8)):
                diff = (x.double() - y.double()).abs().max().item()
                problems.append(f"{name}: max |difference| {diff:.3g}")
    return problems, len(names_a)


def check_resumed(uninterrupted: Path, resumed: Path) -> Callable[[], str]:
    """The final ControlNet and checkpoint-2 (parameters and optimiser state) equal bit for bit, the resumed run
    did resume (it wrote no checkpoint-1), and meta-step 2 moved the weights (else equality proves nothing)."""

    def check() -> str:
        written = sorted(p.name for p in resumed.glob("checkpoint-*"))
        assert written == ["checkpoint-2"], f"the resumed run wrote {written}: it did not start at meta-step 1"
        from metacontrol.checkpointing import PARAMETERS_FILE

        moved, _ = differences(uninterrupted / "checkpoint-1" / PARAMETERS_FILE,
                               uninterrupted / "checkpoint-2" / PARAMETERS_FILE)
        assert moved, "checkpoint-1 and checkpoint-2 hold the same parameters: meta-step 2 changed nothing"
        files = [p.relative_to(uninterrupted) for folder in (uninterrupted, uninterrupted / "checkpoint-2")
                 for p in sorted(folder.glob("*.safetensors"))]
        assert files, f"no safetensors in {uninterrupted}"
        tensors = 0
        for rel in files:
            assert (resumed / rel).is_file(), f"the resumed run has no {rel}"
            problems, count = differences(uninterrupted / rel, resumed / rel)
            more = f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
            assert not problems, f"{rel} differs from the uninterrupted run's: {'; '.join(problems[:5])}{more}"
            tensors += count
        return (f"bit-identical to the uninterrupted run: {', '.join(map(str, files))} ({tensors} tensors); "
                f"meta-step 2 changed {len(moved)} of them")

    return check


def checkpoint_listing(output_dirs: list[Path]) -> tuple[list[str], Callable[[], str]]:
    """A table of every checkpoint-N folder's files, and the check that they are safetensors and JSON only."""
    lines = ["| checkpoint | file | size |", "|---|---|---:|"]
    bad: list[str] = []
    folders = [c for d in output_dirs if d.is_dir() for c in sorted(d.glob("checkpoint-*")) if c.is_dir()]
    for folder in folders:
        for file in sorted(p for p in folder.rglob("*") if p.is_file()):
            rel = file.relative_to(folder)
            lines.append(f"| {folder.parent.name}/{folder.name} | {rel} | {fmt_size(file.stat().st_size)} |")
            if file.suffix not in ALLOWED_IN_CHECKPOINTS:
                bad.append(f"{folder.parent.name}/{folder.name}/{rel}")

    def check() -> str:
        assert folders, "no checkpoint-N folder was written"
        assert not bad, f"not safetensors or JSON: {', '.join(bad)}"
        return f"{len(folders)} checkpoint folders, safetensors and JSON only"

    return lines, check


def table(results: list[Result]) -> list[str]:
    lines = ["| # | run | result | wall (s) | peak RSS (MB) | notes |", "|---:|---|---|---:|---:|---|"]
    for i, r in enumerate(results):
        outcome = "skipped" if r.ok is None else "ok" if r.ok else "**FAILED**"
        wall = f"{r.wall_s:.0f}" if r.wall_s is not None else ""
        peak = fmt_mb(r.peak_mb) if r.wall_s is not None else ""
        lines.append(f"| {i} | {r.name} | {outcome} | {wall} | {peak} | {r.note.replace('|', '/')} |")
    return lines


def run_all(work: Path, timeout_s: float) -> tuple[Runner, list[str]]:
    logs, cache = work / "logs", work / "cache"
    logs.mkdir()
    runner = Runner(logs, timeout_s)
    base = work / "sd15-random"
    meta, resumed, full, lora = (work / name for name in ("meta", "meta-resumed", "finetune-full", "finetune-lora"))
    meta_world, finetune_world = world_keys()

    if not runner.run("build SD-1.5-shaped base (random weights)",
                      [sys.executable, str(Path(__file__).resolve()), "--build-base", str(base)],
                      check_base(base, logs / "build-sd-1-5-shaped-base-random-weights.out")):
        for name in ("meta-train", "meta-train resumed", "finetune full", "finetune lora", "checkpoint contents"):
            runner.skip(name, "no base model")
        return runner, []
    meta_ok = runner.run("meta-train (reptile, bf16, gradient checkpointing)",
                         meta_train_command(base, meta, cache, meta_world),
                         check_output(meta, ["checkpoint-1", "checkpoint-2"]))
    if meta_ok:
        runner.run("meta-train resumed from checkpoint-1",
                   meta_train_command(base, resumed, cache, meta_world,
                                      f"resume_from_checkpoint={meta / 'checkpoint-1'}"),
                   check_resumed(meta, resumed))
        runner.run("finetune full (bf16, from meta-train's ControlNet)",
                   finetune_command(base, meta, full, cache, finetune_world, "mode=full"),
                   check_output(full, ["checkpoint-2"]))
        runner.run("finetune lora rank 8 (bf16, same start)",
                   finetune_command(base, meta, lora, cache, finetune_world, "mode=lora", "lora_rank=8"),
                   check_output(lora, ["checkpoint-2"], lora=True))
    else:
        for name in ("meta-train resumed", "finetune full", "finetune lora"):
            runner.skip(name, "meta-training failed")
    listing, check = checkpoint_listing([meta, resumed, full, lora])
    runner.check("checkpoint contents", check)
    return runner, listing


@contextmanager
def work_folder(parent: Path | None, prefix: str, keep: bool) -> Iterator[Path]:
    """A new temporary folder under ``parent`` (default: the system's), deleted afterwards unless ``keep``."""
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    print(f"work folder: {work}", flush=True)
    try:
        yield work
    finally:
        if keep:
            print(f"\nkept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="where to create the run's temporary folder (default: the system's temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (base, outputs, logs)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds each subprocess may take (default 3600)")
    parser.add_argument("--build-base", type=Path, default=None, help=argparse.SUPPRESS)  # the base's subprocess
    args = parser.parse_args(argv)
    if args.build_base is not None:
        build_base(args.build_base)
        return 0

    started = time.perf_counter()
    with work_folder(args.work_dir, "metacontrol-real-shapes-", args.keep) as work:
        runner, listing = run_all(work, args.timeout)
    minutes = (time.perf_counter() - started) / 60
    failed = [r.name for r in runner.results if r.ok is False]
    command = shlex.join(["python", "bench/real_shapes.py", *(argv if argv is not None else sys.argv[1:])])
    print(f"\n### Real shapes: SD 1.5 architecture, random weights, {RESOLUTION} px, CPU, bf16, 1 thread\n")
    print("\n".join(table(runner.results)))
    if listing:
        print("\nCheckpoint folders:\n")
        print("\n".join(listing))
    print(f"\nPeak RSS: the subprocess's maximum resident set size ({'GNU time' if Path(GNU_TIME).exists() else 'getrusage'})."
          f"\nTotal: {minutes:.1f} min; {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f} at the end."
          f"\nReproduce (from the repository root, in .venv): {command}")
    if failed:
        print(f"\nFAILED: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
