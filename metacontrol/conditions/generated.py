"""Generated condition tasks: many conditions derived from the synthetic world's ground truth by random but fixed
transforms, so that meta-learning sees a task *distribution* rather than four tasks (Rajendran et al., 2020;
MLTI, Yao et al., 2022).

A task is a name, ``gen-<kind>-<seed>`` (a mixture: ``gen-mix.<kind>+<kind>-<seed>``), and the name alone fixes
its transform: the same name renders the same map of a scene anywhere, different seeds give different maps.
``get_condition`` builds them on demand; ``expand_tasks`` turns a family spec ``gen:<kind>+<kind>:<count>:<seed>``
of ``data.tasks`` into that many names. Each kind declares the built-in conditions it *resembles*: a family
must not use a kind that resembles a condition held out for evaluation (``check_held_out``), so nothing leaks.

Kinds: ``scalar`` (depth through a random colour ramp, maybe inverted, with a gamma), ``normal`` (normals with
channels permuted and flipped), ``palette`` (the class or instance map in random colours, some classes hidden),
``edge`` (object boundaries dilated, blurred or dashed, in random colours), ``pose`` (skeletons with permuted limb
colours and another stick width), ``mix`` (two of the named kinds blended).
"""

from __future__ import annotations

import re
from typing import ClassVar

import cv2
import numpy as np

from metacontrol.conditions.base import Condition
from metacontrol.conditions.builtin import LAYOUT_METRICS, OPENPOSE_COLOURS, OPENPOSE_LIMBS
from metacontrol.config_loader import ConfigError
from metacontrol.world import CLASSES, Scene

RESEMBLES = {"scalar": {"depth"}, "normal": {"normal"}, "palette": {"seg"}, "pose": {"pose"},
             "edge": {"canny", "hed", "scribble", "lineart"}}
KINDS = tuple(RESEMBLES)
NAME = re.compile(r"gen-(?:(?P<kind>[a-z]+)|mix\.(?P<parts>[a-z]+(?:\+[a-z]+)+))-(?P<seed>\d+)")
SPEC = re.compile(r"gen:(?P<kinds>[a-z]+(?:\+[a-z]+)*):(?P<count>\d+):(?P<seed>\d+)")


class GeneratedCondition(Condition):
    """One seeded transform of one kind of ground truth. Synthetic scenes only: no annotator for photos."""

    kind: ClassVar[str]

    def __init__(self, name: str, seed: int) -> None:
        self.name = name  # type: ignore[misc]  (an instance's name: these are made per task, not registered)
        self.draw(np.random.default_rng(seed))

    def draw(self, rng: np.random.Generator) -> None:
        """Fix the transform's parameters (called once, from the name's seed)."""

    @property
    def resembles(self) -> set[str]:
        return RESEMBLES[self.kind]


def _colours(rng: np.random.Generator, count: int) -> np.ndarray:
    return rng.integers(0, 256, (count, 3)).astype(np.float64)


class Scalar(GeneratedCondition):
    kind = "scalar"
    control_metrics = LAYOUT_METRICS

    def draw(self, rng: np.random.Generator) -> None:
        self.invert, self.gamma = bool(rng.integers(2)), float(np.exp(rng.uniform(-0.7, 0.7)))
        self.stops = _colours(rng, int(rng.integers(2, 5)))

    def render(self, scene: Scene) -> np.ndarray:
        inverse = 1.0 / scene.depth
        value = (inverse - inverse.min()) / max(float(np.ptp(inverse)), 1e-6)
        value = (1.0 - value if self.invert else value) ** self.gamma
        position = value * (len(self.stops) - 1)
        low = np.minimum(position.astype(int), len(self.stops) - 2)
        frac = (position - low)[..., None]
        return np.rint(self.stops[low] * (1 - frac) + self.stops[low + 1] * frac).astype(np.uint8)


class NormalChannels(GeneratedCondition):
    kind = "normal"
    control_metrics = LAYOUT_METRICS

    def draw(self, rng: np.random.Generator) -> None:
        self.order, self.signs = rng.permutation(3), rng.choice([-1.0, 1.0], 3)

    def render(self, scene: Scene) -> np.ndarray:
        normals = scene.normals[..., self.order] * self.signs
        return np.clip(np.rint((normals + 1.0) * 127.5), 0, 255).astype(np.uint8)


class Palette(GeneratedCondition):
    kind = "palette"
    control_metrics = LAYOUT_METRICS

    def draw(self, rng: np.random.Generator) -> None:
        self.instances = bool(rng.integers(2))
        self.palette = _colours(rng, 64).astype(np.uint8)
        self.hidden = rng.random(len(CLASSES)) < 0.3  # classes drawn black

    def render(self, scene: Scene) -> np.ndarray:
        labels = scene.instance_map % len(self.palette) if self.instances else scene.class_map
        out = self.palette[labels]
        out[self.hidden[scene.class_map]] = 0
        return out


