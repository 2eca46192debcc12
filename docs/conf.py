"""Sphinx configuration of the docs site (`make docs`): MyST Markdown pages in docs/, the Furo
theme, and the reference pages generated from the code before every build
(docs/_ext/reference.py), so no flag, route, RPC, metric, kind or result is copied by hand."""

import sys
from pathlib import Path

DOCS = Path(__file__).parent
sys.path[:0] = [str(DOCS / "_ext"), str(DOCS.parent / "benchmarks")]

project = "ticketserve"
author = "the ticketserve authors"
extensions = ["myst_parser", "reference"]
myst_enable_extensions = ["colon_fence", "dollarmath", "amsmath"]
myst_heading_anchors = 3
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_ext"]
html_theme = "furo"
html_title = "ticketserve"
html_static_path = ["_static"]
