"""Sphinx configuration: ``make docs`` builds the HTML into ``docs/_build/html``."""

from __future__ import annotations

import os
from importlib import metadata

# Project metadata comes from the installed package (``pip install -e '.[docs]'``).
_meta = metadata.metadata("flask-execute")

project = _meta["Name"]
release = _meta["Version"]
version = ".".join(release.split(".")[:2])
copyright = "2026, the flask-execute contributors"
author = "the flask-execute contributors"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.intersphinx",
    "myst_parser",
    "pallets_sphinx_themes",
]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

# -- MyST ---------------------------------------------------------------------------
# Anchors for ``page.md#section`` links (``cli.md#production``), as GitHub makes them.
myst_heading_anchors = 3

# -- autodoc ------------------------------------------------------------------------
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_preserve_defaults = True

# -- intersphinx ----------------------------------------------------------------------
# The CI build has no network beyond package registries, so no inventory is fetched by
# default; FLASK_EXECUTE_DOCS_INTERSPHINX=1 links to Python, Flask and Celery.
intersphinx_mapping: dict[str, tuple[str, str | None]] = {}
if os.environ.get("FLASK_EXECUTE_DOCS_INTERSPHINX") == "1":
    intersphinx_mapping = {
        "python": ("https://docs.python.org/3/", None),
        "flask": ("https://flask.palletsprojects.com/en/stable/", None),
        "celery": ("https://docs.celeryq.dev/en/stable/", None),
    }

# -- HTML -----------------------------------------------------------------------------
html_theme = "flask"
html_theme_options = {"index_sidebar_logo": False}
html_context = {"project_links": []}
html_sidebars = {
    "index": ["project.html", "localtoc.html", "searchbox.html"],
    "**": ["localtoc.html", "relations.html", "searchbox.html"],
}
html_title = f"{project} Documentation ({version})"
html_show_sourcelink = False
