"""The prepared data path at 512 px: training RAM flat in the set's size, the loader's speed beside a step's, and
``metacontrol prepare``'s speed on 1 and 2 processes.

    python bench/data_path.py [--sizes 2000 20000] [--work-dir DIR] [--prepare-photos 32]

1. **RAM**: for each size, a prepared set with SD-1.5-shaped encodings (latents 4x64x64 mean and std, CLIP-L text
   embeddings 77x768, one per distinct caption; random values: RAM does not care) and 512 px PNG maps is written
   in ``metacontrol prepare``'s layout (its own ShardWriter and index, the encoders left out), then read by a fresh
   process through ``load_task_data(source: prepared)`` as training does; that process draws 200 batches of 8 and
   reports its peak RSS. The in-RAM cache the project used before would hold every encoding: that size is printed
   beside it.
2. **Loader vs step**: the same process times those batches (samples/s), and a training step of SD-1.5-shaped random
   weights at 512 px on this CPU (batch 1, bf16, cached latents) gives the rate the loader must keep up with.
3. **prepare**: ``--prepare-photos`` copies of scikit-image's photos at 512 px, canny and HED (random weights), on 1
   and then 2 processes (gloo), images/s each.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESOLUTION, LATENT, TOKENS, WIDTH = 512, 64, 77, 768
BATCHES, BATCH = 200, 8


def write_set(out: Path, size: int, shard_size: int = 1024) -> None:
    """``size`` rows in prepare's layout; every row has its own 512 px map (a few shapes) and random encodings."""
    import numpy as np

    from metacontrol.atomic import atomic_write_bytes
    from metacontrol.config import PrepareConfig
    from metacontrol.data.prepare import ENCODINGS_FOLDER, INDEX_FILE, ShardWriter, shard_name

    cfg = PrepareConfig(train_data_dir="synthetic", conditions=["canny"], resolution=RESOLUTION, shard_size=shard_size)
    rng = np.random.default_rng(0)
    image = np.zeros((RESOLUTION, RESOLUTION, 3), np.uint8)
    markers = []
    for number in range(math.ceil(size / shard_size)):
        rows = min(shard_size, size - number * shard_size)
        writer = ShardWriter(out, number, cfg, device=None)  # type: ignore[arg-type]
        for i in range(rows):
            condition_map = image.copy()
            condition_map[:, (i * 7) % RESOLUTION] = 255
            writer.writers["canny"].write({"image": {"bytes": _png(image), "path": None},
                                           "conditioning_image": {"bytes": _png(condition_map), "path": None},
                                           "text": f"caption {i % 50}"})
        writer.kept = rows
        marker = writer.finish()
        folder = out / ENCODINGS_FOLDER / shard_name(number)
        folder.mkdir(parents=True, exist_ok=True)
        for key in ("latent_mean", "latent_std"):
            np.save(folder / f"{key}.npy", rng.standard_normal((rows, 4, LATENT, LATENT), np.float32))
        np.save(folder / "text_embeds.npy", rng.standard_normal((50, TOKENS, WIDTH), np.float32))
        np.save(folder / "caption_index.npy", np.arange(rows, dtype=np.int64) % 50)
        markers.append(marker)
    index = {"num_rows": size, "listed_bad": [], "conditions": ["canny"], "resolution": RESOLUTION,
             "shards": markers, "kept": size, "encodings": "bench"}
    atomic_write_bytes(out / INDEX_FILE, json.dumps(index).encode())


def _png(array) -> bytes:
    from metacontrol.data.prepare import png_bytes

    return png_bytes(array)


def read_set(out: Path) -> None:
    """In a fresh process: open as training does, draw the batches, print samples/s and peak RSS as JSON."""
    import numpy as np
    import torch

    from metacontrol.data.shards import PreparedTaskData

    before = _rss_mb()
    data = PreparedTaskData(out, "canny", RESOLUTION)
    data.cached = data.stored_encodings("bench", ("text_embeds",))  # type: ignore[assignment]
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    for _ in range(BATCHES):
        batch = data.batch(rng.choice(len(data), BATCH, replace=False).tolist())
    seconds = time.perf_counter() - started
    assert batch["latent_mean"].shape == (BATCH, 4, LATENT, LATENT) and batch["text_embeds"].dtype == torch.float32
    print(json.dumps({"samples_s": BATCHES * BATCH / seconds, "peak_rss_mb": _peak_mb(), "start_rss_mb": before,
                      **{key: _status_mb(key) for key in ("RssAnon", "RssFile")}}))


