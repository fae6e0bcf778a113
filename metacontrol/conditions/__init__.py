"""Condition registry: ``get_condition("canny").render(scene)`` or ``.annotate(image, annotators)``."""

from metacontrol.conditions import builtin as _builtin  # noqa: F401  (registers the built-in conditions)
from metacontrol.conditions.annotators import AnnotatorSpec, AnnotatorUnavailable, load_annotator
from metacontrol.conditions.base import Condition, condition_names, get_condition, register, task_list

META_TRAIN_CONDITIONS = ("canny", "hed", "depth", "pose")
HELD_OUT_CONDITIONS = ("seg", "normal", "scribble", "lineart")

__all__ = [
    "AnnotatorSpec",
    "AnnotatorUnavailable",
    "Condition",
    "HELD_OUT_CONDITIONS",
    "META_TRAIN_CONDITIONS",
    "condition_names",
    "get_condition",
    "load_annotator",
    "register",
    "task_list",
]
