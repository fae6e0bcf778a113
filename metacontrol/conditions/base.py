"""One interface for every condition: render it from synthetic ground truth or annotate a real image."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import cv2
import numpy as np

from metacontrol.conditions.annotators import AnnotatorSpec, AnnotatorUnavailable, load_annotator
from metacontrol.config_loader import ConfigError
from metacontrol.world import Scene


def to_rgb_uint8(array: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, 1|3|4) in uint8 -> (H, W, 3) uint8, the format ControlNets are trained on."""
    if array.dtype != np.uint8:
        raise TypeError(f"expected a uint8 map, got {array.dtype}")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.shape[2] == 1:
        return np.repeat(array, 3, axis=2)
    if array.shape[2] == 4:
        return array[:, :, :3].copy()
    return array


class Condition(ABC):
    """A kind of control map (canny, depth, pose...).

    ``render`` gives the exact map from synthetic ground truth; ``annotate`` derives it from an RGB
    image with a controlnet-aux detector, as one would for real photos. Both return (H, W, 3) uint8
    at the size of the input.
    """

    name: ClassVar[str]
    is_edge: ClassVar[bool] = False  # edge-like maps are the ones the paper controls zero-shot
    # What the condition constrains, as metrics of ``metacontrol.eval.metrics`` scored by the harness:
    # the control score averages their floor-to-ceiling normalised values.
    control_metrics: ClassVar[tuple[str, ...]] = ("edge_f1",)
    # How the field scores control on photos (the ControlNet++ protocol): the annotator re-run on the generated
    # image against the same annotator on the photo, by this metric (``eval.harness.fidelity``); None: no
    # annotator to re-run, so photos cannot score this condition.
    fidelity_metric: ClassVar[str | None] = None
    annotator: ClassVar[AnnotatorSpec | None] = None

    @abstractmethod
    def render(self, scene: Scene) -> np.ndarray: ...

    def detector_kwargs(self, resolution: int) -> dict[str, Any]:
        """Keyword arguments for the controlnet-aux detector's ``__call__`` at ``resolution``."""
        return {"detect_resolution": resolution, "image_resolution": resolution, "output_type": "np"}

    def annotate(self, image: np.ndarray, annotators: str | None = None, device: str | None = None) -> np.ndarray:
        """Run the condition's controlnet-aux annotator on an (H, W, 3) uint8 RGB image; ``device`` (e.g.
        ``cuda:0``) moves a neural detector there first. controlnet-aux's detectors take one image a call."""
        if self.annotator is None:
            raise AnnotatorUnavailable(
                f"condition {self.name!r} has no controlnet-aux annotator; provide its maps as "
                "conditioning images (a `conditioning_image` column) or use the synthetic world"
            )
        detector = self.detector(annotators, device)
        h, w = image.shape[:2]
        detect = max(64, int(np.ceil(max(h, w) / 64) * 64))
        out = detector(image, **self.detector_kwargs(detect))
        out = to_rgb_uint8(np.asarray(out))
        if out.shape[:2] != (h, w):
            out = cv2.resize(out, (w, h), interpolation=cv2.INTER_LINEAR)
        return out

    def detector(self, annotators: str | None, device: str | None = None) -> Any:
        """The controlnet-aux detector (built once per weights location), on ``device`` when given."""
        if self.annotator is None:
            raise AnnotatorUnavailable(f"condition {self.name!r} has no controlnet-aux annotator")
        detector = load_annotator(self.annotator, annotators)
        if device is not None and hasattr(detector, "to"):
            detector.to(device)
        return detector

    def __repr__(self) -> str:
        return f"<Condition {self.name}>"


_REGISTRY: dict[str, Condition] = {}


def register(cls: type[Condition]) -> type[Condition]:
    """Class decorator adding a condition (one instance) to the registry under ``cls.name``."""
    _REGISTRY[cls.name] = cls()
    return cls


def get_condition(name: str) -> Condition:
    """A built-in condition, or a generated task (``gen-...``, made from its name once: ``conditions/generated.py``)."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name.startswith("gen-"):
        from metacontrol.conditions.generated import make

        _REGISTRY[name] = make(name)
        return _REGISTRY[name]
    raise ConfigError(f"unknown condition {name!r}; known conditions: {', '.join(condition_names())} "
                      "and generated tasks (gen-<kind>-<seed>)")


def task_list(tasks: list[str], shown: int = 6) -> str:
    """Task names for a log line or a card: all built-in ones, and at most ``shown`` generated ones with a count."""
    generated = [t for t in tasks if t.startswith("gen-")]
    named = [t for t in tasks if not t.startswith("gen-")] + generated[:shown]
    rest = len(generated) - shown
    return ", ".join(named) + (f" and {rest} more generated tasks ({len(generated)} in all)" if rest > 0 else "")


def condition_names() -> list[str]:
    """The built-in conditions (generated tasks are made on demand and not listed)."""
    return sorted(name for name in _REGISTRY if not name.startswith("gen-"))