def _status_mb(key: str) -> float:
    """A /proc/self/status memory line: ``RssAnon`` is the process's own memory, ``RssFile`` file pages it maps
    (the memory-mapped shards: page cache the kernel takes back under pressure)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) / 1024
    return math.nan


def _rss_mb() -> float:
    return _status_mb("VmRSS")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def step_rate() -> float:
    """Samples/s of one training step at SD-1.5 shapes, 512 px, batch 1, bf16, cached latents (after a warm-up)."""
    import torch

    sys.path.insert(0, str(REPO / "bench"))
    import throughput

    from metacontrol.controlnet import create_controlnet
    from metacontrol.objective import ControlNetObjective

    base = throughput.build_base("sd15").freeze(torch.bfloat16)
    controlnet = create_controlnet(base).train()
    objective = ControlNetObjective(base, controlnet, torch.bfloat16, lambda: torch.autocast("cpu", torch.bfloat16))
    batch = {"latent_mean": torch.randn(1, 4, LATENT, LATENT), "latent_std": torch.full((1, 4, LATENT, LATENT), 0.1),
             "text_embeds": torch.randn(1, TOKENS, WIDTH),
             "conditioning_pixel_values": torch.rand(1, 3, RESOLUTION, RESOLUTION)}
    seconds = []
    for step in range(2):
        started = time.perf_counter()
        objective.loss(batch, torch.Generator().manual_seed(step)).backward()
        seconds.append(time.perf_counter() - started)
    return 1 / seconds[-1]


def prepare_rate(work: Path, copies: int, processes: int) -> float:
    from metacontrol.data.sample_photos import PHOTOS, random_hed_annotators, write_photo_folder

    photos = work / "photos"
    if not photos.is_dir():
        write_photo_folder(photos, size=RESOLUTION)
        lines = (photos / "metadata.jsonl").read_text().splitlines()
        (photos / "metadata.jsonl").write_text("\n".join(lines[i % len(PHOTOS)] for i in range(copies)) + "\n")
        random_hed_annotators(work / "annotators")
    out = work / f"prepared-{processes}"
    args = ["-m", "metacontrol.cli", "prepare", f"train_data_dir={photos}", "conditions=[canny, hed]",
            f"annotators={work / 'annotators'}", f"resolution={RESOLUTION}", "shard_size=4", f"output_dir={out}",
            "dataloader_num_workers=1"]
    launcher = [sys.executable] if processes == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                        "--nproc_per_node", str(processes)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    started = time.perf_counter()
    subprocess.run([*launcher, *args], cwd=REPO, env=env, check=True, capture_output=True)
    return copies / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--prepare-photos", type=int, default=32, help="photos for the prepare timing (0: skip)")
    parser.add_argument("--read", type=Path, default=None, help=argparse.SUPPRESS)  # the reading subprocess
    args = parser.parse_args(argv)
    if args.read is not None:
        read_set(args.read)
        return 0
    if args.work_dir is not None:
        args.work_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="metacontrol-data-path-", dir=args.work_dir))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    per_sample_mb = (2 * 4 * LATENT * LATENT + TOKENS * WIDTH) * 4 / 2**20
    print(f"### Prepared data path, {RESOLUTION} px, SD-1.5-shaped encodings (work folder {work})\n")
    print("| samples | on disk (GB) | reader peak RSS (MB) | of it anonymous / file-backed at the end (MB) | "
          "in-RAM encodings would be (MB) | loader samples/s |")
    print("|---:|---:|---:|---:|---:|---:|")
    peaks = []
    for size in args.sizes:
        out = work / f"set-{size}"
        write_set(out, size)
        disk = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**30
        result = json.loads(subprocess.run([sys.executable, __file__, "--read", str(out)], env=env, check=True,
                                           capture_output=True, text=True).stdout.strip().splitlines()[-1])
        peaks.append((result["peak_rss_mb"], result["RssAnon"]))
        print(f"| {size:,} | {disk:.1f} | {result['peak_rss_mb']:,.0f} | {result['RssAnon']:,.0f} / "
              f"{result['RssFile']:,.0f} | {size * per_sample_mb:,.0f} | {result['samples_s']:,.0f} |", flush=True)
        subprocess.run(["rm", "-rf", str(out)], check=True)
    print(f"\nLargest / smallest set: peak RSS x{peaks[-1][0] / peaks[0][0]:.3f}, anonymous memory "
          f"x{peaks[-1][1] / peaks[0][1]:.3f}")
    print(f"Training step at SD-1.5 shapes, 512 px, batch 1, bf16, cached latents, this CPU: {step_rate():.3f} samples/s")
    if args.prepare_photos:
        one, two = (prepare_rate(work, args.prepare_photos, p) for p in (1, 2))
        print(f"\nprepare, {args.prepare_photos} photos at {RESOLUTION} px, canny + HED (random weights): "
              f"{one:.2f} images/s on 1 process, {two:.2f} on 2 (x{two / one:.2f}); includes start-up")
    print(f"\nReproduce: {shlex.join(['python', 'bench/data_path.py', *(argv if argv is not None else sys.argv[1:])])}")
    subprocess.run(["rm", "-rf", str(work)], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
