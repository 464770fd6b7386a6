"""The Fashion-MNIST report: table beside the paper, post-training curves with knees, E[θ]
histograms, the p₁ sweep, the mantissa test and the cost of the noise layers (tables in
``paper.tables``, figures in ``paper.figures``).

Everything is computed from finished runs (``paper.runs``); a missing piece is skipped and
named in the summary, so a partial grid still gives a partial report.  The report's files are
written as one set (``bmrs.io.staged_outputs``), and a report built from more finished runs is
never replaced by one built from fewer unless asked (``force``).
"""

from __future__ import annotations

import re
from pathlib import Path

from bmrs.defaults import KL_WEIGHT
from bmrs import BMRSError, ConfigError
from bmrs.io import FolderLock, atomic_write, read_json, remove_stale_temporaries, staged_outputs, write_json
from .figures import (
    CURVE_CRITERIA, _delta_f_after_exact_bmrs_n, _mantissas, _p1_sweep, _plot_table, _post_training,
    _theta_histograms, knee_distances, mantissa_test,
)
from .runs import EXTRA_METHODS, Job, summary_rows
from .tables import (
    CSV_COLUMNS, CSV_METHODS, TABLE_METHODS, _cost, _markdown_table, _schedule, _write_table, agreement, aggregate,
    goal_lines, goal_runs_table,
)

__all__ = ["build_report", "aggregate", "knee_distances", "mantissa_test", "agreement", "goal_lines",
           "CSV_COLUMNS", "TABLE_METHODS", "CSV_METHODS", "CURVE_CRITERIA", "check_not_fewer", "MANIFEST"]

#: what the report was built from (finished runs, jobs), read back before a rebuild
MANIFEST = "report.json"


def build_report(jobs: list[Job], runs: Path, report: Path, levels: int = 21, log=print, force: bool = False) -> dict:
    """Write fashion-mnist.csv/.md and the figures into ``report`` from the finished runs, as one set.

    A report already built from more finished runs is kept (ConfigError) unless ``force``: a mistyped ``runs``
    folder or an empty seed list would otherwise replace it with an empty one."""
    rows = summary_rows(jobs)
    check_not_fewer(report, len(rows), len(jobs), runs, force)
    with FolderLock(report, "reproduce report"):
        remove_stale_temporaries(report)
        with staged_outputs(report) as stage:
            result = _build(jobs, rows, runs, stage, levels, log, cache_dir=report)
    log(f"report: {report / 'fashion-mnist.md'}")
    return result


def check_not_fewer(report: Path, finished: int, jobs: int, runs: Path, force: bool = False) -> None:
    """ConfigError if ``report`` was built from more finished runs than ``finished`` (and not ``force``).

    Examples:
        >>> import tempfile
        >>> check_not_fewer(Path(tempfile.mkdtemp()), 0, 78, Path("runs"))  # no report yet: nothing to lose
    """
    before = finished_runs_of(report)
    if before is not None and finished < before and not force:
        raise ConfigError(f"{report} holds a report built from {before} finished runs; {runs} has {finished} of "
                          f"{jobs} (check --runs and --seeds); pass --force to replace the report anyway")


def finished_runs_of(report: Path) -> int | None:
    """How many finished runs the report in ``report`` was built from (None: no report there)."""
    manifest = report / MANIFEST
    if manifest.is_file():
        try:
            count = read_json(manifest).get("finished_runs")
        except (BMRSError, AttributeError):
            count = None
        if isinstance(count, int) and not isinstance(count, bool) and count >= 0:
            return count
    md = report / "fashion-mnist.md"
    if md.is_file():  # (a report from before the manifest existed)
        found = re.search(r"(\d+) of (\d+) finished", md.read_text(errors="replace"))
        return int(found.group(1)) if found else None
    return None


