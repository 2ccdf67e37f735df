"""The docs stay in step with the code: every config key is documented with its
default, and the README's quick start is exactly two commands."""

from __future__ import annotations

import pathlib
import re

import pytest

from flask_execute.config import KEYS

ROOT = pathlib.Path(__file__).resolve().parent.parent


def table_rows(text: str) -> dict[str, list[str]]:
    """``{key: cells}`` for every Markdown table row whose first cell is `KEY`."""
    rows = {}
    for line in text.splitlines():
        match = re.match(r"\|\s*`([A-Z_]+)`\s*\|", line)
        if match:
            rows[match.group(1)] = [c.strip() for c in line.strip().strip("|").split("|")]
    return rows


@pytest.fixture(scope="module")
def config_rows() -> dict[str, list[str]]:
    return table_rows((ROOT / "docs" / "configuration.md").read_text(encoding="utf-8"))


@pytest.mark.parametrize("key", KEYS, ids=lambda k: k.name)
def test_config_key_documented_with_default(key, config_rows):
    assert key.name in config_rows, f"{key.name} is missing from docs/configuration.md"
    cells = config_rows[key.name]
    assert len(cells) == 3, cells
    assert f"`{key.default!r}`" in cells[1]
    assert cells[2], f"{key.name} has no meaning in docs/configuration.md"


def test_config_table_has_no_unknown_keys(config_rows):
    assert set(config_rows) == {key.name for key in KEYS}


def test_readme_quick_start_is_two_commands():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Quick start from a clone", 1)[1]
    block = re.search(r"```[a-z]*\n(.*?)```", section, re.DOTALL)
    assert block is not None
    commands = [line.strip() for line in block.group(1).splitlines() if line.strip()]
    assert commands == ["make demo", "make test"]
