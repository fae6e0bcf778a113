"""``metacontrol`` and its small commands in real subprocesses: help, condition-map, annotate, generate.

Each output file is compared with what the library computes for the same input, so a command that
writes the wrong map, the wrong size or ignores a flag fails here.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from metacontrol.cli import COMMANDS
from metacontrol.commands import condition_map, generate_image, generate_main
from metacontrol.conditions import get_condition, load_annotator
from metacontrol.config_loader import ConfigError
from metacontrol.world import SceneWorld, WorldConfig
from tests.conftest import PYTHON, REPO, run_script

CLI = [PYTHON, "-m", "metacontrol.cli"]


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """In-process generation on one thread, as the subprocesses run (OMP_NUM_THREADS=1): on a shared CPU
    two threads of tiny matrices wait on each other and are many times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _one_error_line(result, *words: str) -> None:
    """Failed with status 1 and exactly one line on stderr that names every word."""
    assert result.returncode == 1, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and all(w in lines[0] for w in words), result.stderr


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_every_command_with_one_line(flag):
    result = run_script([*CLI, flag])
    listed = {line.split()[0]: line for line in result.stdout.splitlines() if line.startswith("  ")}
    assert list(listed) == list(COMMANDS)
    assert all(len(line.split()) > 2 for line in listed.values())  # each has its summary


def test_no_command_shows_the_list_and_an_unknown_one_a_single_line():
    bare = run_script(CLI, check=False)
    assert bare.returncode == 2 and all(f"  {name} " in bare.stderr for name in COMMANDS)
    unknown = run_script([*CLI, "condition-mapp"], check=False)
    assert unknown.returncode == 2 and unknown.stdout == ""
    assert unknown.stderr.count("\n") == 1 and "unknown command 'condition-mapp'" in unknown.stderr


def test_script_commands_run_their_script(capsys):
    from metacontrol.cli import main

    with pytest.raises(SystemExit) as info:
        main(["evaluate", "--help"])
    assert info.value.code == 0 and "Evaluate ControlNet checkpoints" in capsys.readouterr().out


def test_condition_map_writes_the_rendered_map_the_scene_and_prints_its_caption(tmp_path):
    result = run_script([*CLI, "condition-map", "normal", "--seed", "3", "--resolution", "32",
                         "-o", str(tmp_path / "maps/normal.png"), "--image-out", str(tmp_path / "scene.png")])
    scene = SceneWorld(WorldConfig(resolution=32)).sample(3)
    assert result.stdout.strip() == scene.caption
    np.testing.assert_array_equal(_pixels(tmp_path / "maps/normal.png"), get_condition("normal").render(scene))
    np.testing.assert_array_equal(_pixels(tmp_path / "scene.png"), scene.image)
    run_script([*CLI, "condition-map", "pose", "--seed", "3", "-o", str(tmp_path / "pose.png")])
    assert Image.open(tmp_path / "pose.png").size == (64, 64)  # the tiny model's resolution by default
    np.testing.assert_array_equal(_pixels(tmp_path / "pose.png"), np.asarray(condition_map("pose", 3)[0]))


def test_condition_map_rejects_an_unknown_condition_in_one_line(tmp_path):
    result = run_script([*CLI, "condition-map", "normals", "--seed", "0", "-o", str(tmp_path / "m.png")], check=False)
    _one_error_line(result, "'normals'", "normal, pose")
    assert not (tmp_path / "m.png").exists()


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """A non-square 'photo' (a world scene, cropped) saved as PNG."""
    path = tmp_path_factory.mktemp("photo") / "photo.png"
    Image.fromarray(SceneWorld(WorldConfig(resolution=64)).sample(1).image[:, :48]).save(path)
    return path


def test_annotate_canny_keeps_the_photo_size_and_matches_the_library(tmp_path, photo):
    run_script([*CLI, "annotate", "canny", str(photo), "-o", str(tmp_path / "canny.png")])
    expected = get_condition("canny").annotate(_pixels(photo))
    np.testing.assert_array_equal(_pixels(tmp_path / "canny.png"), expected)
    assert expected.shape == (64, 48, 3) and expected.max() == 255
    run_script([*CLI, "annotate", "canny", str(photo), "--resolution", "32", "-o", str(tmp_path / "small.png")])
    assert Image.open(tmp_path / "small.png").size == (32, 32)


def test_annotate_lineart_prints_no_third_party_warnings(tmp_path, photo):
    """controlnet-aux's import warns about mediapipe, timm and torch.jit: none of it reaches the user."""
    result = run_script([*CLI, "annotate", "lineart", str(photo), "-o", str(tmp_path / "lineart.png")])
    assert result.stderr == ""
    np.testing.assert_array_equal(_pixels(tmp_path / "lineart.png"), get_condition("lineart").annotate(_pixels(photo)))