def _build(jobs: list[Job], rows: list[dict], runs: Path, report: Path, levels: int, log, cache_dir: Path) -> dict:
    """Every file of the report, written into ``report`` (the staging folder)."""
    table = aggregate(rows)
    table_md = _write_table(aggregate(rows, CSV_METHODS), report)
    if table:
        _plot_table(table, report)
    curves = {net: _post_training(net, runs, report, levels, log, cache_dir) for net in ("mlp", "lenet5")}
    knees = []
    for net, results in curves.items():
        for res in results:
            k = res.get("knee")
            if k and "stop_compression" in k:
                knees.append(f"| {net} | {res['criterion']} | {k['knee_compression']:.1f} | {k['knee_accuracy']:.2f} | "
                             f"{k['stop_compression']:.1f} | {k['stop_accuracy']:.2f} | "
                             f"{k['compression_from_knee']:+.1f} | {k['accuracy_from_knee']:+.2f} |")
    hist = _theta_histograms(runs, report)
    exact_n = _delta_f_after_exact_bmrs_n(runs, report)
    p1 = _p1_sweep(runs, report, log)
    mant = _mantissas(runs, report)
    cost = _cost(rows)
    beyond = _markdown_table(aggregate(rows, EXTRA_METHODS))
    done = len(rows)
    md = [
        "# Fashion-MNIST: the paper's table, measured here",
        "",
        f"Regenerate with `python -m paper fashion-mnist` from a source checkout (runs in `{runs}`, {done} of {len(jobs)} finished; "
        f"rerunning continues the unfinished ones and rebuilds this report). Continuous pruning: {_schedule(jobs)}; "
        "the best validation checkpoint after the last pruning "
        "step is tested; compression is the share of parameters removed from the physically compacted network.",
        "",
        table_md,
        "",
        "![table](fashion-mnist-table.png)",
        "",
        "What agrees with the paper (our mean within 2 standard deviations of the paper's, or within 2 points):",
        "",
        *agreement(table),
        "",
        "`bmrs-n` is `bmrs train`'s defaults (the stated rule ΔF ≥ −1 nat or E[θ] < 2⁻²³, noise parameters at 10× "
        f"the learning rate, the KL as a {KL_WEIGHT:g}-weighted mean over structures, deterministic fine-tuning; "
        "docs/decision-rule.md); every other method runs with the paper's recipe. `bmrs-n-exact` is the exact rule "
        "ΔF ≥ 0 with the paper's recipe: the ΔF of a posterior the data leaves prior-like is a tie just below 0, so "
        "it prunes nothing; `bmrs-n-published` (the public code's +½ ln 2π ≈ 0.919) prunes those posteriors; "
        "`plain` is the network without noise layers.",
        "",
        "## Beyond the paper: exact BMRS_N, the public code's ΔF, and the evidence lower bound",
        "",
        "`bmrs-n-published` adds the public code's +½ ln 2π ≈ 0.919 to ΔF; `bmrs-n-elbo` is exact BMRS_N with "
        "the KL weighted as Σ KL / N (the proper evidence lower bound) instead of the paper's layer mean; "
        "`-detft` variants fine-tune deterministically (see the goal below).",
        "",
        beyond,
        "",
        "Where the posteriors of the exact BMRS_N runs end up (![ΔF](delta-f-exact-bmrs-n.png)): prior-like "
        "(tiny KL), yet every ΔF_N is negative, because BMRS_N evaluates the posterior's density at the boundary "
        "θ = e⁻²⁰, exactly where a tilted truncated normal differs most from the flat prior.",
        "",
        exact_n,
        "",
        "## The goal: BMRS_N at ≥ 85% compression within 2 points of the unpruned network",
        "",
        "`none` is the unpruned network trained with noise layers (the paper's reference), `plain` the same "
        "network without them. `-detft` fine-tunes the pruned network for the last 10 epochs with θ fixed at "
        "E[θ]·mask and no KL term (`--finetune deterministic`); `-elbo` weights the KL as Σ KL / N.",
        "",
        *goal_lines(rows),
        "",
        "Exploratory single runs (`runs/goal`): longer deterministic fine-tuning and a tempered KL "
        "(`--kl elbo --kl-weight W`, between the ELBO and the paper's layer mean):",
        "",
        goal_runs_table(runs, rows),
        "",
        "## Post-training pruning",
        "",
        f"From the unpruned seed-0 runs (their weights after the last epoch), every criterion prunes the globally most prunable structures at {levels} "
        "levels (no fine-tuning between levels; the paper used 100 levels with one fine-tuning epoch each). "
        "Stars mark where ΔF ≥ 0 stops. Knee: Kneedle (kneed, concave decreasing) on accuracy against compression.",
        "",
        "![mlp](post-training-mlp.png) ![lenet5](post-training-lenet5.png)",
        "",
        "| network | criterion | knee compression % | knee accuracy % | stop compression % | stop accuracy % | Δ compression | Δ accuracy |",
        "|---|---|---|---|---|---|---|---|",
        *knees,
        "",
        "## E[θ] before and after pruning",
        "",
        "![histograms](theta-histograms.png)",
        "",
        hist,
        "",
        "## Open questions",
        "",
        "**p₁ for BMRS_U** (post-training on the unpruned seed-0 models after their last epoch): ![p1](p1-sweep.png)",
        "",
        "| network | p₁ | compression % | accuracy % |",
        "|---|---|---|---|",
        p1,
        "",
        f"**Are the mantissas log-uniform?** ![mantissa](mantissa.png) {mant}",
        "",
        "**Training-time cost of the noise layers** (mean epoch wall time of the runs):",
        "",
        cost,
        "",
    ]
    atomic_write(report / "fashion-mnist.md", lambda tmp: Path(tmp).write_text("\n".join(md)))
    write_json(report / MANIFEST, {"finished_runs": done, "jobs": len(jobs), "runs": str(runs), "levels": levels})
    return {"table": table, "curves": curves}
