"""Sphinx configuration of the API reference (built from the installed package's docstrings).

Build: pip install ".[docs]" && python -m sphinx -W --keep-going -b html docs build/docs
Offline: no intersphinx, no theme or extension beyond what Sphinx itself ships.
"""
import importlib.util

import tactic

project = "Tactic"
author = "The Tactic authors"
copyright = "the Tactic authors; Apache-2.0"
release = version = tactic.__version__

extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon"]
napoleon_google_docstring = True
napoleon_numpy_docstring = False
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
# The optional integrations import torch/transformers; without them (the `docs` extra alone)
# the reference is still built, against stand-ins for those modules.
autodoc_mock_imports = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
default_role = "literal"   # docstrings write `name` for code
# The docstrings are plain text, not reStructuredText: |q|^2 or **inputs read to docutils as
# unclosed inline markup. Those warnings are silenced; every other warning (a module that does
# not import, a missing member, a broken reference) fails the build under -W.
suppress_warnings = ["docutils"]
exclude_patterns = ["_build", "CONTRACT.md"]
html_theme = "alabaster"
html_title = f"Tactic {release}"
