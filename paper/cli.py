"""The command ``python -m paper fashion-mnist``: every method × network × seed of the paper's Fashion-MNIST
table as resumable ``bmrs train`` runs, then the report (table, CSV, figures, open questions).

Bad input ends with a one-line ``paper: error: …`` and exit code 2 (settings) or 1 (data, runs); Ctrl-C or
SIGTERM stops the runs, which the same command resumes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bmrs.cli import CommandParser, progress_wanted, run_command
from bmrs.training.options import int_list

__all__ = ["build_parser", "main", "REPORT", "RUNS"]

#: where the report goes: paper/results, beside this file (wherever the command is run from)
REPORT = Path(__file__).resolve().parent / "results"
#: where the runs go, relative to the folder the command is run from
RUNS = "runs/reproduce/fashion-mnist"
INTERRUPTED = "rerun the same command: finished runs are kept and interrupted ones resume"


class _PaperParser(CommandParser):
    name = "paper"


def build_parser() -> argparse.ArgumentParser:
    """The options of ``python -m paper``.

    Examples:
        >>> args = build_parser().parse_args(["fashion-mnist", "--seeds", "0,1"])
        >>> args.seeds, args.workers, args.epochs, args.report_only
        ([0, 1], 2, 50, False)
    """
    p = _PaperParser(prog="python -m paper", description="Run every method × network × seed of the paper's "
                     "Fashion-MNIST table (resumable, skipping finished runs), then write the results table, CSV, "
                     "plots and summary.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (shown only on a terminal anyway)")
    p.add_argument("dataset", choices=("fashion-mnist",), help="the dataset to reproduce (fashion-mnist)")
    p.add_argument("--seeds", type=int_list, default=[0, 1, 2], help="comma-separated seeds (default: 0,1,2)")
    p.add_argument("--workers", type=int, default=2, help="runs at once, one thread each (default: 2)")
    p.add_argument("--epochs", type=int, default=50, help="epochs with pruning (paper: 50)")
    p.add_argument("--finetune-epochs", type=int, default=10, help="fine-tuning epochs (paper: 10)")
    p.add_argument("--train-subset", type=int, default=None, help="train on N examples only (quick runs)")
    p.add_argument("--levels", type=int, default=21, help="levels of the post-training sweep (paper: 100)")
    p.add_argument("--runs", default=RUNS, help="folder of the runs (default: %(default)s)")
    p.add_argument("--report", default=str(REPORT), help="folder of the report (default: paper/results)")
    p.add_argument("--report-only", action="store_true", help="only rebuild the report from finished runs")
    p.add_argument("--force", action="store_true",
                   help="replace a report even if it was built from more finished runs than there are now")
    return p


def _reproduce(args) -> int:
    from bmrs.extras import require

    from .reproduce import reproduce

    for module in ("matplotlib", "scipy", "kneed"):  # the report's figures, tests and knee points
        require(module, "paper", "the reproduction's report")
    return reproduce(args, progress=progress_wanted(args))


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m paper``; returns the exit code."""
    args = build_parser().parse_args(argv)
    return run_command(_reproduce, args, INTERRUPTED, name="paper")
