"""``bmrs reproduce fashion-mnist``: run the grid, then write the report (see reproduce_report)."""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError
from .reproduce_runs import grid_jobs, run_jobs

__all__ = ["reproduce"]


def reproduce(args, log=print, progress: bool = True) -> int:
    """Run (or continue) every job of the grid, then build the report from whatever has finished."""
    if args.workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {args.workers}")
    if args.levels < 2:  # checked before hours of runs, not after them
        raise ConfigError(f"--levels must be at least 2 (pruning fractions from 0 to 1), got {args.levels}")
    extra = [] if args.train_subset is None else ["--train-subset", str(args.train_subset)]
    jobs = grid_jobs(args.runs, args.seeds, epochs=args.epochs, finetune_epochs=args.finetune_epochs, extra=extra)
    # the settings of each method are checked here, before any run starts (a 0 subset ran on all the data);
    # the jobs that follow another run's schedule cannot build their command before it has finished
    for job in jobs:
        if job.seed == jobs[0].seed and job.depends_on is None:
            job.train_config()
    failed = []
    if not args.report_only:
        failed = run_jobs(jobs, workers=args.workers, log=log, progress=progress)
    from .reproduce_report import build_report

    build_report(jobs, Path(args.runs), Path(args.report), levels=args.levels, log=log)
    if failed:
        log(f"{len(failed)} runs failed; rerun the same command to retry them")
        return 1
    return 0
