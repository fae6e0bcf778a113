"""The synthetic scene world: procedural scenes whose ground truth gives every condition map exactly.

A scene is a room (a back wall and a floor plane seen by a pinhole camera) with balls, boxes,
triangles and articulated stick figures standing on the floor. Everything is drawn far to near
(painter's algorithm) at ``supersample`` times the output resolution and box-filtered down for
anti-aliasing; depth, normals, classes and instances are point-sampled (not averaged) so they stay
exact: at the supersample nearest each pixel centre, i.e. at (i + 0.5 + 0.5 / s) px for an even
supersampling factor s, 1/8 px off the centre at the default s = 4. The same seed gives the same scene, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from metacontrol.config_loader import check

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (40, 80, 215),
    "yellow": (230, 205, 40),
    "purple": (140, 60, 175),
    "orange": (240, 135, 30),
    "white": (240, 240, 240),
    "gray": (120, 120, 120),
}
OBJECT_SHAPES = ("ball", "box", "triangle")
# Class ids of the class map; 0 and 1 are the room itself.
CLASSES = ("wall", "floor", "ball", "box", "triangle", "person")
CLASS_ID = {name: i for i, name in enumerate(CLASSES)}

# OpenPose body-18 order, as controlnet-aux uses it.
KEYPOINT_NAMES = (
    "nose", "neck", "r_shoulder", "r_elbow", "r_wrist", "l_shoulder", "l_elbow", "l_wrist",
    "r_hip", "r_knee", "r_ankle", "l_hip", "l_knee", "l_ankle", "r_eye", "l_eye", "r_ear", "l_ear",
)  # fmt: skip
# Limbs drawn as capsules for the figure's body (pairs of keypoint indices).
BODY_LIMBS = ((1, 2), (2, 3), (3, 4), (1, 5), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12), (12, 13), (8, 11))

WALL_DEPTH = 12.0  # distance of the back wall
CAMERA_HEIGHT = 1.6  # camera height above the floor, in world units
FOCAL = 1.1  # focal length in units of image height


@dataclass
class SceneOptions:
    """What the world's scenes hold and how they are drawn, at any resolution: the ``world`` section of the
    training configs, whose scenes are rendered at the run's own ``resolution`` (one key, not two)."""

    min_objects: int = 1
    max_objects: int = 3
    figure_probability: float = 0.8
    supersample: int = 4
    shading: bool = True

    def __post_init__(self) -> None:
        check(0 <= self.min_objects <= self.max_objects, "min_objects", self.min_objects,
              f"0 <= min_objects <= max_objects ({self.max_objects})")
        check(0.0 <= self.figure_probability <= 1.0, "figure_probability", self.figure_probability,
              "a probability in [0, 1]")
        check(self.supersample in (1, 2, 4, 8), "supersample", self.supersample, "1, 2, 4 or 8")


@dataclass
class WorldConfig(SceneOptions):
    """Knobs of the synthetic world and its resolution. Defaults give the embedded 64x64 world."""

    resolution: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.resolution >= 16, "resolution", self.resolution, "an integer >= 16")


@dataclass
class SceneObject:
    """One drawn thing, in the order it was drawn (far to near)."""

    kind: str  # ball | box | triangle | person
    colour: str
    depth: float
    instance_id: int
    area: int = 0  # visible pixels in the output image
    keypoints: np.ndarray | None = None  # (18, 2) pixel coordinates (x, y) for persons


@dataclass
class Scene:
    """All ground truth of one sample. Arrays are (H, W[, C]) at the output resolution."""

    image: np.ndarray  # uint8 RGB
    depth: np.ndarray  # float32 distance from the camera (larger = farther)
    normals: np.ndarray  # float32 unit normals, camera frame: x right, y up, z towards the camera
    class_map: np.ndarray  # uint8 ids into CLASSES
    instance_map: np.ndarray  # int32, 0 = room, k >= 1 = objects[k - 1]
    boundaries: np.ndarray  # float32 in [0, 1]: fraction of supersamples on an object boundary
    objects: list[SceneObject] = field(default_factory=list)
    wall_colour: str = ""
    floor_colour: str = ""
    caption: str = ""
    seed: int = 0

    @property
    def keypoints(self) -> list[np.ndarray]:
        """Per person, (18, 3) array of x, y (pixels) and visibility (1 inside the image)."""
        out = []
        h, w = self.depth.shape
        for obj in self.objects:
            if obj.keypoints is None:
                continue
            xy = obj.keypoints
            inside = (xy[:, 0] >= 0) & (xy[:, 0] < w) & (xy[:, 1] >= 0) & (xy[:, 1] < h)
            out.append(np.concatenate([xy, inside[:, None].astype(np.float32)], axis=1))
        return out

    @property
    def main_object(self) -> SceneObject | None:
        """The object with the largest visible area: the one the caption names first."""
        visible = [o for o in self.objects if o.area > 0]
        return max(visible, key=lambda o: o.area) if visible else None


