"""``python -m paper fashion-mnist``: run the grid, then write the report (see ``paper.report``)."""

from __future__ import annotations

from pathlib import Path

from bmrs import ConfigError
from bmrs.training.config import check_int
from .runs import grid_jobs, run_jobs

__all__ = ["reproduce"]


def reproduce(args, log=print, progress: bool = True) -> int:
    """Run (or continue) every job of the grid, then build the report from whatever has finished."""
    for name in ("workers", "levels", "epochs", "finetune_epochs"):  # checked before hours of runs, not after
        check_int(name, getattr(args, name))
    if args.train_subset is not None:
        check_int("train_subset", args.train_subset)
    if not args.seeds:
        raise ConfigError("no seeds given; pass e.g. --seeds 0,1,2", field="seeds")
    for seed in args.seeds:
        check_int("seeds", seed, 0, 2**63 - 1)
    extra = {} if args.train_subset is None else {"train_subset": args.train_subset}
    jobs = grid_jobs(args.runs, args.seeds, epochs=args.epochs, finetune_epochs=args.finetune_epochs, extra=extra)
    # the settings of each method are checked here, before any run starts (a 0 subset ran on all the data);
    # the jobs that follow another run's schedule cannot build their command before it has finished
    for job in jobs:
        if job.seed == jobs[0].seed and job.depends_on is None:
            job.train_config()
    failed = []
    force = getattr(args, "force", False)
    if args.report_only:  # refused at once, not after the report's sweeps
        from .report import check_not_fewer
        from .runs import summary_rows
        check_not_fewer(Path(args.report), len(summary_rows(jobs)), len(jobs), Path(args.runs), force)
    else:
        failed = run_jobs(jobs, workers=args.workers, log=log, progress=progress)
    from .report import build_report

    build_report(jobs, Path(args.runs), Path(args.report), levels=args.levels, log=log, force=force)
    if failed:
        log(f"{len(failed)} runs failed; rerun the same command to retry them")
        return 1
    return 0
