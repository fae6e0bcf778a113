"""Generated condition tasks: a name fixes its map, families expand reproducibly, held-out kinds never leak, a
mixture is the blend of its parts, and meta-training runs on a family of them."""

from __future__ import annotations

import numpy as np
import pytest

from metacontrol.conditions import get_condition
from metacontrol.conditions.generated import KINDS, check_held_out, expand_tasks, make
from metacontrol.config import MetaTrainConfig
from metacontrol.config_loader import ConfigError, load_config
from metacontrol.world import SceneWorld, WorldConfig
from tests.conftest import PYTHON, meta_train_args, run_script

SCENES = [SceneWorld(WorldConfig(resolution=32)).sample(seed) for seed in (1, 2)]


@pytest.mark.parametrize("kind", KINDS)
def test_a_name_renders_the_same_map_anywhere_and_other_seeds_other_maps(kind):
    name, other = f"gen-{kind}-11", f"gen-{kind}-12"
    for scene in SCENES:
        first, again = make(name).render(scene), make(name).render(scene)  # two independent builds of the name
        assert first.shape == (32, 32, 3) and first.dtype == np.uint8
        np.testing.assert_array_equal(first, again)
    assert any(not np.array_equal(make(name).render(s), make(other).render(s)) for s in SCENES)


def test_normal_channels_and_a_mixture_by_hand():
    scene = SCENES[0]
    task = make("gen-normal-3")
    expected = np.clip(np.rint((scene.normals[..., task.order] * task.signs + 1.0) * 127.5), 0, 255)
    np.testing.assert_array_equal(task.render(scene), expected.astype(np.uint8))
    mix = make("gen-mix.scalar+pose-4")
    a, b = (p.render(scene).astype(np.float64) for p in mix.parts)
    np.testing.assert_array_equal(mix.render(scene), np.rint(a * mix.weight + b * (1 - mix.weight)).astype(np.uint8))


def test_a_family_expands_reproducibly_into_registered_tasks():
    tasks = ["canny", "gen:scalar+pose+mix:20:0"]
    names = expand_tasks(tasks)
    assert names == expand_tasks(tasks) and names[0] == "canny" and len(set(names)) == 21
    assert expand_tasks(["gen:scalar+pose+mix:20:1"]) != names[1:]
    assert {n.split("-")[1] for n in names[1:]} == {"scalar", "pose", "mix.scalar+pose"}
    assert get_condition(names[1]).name == names[1]
    cfg = load_config(MetaTrainConfig, None, ["data.tasks=[canny, 'gen:scalar:5:0']"])
    assert cfg.data.tasks == ["canny", *expand_tasks(["gen:scalar:5:0"])]


def test_held_out_kinds_and_bad_names_are_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"^data.tasks: gen-normal-\d+ is generated from what normal shows"):
        load_config(MetaTrainConfig, None, ["data.tasks=['gen:normal:3:0']"])
    with pytest.raises(ConfigError, match="gen-mix.scalar.edge-1 is generated from what .*scribble"):
        check_held_out(["gen-mix.scalar+edge-1"], ["scribble"])
    check_held_out(["gen-edge-1"], ["seg", "normal"])  # edges leak no layout condition
    with pytest.raises(ConfigError, match="names blob; kinds are scalar, normal, palette, pose, edge"):
        expand_tasks(["gen:scalar+blob:3:0"])
    with pytest.raises(ConfigError, match="a generated task is gen-<kind>-<seed>"):
        get_condition("gen-blob-3")


def test_a_generated_task_is_a_condition_fine_tuning_takes():
    """The held-out generated family is measured by fine-tuning on one of its tasks."""
    from metacontrol.config import FinetuneConfig

    cfg = load_config(FinetuneConfig, None, ["condition=gen-mix.normal+palette-1"])
    assert cfg.output_dir == "outputs/finetune-gen-mix.normal+palette-1-full"
    with pytest.raises(ConfigError, match="a generated task is gen-<kind>-<seed>"):
        load_config(FinetuneConfig, None, ["condition=gen-blob-1"])
    with pytest.raises(ConfigError, match="condition: 'nrmal' is not valid; expected one of .*or a generated task"):
        load_config(FinetuneConfig, None, ["condition=nrmal"])


def test_meta_training_runs_on_a_generated_family(tiny_sd_dir, tmp_path):
    out = tmp_path / "gen"
    run_script([PYTHON, "meta_train.py", *meta_train_args(tiny_sd_dir, out, "data.tasks=['gen:scalar+pose+mix:6:0']",
                                                           "meta.max_meta_steps=2", "checkpointing_steps=2")])
    assert (out / "diffusion_pytorch_model.safetensors").is_file()
    assert "gen-scalar-" in (out / "meta_train_config.yaml").read_text()  # the expanded names, as trained