def test_annotate_hed_reads_weights_from_a_folder(tmp_path, photo):
    import torch
    from controlnet_aux.hed import ControlNetHED_Apache2

    torch.manual_seed(0)
    folder = tmp_path / "annotators"
    folder.mkdir()
    torch.save(ControlNetHED_Apache2().state_dict(), folder / "ControlNetHED.pth")
    run_script([*CLI, "annotate", "hed", str(photo), "--annotators", str(folder), "-o", str(tmp_path / "hed.png")])
    load_annotator.cache_clear()
    np.testing.assert_array_equal(_pixels(tmp_path / "hed.png"),
                                  get_condition("hed").annotate(_pixels(photo), str(folder)))
    load_annotator.cache_clear()


def test_annotate_errors_are_one_line(tmp_path, photo):
    out = str(tmp_path / "x.png")
    _one_error_line(run_script([*CLI, "annotate", "hed", str(photo), "--annotators", str(tmp_path), "-o", out],
                               check=False), "ControlNetHED.pth", str(tmp_path))
    _one_error_line(run_script([*CLI, "annotate", "canny", str(tmp_path / "nope.jpg"), "-o", out], check=False),
                    "nope.jpg", "no such file")
    _one_error_line(run_script([*CLI, "annotate", "canny", str(photo), "-o", str(tmp_path / "x.unknown")],
                               check=False), "x.unknown", ".png")


@pytest.fixture(scope="module")
def controlnet_dir(tiny_sd_dir, tmp_path_factory):
    """A ControlNet for the tiny random model whose zero-initialised convolutions are not zero, so the map matters."""
    import torch

    from metacontrol.controlnet import create_controlnet
    from metacontrol.models.base import load_base_model

    torch.manual_seed(0)
    controlnet = create_controlnet(load_base_model(str(tiny_sd_dir)))
    with torch.no_grad():
        for name, p in controlnet.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")):
                p.normal_(0, 0.5)
    path = tmp_path_factory.mktemp("controlnet")
    controlnet.save_pretrained(path)
    return path


def test_generate_writes_the_pipeline_image(tmp_path, tiny_sd_dir, controlnet_dir):
    image, scene = condition_map("seg", seed=2)  # 64 px, centre-cropped (resized) to the test model's 32
    image.save(tmp_path / "seg.png")
    run_script([*CLI, "generate", "--controlnet", str(controlnet_dir), "--image", str(tmp_path / "seg.png"),
                "--prompt", scene.caption, "--base", str(tiny_sd_dir), "--steps", "3", "--seed", "5",
                "--resolution", "32", "-o", str(tmp_path / "out.png")])
    written = _pixels(tmp_path / "out.png").astype(int)

    def generated(map_path, seed):
        return np.asarray(generate_image(str(controlnet_dir), map_path, scene.caption, str(tiny_sd_dir), steps=3,
                                         seed=seed, resolution=32), int)

    reference = generated(tmp_path / "seg.png", 5)
    assert written.shape == (32, 32, 3)
    assert np.abs(written - reference).max() <= 2  # the same image (thread counts differ)
    condition_map("canny", seed=2)[0].save(tmp_path / "canny.png")
    other_seed, other_map = generated(tmp_path / "seg.png", 6), generated(tmp_path / "canny.png", 5)
    # the seed and the condition map both reach the pipeline
    assert not np.array_equal(other_seed, reference) and not np.array_equal(other_map, reference)


def test_generate_rejects_a_map_the_base_cannot_take(tmp_path, tiny_sd_dir, controlnet_dir, capsys):
    Image.new("RGB", (30, 30)).save(tmp_path / "odd.png")
    with pytest.raises(ConfigError, match=r"odd\.png: 30x30 px.*divisible by 4"):
        generate_image(str(controlnet_dir), tmp_path / "odd.png", "a ball", str(tiny_sd_dir))
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        generate_main(["--controlnet", str(controlnet_dir), "--image", str(tmp_path / "none.png"), "--prompt", "a",
                       "--base", str(tiny_sd_dir), "-o", str(tmp_path / "o.png")])
    assert info.value.code == 1
    assert capsys.readouterr().err == f"metacontrol generate: error: {tmp_path / 'none.png'}: no such file\n"
    assert not (tmp_path / "o.png").exists()


def test_readme_python_snippet_runs_as_written(tmp_path, monkeypatch):
    """The README's snippet, unedited, from a folder laid out like the repository after its fine-tune command.

    The fine-tuned folder it loads is the shipped meta-learned ControlNet (same shape, no training here).
    """
    snippet = re.search(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    controlnet = re.search(r'ControlNetModel\.from_pretrained\("([^"]+)"\)', snippet).group(1)
    (tmp_path / "checkpoints").symlink_to(REPO / "checkpoints")
    if not (tmp_path / controlnet).exists():
        (tmp_path / controlnet).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / controlnet).symlink_to(REPO / "checkpoints/meta-controlnet-tiny")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    image, normal_map = np.asarray(namespace["image"]), np.asarray(namespace["normal_map"])
    assert image.shape == normal_map.shape == (64, 64, 3)
    assert image.std() > 10  # a picture, not a blank