class _Canvas:
    """Supersampled buffers that shapes are painted into, far to near."""

    def __init__(self, size: int) -> None:
        self.size = size
        coords = (np.arange(size, dtype=np.float32) + 0.5) / size  # normalised pixel centres
        self.ys, self.xs = np.meshgrid(coords, coords, indexing="ij")
        self.rgb = np.zeros((size, size, 3), np.float32)
        self.depth = np.zeros((size, size), np.float32)
        self.normals = np.zeros((size, size, 3), np.float32)
        self.classes = np.zeros((size, size), np.uint8)
        self.instances = np.zeros((size, size), np.int32)

    def paint(self, mask, colour, depth, normals, class_id: int, instance_id: int, shade) -> None:
        self.rgb[mask] = np.clip(np.asarray(colour, np.float32)[None] * shade[mask][:, None], 0, 255)
        self.depth[mask] = depth[mask] if np.ndim(depth) else depth
        self.normals[mask] = normals[mask] if np.ndim(normals) == 3 else normals
        self.classes[mask] = class_id
        self.instances[mask] = instance_id


def _floor_row(depth: float) -> float:
    """Normalised image row (0 top, 1 bottom) where the floor is at ``depth``; horizon at 0.5."""
    return 0.5 + FOCAL * CAMERA_HEIGHT / depth


def _capsule_mask(xs, ys, p0, p1, radius) -> np.ndarray:
    d = np.asarray(p1, np.float32) - np.asarray(p0, np.float32)
    t = ((xs - p0[0]) * d[0] + (ys - p0[1]) * d[1]) / max(float(d @ d), 1e-8)
    t = np.clip(t, 0.0, 1.0)
    return (xs - (p0[0] + t * d[0])) ** 2 + (ys - (p0[1] + t * d[1])) ** 2 <= radius**2


def _figure_keypoints(rng: np.random.Generator, foot_x: float, foot_y: float, height: float) -> np.ndarray:
    """18 OpenPose keypoints (normalised x, y) of a standing figure with random limb angles."""
    u = height / 8.0  # body unit: a figure is eight heads tall
    kp = np.zeros((18, 2), np.float32)
    lean = rng.uniform(-0.15, 0.15)
    hip = np.array([foot_x + lean * u, foot_y - 4.0 * u])
    neck = hip + np.array([lean * u * 2, -2.8 * u])
    kp[1] = neck
    kp[0] = neck + np.array([rng.uniform(-0.3, 0.3) * u, -0.9 * u])  # nose
    for side, sign in ((0, -1.0), (1, 1.0)):  # 0 = right (image left), 1 = left
        shoulder, elbow, wrist, hip_i, knee, ankle = (2, 3, 4, 8, 9, 10) if side == 0 else (5, 6, 7, 11, 12, 13)
        kp[shoulder] = neck + np.array([sign * 0.9 * u, 0.15 * u])
        arm_up = rng.uniform(-0.5, 2.6)  # angle from hanging down, outward
        fore = arm_up + rng.uniform(-0.6, 1.2)
        kp[elbow] = kp[shoulder] + 1.5 * u * np.array([sign * np.sin(arm_up), np.cos(arm_up)])
        kp[wrist] = kp[elbow] + 1.4 * u * np.array([sign * np.sin(fore), np.cos(fore)])
        kp[hip_i] = hip + np.array([sign * 0.5 * u, 0.0])
        leg = rng.uniform(-0.1, 0.45)
        kp[knee] = kp[hip_i] + 2.0 * u * np.array([sign * np.sin(leg), np.cos(leg)])
        shin = leg * rng.uniform(0.0, 0.6)
        kp[ankle] = kp[knee] + 2.0 * u * np.array([sign * np.sin(shin), np.cos(shin)])
    kp[14] = kp[0] + np.array([-0.25 * u, -0.2 * u])  # r_eye
    kp[15] = kp[0] + np.array([0.25 * u, -0.2 * u])  # l_eye
    kp[16] = kp[0] + np.array([-0.5 * u, -0.05 * u])  # r_ear
    kp[17] = kp[0] + np.array([0.5 * u, -0.05 * u])  # l_ear
    return kp


