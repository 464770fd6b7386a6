"""The reproduction of the BMRS paper's Fashion-MNIST experiments (not part of the installed ``bmrs``).

Run from a source checkout: ``python -m paper fashion-mnist`` (paper/README.md).  ``paper.runs`` is the grid of
``bmrs train`` runs, ``paper.report`` the report built from them (``paper.tables``, ``paper.figures``),
``paper.reproduce`` the two together and ``paper.cli`` the command.  It uses bmrs through its public names;
bmrs never imports it.
"""
