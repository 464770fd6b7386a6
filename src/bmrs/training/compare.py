"""One line comparing a finished run with a reference run (e.g. the same network without noise)."""

from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError, ConfigError
from ..io import read_json

__all__ = ["baseline_metrics", "comparison_line"]


def baseline_metrics(folder: str | Path) -> dict:
    """The reference run's metrics.json (ConfigError if the folder holds no finished run).

    Examples:
        baseline = baseline_metrics("runs/plain")
    """
    path = Path(folder) / "metrics.json"
    if not path.is_file():
        raise ConfigError(f"--compare-to {folder}: no finished run there (no metrics.json); train it first")
    metrics = read_json(path)
    if not isinstance(metrics, dict) or not isinstance(metrics.get("test_accuracy"), (int, float)):
        raise CheckpointError(f"{path}: not a bmrs metrics file (no test_accuracy)")
    return metrics


def comparison_line(metrics: dict, baseline: dict, name: str | Path) -> str:
    """E.g. ``compared with runs/plain: test accuracy 0.8712 vs 0.8890 (-1.78 points), 85.2% of parameters removed``.

    Examples:
        >>> comparison_line({"test_accuracy": 0.87, "parameter_compression_pct": 85.0}, {"test_accuracy": 0.89}, "plain")
        'compared with plain: test accuracy 0.8700 vs 0.8900 (-2.00 points), 85.0% of parameters removed'
    """
    ours, theirs = float(metrics["test_accuracy"]), float(baseline["test_accuracy"])
    removed = float(metrics.get("parameter_compression_pct", 0.0))
    return (f"compared with {name}: test accuracy {ours:.4f} vs {theirs:.4f} ({100 * (ours - theirs):+.2f} points), "
            f"{removed:.1f}% of parameters removed")
