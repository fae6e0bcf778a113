"""Condition maps: the registry, each map's visual convention, and controlnet-aux annotators from local folders.

Community ControlNets were trained on controlnet-aux's exact formats (cv2 Canny thresholds, the ADE20K
palette, OpenPose stick drawing, near-is-bright depth), so these tests pin our renders to those formats
rather than to our own code. controlnet-aux is imported inside the tests that need it: it costs seconds.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from metacontrol.conditions import (
    HELD_OUT_CONDITIONS,
    META_TRAIN_CONDITIONS,
    AnnotatorUnavailable,
    condition_names,
    get_condition,
    load_annotator,
)
from metacontrol.conditions.builtin import ADE20K_CLASS_INDEX, ADE20K_COLOURS, draw_openpose
from metacontrol.config_loader import ConfigError
from metacontrol.world import CLASS_ID, CLASSES, Scene, SceneWorld, WorldConfig
from tests.conftest import PYTHON, meta_train_args, run_script

# controlnet-aux's import warns about optional extras (mediapipe) and re-registered timm models: not ours.
pytestmark = [
    pytest.mark.filterwarnings("ignore:The module 'mediapipe' is not installed:UserWarning"),
    pytest.mark.filterwarnings("ignore:Overwriting tiny_vit:UserWarning"),
]

# Seed 1 of the default world has two balls, a triangle and a person, all visible at 64 and 32 px.
BUSY_SEED = 1


def _busy_scene(resolution: int) -> Scene:
    scene = SceneWorld(WorldConfig(resolution=resolution)).sample(BUSY_SEED)
    kinds = {o.kind for o in scene.objects if o.area > 0}
    assert "person" in kinds and len(kinds) >= 2, "the world changed: pick another BUSY_SEED"
    return scene


@pytest.fixture(autouse=True)
def _fresh_annotator_cache():
    """``load_annotator`` is lru_cached by (spec, folder): clear it so no test sees another's detector."""
    load_annotator.cache_clear()
    yield
    load_annotator.cache_clear()


@pytest.fixture(scope="module")
def hed_folder(tmp_path_factory) -> Path:
    """A local "Annotators" folder holding a randomly initialised HED network, as controlnet-aux saves it."""
    import torch
    from controlnet_aux.hed import ControlNetHED_Apache2

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("annotators")
    torch.save(ControlNetHED_Apache2().state_dict(), folder / "ControlNetHED.pth")
    return folder


def test_registry_holds_the_eight_conditions_split_into_train_and_held_out() -> None:
    names = condition_names()
    assert names == sorted(["canny", "hed", "scribble", "lineart", "depth", "normal", "seg", "pose"])
    assert sorted(META_TRAIN_CONDITIONS + HELD_OUT_CONDITIONS) == names


@pytest.mark.parametrize("resolution", [64, 32])
@pytest.mark.parametrize("name", ["canny", "hed", "scribble", "lineart", "depth", "normal", "seg", "pose"])
def test_every_condition_renders_a_non_trivial_rgb_map(name: str, resolution: int) -> None:
    scene = _busy_scene(resolution)
    out = get_condition(name).render(scene)
    assert out.shape == (resolution, resolution, 3) and out.dtype == np.uint8
    assert out.min() < out.max(), f"{name} map is constant"
    np.testing.assert_array_equal(out, get_condition(name).render(scene))  # no hidden randomness


def test_canny_is_cv2_canny_100_200_for_render_and_annotate() -> None:
    canny = get_condition("canny")
    for resolution in (64, 32):
        scene = _busy_scene(resolution)
        expected = cv2.Canny(scene.image, 100, 200)
        assert expected.any()
        np.testing.assert_array_equal(canny.render(scene), np.repeat(expected[:, :, None], 3, axis=2))
        np.testing.assert_array_equal(canny.annotate(scene.image), np.repeat(expected[:, :, None], 3, axis=2))


def test_depth_is_bright_near_and_monotone_in_depth() -> None:
    scene = _busy_scene(64)
    grey = get_condition("depth").render(scene)
    assert np.all(grey == grey[:, :, :1]), "depth map must be grey"
    value = grey[:, :, 0].ravel().astype(int)
    depth = scene.depth.ravel()
    assert value[depth.argmin()] == 255 and value[depth.argmax()] == 0
    order = np.argsort(depth, kind="stable")
    # Sorted by increasing depth the brightness never increases; strictly nearer can tie only on quantisation.
    assert np.all(np.diff(value[order]) <= 0)
    assert len(np.unique(value)) > 20


def test_normal_map_encodes_wall_and_floor_orientation() -> None:
    scene = _busy_scene(64)
    rgb = get_condition("normal").render(scene).astype(int)
    room = scene.instance_map == 0
    wall = rgb[room & (scene.class_map == CLASS_ID["wall"])]
    floor = rgb[room & (scene.class_map == CLASS_ID["floor"])]
    assert len(wall) and len(floor)
    assert np.abs(wall - [128, 128, 255]).max() <= 1
    assert np.abs(floor - [128, 255, 128]).max() <= 1


def test_seg_colours_are_the_ade20k_palette() -> None:
    from controlnet_aux.util import ade_palette

    palette = ade_palette()
    for cls, index in ADE20K_CLASS_INDEX.items():
        assert tuple(palette[index]) == ADE20K_COLOURS[index], cls
    world = SceneWorld(WorldConfig(min_objects=3, max_objects=6))
    seen = set()
    for seed in range(10):
        scene = world.sample(seed)
        seg = get_condition("seg").render(scene)
        for class_id, cls in enumerate(CLASSES):
            pixels = seg[scene.class_map == class_id]
            if len(pixels):
                seen.add(cls)
                assert np.all(pixels == palette[ADE20K_CLASS_INDEX[cls]]), cls
    assert seen == set(CLASSES)