class Edge(GeneratedCondition):
    kind = "edge"

    def draw(self, rng: np.random.Generator) -> None:
        self.style = ("dilate", "blur", "dash")[int(rng.integers(3))]
        self.size = int(rng.integers(1, 4))
        self.fg, self.bg = _colours(rng, 1)[0] * 0.5 + 127, _colours(rng, 1)[0] * 0.25

    def render(self, scene: Scene) -> np.ndarray:
        lines = (scene.boundaries > 0).astype(np.float32)
        if self.style == "dilate":
            lines = cv2.dilate(lines, np.ones((self.size + 1, self.size + 1), np.uint8))
        elif self.style == "blur":
            lines = np.clip(cv2.GaussianBlur(lines, (0, 0), 0.5 * self.size) * 3, 0, 1)
        else:
            yy, xx = np.indices(lines.shape)
            lines = lines * (((xx + yy) // (2 * self.size + 1)) % 2 == 0)
        alpha = lines[..., None]
        return np.rint(self.fg * alpha + self.bg * (1 - alpha)).astype(np.uint8)


class PoseStyle(GeneratedCondition):
    kind = "pose"
    control_metrics = ("figure_iou",)

    def draw(self, rng: np.random.Generator) -> None:
        self.colours = np.asarray(OPENPOSE_COLOURS)[rng.permutation(len(OPENPOSE_COLOURS))]
        self.width = float(rng.uniform(0.5, 2.0))

    def render(self, scene: Scene) -> np.ndarray:
        h, w = scene.depth.shape
        canvas = np.zeros((h, w, 3), np.uint8)
        stick = max(1, round(4 * self.width * min(h, w) / 512))
        for person in scene.keypoints:
            visible = person[:, 2] > 0
            for (a, b), colour in zip(OPENPOSE_LIMBS, self.colours):
                if visible[a - 1] and visible[b - 1]:
                    cv2.line(canvas, tuple(int(v) for v in person[a - 1, :2]), tuple(int(v) for v in person[b - 1, :2]),
                             [int(c) for c in colour], thickness=stick)
        return canvas


class Mix(GeneratedCondition):
    """Two seeded tasks of the named kinds blended with a fixed weight (task interpolation, as MLTI does)."""

    kind = "mix"

    def __init__(self, name: str, seed: int, kinds: list[str]) -> None:
        self.kinds = kinds
        super().__init__(name, seed)

    def draw(self, rng: np.random.Generator) -> None:
        picked = rng.choice(len(self.kinds), 2)
        self.parts = [make(f"gen-{self.kinds[i]}-{int(rng.integers(10**6))}") for i in picked]
        self.weight = float(rng.uniform(0.3, 0.7))
        self.control_metrics = tuple(dict.fromkeys(m for p in self.parts for m in p.control_metrics))  # type: ignore[misc]

    @property
    def resembles(self) -> set[str]:
        return set().union(*(RESEMBLES[k] for k in self.kinds))

    def render(self, scene: Scene) -> np.ndarray:
        a, b = (p.render(scene).astype(np.float64) for p in self.parts)
        return np.rint(a * self.weight + b * (1 - self.weight)).astype(np.uint8)


CLASSES_BY_KIND: dict[str, type[GeneratedCondition]] = {
    cls.kind: cls for cls in (Scalar, NormalChannels, Palette, Edge, PoseStyle)}


def make(name: str) -> GeneratedCondition:
    """The generated condition a name stands for (``NAME``), or one line saying what names look like."""
    match = NAME.fullmatch(name)
    kinds = match["parts"].split("+") if match and match["parts"] else [match["kind"]] if match else []
    if not match or any(k not in CLASSES_BY_KIND for k in kinds):
        raise ConfigError(f"unknown condition {name!r}: a generated task is gen-<kind>-<seed> or "
                          f"gen-mix.<kind>+<kind>-<seed>, kinds {', '.join(KINDS)}")
    seed = int(match["seed"])
    return Mix(name, seed, kinds) if match["parts"] else CLASSES_BY_KIND[kinds[0]](name, seed)


def expand_tasks(tasks: list[str]) -> list[str]:
    """``data.tasks`` with every family spec ``gen:<kinds>:<count>:<seed>`` replaced by its task names: ``count``
    tasks, each of one of the kinds (mixtures of two when ``mix`` is among them), seeded from ``seed``."""
    out = []
    for task in tasks:
        match = SPEC.fullmatch(task)
        if match is None:
            out.append(task)
            continue
        kinds = match["kinds"].split("+")
        plain = [k for k in kinds if k != "mix"]
        unknown = [k for k in kinds if k != "mix" and k not in CLASSES_BY_KIND]
        if unknown or not plain:
            raise ConfigError(f"tasks: {task!r} names {', '.join(unknown) or 'no kind but mix'}; kinds are "
                              f"{', '.join(KINDS)} (and mix, of the others named)")
        rng = np.random.default_rng(int(match["seed"]))
        for _ in range(int(match["count"])):
            kind, seed = kinds[int(rng.integers(len(kinds)))], int(rng.integers(10**6))
            out.append(f"gen-mix.{'+'.join(plain)}-{seed}" if kind == "mix" else f"gen-{kind}-{seed}")
    if len(set(out)) != len(out):
        raise ConfigError(f"tasks: {len(out) - len(set(out))} repeated task(s) after expanding the generated "
                          "families; use another seed or fewer tasks")
    return out


def check_held_out(tasks: list[str], held_out: list[str]) -> None:
    """One line if a generated task resembles a condition held out for evaluation (it would leak that kind)."""
    for task in tasks:
        if task.startswith("gen-") and (leaked := make(task).resembles & set(held_out)):
            raise ConfigError(f"tasks: {task} is generated from what {', '.join(sorted(leaked))} shows, "
                              "which is held out for evaluation; use other kinds")
