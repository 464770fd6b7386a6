"""``python -m paper fashion-mnist``: the paper's grid and report (see paper/README.md)."""

import sys

from paper.cli import main

sys.exit(main())
