"""The synthetic world's ground truth: determinism, field contracts, and geometric consistency between maps.

Every condition map is rendered from these fields, so an inconsistency here (a keypoint off its limb, a far
object painted over a near one) silently becomes a wrong training target downstream.
"""

from __future__ import annotations

import numpy as np
import pytest

from metacontrol.config_loader import ConfigError
from metacontrol.world import (
    CAMERA_HEIGHT,
    CLASS_ID,
    CLASSES,
    COLOURS,
    FOCAL,
    WALL_DEPTH,
    Scene,
    SceneObject,
    SceneWorld,
    WorldConfig,
    _Canvas,
)

# OpenPose-18 indices of neck, shoulders, elbows, wrists, hips, knees, ankles: the points on drawn limbs
# (nose, eyes and ears sit on or beside the head disc and are not limb endpoints).
BODY_KEYPOINTS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13)
# How far each kind's visible surface may lie from its ``depth`` attribute (nearer, farther), in world units:
# a ball bulges up to its radius (<= 1.0) towards the camera, a box's lid sits 0.3 behind its front face.
DEPTH_EXTENT = {"ball": (1.0, 0.0), "box": (0.0, 0.3), "triangle": (0.0, 0.0), "person": (0.0, 0.0)}


class _MaskRecordingWorld(SceneWorld):
    """A SceneWorld that also keeps each object's full silhouette, before nearer objects cover parts of it.

    Right after an object is painted every supersample it covers carries its instance id, so reading the
    canvas at that moment gives the whole mask without re-implementing any shape.
    """

    def __init__(self, config: WorldConfig) -> None:
        super().__init__(config)
        self.masks: dict[int, np.ndarray] = {}

    def _paint_object(self, canvas: _Canvas, obj: SceneObject, rng: np.random.Generator) -> None:
        super()._paint_object(canvas, obj, rng)
        s = self.config.supersample
        centre = canvas.instances[s // 2 :: s, s // 2 :: s]
        self.masks[obj.instance_id] = centre == obj.instance_id


def _assert_same_scene(a: Scene, b: Scene) -> None:
    for name in ("image", "depth", "normals", "class_map", "instance_map", "boundaries"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert x.tobytes() == y.tobytes(), f"{name} differs for the same seed"
    assert a.caption == b.caption
    assert (a.wall_colour, a.floor_colour) == (b.wall_colour, b.floor_colour)
    assert [(o.kind, o.colour, o.depth, o.instance_id, o.area) for o in a.objects] == [
        (o.kind, o.colour, o.depth, o.instance_id, o.area) for o in b.objects
    ]
    for ka, kb in zip(a.keypoints, b.keypoints, strict=True):
        assert ka.tobytes() == kb.tobytes()


def test_same_seed_same_scene_bit_for_bit_and_seeds_differ() -> None:
    world = SceneWorld()
    for seed in (0, 7, 123456):
        # A fresh world too: nothing may leak between samples through generator state.
        _assert_same_scene(world.sample(seed), SceneWorld().sample(seed))
    images = [world.sample(seed).image.tobytes() for seed in range(6)]
    assert len(set(images)) == len(images)
    captions = {world.sample(seed).caption for seed in range(6)}
    assert len(captions) > 1


@pytest.mark.parametrize("resolution", [64, 32])
def test_field_shapes_dtypes_and_ranges(resolution: int) -> None:
    world = SceneWorld(WorldConfig(resolution=resolution))
    r = resolution
    for seed in range(5):
        scene = world.sample(seed)
        assert scene.image.shape == (r, r, 3) and scene.image.dtype == np.uint8
        assert scene.depth.shape == (r, r) and scene.depth.dtype == np.float32
        assert np.all(scene.depth > 0) and np.all(scene.depth <= WALL_DEPTH)
        assert scene.normals.shape == (r, r, 3) and scene.normals.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(scene.normals, axis=-1), 1.0, atol=1e-3)
        assert scene.class_map.shape == (r, r) and scene.class_map.dtype == np.uint8
        assert scene.class_map.max() < len(CLASSES)
        assert scene.instance_map.shape == (r, r) and scene.instance_map.dtype == np.int32
        assert scene.instance_map.min() >= 0 and scene.instance_map.max() <= len(scene.objects)
        assert scene.boundaries.shape == (r, r) and scene.boundaries.dtype == np.float32
        assert scene.boundaries.min() >= 0.0 and scene.boundaries.max() <= 1.0
        assert scene.boundaries.max() > 0.0  # at least the horizon
        # Instances and classes agree: the room is wall/floor, object k has its own kind's class.
        room = scene.instance_map == 0
        assert set(np.unique(scene.class_map[room])) <= {CLASS_ID["wall"], CLASS_ID["floor"]}
        for obj in scene.objects:
            mine = scene.instance_map == obj.instance_id
            assert obj.area == int(mine.sum())
            assert np.all(scene.class_map[mine] == CLASS_ID[obj.kind])
        for person in scene.keypoints:
            assert person.shape == (18, 3) and person.dtype == np.float32
            assert set(np.unique(person[:, 2])) <= {0.0, 1.0}


def test_objects_are_drawn_far_to_near_and_sit_in_front_of_the_room() -> None:
    world = SceneWorld(WorldConfig(min_objects=3, max_objects=5))
    for seed in range(20):
        scene = world.sample(seed)
        assert [o.instance_id for o in scene.objects] == list(range(1, len(scene.objects) + 1))
        depths = [o.depth for o in scene.objects]
        assert depths == sorted(depths, reverse=True), "instance ids must follow decreasing depth"
        on_object = scene.instance_map > 0
        assert np.all(scene.depth[on_object] < WALL_DEPTH)
        wall = (scene.instance_map == 0) & (scene.class_map == CLASS_ID["wall"])
        assert np.all(scene.depth[wall] == WALL_DEPTH)
        for obj in scene.objects:
            nearer, farther = DEPTH_EXTENT[obj.kind]
            d = scene.depth[scene.instance_map == obj.instance_id]
            assert np.all(d >= obj.depth - nearer - 1e-4) and np.all(d <= obj.depth + farther + 1e-4), obj


def test_floor_recedes_towards_the_horizon() -> None:
    """Per column, visible floor is strictly farther on every row closer to the horizon (higher up)."""
    world = SceneWorld(WorldConfig(min_objects=0, max_objects=2))
    for seed in range(10):
        scene = world.sample(seed)
        floor = (scene.instance_map == 0) & (scene.class_map == CLASS_ID["floor"])
        assert floor.any()
        for col in range(floor.shape[1]):
            rows = np.flatnonzero(floor[:, col])
            assert np.all(np.diff(scene.depth[rows, col]) < 0), f"seed {seed} column {col}"
        # Everything below the horizon row of the wall is floor or object, never wall.
        wall_rows = np.flatnonzero((scene.class_map == CLASS_ID["wall"]).any(axis=1))
        floor_rows = np.flatnonzero((scene.class_map == CLASS_ID["floor"]).any(axis=1))
        assert wall_rows.max() < floor_rows.min()


def test_point_sampled_maps_are_exact_at_their_sample_points() -> None:
    """Depth and classes are exact at the supersample nearest the pixel centre: (i + 0.5 + 0.5/s) px."""
    for resolution in (24, 64):
        scene = SceneWorld(WorldConfig(resolution=resolution, min_objects=0, max_objects=0,
                                       figure_probability=0.0)).sample(0)
        s = WorldConfig().supersample
        centres = (np.arange(resolution) + 0.5 + 0.5 / s) / resolution
        horizon = 0.5 + FOCAL * CAMERA_HEIGHT / WALL_DEPTH
        is_floor = centres > horizon
        expected_class = np.where(is_floor, CLASS_ID["floor"], CLASS_ID["wall"])
        np.testing.assert_array_equal(scene.class_map[:, 0], expected_class, err_msg=f"{resolution} px")
        floor_depth = FOCAL * CAMERA_HEIGHT / (centres[is_floor] - 0.5)
        expected_depth = np.minimum(floor_depth, WALL_DEPTH)
        np.testing.assert_allclose(scene.depth[is_floor, 0], expected_depth, rtol=1e-5, err_msg=f"{resolution} px")


def test_overlaps_are_won_by_the_nearer_object() -> None:
    """With six objects and a figure overlaps are common: every contested pixel belongs to the nearest claimant."""
    world = _MaskRecordingWorld(WorldConfig(min_objects=6, max_objects=6, figure_probability=1.0))
    contested_pixels = 0
    for seed in range(6):
        world.masks.clear()
        scene = world.sample(seed)
        claims = np.stack([world.masks[o.instance_id] for o in scene.objects])  # (n, H, W)
        # The instance map shows exactly the union of all silhouettes.
        np.testing.assert_array_equal(scene.instance_map > 0, claims.any(axis=0))
        claim_depth = np.where(claims, np.array([o.depth for o in scene.objects])[:, None, None], np.inf)
        nearest = np.array([o.instance_id for o in scene.objects])[claim_depth.argmin(axis=0)]
        contested = claims.sum(axis=0) >= 2
        contested_pixels += int(contested.sum())
        np.testing.assert_array_equal(scene.instance_map[contested], nearest[contested])
    assert contested_pixels > 100, "the configuration no longer produces overlaps; the test proves nothing"


def test_pose_keypoints_land_on_the_drawn_limbs() -> None:
    """Visible body keypoints hit the figure's own pixels, or a nearer object that hides them."""
    world = SceneWorld(WorldConfig(figure_probability=1.0))
    hits = total = 0
    for seed in range(30):
        scene = world.sample(seed)
        h, w = scene.depth.shape
        depth_of = {o.instance_id: o.depth for o in scene.objects}
        people = [o for o in scene.objects if o.kind == "person"]
        assert len(people) == len(scene.keypoints) == 1
        person, keypoints = people[0], scene.keypoints[0]
        for x, y, visible in keypoints[list(BODY_KEYPOINTS)]:
            if not visible:
                continue
            total += 1
            col, row = int(x), int(y)
            near = scene.instance_map[max(row - 1, 0) : row + 2, max(col - 1, 0) : col + 2]
            if any(k == person.instance_id or (k > 0 and depth_of[int(k)] < person.depth) for k in near.ravel()):
                hits += 1
    assert total > 30 * 10
    # All of them hit today; a bar of 0.98 catches a keypoint grid shifted by 1.5 px (about 0.95 hit).
    assert hits / total > 0.98, f"{hits}/{total} visible body keypoints on their limbs"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _caption_objects(scene: Scene) -> list[str]:
    described = scene.caption.split(" in front of ")[0]
    return described.split(" and ")


def test_captions_name_the_room_and_lead_with_the_main_object() -> None:
    world = SceneWorld(WorldConfig(min_objects=2, max_objects=6))
    hidden_seen = 0
    for seed in range(25):
        scene = world.sample(seed)
        assert scene.caption.endswith(f"{scene.wall_colour} wall on {_article(scene.floor_colour)} "
                                      f"{scene.floor_colour} floor")
        assert f" {scene.wall_colour} wall" in scene.caption
        visible = [o for o in scene.objects if o.area > 0]
        main = scene.main_object
        assert main is not None and main.area == max(o.area for o in scene.objects)
        assert scene.caption.startswith(f"{_article(main.colour)} {main.colour} {main.kind} ")
        phrases = _caption_objects(scene)
        # One phrase per visible object, largest first; hidden objects are not described at all.
        assert len(phrases) == len(visible)
        by_area = sorted(visible, key=lambda o: -o.area)
        assert phrases == [f"{_article(o.colour)} {o.colour} {o.kind}" for o in by_area]
        hidden_seen += sum(o.area == 0 for o in scene.objects)
    assert hidden_seen > 0, "no fully hidden object in these seeds: the 'not mentioned' case went untested"


def test_empty_room_caption() -> None:
    scene = SceneWorld(WorldConfig(min_objects=0, max_objects=0, figure_probability=0.0)).sample(3)
    assert scene.objects == [] and scene.main_object is None
    assert scene.caption.startswith("an empty room")
    assert scene.wall_colour in COLOURS and scene.floor_colour in COLOURS
    assert scene.wall_colour != scene.floor_colour


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"resolution": 8}, "resolution"),
        ({"min_objects": 4, "max_objects": 2}, "min_objects"),
        ({"figure_probability": 1.5}, "figure_probability"),
        ({"supersample": 3}, "supersample"),
    ],
)
def test_world_config_validation_names_the_key(kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as info:
        WorldConfig(**kwargs)
    assert repr(next(iter(kwargs.values()))) in str(info.value)