def test_draw_openpose_matches_controlnet_aux_draw_bodypose() -> None:
    from controlnet_aux.open_pose.body import Keypoint
    from controlnet_aux.open_pose.util import draw_bodypose

    rng = np.random.default_rng(0)
    for trial in range(5):
        # Integer pixel coordinates: x / 512 * 512 is exact, so both sides see the same numbers.
        xy = rng.integers(20, 492, size=(18, 2)).astype(np.float64)
        visible = np.ones(18)
        visible[rng.integers(0, 18)] = 0  # one missing keypoint drops its limbs and its dot
        ours = draw_openpose(np.zeros((512, 512, 3), np.uint8), np.column_stack([xy, visible]), stickwidth=4)
        theirs = draw_bodypose(
            np.zeros((512, 512, 3), np.uint8),
            [Keypoint(x / 512, y / 512) if v else None for (x, y), v in zip(xy, visible)],
        )
        assert ours.any()
        np.testing.assert_array_equal(ours, theirs, err_msg=f"trial {trial}")


def test_lineart_annotator_needs_no_weights_and_keeps_the_input_size() -> None:
    image = cv2.resize(_busy_scene(64).image, (80, 48), interpolation=cv2.INTER_AREA)
    out = get_condition("lineart").annotate(image)
    assert out.shape == (48, 80, 3) and out.dtype == np.uint8
    assert out.max() > 0


def test_hed_and_scribble_annotators_load_weights_from_a_local_folder(hed_folder: Path) -> None:
    image = _busy_scene(64).image
    hed = get_condition("hed")
    first = hed.annotate(image, str(hed_folder))
    assert first.shape == (64, 64, 3) and first.dtype == np.uint8
    assert first.min() < first.max()
    np.testing.assert_array_equal(first, hed.annotate(image, str(hed_folder)))
    non_square = hed.annotate(image[:, :48], str(hed_folder))
    assert non_square.shape == (64, 48, 3)
    scribble = get_condition("scribble").annotate(image, str(hed_folder))
    assert scribble.shape == (64, 64, 3) and scribble.dtype == np.uint8
    assert set(np.unique(scribble)) <= {0, 255}


def test_missing_weights_name_the_file_and_the_folder(tmp_path: Path) -> None:
    image = _busy_scene(32).image
    with pytest.raises(AnnotatorUnavailable) as info:
        get_condition("hed").annotate(image, str(tmp_path))
    assert "ControlNetHED.pth" in str(info.value) and str(tmp_path) in str(info.value)
    with pytest.raises(AnnotatorUnavailable, match="ControlNetHED.pth"):
        get_condition("scribble").annotate(image, None)
    missing = tmp_path / "no" / "such" / "folder"
    with pytest.raises(AnnotatorUnavailable, match=f"^HEDdetector: annotator folder {missing} does not exist; "
                                                   "it must hold ControlNetHED.pth$"):  # fmt: skip
        get_condition("hed").annotate(image, str(missing))
    with pytest.raises(AnnotatorUnavailable, match="seg"):
        get_condition("seg").annotate(image, str(tmp_path))


def _hub_cache_with(repo: str, files: list[Path], cache: Path) -> None:
    """``cache`` laid out as ``hf_hub_download`` leaves it after fetching ``files`` from ``repo``'s main branch."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    (folder / "snapshots" / commit).mkdir(parents=True)
    for file in files:
        shutil.copy(file, folder / "snapshots" / commit / file.name)


def test_an_annotators_hub_id_is_tried_on_the_hub_even_offline(hed_folder: Path, tmp_path: Path, monkeypatch) -> None:
    """`lllyasviel/Annotators` is a Hub id, not a missing path: offline, the local Hub cache may hold it."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets when the hub is imported
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    hed = get_condition("hed")
    with pytest.raises(AnnotatorUnavailable) as info:
        load_annotator(hed.annotator, "lllyasviel/Annotators")
    message = str(info.value)
    assert message.startswith("HEDdetector: cannot load ControlNetHED.pth from the Hub repo lllyasviel/Annotators: ")
    assert "HF_HUB_OFFLINE" in message and "\n" not in message and "does not exist" not in message

    _hub_cache_with("lllyasviel/Annotators", [hed_folder / "ControlNetHED.pth"], tmp_path / "hub")
    image = _busy_scene(64).image
    np.testing.assert_array_equal(hed.annotate(image, "lllyasviel/Annotators"), hed.annotate(image, str(hed_folder)))


def test_annotator_weights_missing_from_the_offline_hub_stop_a_run_in_one_line(tiny_sd_dir, tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(_busy_scene(32).image).save(folder / "scene.png")
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "scene.png", "text": "a scene"}) + "\n")
    result = run_script([PYTHON, "meta_train.py", *meta_train_args(
        tiny_sd_dir, tmp_path / "out", "data.source=imagefolder", f"data.train_data_dir={folder}", "data.tasks=[hed]",
        "data.annotators=lllyasviel/Annotators")], env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")},
        check=False)  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if "Annotators" in line]
    assert len(lines) == 1 and lines[0].startswith(
        "meta_train: configuration error: HEDdetector: cannot load ControlNetHED.pth from the Hub repo "
        "lllyasviel/Annotators: ") and "HF_HUB_OFFLINE" in lines[0]  # fmt: skip


def test_unknown_condition_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="nope") as info:
        get_condition("nope")
    for name in condition_names():
        assert name in str(info.value)
