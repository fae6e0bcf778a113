"""Quantitative control metrics: how well a generated image follows its condition.

Everything here is plain numpy / OpenCV on host arrays (no torch), so it runs anywhere the evaluation
loop does. Conventions shared by all functions:

* Images are ``(H, W)`` or ``(H, W, C)`` arrays; uint8 images are on the 0..255 scale, float images
  must be passed on the same scale as ``data_range`` says.
* Every function checks its inputs and raises ``ValueError`` naming the offending shape / value.
* Undefined cases are explicit: an edge F1 with both maps empty is 1.0 and with exactly one empty is
  0.0; keypoint metrics with nothing to compare return ``nan``; ``psnr`` of identical images is ``inf``.

``segment_by_scene_colours`` / ``layout_miou`` are the synthetic world's exact re-annotation: when no
controlnet-aux annotator weights exist, a generated image is segmented by nearest mean ground-truth
region colour, which tells whether generated objects are where the condition put them for *any*
condition type. ``region_iou``, ``boundary_f1`` and ``figure_iou`` ask the same of layout and pose
without depending on colours: regions are told apart by the generated image's *own* colours.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import cv2
import numpy as np

if TYPE_CHECKING:  # pragma: no cover - typing only
    from metacontrol.world import Scene

__all__ = [
    "boundary_f1",
    "canny_edges",
    "control_score",
    "edge_f1",
    "figure_iou",
    "keypoint_error",
    "layout_miou",
    "mean_iou",
    "normal_angular_error",
    "pck",
    "psnr",
    "region_iou",
    "rmse",
    "segment_by_scene_colours",
    "ssim",
]

# Gaussian SSIM window of Wang et al. (2004): sigma 1.5, truncated at 3.5 sigma -> 11 x 11 (as skimage).
_SSIM_SIGMA = 1.5
_SSIM_RADIUS = int(3.5 * _SSIM_SIGMA + 0.5)
_SSIM_K1, _SSIM_K2 = 0.01, 0.03


# -- helpers -------------------------------------------------------------------------------------------
def _check_same_shape(
    a: np.ndarray, b: np.ndarray, what: str, a_name: str = "pred", b_name: str = "target"
) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{what}: {a_name} has shape {a.shape} but {b_name} has shape {b.shape}; they must match"
        )


def _as_image(x: np.ndarray, name: str, what: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim not in (2, 3) or x.size == 0:
        raise ValueError(f"{what}: {name} must be a non-empty (H, W) or (H, W, C) image, got shape {x.shape}")
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
        raise ValueError(f"{what}: {name} must be numeric, got dtype {x.dtype}")
    return x


def _as_edge_map(x: np.ndarray, name: str) -> np.ndarray:
    """(H, W) bool edge mask from a bool / numeric (H, W) or (H, W, C) map: any channel > 0 is an edge."""
    x = _as_image(x, name, "edge_f1")
    edges = x > 0
    return edges.any(axis=2) if edges.ndim == 3 else edges


def _distance_to(edges: np.ndarray) -> np.ndarray:
    """Exact Euclidean distance (px) from every pixel to the nearest True pixel of ``edges``."""
    return cv2.distanceTransform((~edges).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)


def _as_keypoints(x: np.ndarray, name: str, what: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim < 2 or x.shape[-1] != 3:
        raise ValueError(
            f"{what}: {name} must be (K, 3) rows of (x, y, visibility) (or (..., K, 3)), got shape {x.shape}"
        )
    return x.reshape(-1, 3)


# -- edges ---------------------------------------------------------------------------------------------
def edge_f1(pred: np.ndarray, target: np.ndarray, tolerance: int = 2) -> float:
    """F1 of predicted vs target edge pixels with a ``tolerance``-px match radius (ControlNet++-style Canny F1).

    Precision is the fraction of predicted edge pixels within ``tolerance`` px (Euclidean) of a target
    edge pixel, recall the fraction of target edge pixels within ``tolerance`` px of a predicted one,
    F1 their harmonic mean. Maps are bool or numeric, ``(H, W)`` or ``(H, W, C)`` (a pixel is an edge
    if any channel is > 0). Conventions: both maps empty -> 1.0 (nothing to find, nothing found);
    exactly one empty -> 0.0; precision and recall both 0 -> 0.0.
    """
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, np.integer)) or tolerance < 0:
        raise ValueError(f"edge_f1: tolerance must be an integer >= 0 (pixels), got {tolerance!r}")
    p, t = _as_edge_map(pred, "pred"), _as_edge_map(target, "target")
    _check_same_shape(p, t, "edge_f1 (spatial size)")
    n_pred, n_target = int(p.sum()), int(t.sum())
    if n_pred == 0 and n_target == 0:
        return 1.0
    if n_pred == 0 or n_target == 0:
        return 0.0
    precision = float((_distance_to(t)[p] <= tolerance + 1e-6).mean())
    recall = float((_distance_to(p)[t] <= tolerance + 1e-6).mean())
    if precision + recall == 0.0:
        return 0.0
    return 2.0 * precision * recall / (precision + recall)


def canny_edges(image_uint8_rgb: np.ndarray, low: int = 100, high: int = 200) -> np.ndarray:
    """Canny edge mask (bool, H x W) of a uint8 image with the canny condition's thresholds, to score edge control."""
    image = _as_image(image_uint8_rgb, "image", "canny_edges")
    if image.dtype != np.uint8:
        raise ValueError(f"canny_edges: image must be uint8, got dtype {image.dtype}")
    if image.ndim == 3 and image.shape[2] not in (1, 3):
        raise ValueError(f"canny_edges: image must have 1 or 3 channels, got shape {image.shape}")
    if not 0 <= low <= high:
        raise ValueError(f"canny_edges: need 0 <= low <= high, got low={low}, high={high}")
    return cv2.Canny(np.ascontiguousarray(image), low, high) > 0


