"""Throughput of the synthetic world on one CPU core: scenes alone, and scenes plus all condition maps.

    python bench/world_speed.py [--resolution 64 128] [--samples 2000]

Task pools are rendered once at start-up (``data.pool_size`` scenes per task) and dataloader workers each
get one core, so single-core samples per minute is the number that sizes start-up time and worker
counts. Thread pools are pinned to one thread before numpy/cv2 load so no library quietly uses more
(rendering never imports torch; OMP_NUM_THREADS=1 would pin it too).

Rates are computed from the process's CPU time, which is what one dedicated core would take: on a shared
machine wall-clock time mostly measures the neighbours. The wall/CPU column shows how shared it was.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy / cv2 are imported, or their pools are already sized

import argparse  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from metacontrol.conditions import condition_names, get_condition  # noqa: E402
from metacontrol.world import SceneWorld, WorldConfig  # noqa: E402


@dataclass
class Cell:
    """Totals for one resolution: CPU seconds and minor page faults per variant, wall seconds overall."""

    generation_cpu: float = 0.0
    with_maps_cpu: float = 0.0
    generation_faults: int = 0
    with_maps_faults: int = 0
    wall: float = 0.0
    per_map_cpu: dict[str, float] = field(default_factory=dict)


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def measure(resolution: int, samples: int, names: list[str]) -> Cell:
    """Time generation alone and generation plus every map on the same seeds, alternating scene by scene.

    Alternating keeps both variants in the same malloc state. Run as two separate loops, generation alone
    came out ~30% slower than generation plus maps at 128 px: glibc kept unmapping and re-faulting the
    freed canvases in one loop only (the page-fault column shows this cost).
    """
    world = SceneWorld(WorldConfig(resolution=resolution))
    conditions = [get_condition(name) for name in names]
    for condition in conditions:  # warm-up: first calls pay for lazy allocations
        condition.render(world.sample(0))
    cell = Cell(per_map_cpu=dict.fromkeys(names, 0.0))
    wall = time.perf_counter()
    for seed in range(samples):
        faults, start = _minor_faults(), time.process_time()
        world.sample(seed)
        cell.generation_cpu += time.process_time() - start
        cell.generation_faults += _minor_faults() - faults

        faults, start = _minor_faults(), time.process_time()
        scene = world.sample(seed)
        for condition in conditions:
            t0 = time.process_time()
            condition.render(scene)
            cell.per_map_cpu[condition.name] += time.process_time() - t0
        cell.with_maps_cpu += time.process_time() - start
        cell.with_maps_faults += _minor_faults() - faults
    cell.wall = time.perf_counter() - wall
    return cell


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, nargs="+", default=[64, 128], help="output sizes in pixels")
    parser.add_argument("--samples", type=int, default=2000, help="scenes per resolution")
    args = parser.parse_args(argv)
    if args.samples < 1 or min(args.resolution) < 16:
        parser.error("--samples must be >= 1 and every --resolution >= 16")
    cv2.setNumThreads(1)
    names = condition_names()
    cells = {resolution: measure(resolution, args.samples, names) for resolution in args.resolution}

    n = args.samples
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(f"python {platform.python_version()}, numpy {np.__version__}, opencv {cv2.__version__}, "
          f"cv2 threads {cv2.getNumThreads()}, load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs, "
          f"{n} scenes per resolution\n")
    print(f"| resolution | generation only (samples/min) | generation + {len(names)} maps (samples/min) "
          f"| CPU ms/scene: generation / {len(names)} maps | minor page faults/scene, generation | wall/CPU |")
    print("|---:|---:|---:|---:|---:|---:|")
    for resolution, cell in cells.items():
        maps = sum(cell.per_map_cpu.values())
        print(f"| {resolution} px | {60 * n / cell.generation_cpu:,.0f} | {60 * n / cell.with_maps_cpu:,.0f} "
              f"| {1000 * cell.generation_cpu / n:.2f} / {1000 * maps / n:.2f} "
              f"| {cell.generation_faults / n:,.0f} | "
              f"{cell.wall / (cell.generation_cpu + cell.with_maps_cpu):.2f} |")
    print("\nCPU ms per map (rendering only):\n")
    print("| resolution | " + " | ".join(names) + " |")
    print("|---:|" + "---:|" * len(names))
    for resolution, cell in cells.items():
        print(f"| {resolution} px | " + " | ".join(f"{1000 * cell.per_map_cpu[m] / n:.3f}" for m in names) + " |")


if __name__ == "__main__":
    main()
