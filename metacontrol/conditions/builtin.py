"""The built-in conditions, each rendered in the visual format the community's ControlNets expect.

Meta-training set (the default): canny, hed, depth, pose. Held out for adaptation and zero-shot
tests: seg, normal, scribble, lineart.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from metacontrol.conditions.annotators import AnnotatorSpec
from metacontrol.conditions.base import Condition, register, to_rgb_uint8
from metacontrol.world import CLASSES, Scene

# ADE20K palette entries (controlnet_aux.util.ade_palette) for the world's classes: the segmentation
# ControlNets of the community were trained on ADE20K colours.
ADE20K_CLASS_INDEX = {"wall": 0, "floor": 3, "person": 12, "box": 41, "ball": 119, "triangle": 34}
ADE20K_COLOURS = {0: (120, 120, 120), 3: (80, 50, 50), 12: (150, 5, 61), 41: (0, 255, 20),
                  119: (255, 0, 163), 34: (255, 41, 10)}  # fmt: skip
SEG_PALETTE = np.array([ADE20K_COLOURS[ADE20K_CLASS_INDEX[c]] for c in CLASSES], np.uint8)

# Layout conditions fix where objects are and where their outlines run, not their colours.
LAYOUT_METRICS = ("region_iou", "boundary_f1")

# OpenPose drawing as in controlnet_aux.open_pose.util.draw_bodypose (1-based keypoint pairs).
OPENPOSE_LIMBS = ((2, 3), (2, 6), (3, 4), (4, 5), (6, 7), (7, 8), (2, 9), (9, 10), (10, 11), (2, 12),
                  (12, 13), (13, 14), (2, 1), (1, 15), (15, 17), (1, 16), (16, 18))  # fmt: skip
OPENPOSE_COLOURS = ((255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
                    (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
                    (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85))  # fmt: skip


def draw_openpose(canvas: np.ndarray, keypoints: np.ndarray | None, stickwidth: int = 4) -> np.ndarray:
    """Draw one body (18 x (x, y, visible), pixel coordinates) the way controlnet-aux does.

    Identical to ``draw_bodypose`` for ``stickwidth=4`` (its 512 px setting); smaller images use a
    proportionally thinner stick so limbs stay limbs rather than blobs.
    """
    if keypoints is None:
        return canvas
    visible = keypoints[:, 2] > 0
    for (a, b), colour in zip(OPENPOSE_LIMBS, OPENPOSE_COLOURS):
        if not (visible[a - 1] and visible[b - 1]):
            continue
        xs = np.array([keypoints[a - 1, 0], keypoints[b - 1, 0]])
        ys = np.array([keypoints[a - 1, 1], keypoints[b - 1, 1]])
        length = float(np.hypot(xs[0] - xs[1], ys[0] - ys[1]))
        angle = float(np.degrees(np.arctan2(ys[0] - ys[1], xs[0] - xs[1])))
        polygon = cv2.ellipse2Poly((int(xs.mean()), int(ys.mean())), (int(length / 2), stickwidth), int(angle), 0, 360, 1)
        cv2.fillConvexPoly(canvas, polygon, [int(float(c) * 0.6) for c in colour])
    for point, colour, vis in zip(keypoints, OPENPOSE_COLOURS, visible):
        if vis:
            cv2.circle(canvas, (int(point[0]), int(point[1])), stickwidth, colour, thickness=-1)
    return canvas


def _grey(values: np.ndarray) -> np.ndarray:
    return to_rgb_uint8(np.clip(np.rint(values * 255.0), 0, 255).astype(np.uint8))


@register
class Canny(Condition):
    """Canny edges (100/200) as white on black; annotating is ``cv2.Canny`` itself, no weights needed."""

    name = "canny"
    fidelity_metric = "canny_f1"
    is_edge = True
    low_threshold = 100
    high_threshold = 200

    def render(self, scene: Scene) -> np.ndarray:
        return self.annotate(scene.image)

    def annotate(self, image: np.ndarray, annotators: str | None = None, device: str | None = None) -> np.ndarray:
        return to_rgb_uint8(cv2.Canny(image, self.low_threshold, self.high_threshold))


@register
class SoftEdge(Condition):
    """HED-style soft edges: object boundaries blurred, bright on black."""

    name = "hed"
    fidelity_metric = "hed_ssim"
    is_edge = True
    annotator = AnnotatorSpec("controlnet_aux.hed", "HEDdetector", ("ControlNetHED.pth",))

    def render(self, scene: Scene) -> np.ndarray:
        soft = cv2.GaussianBlur(scene.boundaries, (0, 0), 0.8)
        return _grey(soft / max(float(soft.max()), 1e-6))


@register
class Scribble(Condition):
    """Scribbles: thick binary boundary strokes, white on black (HED with ``scribble=True`` on photos)."""

    name = "scribble"
    fidelity_metric = "scribble_ssim"
    is_edge = True
    annotator = AnnotatorSpec("controlnet_aux.hed", "HEDdetector", ("ControlNetHED.pth",))

    def render(self, scene: Scene) -> np.ndarray:
        strokes = cv2.dilate((scene.boundaries > 0).astype(np.uint8), np.ones((2, 2), np.uint8))
        return to_rgb_uint8(strokes * 255)

    def detector_kwargs(self, resolution: int) -> dict[str, Any]:
        return {**super().detector_kwargs(resolution), "scribble": True}


@register
class Lineart(Condition):
    """Thin anti-aliased line art, white on black (controlnet-aux's LineartStandard on photos)."""

    name = "lineart"
    fidelity_metric = "lineart_ssim"
    is_edge = True
    annotator = AnnotatorSpec("controlnet_aux.lineart_standard", "LineartStandardDetector")

    def render(self, scene: Scene) -> np.ndarray:
        return _grey(np.clip(scene.boundaries * 2.0, 0.0, 1.0))

    def detector_kwargs(self, resolution: int) -> dict[str, Any]:
        return {"detect_resolution": resolution, "output_type": "np"}


@register
class Depth(Condition):
    """MiDaS-style relative inverse depth: grey, near = bright, normalised per image."""

    name = "depth"
    fidelity_metric = "depth_rmse"
    control_metrics = LAYOUT_METRICS
    annotator = AnnotatorSpec("controlnet_aux.midas", "MidasDetector", ("dpt_hybrid-midas-501f0c75.pt",))

    def render(self, scene: Scene) -> np.ndarray:
        inverse = 1.0 / scene.depth
        lo, hi = float(inverse.min()), float(inverse.max())
        return _grey((inverse - lo) / max(hi - lo, 1e-6))


@register
class Normal(Condition):
    """Surface normals in the usual RGB encoding: (n + 1) / 2 with x right, y up, z towards the viewer."""

    name = "normal"
    fidelity_metric = "normal_angle"
    control_metrics = LAYOUT_METRICS
    annotator = AnnotatorSpec("controlnet_aux.normalbae", "NormalBaeDetector", ("scannet.pt",))

    def render(self, scene: Scene) -> np.ndarray:
        return np.clip(np.rint((scene.normals + 1.0) * 127.5), 0, 255).astype(np.uint8)


@register
class Segmentation(Condition):
    """Semantic segmentation in the ADE20K palette. controlnet-aux has no ADE20K segmenter without mmcv."""

    name = "seg"
    control_metrics = LAYOUT_METRICS

    def render(self, scene: Scene) -> np.ndarray:
        return SEG_PALETTE[scene.class_map]


@register
class Pose(Condition):
    """OpenPose body skeletons drawn as controlnet-aux draws them, on black."""

    name = "pose"
    fidelity_metric = "pose_pck"
    control_metrics = ("figure_iou",)  # the figure, judged in its own box: the other objects do not count
    annotator = AnnotatorSpec(
        "controlnet_aux.open_pose", "OpenposeDetector", ("body_pose_model.pth", "hand_pose_model.pth", "facenet.pth")
    )

    def render(self, scene: Scene) -> np.ndarray:
        h, w = scene.depth.shape
        canvas = np.zeros((h, w, 3), np.uint8)
        stickwidth = max(1, round(4 * min(h, w) / 512))
        for person in scene.keypoints:
            draw_openpose(canvas, person, stickwidth)
        return canvas

    def detector_kwargs(self, resolution: int) -> dict[str, Any]:
        return {**super().detector_kwargs(resolution), "include_body": True, "include_hand": False,
                "include_face": False}  # fmt: skip

    def keypoints(self, image: np.ndarray, annotators: str | None, device: str | None = None) -> np.ndarray:
        """The body keypoints OpenPose finds in an (H, W, 3) uint8 image: (18, 3) rows of (x, y, visible) in
        pixels, of its most confident person (all invisible when it finds none), as ``eval.metrics.pck`` takes."""
        people = self.detector(annotators, device).detect_poses(image)
        return openpose_keypoints(people, image.shape[:2])


def openpose_keypoints(people: list, size: tuple[int, int]) -> np.ndarray:
    """controlnet-aux's ``PoseResult`` list (keypoints in [0, 1]) -> (18, 3) pixel rows of its best person."""
    out = np.zeros((len(OPENPOSE_COLOURS), 3), np.float64)
    if not people:
        return out
    best = max(people, key=lambda person: person.body.total_score)
    h, w = size
    for index, point in enumerate(best.body.keypoints[: len(out)]):
        if point is not None:
            out[index] = (point.x * w, point.y * h, 1.0)
    return out
