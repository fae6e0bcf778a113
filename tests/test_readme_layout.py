"""The README's Layout section matches the tree: every module of the package is named there, and every path
it names at the top of a line exists."""

from __future__ import annotations

import re

from tests.conftest import REPO


def layout_block() -> list[str]:
    section = (REPO / "README.md").read_text().split("\n## Layout\n", 1)[1]
    return section.split("```\n", 2)[1].splitlines()


def test_every_package_module_is_named_in_the_layout():
    text = "\n".join(layout_block())
    named = set(re.findall(r"[\w-]+\.py", text))
    modules = {p.name for p in (REPO / "metacontrol").rglob("*.py") if p.name != "__init__.py"}
    assert modules - named == set(), f"modules missing from the README's Layout: {sorted(modules - named)}"
    folders = {p.name for p in (REPO / "metacontrol").iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert {f for f in folders if f"{f}/" not in text} == set()


def test_every_path_the_layout_starts_a_line_with_exists():
    """Lines at the left edge name repository paths; lines indented by two name paths inside metacontrol/."""
    entries = [(REPO, line) for line in layout_block() if line[:1].strip()]
    entries += [(REPO / "metacontrol", line[2:]) for line in layout_block() if re.match(r"  \S", line)]
    assert len(entries) > 20, "the Layout block was not found"
    for folder, line in entries:
        for name in re.findall(r"[\w-]+(?:\.py|/)", line.split("  ")[0]):  # the path column, before the gap
            assert (folder / name).exists(), f"README Layout names {name}, not in {folder.relative_to(REPO) or '.'}"
