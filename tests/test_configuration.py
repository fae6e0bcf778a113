"""The typed YAML config loader: conversions, overrides, and errors that say which key, which value, what is allowed.

A config typo should cost seconds, so every error path is checked for the words a user needs to fix it.
"""

from __future__ import annotations

import importlib.util
import runpy
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from metacontrol.config import FinetuneConfig, MetaTrainConfig
from metacontrol.config_loader import ConfigError, from_dict, load_config, parse_overrides
from metacontrol.world import WorldConfig

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Optim:
    kind: Literal["sgd", "adam"] = "adam"
    lr: float = 1e-3
    steps: int = 10


@dataclass
class Section:
    optim: Optim = field(default_factory=Optim)
    names: list[str] = field(default_factory=lambda: ["a"])
    freeze: str | list[str] = "none"
    limit: int | None = 3
    enabled: bool = True


@dataclass
class Root:
    name: str = "run"
    section: Section = field(default_factory=Section)


def _error(data: dict) -> str:
    with pytest.raises(ConfigError) as info:
        from_dict(Root, data)
    return str(info.value)


def test_defaults_and_nested_sections() -> None:
    assert from_dict(Root, {}) == Root()
    config = from_dict(Root, {"name": "x", "section": {"optim": {"kind": "sgd", "steps": 5}, "limit": None}})
    assert config.name == "x"
    assert config.section.optim == Optim(kind="sgd", lr=1e-3, steps=5)
    assert config.section.limit is None
    assert config.section.names == ["a"]


def test_value_conversions() -> None:
    config = from_dict(Root, {"section": {"optim": {"lr": "1e-4"}, "names": ["p", "q"], "freeze": ["x*", "y*"]}})
    assert config.section.optim.lr == 1e-4 and isinstance(config.section.optim.lr, float)
    assert config.section.names == ["p", "q"]
    assert config.section.freeze == ["x*", "y*"]
    assert from_dict(Root, {"section": {"freeze": "paper"}}).section.freeze == "paper"
    integer_lr = from_dict(Root, {"section": {"optim": {"lr": 2}}}).section.optim.lr
    assert integer_lr == 2.0 and isinstance(integer_lr, float)
    assert from_dict(Root, {"section": {"limit": 7}}).section.limit == 7


def test_literal_error_lists_the_allowed_values() -> None:
    message = _error({"section": {"optim": {"kind": "rmsprop"}}})
    assert "section.optim.kind" in message and "'rmsprop'" in message
    assert "'sgd'" in message and "'adam'" in message


def test_unknown_key_is_named_with_the_allowed_keys() -> None:
    message = _error({"section": {"optim": {"lr": 0.1, "momentum": 0.9}}})
    assert "section.optim.momentum" in message
    for key in ("kind", "lr", "steps"):
        assert key in message
    top = _error({"nmae": "typo"})
    assert "nmae" in top and "name" in top and "section" in top


@pytest.mark.parametrize(
    ("data", "key", "value"),
    [
        ({"section": {"optim": {"steps": "ten"}}}, "section.optim.steps", "'ten'"),
        ({"section": {"optim": {"steps": 2.5}}}, "section.optim.steps", "2.5"),
        ({"section": {"optim": {"steps": True}}}, "section.optim.steps", "True"),
        ({"section": {"optim": {"lr": "fast"}}}, "section.optim.lr", "'fast'"),
        ({"section": {"enabled": "yes please"}}, "section.enabled", "'yes please'"),
        ({"section": {"names": "a"}}, "section.names", "'a'"),
        ({"section": {"names": ["a", 3]}}, "section.names[1]", "3"),
        ({"section": {"freeze": 3}}, "section.freeze", "3"),
        ({"section": {"limit": "many"}}, "section.limit", "'many'"),
        ({"section": {"limit": None, "optim": None}}, "section.optim", "None"),
        ({"name": None}, "name", "None"),
    ],
)
def test_wrong_type_names_the_dotted_key_and_the_value(data: dict, key: str, value: str) -> None:
    message = _error(data)
    assert message.startswith(f"{key}:"), message
    assert value in message


def test_parse_overrides() -> None:
    assert parse_overrides(["a.b=3", "c=[x, y]", "--d.e.f=1e-4", "g = hello", "h=", "i=null"]) == {
        "a": {"b": 3},
        "c": ["x", "y"],
        "d": {"e": {"f": "1e-4"}},
        "g": "hello",
        "h": "",
        "i": None,
    }
    # Values are YAML: a later override of the same section merges, an equals sign in the value is kept.
    assert parse_overrides(["a.b=1", "a.c=x=y"]) == {"a": {"b": 1, "c": "x=y"}}
    with pytest.raises(ConfigError, match="inner.steps") as info:
        parse_overrides(["meta.inner_steps"])
    assert "'meta.inner_steps'" in str(info.value) and "key=value" in str(info.value)
    with pytest.raises(ConfigError, match="empty key"):
        parse_overrides(["=3"])
    with pytest.raises(ConfigError, match="a is not a section"):
        parse_overrides(["a=1", "a.b=2"])


