"""Doctests of an integration run only where its library is installed (CI installs both: ``pip install -e .[test]``)."""

import importlib.util

_NEEDS = {"lightning.py": ("lightning", "pytorch_lightning"), "transformers.py": ("transformers",)}

collect_ignore = [name for name, libraries in _NEEDS.items()
                  if not any(importlib.util.find_spec(lib) for lib in libraries)]
