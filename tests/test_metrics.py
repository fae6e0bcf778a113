"""Tests of metacontrol.eval.metrics: hand-computed values, conventions and the synthetic re-annotation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from metacontrol.eval.metrics import (
    boundary_f1,
    canny_edges,
    control_score,
    edge_f1,
    figure_iou,
    keypoint_error,
    layout_miou,
    mean_iou,
    normal_angular_error,
    pck,
    psnr,
    region_iou,
    rmse,
    segment_by_scene_colours,
    ssim,
)
from metacontrol.world import CLASS_ID, CLASSES, Scene, SceneObject, SceneWorld


def _line(shape=(32, 32), row=10, cols=slice(4, 28)) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[row, cols] = True
    return m


# -- edge_f1 / canny -----------------------------------------------------------------------------------
def test_edge_f1_perfect_empty_and_conventions():
    t = _line()
    assert edge_f1(t, t) == 1.0
    assert edge_f1(t, t, tolerance=0) == 1.0
    empty = np.zeros_like(t)
    assert edge_f1(empty, t) == 0.0
    assert edge_f1(t, empty) == 0.0
    assert edge_f1(empty, empty) == 1.0


def test_edge_f1_shifted_line_and_tolerance():
    t, shifted = _line(row=10), _line(row=11)
    assert edge_f1(shifted, t, tolerance=2) == 1.0
    assert edge_f1(shifted, t, tolerance=1) == 1.0
    assert edge_f1(shifted, t, tolerance=0) < 0.1
    assert edge_f1(_line(row=14), t, tolerance=2) == 0.0  # 4 px away: outside the tolerance


def test_edge_f1_hand_computed():
    # 10 isolated target dots (6 px apart); the prediction hits 5 of them and puts 5 dots far away.
    target = np.zeros((40, 64), np.uint8)
    target[5, 2:62:6] = 255
    assert target.sum() // 255 == 10
    pred = np.zeros_like(target)
    pred[5, 2:32:6] = 255  # hits the first 5
    pred[35, 2:32:6] = 255  # 30 px below anything
    assert edge_f1(pred, target, tolerance=2) == pytest.approx(0.5)
    # Asymmetric: 5 hits, no misses in pred -> P = 1, R = 0.5, F1 = 2/3.
    only_hits = np.zeros_like(target)
    only_hits[5, 2:32:6] = 255
    assert edge_f1(only_hits, target, tolerance=2) == pytest.approx(2 / 3)


def test_edge_f1_accepts_rgb_and_validates():
    t = _line()
    rgb = np.repeat((t * 255).astype(np.uint8)[..., None], 3, axis=2)
    assert edge_f1(rgb, t) == 1.0
    with pytest.raises(ValueError, match="shape"):
        edge_f1(t, np.zeros((16, 16), bool))
    with pytest.raises(ValueError, match="tolerance"):
        edge_f1(t, t, tolerance=-1)


def test_canny_edges_matches_condition_and_scores_itself_perfectly():
    image = SceneWorld().sample(1).image
    edges = canny_edges(image)
    assert edges.dtype == np.bool_ and edges.shape == image.shape[:2] and edges.any()
    assert edge_f1(edges, edges) == 1.0
    assert edge_f1(canny_edges(np.zeros_like(image)), edges) == 0.0
    with pytest.raises(ValueError, match="uint8"):
        canny_edges(image.astype(np.float32))


# -- ssim / psnr / rmse --------------------------------------------------------------------------------
def test_ssim_matches_skimage_reference():
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(0)
    a = SceneWorld().sample(3).image
    b = np.clip(a.astype(int) + rng.integers(-40, 41, a.shape), 0, 255).astype(np.uint8)
    ref = structural_similarity(
        a, b, data_range=255, channel_axis=-1, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
    )
    assert ssim(a, b) == pytest.approx(ref, abs=1e-3)
    g = rng.random((40, 50))
    h = g + 0.1 * rng.standard_normal(g.shape)
    ref = structural_similarity(
        g, h, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
    )
    assert ssim(g, h, data_range=1.0) == pytest.approx(ref, abs=1e-3)


def test_ssim_properties():
    a = SceneWorld().sample(3).image
    assert ssim(a, a) == pytest.approx(1.0)
    assert ssim(a, 255 - a) < 0.3
    b = np.roll(a, 2, axis=1)
    assert ssim(a, b) == pytest.approx(ssim(b, a))
    with pytest.raises(ValueError, match="shape"):
        ssim(a, a[..., 0])


def test_psnr_and_rmse_hand_values():
    a = np.full((16, 16, 3), 100, np.uint8)
    b = a + 10
    assert psnr(a, b) == pytest.approx(20 * math.log10(255 / 10))
    assert psnr(a, a) == math.inf
    assert rmse(a, b) == pytest.approx(10.0)
    # Half the pixels differ by 4: MSE = 8, RMSE = sqrt(8).
    c = np.zeros((4, 4), np.float32)
    d = c.copy()
    d[:2] = 4.0
    assert rmse(c, d) == pytest.approx(math.sqrt(8.0))
    assert psnr(c, d, data_range=1.0) == pytest.approx(10 * math.log10(1 / 8))
    with pytest.raises(ValueError, match="shape"):
        rmse(c, d[:3])


# -- mean_iou ------------------------------------------------------------------------------------------
def test_mean_iou_hand_computed():
    target = np.array([[0, 0, 1, 1]])
    pred = np.array([[0, 1, 1, 1]])
    # class 0: I=1, U=2 -> 0.5; class 1: I=2, U=3 -> 2/3
    assert mean_iou(pred, target) == pytest.approx((0.5 + 2 / 3) / 2)
    assert mean_iou(target, target) == 1.0
    # Classes absent from both are ignored by default, count as 1.0 with ignore_absent=False.
    assert mean_iou(pred, target, num_classes=5) == pytest.approx((0.5 + 2 / 3) / 2)
    assert mean_iou(pred, target, num_classes=4, ignore_absent=False) == pytest.approx((0.5 + 2 / 3 + 2) / 4)
    # A prediction of a class absent from the target: that class scores 0 and counts.
    assert mean_iou(np.full_like(target, 2), target) == 0.0
    with pytest.raises(ValueError, match="num_classes"):
        mean_iou(pred, target, num_classes=1)
    with pytest.raises(ValueError, match="shape"):
        mean_iou(pred, target.T)


# -- keypoints -----------------------------------------------------------------------------------------
def test_keypoint_error_and_pck_hand_computed():
    target = np.array([[10, 10, 1], [20, 20, 1], [30, 30, 1], [40, 40, 0]], np.float32)
    pred = np.array([[13, 14, 1], [20, 20, 1], [30, 30, 0], [0, 0, 1]], np.float32)
    # Visible in both: rows 0 (distance 5) and 1 (distance 0) -> mean 2.5, / 64.
    assert keypoint_error(pred, target, normaliser=64) == pytest.approx(2.5 / 64)
    # Target-visible: rows 0-2; correct within 5 px: rows 0 and 1; row 2 missed -> 2/3.
    assert pck(pred, target, threshold_px=5) == pytest.approx(2 / 3)
    assert pck(pred, target, threshold_px=4) == pytest.approx(1 / 3)
    assert pck(target, target, threshold_px=0) == 1.0
    assert keypoint_error(target, target, 64) == 0.0


def test_keypoint_conventions():
    target = np.array([[10, 10, 1], [20, 20, 1]], np.float32)
    invisible = target.copy()
    invisible[:, 2] = 0
    assert pck(invisible, target, 5) == 0.0  # nothing predicted
    assert math.isnan(keypoint_error(invisible, target, 64))
    assert math.isnan(pck(target, invisible, 5))
    with pytest.raises(ValueError, match="shape"):
        pck(target[:1], target, 5)
    with pytest.raises(ValueError, match="normaliser"):
        keypoint_error(target, target, 0)


def test_keypoints_on_scene_figures():
    scene = next(s for s in (SceneWorld().sample(i) for i in range(20)) if s.keypoints)
    kp = scene.keypoints[0]
    moved = kp.copy()
    moved[:, 0] += 3.0
    assert pck(kp, kp, 1.0) == 1.0
    assert keypoint_error(moved, kp, normaliser=64) == pytest.approx(3.0 / 64)
    assert pck(moved, kp, 2.0) == 0.0 and pck(moved, kp, 3.0) == 1.0


# -- normals -------------------------------------------------------------------------------------------
def test_normal_angular_error():
    front = np.zeros((4, 4, 3), np.float32)
    front[...] = (127.5, 127.5, 255.0)  # (0, 0, 1)
    right = np.zeros_like(front)
    right[...] = (255.0, 127.5, 127.5)  # (1, 0, 0)
    assert normal_angular_error(front, front) == pytest.approx(0.0, abs=1e-6)
    assert normal_angular_error(front, right) == pytest.approx(90.0)
    # uint8-encoded (the condition's rounding): within half a degree.
    u_front, u_right = np.rint(front).astype(np.uint8), np.rint(right).astype(np.uint8)
    assert normal_angular_error(u_front, u_right) == pytest.approx(90.0, abs=0.5)
    assert normal_angular_error(u_front, 255 - u_front) > 170.0
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        normal_angular_error(front[..., 0], right[..., 0])


# -- synthetic re-annotation ---------------------------------------------------------------------------
def test_segment_by_scene_colours_recovers_ground_truth():
    world = SceneWorld()
    mious = []
    for seed in range(5):
        scene = world.sample(seed)
        class_map, instance_map = segment_by_scene_colours(scene.image, scene)
        assert class_map.shape == scene.class_map.shape and class_map.dtype == np.uint8
        assert instance_map.shape == scene.instance_map.shape and instance_map.dtype == np.int32
        assert (class_map == scene.class_map).mean() > 0.9
        assert (instance_map == scene.instance_map).mean() > 0.9
        mious.append(layout_miou(scene.image, scene))
        grey = np.full_like(scene.image, 128)
        assert layout_miou(grey, scene) < 0.4
    assert np.mean(mious) > 0.8


def test_segment_separates_wall_and_floor_and_follows_layout():
    scene = SceneWorld().sample(2)
    # A flat image painted with the exact palette of the class map: recovers the class map exactly.
    means = {}
    for c in np.unique(scene.class_map):
        means[c] = scene.image[scene.class_map == c].mean(axis=0)
    painted = np.zeros_like(scene.image)
    for c, colour in means.items():
        painted[scene.class_map == c] = np.rint(colour).astype(np.uint8)
    class_map, _ = segment_by_scene_colours(painted, scene)
    assert set(np.unique(class_map)) >= {CLASSES.index("wall"), CLASSES.index("floor")}
    assert layout_miou(painted, scene) > 0.95
    # The same image shifted sideways puts objects where the condition did not: the score drops.
    assert layout_miou(np.roll(scene.image, 16, axis=1), scene) < layout_miou(scene.image, scene) - 0.2
    with pytest.raises(ValueError, match="shape"):
        segment_by_scene_colours(scene.image[:32], scene)


# -- colour-free layout and pose metrics on a hand-made scene ---------------------------------------
WALL, BOX, PERSON = (200, 200, 200), (0, 0, 255), (255, 0, 0)


def _hand_scene() -> Scene:
    """24 x 24 px, a uniform wall, a 6 x 6 box at rows/cols 4-9 and a 12 x 2 'person' at rows 8-19, cols 16-17."""
    instance = np.zeros((24, 24), np.int32)
    classes = np.full((24, 24), CLASS_ID["wall"], np.uint8)
    image = np.zeros((24, 24, 3), np.uint8)
    image[:] = WALL
    instance[4:10, 4:10], classes[4:10, 4:10], image[4:10, 4:10] = 1, CLASS_ID["box"], BOX
    instance[8:20, 16:18], classes[8:20, 16:18], image[8:20, 16:18] = 2, CLASS_ID["person"], PERSON
    label = instance.astype(np.int64) * 16 + classes
    edge = np.zeros((24, 24), bool)
    edge[:, 1:] |= label[:, 1:] != label[:, :-1]
    edge[1:, :] |= label[1:, :] != label[:-1, :]
    objects = [SceneObject("box", "blue", 5.0, 1, area=36), SceneObject("person", "red", 4.0, 2, area=24)]
    zeros = np.zeros((24, 24), np.float32)
    return Scene(image=image, depth=zeros + 10, normals=np.zeros((24, 24, 3), np.float32), class_map=classes,
                 instance_map=instance, boundaries=edge.astype(np.float32), objects=objects)


def test_region_iou_perfect_empty_recoloured_and_shifted_by_hand():
    scene = _hand_scene()
    assert region_iou(scene.image, scene) == 1.0
    assert region_iou(np.full_like(scene.image, 128), scene) == 0.0  # no structure: all read as room
    # Colours are the text's job: the same layout in other colours is still perfect.
    recoloured = scene.image[..., ::-1].copy()
    recoloured[scene.instance_map == 0] = (10, 120, 30)
    assert region_iou(recoloured, scene) == 1.0
    # The box drawn 2 px to the right: its pixels still stand out (segmentation = the shifted box),
    # IoU 24 / 48 = 0.5 for the box; the person is untouched (1.0): mean 0.75.
    shifted = scene.image.copy()
    shifted[4:10, 4:10] = WALL
    shifted[4:10, 6:12] = BOX
    assert region_iou(shifted, scene) == pytest.approx(0.75)


def test_figure_iou_follows_the_figure_only():
    scene = _hand_scene()
    assert figure_iou(scene.image, scene) == 1.0
    assert figure_iou(np.full_like(scene.image, 128), scene) == 0.0
    no_box = scene.image.copy()
    no_box[4:10, 4:10] = WALL  # the other object is gone: pose is unaffected, layout is not
    assert figure_iou(no_box, scene) == 1.0
    assert region_iou(no_box, scene) == pytest.approx(0.5)
    # The figure 1 px to the right: predicted cols 17-18 against true 16-17 -> IoU 12 / 36.
    moved = scene.image.copy()
    moved[8:20, 16:18] = WALL
    moved[8:20, 17:19] = PERSON
    assert figure_iou(moved, scene) == pytest.approx(1 / 3)
    figureless = _hand_scene()
    figureless.objects = figureless.objects[:1]
    assert math.isnan(figure_iou(scene.image, figureless))


def test_boundary_f1_perfect_empty_and_shifted():
    scene = _hand_scene()
    # Canny on the ground truth itself misses a few corner pixels of the exact geometric boundary, so
    # it scores just under 1; the control score's ceiling (ground truth through the VAE) absorbs that.
    assert boundary_f1(scene.image, scene) > 0.9
    assert boundary_f1(np.full_like(scene.image, 128), scene) == 0.0
    shifted = np.roll(scene.image, 5, axis=1)  # vertical edges 5 px off (beyond the 2 px tolerance)
    assert 0.0 < boundary_f1(shifted, scene) < 0.9
    with pytest.raises(ValueError, match="generated must be"):
        boundary_f1(scene.image[..., 0], scene)


def test_colour_free_metrics_on_world_scenes():
    """On real world scenes the ground-truth image scores (near) perfectly; a blank image scores 0."""
    world = SceneWorld()
    for seed in range(4):
        scene = world.sample(2_000_000_000 + seed)
        assert region_iou(scene.image, scene) > 0.8
        assert boundary_f1(scene.image, scene) > 0.8
        blank = np.full_like(scene.image, 90)
        assert region_iou(blank, scene) == 0.0
        if any(o.kind == "person" and o.area > 0 for o in scene.objects):
            assert figure_iou(scene.image, scene) > 0.7
            assert figure_iou(blank, scene) == 0.0


# -- control_score -------------------------------------------------------------------------------------
def test_control_score():
    assert control_score(0.2, floor=0.2, ceiling=0.8) == 0.0
    assert control_score(0.8, floor=0.2, ceiling=0.8) == 1.0
    assert control_score(0.5, floor=0.2, ceiling=0.8) == pytest.approx(0.5)
    assert control_score(1.5, floor=0.2, ceiling=0.8) == 1.0
    assert control_score(-1.0, floor=0.2, ceiling=0.8) == 0.0
    # Lower is better (e.g. RMSE in [0, 40]): mirrored.
    assert control_score(0.0, floor=0.0, ceiling=40.0, higher_is_better=False) == 1.0
    assert control_score(40.0, floor=0.0, ceiling=40.0, higher_is_better=False) == 0.0
    assert control_score(10.0, floor=0.0, ceiling=40.0, higher_is_better=False) == pytest.approx(0.75)
    assert control_score(99.0, floor=0.0, ceiling=40.0, higher_is_better=False) == 0.0
    assert math.isnan(control_score(0.5, floor=0.3, ceiling=0.3))
    assert math.isnan(control_score(math.nan, floor=0.0, ceiling=1.0))
    with pytest.raises(ValueError, match="floor"):
        control_score(0.5, floor=1.0, ceiling=0.0)


def test_normalised_control_by_hand():
    from metacontrol.eval.harness import normalised_control

    scores = {"a": np.array([0.2, 0.6, 1.0]), "b": np.array([10.0, np.nan, 30.0]), "c": np.array([5.0, 5.0, 5.0])}
    floor, ceiling = {"a": 0.2, "b": 10.0, "c": 5.0}, {"a": 0.6, "b": 30.0, "c": 5.0}
    # a: (0, 1, 2); b: (0, nan, 1); c has no range and is left out -> means (0, 1, 1.5), unclipped.
    np.testing.assert_allclose(normalised_control(scores, floor, ceiling, ("a", "b", "c")), [0.0, 1.0, 1.5])
    np.testing.assert_allclose(normalised_control(scores, floor, ceiling, ("b",)), [0.0, np.nan, 1.0])
    assert np.isnan(normalised_control(scores, floor, ceiling, ("c",))).all()


def test_normalised_control_reads_errors_the_same_way():
    """An error (depth RMSE, normal angle): the ceiling is below the floor; halfway between scores 0.5."""
    from metacontrol.eval.harness import normalised_control

    scores = {"normal_angle": np.array([60.0, 35.0, 10.0, 70.0]), "depth_rmse": np.array([0.4, 0.3, 0.2, 0.5])}
    floor, ceiling = {"normal_angle": 60.0, "depth_rmse": 0.4}, {"normal_angle": 10.0, "depth_rmse": 0.2}
    np.testing.assert_allclose(normalised_control(scores, floor, ceiling, ("normal_angle",)), [0, 0.5, 1, -0.2])
    np.testing.assert_allclose(normalised_control(scores, floor, ceiling, ("depth_rmse",)), [0, 0.5, 1, -0.5])
    # an error whose "ceiling" is worse than its floor has nothing to normalise by
    worse = {"normal_angle": 80.0, "depth_rmse": 0.2}
    assert np.isnan(normalised_control(scores, floor, worse, ("normal_angle",))).all()


def test_openpose_keypoints_to_pixels_and_pck_by_hand():
    """controlnet-aux's PoseResult (keypoints in [0, 1]) -> pixel rows of the most confident person; PCK@0.1."""
    from controlnet_aux.open_pose import PoseResult
    from controlnet_aux.open_pose.body import BodyResult, Keypoint

    from metacontrol.conditions.builtin import openpose_keypoints
    from metacontrol.eval.harness import PCK_THRESHOLD

    def person(points: dict[int, tuple[float, float]], score: float) -> PoseResult:
        keypoints = [Keypoint(*points[i]) if i in points else None for i in range(18)]
        return PoseResult(BodyResult(keypoints, score, len(points)), None, None, None)

    truth = {0: (0.5, 0.25), 1: (0.5, 0.5), 2: (0.25, 0.5), 3: (0.75, 0.75)}
    faint = person({0: (0.0, 0.0)}, score=0.5)
    target = openpose_keypoints([faint, person(truth, score=3.0)], (64, 128))  # H 64, W 128
    assert target[:4].tolist() == [[64, 16, 1], [64, 32, 1], [32, 32, 1], [96, 48, 1]] and not target[4:].any()
    assert not openpose_keypoints([], (64, 64)).any()  # nobody found: every keypoint invisible
    # shifted right by 10 px (within 0.1 x 128 = 12.8) except keypoint 3 (by 20 px); keypoint 2 not found
    shifted = {0: (0.5 + 10 / 128, 0.25), 1: (0.5 + 10 / 128, 0.5), 3: (0.75 + 20 / 128, 0.75)}
    found = openpose_keypoints([person(shifted, 1.0)], (64, 128))
    assert pck(found, target, PCK_THRESHOLD * 128) == pytest.approx(2 / 4)
    assert pck(target, target, PCK_THRESHOLD * 128) == 1.0
    assert pck(openpose_keypoints([], (64, 128)), target, PCK_THRESHOLD * 128) == 0.0