def test_load_config_merges_file_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    # PyYAML reads "1e-4" (no dot) as a string: the float field must still take it as a number.
    path.write_text("name: from-file\nsection:\n  optim:\n    lr: 1e-4\n    kind: sgd\n  names: [p]\n")
    config = load_config(Root, path, ["section.optim.steps=4", "section.names=[q, r]", "section.freeze=[x]"])
    assert config.name == "from-file"
    assert config.section.optim == Optim(kind="sgd", lr=1e-4, steps=4)
    assert config.section.names == ["q", "r"] and config.section.freeze == ["x"]
    assert load_config(Root, None, ["name=cli"]).name == "cli"


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError, match="does not exist") as info:
        load_config(Root, missing)
    assert str(missing) in str(info.value)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping") as info:
        load_config(Root, listing)
    assert str(listing) in str(info.value)
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML") as info:
        load_config(Root, broken)
    assert str(broken) in str(info.value)
    typo = tmp_path / "typo.yaml"
    typo.write_text("section:\n  optim:\n    kind: adagrad\n")
    with pytest.raises(ConfigError) as info:
        load_config(Root, typo)
    assert str(typo) in str(info.value) and "section.optim.kind" in str(info.value)
    # An empty file is an empty mapping: all defaults.
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(Root, empty) == Root()


def test_meta_tiny_yaml_loads_into_meta_train_config() -> None:
    config = load_config(MetaTrainConfig, REPO / "configs" / "meta_tiny.yaml")
    assert config.resolution == 64 and config.data.world_at(config.resolution).resolution == 64
    assert config.data.tasks == ["canny", "hed", "depth", "pose"]
    assert config.meta.algorithm == "reptile"
    assert config.meta.inner_learning_rate == pytest.approx(5e-4)
    assert config.freeze.inner == "none"
    assert config.mixed_precision is None and config.checkpoints_total_limit == 2
    # The demo must never rewrite the committed checkpoints: its output (and the built-in default) is under outputs/.
    assert config.output_dir.startswith("outputs/") and MetaTrainConfig().output_dir.startswith("outputs/")
    tweaked = load_config(
        MetaTrainConfig,
        REPO / "configs" / "meta_tiny.yaml",
        ["meta.algorithm=fomaml", "meta.outer_learning_rate=1e-4", "resolution=32"],
    )
    assert tweaked.meta.algorithm == "fomaml" and tweaked.meta.outer_learning_rate == 1e-4
    assert tweaked.data.world_at(tweaked.resolution).resolution == 32  # one key: the world renders at it


def test_meta_tiny_rejects_an_unknown_algorithm() -> None:
    with pytest.raises(ConfigError, match=r"meta\.algorithm") as info:
        load_config(MetaTrainConfig, REPO / "configs" / "meta_tiny.yaml", ["meta.algorithm=maml"])
    message = str(info.value)
    assert "'maml'" in message and "'reptile'" in message and "meta_tiny.yaml" in message


def test_the_world_renders_at_the_runs_resolution_set_once() -> None:
    """`resolution` alone sets the synthetic scenes' size; the world section has no second copy to disagree."""
    config = load_config(MetaTrainConfig, None, ["resolution=32", "data.world.max_objects=2"])
    assert config.data.world_at(config.resolution) == WorldConfig(resolution=32, max_objects=2)
    with pytest.raises(ConfigError, match=r"unknown key data\.world\.resolution; allowed keys in data\.world: "):
        load_config(MetaTrainConfig, None, ["data.world.resolution=32"])


def test_nested_section_validation_names_the_full_dotted_key() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(MetaTrainConfig, None, ["data.world.supersample=3"])
    assert "data.world.supersample" in str(info.value)


@pytest.mark.parametrize("recipe", sorted((REPO / "configs" / "recipes").glob("*.yaml")), ids=lambda p: p.stem)
def test_recipe_configs_load_and_state_their_budget(recipe: Path) -> None:
    """Every recipe loads and spends joint's 1x budget of samples (19,200), or 2x on top of a 1x start for 3x."""
    config = load_config(MetaTrainConfig, recipe)
    assert config.output_dir.startswith("outputs/")
    samples, _ = config.meta.data_budget()
    assert samples == 19_200 * (2 if recipe.stem.endswith("3x") else 1)
    assert recipe.stem.endswith("3x") or recipe.stem in ("joint_then_meta", "meta_lora") or \
        config.controlnet_model_name_or_path is None


