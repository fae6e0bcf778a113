"""The README's configuration table cannot drift: every key it lists exists, every key of MetaTrainConfig is
listed, and every default it states is true."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import yaml

from metacontrol.config import MetaTrainConfig
from metacontrol.config_loader import load_config
from tests.conftest import REPO

ROW = re.compile(r"^\| ((?:`[^`]+`(?: / )?)+) \| (.*?) \|")  # | `key` / `key` | default / default | meaning |


def table_rows() -> list[tuple[list[str], list[str]]]:
    """(dotted keys, stated defaults) per row of the README's Configuration table.

    A row may list several keys (``meta.inner_steps`` / ``inner_optimizer``): later ones without a dot
    are in the first one's section. One default for several keys is the default of each.
    """
    section = (REPO / "README.md").read_text().split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        if not (match := ROW.match(line)):
            continue
        keys = re.findall(r"`([^`]+)`", match.group(1))
        section_prefix = keys[0].rpartition(".")[0]
        keys = [keys[0]] + [k if "." in k or not section_prefix else f"{section_prefix}.{k}" for k in keys[1:]]
        defaults = [d.strip().strip("`") for d in match.group(2).split(" / ")]
        rows.append((keys, defaults * len(keys) if len(defaults) == 1 else defaults))
    return rows


def states(stated: str, value: Any) -> bool:
    """Whether the table's text is ``value``: YAML (``null``, ``[0.9, 0.999]``, ``5e-4``) or, for a
    list of names, the names comma-separated."""
    if isinstance(value, list) and stated == ", ".join(map(str, value)):
        return True
    try:
        parsed = yaml.safe_load(stated)
        return parsed == value or (isinstance(value, float) and float(parsed) == value)  # YAML 1.1 reads 5e-4 as text
    except (yaml.YAMLError, TypeError, ValueError):
        return False


def test_every_listed_key_exists_and_every_stated_default_is_the_real_one():
    config = load_config(MetaTrainConfig, REPO / "configs/meta_tiny.yaml")  # the dataclasses, then the file
    rows = table_rows()
    assert len(rows) >= 20, "the Configuration table was not found"
    wrong = []
    for keys, defaults in rows:
        assert len(keys) == len(defaults), f"README row {keys}: {len(defaults)} defaults for {len(keys)} keys"
        for key, stated in zip(keys, defaults):
            node = config
            for part in key.split("."):
                assert hasattr(node, part), f"README lists {key}, which is not a key of MetaTrainConfig"
                node = getattr(node, part)
            if not states(stated, node):
                wrong.append(f"{key}: README says {stated}, configs/meta_tiny.yaml gives {node!r}")
    assert not wrong, "; ".join(wrong)


def config_keys(config: Any, prefix: str = "") -> list[str]:
    """Every leaf key of a config dataclass, dotted (``meta.inner_steps``, ``data.world.shading``)."""
    keys = []
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        name = f"{prefix}{field.name}"
        keys += config_keys(value, name + ".") if dataclasses.is_dataclass(value) else [name]
    return keys


def test_every_key_of_the_config_is_in_the_table():
    listed = {key for keys, _ in table_rows() for key in keys}
    missing = [key for key in config_keys(MetaTrainConfig()) if key not in listed]
    assert not missing, f"README's Configuration table lacks {', '.join(missing)}"
