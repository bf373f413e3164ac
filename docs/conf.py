"""Sphinx configuration of lightning-mpi's documentation site.

Build (strict: a warning, such as a broken reference, fails the build):

    pip install -e ".[docs]"
    sphinx-build -W --keep-going -n -b html docs build/site

Pages are Markdown (MyST) and own their text (README is the front page and links them). The API reference is built
from the docstrings (autodoc, Google-style ``Args:`` through napoleon).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "recipes"))
os.environ.setdefault("OMP_NUM_THREADS", "1")

project = "lightning-mpi"
author = "lightning-mpi contributors"
copyright = "lightning-mpi contributors"
import lightning_mpi  # noqa: E402 - the version has one source: the package

release = version = lightning_mpi.__version__

extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon"]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
# The tables the benchmarks write next to their results (recipes/benchmarks/speed.py,
# tools/cluster/network_benchmark.py, recipes/time_to_accuracy/run.py) are data, not pages: a page includes them or
# links their directory.
exclude_patterns = [
    "_build",
    "README.md",
    "benchmark/*.md",
    "network/*.md",
    "time-to-accuracy/*.md",
    "conformance/torch/*.md",
    "distributed-benchmark/*.md",
    "network-distributed/*.md",
    "memory/*.md",
]
myst_enable_extensions = ["colon_fence"]
myst_heading_anchors = 3

html_theme = "furo"
html_title = "lightning-mpi"
html_static_path: list[str] = []

# The API reference: the library's own objects, documented as written.
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
autodoc_default_options = {"show-inheritance": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
default_role = "code"

# Strict mode (-n) checks every cross reference. References to lightning-mpi must resolve; those to other projects
# are not checked (building offline, there is no intersphinx inventory to check them against).
nitpicky = True
nitpick_ignore_regex = [
    (
        r"py:.*",
        r"(torch|lightning|lightning_utilities|typing_extensions|numpy|omegaconf|hydra|mpi4py|torchmetrics)(\..*)?",
    ),
    (r"py:.*", r"(collections\.abc|typing|contextlib|pathlib|os|logging|dataclasses|enum|threading|types)\..*"),
    (r"py:.*", r"(Tensor|Module|Optimizer|Trainer|LightningModule|Callback|CheckpointIO|Accelerator|Precision)"),
    (r"py:.*", r"(ReduceOp|ReduceOpName|Path|Any|Callable|Iterator|Sequence|Generator|Hashable|Iterable)"),
    (r"py:.*", r"(NoneType|PathLike|Literal|Optional|Union|ClusterEnvironment|Metric|DictConfig)"),
]


def _prose_attribute_docstring(self: object) -> list[str]:
    """lightning-mpi's property docstrings are prose (``Under sync="ensemble": every member's ...``), not Google's
    ``type: description``: napoleon would read the text before the first colon as the property's type."""
    return list(self._consume_to_end())  # type: ignore[attr-defined]


def setup(app: object) -> None:
    from sphinx.ext.napoleon.docstring import GoogleDocstring

    GoogleDocstring._parse_attribute_docstring = _prose_attribute_docstring  # type: ignore[method-assign]
