"""``python -m bmrs`` is the ``bmrs`` command."""

import sys

from .cli import main

sys.exit(main())