def test_data_budget_counts_samples_and_optimiser_steps() -> None:
    meta = load_config(MetaTrainConfig, None, ["meta.algorithm=fomaml", "meta.max_meta_steps=10",
                                                "meta.tasks_per_meta_step=2", "meta.inner_steps=3",
                                                "meta.support_batch_size=4", "meta.query_batch_size=5"]).meta
    assert meta.data_budget() == (10 * 2 * (3 * 4 + 5), "60 inner + 10 outer optimiser steps")
    joint = load_config(MetaTrainConfig, None, ["meta.algorithm=joint", "meta.max_meta_steps=10",
                                                 "meta.inner_steps=3", "meta.support_batch_size=4"]).meta
    assert joint.data_budget() == (10 * 3 * 2 * 4, "30 optimiser steps")


@pytest.mark.parametrize("override, key", [
    ("meta.inner_betas=[1.0, 0.999]", "meta.inner_betas"),
    ("meta.inner_betas=[0.9]", "meta.inner_betas"),
    ("meta.lora_rank=-1", "meta.lora_rank"),
])  # fmt: skip
def test_new_meta_keys_are_validated(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(MetaTrainConfig, None, [override])


@pytest.mark.parametrize("config, overrides, message", [
    (MetaTrainConfig, ["meta.lr_warmup_steps=10"], r"meta\.lr_warmup_steps: 10 is not valid; expected 0 with "
                                                   r"lr_scheduler 'constant'.*constant_with_warmup"),
    (FinetuneConfig, ["lr_warmup_steps=10"], r"^lr_warmup_steps: 10 .*constant_with_warmup"),
    (MetaTrainConfig, ["meta.lr_warmup_steps=-1", "meta.lr_scheduler=linear"], r"meta\.lr_warmup_steps: -1"),
    (MetaTrainConfig, ["meta.outer_weight_decay=-0.1"], r"meta\.outer_weight_decay: -0\.1"),
    (MetaTrainConfig, ["meta.outer_max_grad_norm=-1"], r"meta\.outer_max_grad_norm: -1"),
    (MetaTrainConfig, ["num_validation_images=0"], r"^num_validation_images: 0 .*validation_steps: 0 turns"),
    (FinetuneConfig, ["validation_inference_steps=0"], r"^validation_inference_steps: 0"),
])  # fmt: skip
def test_settings_that_would_be_ignored_or_fail_later_fail_at_load(config, overrides, message) -> None:
    """Both scripts check the optimiser keys they share with one function, so the checks cannot drift."""
    with pytest.raises(ConfigError, match=message):
        load_config(config, None, overrides)
    load_config(MetaTrainConfig, None, ["meta.lr_warmup_steps=10", "meta.lr_scheduler=constant_with_warmup"])


def test_lora_start_refuses_freezing() -> None:
    with pytest.raises(ConfigError, match="freeze") as info:
        load_config(MetaTrainConfig, None, ["meta.lora_rank=4", "freeze.inner=paper"])
    assert "lora_rank" in str(info.value)


# Every script takes --config plus key=value overrides from the same parser.
SCRIPTS = ("meta_train", "finetune", "evaluate", "pretrain_base")


@pytest.mark.parametrize("script", [*SCRIPTS, "bench/adaptation.py"])
def test_overrides_are_accepted_on_either_side_of_config(script: str) -> None:
    parse_args = (runpy.run_path(str(REPO / script)) if script.endswith(".py") else
                  vars(importlib.import_module(f"metacontrol.scripts.{script}")))["parse_args"]
    args = parse_args(["a.b=1", "--config", "configs/x.yaml", "c=[1, 2]"])
    assert args.config == "configs/x.yaml" and args.overrides == ["a.b=1", "c=[1, 2]"]
    assert parse_args(["a.b=1"]).overrides == ["a.b=1"]


def test_bench_flags_mix_with_overrides() -> None:
    parse_args = runpy.run_path(str(REPO / "bench/adaptation.py"))["parse_args"]
    args = parse_args(["--quick", "a=1", "--config", "c.yaml", "--shard", "1/2", "b=2", "--only", "joint", "c=3"])
    assert (args.quick, args.config, args.shard, args.only) == (True, "c.yaml", "1/2", "joint")
    assert args.overrides == ["a=1", "b=2", "c=3"]


def test_an_override_before_config_reaches_the_config() -> None:
    from metacontrol.scripts import meta_train

    with pytest.raises(ConfigError, match=r"configs/meta_tiny\.yaml: meta\.algorithm: 'maml'"):
        meta_train.main(["meta.algorithm=maml", "--config", "configs/meta_tiny.yaml", "resolution=64"])


# -- the package's configs and checkpoints (metacontrol/shipped.py): the defaults outside a checkout ---------------


def test_configs_and_checkpoints_missing_here_are_the_packages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from metacontrol.models.base import local_folder
    from metacontrol.shipped import SHIPPED, shipped_path

    assert SHIPPED == REPO  # in a checkout (an editable install) the package's copies are the checkout's
    monkeypatch.chdir(tmp_path)  # a folder with no configs/ or checkpoints/
    assert shipped_path("configs/meta_tiny.yaml") == REPO / "configs/meta_tiny.yaml"
    assert shipped_path("configs/recipes/joint.yaml") == REPO / "configs/recipes/joint.yaml"
    assert load_config(MetaTrainConfig, "configs/meta_tiny.yaml").meta.max_meta_steps == 300
    assert local_folder("checkpoints/tiny-sd", "base model folder") == REPO / "checkpoints/tiny-sd"
    # Neither here nor in the package: the error names the path as written, and the hint the package's folder.
    for unchanged in ("configs/nope.yaml", "outputs/run", "../configs/meta_tiny.yaml", "/configs/meta_tiny.yaml"):
        assert shipped_path(unchanged) == Path(unchanged)
    with pytest.raises(ConfigError, match=r"^config file configs/nope\.yaml does not exist$"):
        load_config(MetaTrainConfig, "configs/nope.yaml")
    with pytest.raises(ConfigError, match=r"checkpoints/tiny-sdd does not exist; did you mean checkpoints/tiny-sd\?$"):
        local_folder("checkpoints/tiny-sdd", "base model folder")


def test_a_path_in_the_working_directory_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from metacontrol.models.base import local_folder
    from metacontrol.shipped import shipped_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs/meta_tiny.yaml").write_text("meta:\n  max_meta_steps: 7\n")
    (tmp_path / "checkpoints/tiny-sd").mkdir(parents=True)
    (tmp_path / "checkpoints/my-base").mkdir()
    assert shipped_path("configs/meta_tiny.yaml") == Path("configs/meta_tiny.yaml")
    assert load_config(MetaTrainConfig, "configs/meta_tiny.yaml").meta.max_meta_steps == 7
    assert local_folder("checkpoints/tiny-sd", "base model folder") == Path("checkpoints/tiny-sd")
    # A checkpoints/ of one's own: what it lacks is still the package's; a typo's hint comes from it.
    assert local_folder("checkpoints/joint-3x-controlnet-tiny", "ControlNet folder") == (
        REPO / "checkpoints/joint-3x-controlnet-tiny")
    with pytest.raises(ConfigError, match=r"did you mean checkpoints/my-base\?$"):
        local_folder("checkpoints/my-bse", "base model folder")


def test_the_sd15_recipes_load_with_the_settings_of_the_real_scale():
    from metacontrol.scripts.evaluate import EvaluateConfig

    finetune = load_config(FinetuneConfig, REPO / "configs/finetune_sd15.yaml")
    assert (finetune.learning_rate, finetune.mixed_precision, finetune.gradient_checkpointing) == (1e-5, "bf16", True)
    assert (finetune.resolution, finetune.source, finetune.use_8bit_adam) == (512, "prepared", False)
    evaluate = load_config(EvaluateConfig, REPO / "configs/evaluate_sd15.yaml")
    assert (evaluate.resolution, evaluate.mixed_precision, evaluate.data.source) == (512, "bf16", "imagefolder")
    assert evaluate.conditions == ["canny", "hed", "depth", "pose"]
    meta = load_config(MetaTrainConfig, REPO / "configs/meta_sd15.yaml")
    assert (meta.data.source, meta.mixed_precision, meta.resolution) == ("prepared", "bf16", 512)


def test_8bit_adam_without_bitsandbytes_is_one_line(monkeypatch):
    from metacontrol.optimizers import adam_class

    assert (adam_class(True, True).__name__, adam_class(True, False).__name__) == ("AdamW8bit", "Adam8bit")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed: the import fails
    with pytest.raises(ConfigError, match=r"^use_8bit_adam: true needs bitsandbytes \(pip install 'metacontrol\[bnb\]'\)"):
        adam_class(True, True)
