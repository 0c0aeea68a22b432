"""Sphinx configuration for clpipe's documentation (build: scripts/docs.sh)."""

from __future__ import annotations

import sys
from pathlib import Path

# Read clpipe from this checkout even when it is not installed (sphinx-click imports the
# click commands to document them).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import clpipe  # noqa: E402

project = "clpipe"
author = "the clpipe developers"
copyright = "the clpipe developers"
version = release = clpipe.__version__

extensions = [
    "myst_parser",  # pages are Markdown (MyST)
    "sphinx_click",  # the CLI reference is generated from the click commands
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build"]
myst_enable_extensions = ["deflist"]  # "term\n: definition" lists
myst_heading_anchors = 3  # [text](#a-heading) links

html_theme = "alabaster"
html_title = f"clpipe {release}"
html_theme_options = {"description": "The DICOM sync step", "fixed_sidebar": True}