def _describe_objects(objects: list[SceneObject]) -> str:
    return " and ".join(f"{_article(o.colour)} {o.colour} {o.kind}" for o in objects)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


class SceneWorld:
    """Seeded generator of synthetic scenes: ``SceneWorld(config).sample(seed)``."""

    def __init__(self, config: WorldConfig | None = None) -> None:
        self.config = config or WorldConfig()
        self._canvas_size = self.config.resolution * self.config.supersample

    def sample(self, seed: int) -> Scene:
        cfg = self.config
        rng = np.random.default_rng(seed)
        canvas = _Canvas(self._canvas_size)
        names = list(COLOURS)
        wall, floor = rng.choice(names, size=2, replace=False)
        self._paint_room(canvas, COLOURS[wall], COLOURS[floor])

        kinds = list(rng.choice(OBJECT_SHAPES, size=rng.integers(cfg.min_objects, cfg.max_objects + 1)))
        if rng.random() < cfg.figure_probability:
            kinds.append("person")
        object_colours = [c for c in names if c not in (wall, floor)]
        depths = rng.uniform(3.8, 9.0, size=len(kinds))
        objects = []
        for order, idx in enumerate(np.argsort(-depths)):  # far to near
            kind = kinds[idx]
            obj = SceneObject(kind=str(kind), colour=str(rng.choice(object_colours)), depth=float(depths[idx]),
                              instance_id=order + 1)
            self._paint_object(canvas, obj, rng)
            objects.append(obj)
        return self._finish(canvas, objects, str(wall), str(floor), seed)

    # -- painting ---------------------------------------------------------------------------------
    def _paint_room(self, canvas: _Canvas, wall_rgb, floor_rgb) -> None:
        ys = canvas.ys
        is_floor = ys > _floor_row(WALL_DEPTH)
        floor_depth = FOCAL * CAMERA_HEIGHT / np.maximum(ys - 0.5, 1e-6)
        depth = np.where(is_floor, np.minimum(floor_depth, WALL_DEPTH), WALL_DEPTH).astype(np.float32)
        # Light falls off gently with distance on the floor: gives the floor some texture for depth cues.
        shade = np.where(is_floor, 0.8 + 0.2 * np.clip(1.0 - depth / WALL_DEPTH, 0, 1), 1.0).astype(np.float32)
        if not self.config.shading:
            shade = np.ones_like(shade)
        canvas.paint(~is_floor, wall_rgb, depth, np.array([0, 0, 1], np.float32), CLASS_ID["wall"], 0, shade)
        canvas.paint(is_floor, floor_rgb, depth, np.array([0, 1, 0], np.float32), CLASS_ID["floor"], 0, shade)

    def _paint_object(self, canvas: _Canvas, obj: SceneObject, rng: np.random.Generator) -> None:
        xs, ys = canvas.xs, canvas.ys
        scale = FOCAL / obj.depth  # projected size of one world unit, in image heights
        foot_y = _floor_row(obj.depth)
        cx = rng.uniform(0.12, 0.88)
        colour = COLOURS[obj.colour]
        flat_normal = np.array([0, 0, 1], np.float32)
        ones = np.ones_like(xs)
        class_id = CLASS_ID[obj.kind]
        if obj.kind == "ball":
            r = scale * rng.uniform(0.6, 1.0)
            cy = foot_y - r
            dx, dy = (xs - cx) / r, (ys - cy) / r
            d2 = dx * dx + dy * dy
            mask = d2 <= 1.0
            nz = np.sqrt(np.clip(1.0 - d2, 0.0, 1.0))
            normals = np.stack([dx, -dy, nz], axis=-1).astype(np.float32)
            depth = (obj.depth - nz * r / scale).astype(np.float32)
            light = np.array([-0.4, 0.5, 0.77], np.float32)
            shade = 0.55 + 0.45 * np.clip(normals @ light, 0, 1) if self.config.shading else ones
            canvas.paint(mask, colour, depth, normals, class_id, obj.instance_id, shade)
        elif obj.kind == "box":
            half_w, height = scale * rng.uniform(0.5, 0.9), scale * rng.uniform(0.9, 1.7)
            top = foot_y - height
            # Seen from above the camera's eye line is lower than the box, so its top face shows.
            lid = (np.abs(xs - cx) <= half_w) & (ys < top) & (ys >= top - 0.3 * half_w)
            up = np.array([0, 1, 0], np.float32)
            canvas.paint(lid, colour, obj.depth + 0.3, up, class_id, obj.instance_id, ones * (1.2 if self.config.shading else 1.0))
            front = (np.abs(xs - cx) <= half_w) & (ys <= foot_y) & (ys >= top)
            canvas.paint(front, colour, obj.depth, flat_normal, class_id, obj.instance_id, ones)
        elif obj.kind == "triangle":
            half_w, height = scale * rng.uniform(0.6, 1.0), scale * rng.uniform(1.0, 1.8)
            t = (foot_y - ys) / height  # 0 at the base, 1 at the apex
            mask = (t >= 0) & (t <= 1) & (np.abs(xs - cx) <= half_w * (1 - t))
            canvas.paint(mask, colour, obj.depth, flat_normal, class_id, obj.instance_id, ones)
        elif obj.kind == "person":
            height = scale * CAMERA_HEIGHT * rng.uniform(0.9, 1.1) * 1.1
            kp = _figure_keypoints(rng, cx, foot_y, height)
            radius = height / 22.0
            mask = (xs - kp[0, 0]) ** 2 + (ys - kp[0, 1]) ** 2 <= (2.4 * radius) ** 2  # head
            for a, b in BODY_LIMBS:
                mask |= _capsule_mask(xs, ys, kp[a], kp[b], radius * (1.5 if (a, b) in ((1, 8), (1, 11), (8, 11)) else 1.0))
            canvas.paint(mask, colour, obj.depth, flat_normal, class_id, obj.instance_id, ones)
            obj.keypoints = (kp * self.config.resolution).astype(np.float32)
        else:  # pragma: no cover - kinds come from OBJECT_SHAPES
            raise ValueError(f"unknown object kind {obj.kind!r}")

    # -- resolve ----------------------------------------------------------------------------------
    def _finish(self, canvas: _Canvas, objects: list[SceneObject], wall: str, floor: str, seed: int) -> Scene:
        s, res = self.config.supersample, self.config.resolution
        image = canvas.rgb.reshape(res, s, res, s, 3).mean(axis=(1, 3))
        centre = s // 2
        pick = (slice(centre, None, s), slice(centre, None, s))
        instances = canvas.instances[pick]
        # Boundaries: a supersample whose right or lower neighbour belongs to another region.
        region = canvas.instances.astype(np.int64) * len(CLASSES) + canvas.classes
        edge = np.zeros(region.shape, bool)
        edge[:, :-1] |= region[:, :-1] != region[:, 1:]
        edge[:-1, :] |= region[:-1, :] != region[1:, :]
        boundaries = edge.reshape(res, s, res, s).mean(axis=(1, 3)).astype(np.float32)
        for obj in objects:
            obj.area = int((instances == obj.instance_id).sum())
        visible = sorted((o for o in objects if o.area > 0), key=lambda o: -o.area)
        room = f"{_article(wall)} {wall} wall on {_article(floor)} {floor} floor"
        caption = f"{_describe_objects(visible)} in front of {room}" if visible else f"an empty room : {room}"
        return Scene(
            image=np.clip(np.rint(image), 0, 255).astype(np.uint8),
            depth=canvas.depth[pick].copy(),
            normals=canvas.normals[pick].copy(),
            class_map=canvas.classes[pick].copy(),
            instance_map=instances.copy(),
            boundaries=boundaries,
            objects=objects,
            wall_colour=wall,
            floor_colour=floor,
            caption=caption,
            seed=seed,
        )


def vocabulary() -> list[str]:
    """Every word a caption can contain, for building the tokenizer offline."""
    words = {"a", "an", "and", "in", "front", "of", "wall", "on", "floor", "empty", "room", ":"}
    words |= set(COLOURS) | set(OBJECT_SHAPES) | {"person"}
    return sorted(words)
