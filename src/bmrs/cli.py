"""The ``bmrs`` command line (a thin layer over the library)."""

from __future__ import annotations

import argparse
import sys

from . import __version__

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bmrs", description="Bayesian Model Reduction for Structured pruning.")
    parser.add_argument("--version", action="version", version=f"bmrs {__version__}")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``bmrs`` and ``python -m bmrs``; returns the exit code."""
    build_parser().parse_args(argv)
    print(f"bmrs {__version__}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
