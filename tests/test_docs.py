"""The docs stay in step with the code: every config key is documented with its
default, every worker option with the `celery worker` flag it becomes, every
`flask celery` command has a section, every public name has an API entry, links
resolve, and the README's quick start is exactly two commands."""

from __future__ import annotations

import pathlib
import re

import pytest

from flask_execute.config import KEYS
from flask_execute.worker_options import worker_argv
from flask_execute.worker_options import WORKER_OPTIONS

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


# --- the worker options table ----------------------------------------------------------
def option_rows(text: str) -> dict[str, list[str]]:
    """``{option: cells}`` for every Markdown table row whose first cell is `lower_case`."""
    rows = {}
    for line in text.splitlines():
        match = re.match(r"\|\s*`([a-z_]+)`\s*\|", line)
        if match:
            rows[match.group(1)] = [c.strip() for c in line.strip().strip("|").split("|")]
    return rows


@pytest.fixture(scope="module")
def worker_option_rows() -> dict[str, list[str]]:
    text = (ROOT / "docs" / "workers-and-queues.md").read_text(encoding="utf-8")
    section = text.split("### Worker options", 1)[1].split("\n## ", 1)[0]
    return option_rows(section)


def test_worker_options_table_matches_code(worker_option_rows):
    assert set(worker_option_rows) == set(WORKER_OPTIONS)


@pytest.mark.parametrize("option", WORKER_OPTIONS)
def test_worker_option_documented_with_its_flag(option, worker_option_rows):
    from celery.bin.worker import worker

    assert option in worker_option_rows, f"{option} is missing from docs/workers-and-queues.md"
    cells = worker_option_rows[option]
    assert len(cells) == 4 and all(cells), cells
    flag = "-n" if option == "hostname" else "--" + option.replace("_", "-")
    rendered = worker_argv("w", {option: _sample(WORKER_OPTIONS[option])}, "INFO")
    assert any(arg == flag or arg.startswith(flag + "=") for arg in rendered), rendered
    assert f"`{flag}" in cells[2], f"{option}: the flag cell should show {flag}"
    celery_flags = {opt for param in worker.params for opt in param.opts}
    assert flag in celery_flags, f"{flag} is not a `celery worker` option"


def _sample(kind: str) -> object:
    return {"int": 2, "level": "INFO", "str": "x", "list": ["a"], "pair": [4, 1],
            "number": 5, "flag": True}[kind]  # fmt: skip


# --- the CLI page and links --------------------------------------------------------------
def test_every_cli_command_documented():
    from flask_execute.cli import celery_cli

    text = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    for name in celery_cli.commands:
        assert f"## `flask celery {name}`" in text, f"docs/cli.md has no section for {name}"


@pytest.mark.parametrize(
    "page", ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in ROOT.glob("docs/*.md"))]
)
def test_relative_links_resolve(page):
    path = ROOT / page
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text(encoding="utf-8")):
        if "://" in target or target.startswith("mailto:"):
            continue
        assert (path.parent / target).exists(), f"{page} links to missing {target}"


# --- the API reference ---------------------------------------------------------------------
def api_directive_names(text: str) -> set[str]:
    """Names documented by a directive (``.. autoclass:: Celery``,
    ``.. autoexception:: flask_execute.SignatureError``, ``.. data:: current_task``)."""
    pattern = (
        r"^\s*\.\. (?:auto)?(?:class|exception|function|data)::\s+(?:flask_execute\.)?(\w+)\s*$"
    )
    return set(re.findall(pattern, text, re.MULTILINE))


def test_every_public_name_in_api_reference():
    import flask_execute

    text = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    missing = sorted(set(flask_execute.__all__) - api_directive_names(text))
    assert not missing, f"docs/api.md documents no directive for {missing}"


def test_api_reference_documents_every_extension_method():
    """``Celery`` is documented with all its members, ``map_apply`` and
    ``executor`` included."""
    text = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    assert re.search(r"^\.\. autoclass:: Celery\n   :members:\n", text, re.MULTILINE)


# --- the distribution ------------------------------------------------------------------
def test_version_is_above_the_original_and_install_docs_say_so():
    """The package index serves the original Flask-Execute 0.1.6 under our name: we
    are versioned above it, and the install instructions do not send readers there."""
    from packaging.version import Version

    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")  # tomllib: 3.11+
    version = Version(re.search(r'^version = "(.+)"$', pyproject, re.MULTILINE).group(1))
    assert version > Version("0.1.6")
    assert version.major == 1
    for page in ("README.md", "docs/quickstart.md"):
        text = (ROOT / page).read_text(encoding="utf-8")
        commands = re.findall(r"^pip install .*$", text, re.MULTILINE)
        assert "pip install ./flask-execute" in commands, page
        assert "pip install flask-execute" not in commands, page
        assert "installs Flask-Execute 0.1.6" in " ".join(text.split()), page


@pytest.mark.parametrize(
    "page", ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in ROOT.glob("docs/*.md"))]
)
def test_no_broken_code_spans(page):
    """A backtick inside a `code span` ends it early: the rest renders as text and
    the span's halves start or end with a space. Quote such text with a double
    backtick span (``a `b` c``)."""
    from markdown_it import MarkdownIt

    parser = MarkdownIt("commonmark").enable("table")
    broken = [
        (token.map[0] + 1 if token.map else None, child.content)
        for token in parser.parse((ROOT / page).read_text(encoding="utf-8"))
        if token.type == "inline"
        for child in token.children or ()
        if child.type == "code_inline" and child.content != child.content.strip()
    ]
    assert not broken, f"{page}: code spans cut by a backtick (line, text): {broken}"