# -- image similarity ----------------------------------------------------------------------------------
def _gaussian_filter(x: np.ndarray) -> np.ndarray:
    k = 2 * _SSIM_RADIUS + 1
    return cv2.GaussianBlur(x, (k, k), _SSIM_SIGMA, sigmaY=_SSIM_SIGMA, borderType=cv2.BORDER_REFLECT)


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 255) -> float:
    """Gaussian-window SSIM (Wang et al. 2004; sigma 1.5, K1 0.01, K2 0.03), channel mean: structural fidelity.

    Grey ``(H, W)`` or multi-channel ``(H, W, C)`` images of equal shape, uint8 or float on the scale
    given by ``data_range``. Population (not sample) covariances; the SSIM map is averaged after
    cropping the 5 px border the 11 x 11 window does not fully cover, as skimage does with
    ``gaussian_weights=True, use_sample_covariance=False``. Images must be at least 11 x 11.
    """
    a, b = _as_image(a, "a", "ssim"), _as_image(b, "b", "ssim")
    _check_same_shape(a, b, "ssim", "a", "b")
    if min(a.shape[:2]) < 2 * _SSIM_RADIUS + 1:
        raise ValueError(
            f"ssim: images must be at least {2 * _SSIM_RADIUS + 1} px on each side, got shape {a.shape}"
        )
    if not data_range > 0:
        raise ValueError(f"ssim: data_range must be > 0, got {data_range}")
    x = a.astype(np.float64)
    y = b.astype(np.float64)
    if x.ndim == 2:
        x, y = x[..., None], y[..., None]
    c1 = (_SSIM_K1 * data_range) ** 2
    c2 = (_SSIM_K2 * data_range) ** 2
    r = _SSIM_RADIUS
    scores = []
    for ch in range(x.shape[2]):
        xc, yc = np.ascontiguousarray(x[..., ch]), np.ascontiguousarray(y[..., ch])
        mu_x, mu_y = _gaussian_filter(xc), _gaussian_filter(yc)
        var_x = _gaussian_filter(xc * xc) - mu_x * mu_x
        var_y = _gaussian_filter(yc * yc) - mu_y * mu_y
        cov = _gaussian_filter(xc * yc) - mu_x * mu_y
        num = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
        den = (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
        smap = num / den
        scores.append(float(smap[r:-r, r:-r].mean()))
    return float(np.mean(scores))


def _mse(a: np.ndarray, b: np.ndarray, what: str) -> float:
    a, b = _as_image(a, "a", what), _as_image(b, "b", what)
    _check_same_shape(a, b, what, "a", "b")
    diff = a.astype(np.float64) - b.astype(np.float64)
    return float(np.mean(diff * diff))


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB, 10 log10(data_range^2 / MSE): pixel fidelity; identical images -> inf."""
    if not data_range > 0:
        raise ValueError(f"psnr: data_range must be > 0, got {data_range}")
    mse = _mse(a, b, "psnr")
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(float(data_range) ** 2 / mse)


def rmse(a: np.ndarray, b: np.ndarray) -> float:
    """Root-mean-square difference over all pixels and channels (in the inputs' units): e.g. depth-map error."""
    return math.sqrt(_mse(a, b, "rmse"))


# -- segmentation --------------------------------------------------------------------------------------
def mean_iou(
    pred_labels: np.ndarray,
    target_labels: np.ndarray,
    num_classes: int | None = None,
    ignore_absent: bool = True,
) -> float:
    """Mean intersection-over-union of integer label maps: how well predicted regions overlap the true ones.

    With ``ignore_absent`` (default) the mean runs over the classes present in the union of pred and
    target; classes absent from both are ignored. With ``ignore_absent=False`` it runs over all
    ``num_classes`` classes (required then) and a class absent from both counts as IoU 1.0 (its
    absence was predicted correctly). Labels must be non-negative integers (< ``num_classes`` if given).
    """
    p, t = np.asarray(pred_labels), np.asarray(target_labels)
    _check_same_shape(p, t, "mean_iou")
    if p.size == 0:
        raise ValueError(f"mean_iou: label maps are empty (shape {p.shape})")
    for name, x in (("pred_labels", p), ("target_labels", t)):
        if not (np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_):
            raise ValueError(f"mean_iou: {name} must hold integer labels, got dtype {x.dtype}")
        if x.min() < 0:
            raise ValueError(f"mean_iou: {name} has negative label {int(x.min())}")
    p, t = p.astype(np.int64).ravel(), t.astype(np.int64).ravel()
    top = int(max(p.max(), t.max())) + 1
    if num_classes is not None:
        if num_classes < 1:
            raise ValueError(f"mean_iou: num_classes must be >= 1, got {num_classes}")
        if top > num_classes:
            raise ValueError(f"mean_iou: label {top - 1} is out of range for num_classes={num_classes}")
        n = int(num_classes)
    elif not ignore_absent:
        raise ValueError("mean_iou: ignore_absent=False needs num_classes (which classes count as absent?)")
    else:
        n = top
    confusion = np.bincount(t * n + p, minlength=n * n).reshape(n, n)  # rows target, columns pred
    intersection = np.diag(confusion).astype(np.float64)
    union = confusion.sum(0) + confusion.sum(1) - intersection
    present = union > 0
    if ignore_absent:
        return float(np.mean(intersection[present] / union[present]))
    iou = np.ones(n, np.float64)
    iou[present] = intersection[present] / union[present]
    return float(iou.mean())


# -- keypoints -----------------------------------------------------------------------------------------
def keypoint_error(pred: np.ndarray, target: np.ndarray, normaliser: float) -> float:
    """Mean Euclidean keypoint distance / ``normaliser`` over keypoints visible in both: pose localisation error.

    ``pred`` and ``target`` are ``(K, 3)`` rows of (x, y, visibility) in pixels (or equal-shaped
    ``(..., K, 3)`` stacks, matched row by row); a keypoint is visible when column 2 > 0. Pass e.g.
    the image size as ``normaliser``. No keypoint visible in both -> nan.
    """
    p, t = _as_keypoints(pred, "pred", "keypoint_error"), _as_keypoints(target, "target", "keypoint_error")
    _check_same_shape(p, t, "keypoint_error")
    if not (normaliser > 0 and math.isfinite(normaliser)):
        raise ValueError(f"keypoint_error: normaliser must be a finite number > 0, got {normaliser}")
    both = (p[:, 2] > 0) & (t[:, 2] > 0)
    if not both.any():
        return math.nan
    dist = np.hypot(p[both, 0] - t[both, 0], p[both, 1] - t[both, 1])
    return float(dist.mean() / normaliser)


def pck(pred: np.ndarray, target: np.ndarray, threshold_px: float) -> float:
    """Percentage of correct keypoints: fraction of target-visible keypoints predicted visible within ``threshold_px``.

    Same layout as ``keypoint_error``; a keypoint counts as correct when it is visible in both and its
    distance is <= ``threshold_px``. A keypoint missed by the prediction counts as wrong. No
    target-visible keypoint -> nan.
    """
    p, t = _as_keypoints(pred, "pred", "pck"), _as_keypoints(target, "target", "pck")
    _check_same_shape(p, t, "pck")
    if not threshold_px >= 0:
        raise ValueError(f"pck: threshold_px must be >= 0, got {threshold_px}")
    target_visible = t[:, 2] > 0
    if not target_visible.any():
        return math.nan
    dist = np.hypot(p[:, 0] - t[:, 0], p[:, 1] - t[:, 1])
    correct = target_visible & (p[:, 2] > 0) & (dist <= threshold_px)
    return float(correct.sum() / target_visible.sum())


# -- normals -------------------------------------------------------------------------------------------
def normal_angular_error(pred_rgb: np.ndarray, target_rgb: np.ndarray) -> float:
    """Mean angle in degrees between normals decoded from RGB (n = rgb / 127.5 - 1, renormalised): normal-map fidelity.

    Inputs are ``(H, W, 3)`` on the 0..255 scale (uint8 or float). A zero-length decoded vector is
    left at zero and so scores 90 degrees against anything.
    """
    p, t = (
        _as_image(pred_rgb, "pred_rgb", "normal_angular_error"),
        _as_image(target_rgb, "target_rgb", "normal_angular_error"),
    )
    _check_same_shape(p, t, "normal_angular_error", "pred_rgb", "target_rgb")
    if p.ndim != 3 or p.shape[2] != 3:
        raise ValueError(f"normal_angular_error: normal maps must be (H, W, 3), got shape {p.shape}")

    def decode(rgb: np.ndarray) -> np.ndarray:
        n = rgb.astype(np.float64) / 127.5 - 1.0
        return n / np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-12)

    cos = np.clip((decode(p) * decode(t)).sum(-1), -1.0, 1.0)
    return float(np.degrees(np.arccos(cos)).mean())


# -- synthetic re-annotation ---------------------------------------------------------------------------
def _scene_regions(scene: Scene, what: str) -> tuple[np.ndarray, np.ndarray, int]:
    """(region index per pixel (H, W), region keys, n_classes): the scene's (instance, class) pairs.

    Keys are sorted, so the room (instance 0: wall, floor) comes first and wins exact ties: an image
    with no structure is read as all room, never as an object.
    """
    instances = np.asarray(scene.instance_map).astype(np.int64)
    classes = np.asarray(scene.class_map).astype(np.int64)
    shape = np.asarray(scene.image).shape[:2]
    if instances.shape != shape or classes.shape != shape:
        raise ValueError(f"{what}: scene maps {instances.shape} / {classes.shape} do not match scene.image {shape}")
    n_classes = int(classes.max()) + 1
    keys, region = np.unique((instances * n_classes + classes).ravel(), return_inverse=True)
    return region.reshape(shape), keys, n_classes


def _nearest_region(pixels: np.ndarray, region: np.ndarray, colours: np.ndarray, n_regions: int) -> np.ndarray:
    """Each pixel's region by nearest mean colour, the means taken over ``colours`` of each region."""
    counts = np.bincount(region, minlength=n_regions).astype(np.float64)
    sums = np.stack([np.bincount(region, weights=colours[:, c], minlength=n_regions) for c in range(3)], axis=1)
    present = counts > 0
    means = np.where(present[:, None], sums / np.maximum(counts, 1)[:, None], np.inf).astype(np.float32)
    dist = ((pixels[:, None, :].astype(np.float32) - means[None, :, :]) ** 2).sum(-1)  # (pixels, regions)
    return dist.argmin(axis=1)


def _check_rgb(generated: np.ndarray, scene: Scene, what: str) -> np.ndarray:
    gen = _as_image(generated, "generated", what)
    if gen.ndim != 3 or gen.shape[2] != 3:
        raise ValueError(f"{what}: generated must be (H, W, 3) RGB, got shape {gen.shape}")
    _check_same_shape(gen, np.asarray(scene.image), what, "generated", "scene.image")
    return gen


def segment_by_scene_colours(generated: np.ndarray, scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """(class_map, instance_map) of a generated image by nearest mean ground-truth region colour: where things went.

    Regions are the (instance_id, class_id) pairs of the scene, so wall and floor (both instance 0)
    are separate. Each region's mean colour is taken from ``scene.image``; each generated pixel gets
    the region whose mean is nearest in squared RGB distance (float32; ties go to the lower
    (instance, class) pair). ``generated`` is ``(H, W, 3)`` on the 0..255 scale, the scene's size.
    Returns a uint8 class map and an int32 instance map. Regions of identical colour cannot be told
    apart (possible: two objects may share a colour).
    """
    gen = _check_rgb(generated, scene, "segment_by_scene_colours")
    region, keys, n_classes = _scene_regions(scene, "segment_by_scene_colours")
    truth = np.asarray(scene.image).reshape(-1, 3).astype(np.float64)
    nearest = keys[_nearest_region(gen.reshape(-1, 3), region.ravel(), truth, len(keys))]
    h, w = region.shape
    return (nearest % n_classes).reshape(h, w).astype(np.uint8), (nearest // n_classes).reshape(h, w).astype(np.int32)


def layout_miou(generated: np.ndarray, scene: Scene) -> float:
    """mIoU of the colour-segmented generated image vs ``scene.class_map``: are objects where the condition put them."""
    from metacontrol.world import CLASSES

    class_map, _ = segment_by_scene_colours(generated, scene)
    return mean_iou(class_map, scene.class_map, num_classes=len(CLASSES))


def _own_colour_iou(generated: np.ndarray, scene: Scene, instance: int, margin: int, what: str) -> float:
    """IoU of one object's true mask with the generated image's own-colour segmentation around it.

    Only the object's box (+ ``margin`` px) takes part, so distant objects of the same colour do not
    compete. Every true region in the box gets the mean of the *generated* pixels inside it, and each
    pixel goes to the nearest mean: an object drawn where the mask says, in any colour, separates from
    its surroundings, while wrong colours cost nothing (they are the text's job, not the ControlNet's).
    """
    gen = _check_rgb(generated, scene, what)
    region, keys, n_classes = _scene_regions(scene, what)
    instances = np.asarray(scene.instance_map)
    ys, xs = np.nonzero(instances == instance)
    box = (slice(max(ys.min() - margin, 0), ys.max() + margin + 1), slice(max(xs.min() - margin, 0), xs.max() + margin + 1))
    pixels, labels = gen[box].reshape(-1, 3), region[box].ravel()
    predicted = keys[_nearest_region(pixels, labels, pixels.astype(np.float64), len(keys))] // n_classes
    truth = keys[labels] // n_classes == instance
    return float((truth & (predicted == instance)).sum() / (truth | (predicted == instance)).sum())


def _mean_object_iou(generated: np.ndarray, scene: Scene, kinds: set[str] | None, margin: int, what: str) -> float:
    ids = [o.instance_id for o in scene.objects if o.area > 0 and (kinds is None or o.kind in kinds)]
    ids = [i for i in ids if (np.asarray(scene.instance_map) == i).any()]
    if not ids:
        return math.nan
    return float(np.mean([_own_colour_iou(generated, scene, i, margin, what) for i in ids]))


def region_iou(generated: np.ndarray, scene: Scene, margin: int = 4) -> float:
    """Mean over the scene's visible objects of their own-colour IoU (see ``_own_colour_iou``): layout control.

    1 when every object's pixels (and only they) stand out from their surroundings in the generated
    image's own colours; 0 for an image with no structure (exact ties go to the room). No object -> nan.
    """
    return _mean_object_iou(generated, scene, None, margin, "region_iou")


def boundary_f1(generated: np.ndarray, scene: Scene, tolerance: int = 2) -> float:
    """Edge F1 of the generated image's Canny edges against the scene's exact object boundaries.

    The boundaries come from the world's geometry, not from an edge detector on the ground-truth
    image, so shading and texture edges of the ground truth do not count as structure to follow.
    """
    gen = _check_rgb(generated, scene, "boundary_f1")
    return edge_f1(canny_edges(gen.astype(np.uint8)), np.asarray(scene.boundaries) > 0, tolerance)


def figure_iou(generated: np.ndarray, scene: Scene, margin: int = 4) -> float:
    """``region_iou`` over the people only: does the generated figure follow the skeleton.

    Pose constrains the figure, so the other objects of the scene must not dominate its score; each
    person is judged inside its own box. No visible person -> nan.
    """
    return _mean_object_iou(generated, scene, {"person"}, margin, "figure_iou")


# -- aggregation ---------------------------------------------------------------------------------------
def control_score(value: float, floor: float, ceiling: float, higher_is_better: bool = True) -> float:
    """Metric value rescaled to [0, 1] between a numeric ``floor`` and ``ceiling``: comparable control scores.

    ``floor <= ceiling`` are the numeric ends of the range (ValueError otherwise). Higher-is-better:
    ``clip((value - floor) / (ceiling - floor), 0, 1)``, so floor -> 0 and ceiling -> 1. Lower-is-better
    (RMSE, angular error, keypoint error) is the mirror ``clip((ceiling - value) / (ceiling - floor), 0, 1)``:
    floor (the best value) -> 1, ceiling -> 0. A degenerate range (``ceiling - floor < 1e-9``) or a
    nan value gives nan.
    """
    for name, x in (("floor", floor), ("ceiling", ceiling)):
        if not math.isfinite(x):
            raise ValueError(f"control_score: {name} must be finite, got {x}")
    if ceiling < floor:
        raise ValueError(
            f"control_score: need floor <= ceiling (numeric range ends), got floor={floor}, ceiling={ceiling}"
        )
    if ceiling - floor < 1e-9 or math.isnan(value):
        return math.nan
    score = (value - floor) / (ceiling - floor)
    if not higher_is_better:
        score = 1.0 - score
    return float(min(max(score, 0.0), 1.0))
