"""The Fashion-MNIST report's tables: mean ± std over seeds beside the paper, agreement, the compression goal,
exploratory runs, the cost of the noise layers and the schedule, as Markdown and CSV.

Examples:
    from paper.tables import aggregate
    aggregate([{"network": "mlp", "method": "none", "compression": 0.0, "accuracy": 88.0}])
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np

from bmrs.io import atomic_write, read_json
from .runs import EXTRA_METHODS, GOAL_REFERENCES, PAPER, PAPER_STD, Job

__all__ = ["TABLE_METHODS", "CSV_METHODS", "CSV_COLUMNS", "aggregate", "agreement", "goal_lines", "goal_runs_table"]

TABLE_METHODS = ["none", "l2", "ev", "snr", "bmrs-n", "bmrs-u-8", "bmrs-u-4"]
# the CSV also holds the unpruned network without noise layers, the exact rule and the public code's rule
CSV_METHODS = TABLE_METHODS + ["bmrs-n-exact", "bmrs-n-published", "plain"]
CSV_COLUMNS = ["network", "method", "seeds", "compression_mean", "compression_std", "accuracy_mean",
               "accuracy_std", "paper_compression", "paper_accuracy"]


def aggregate(rows: list[dict], methods=TABLE_METHODS) -> list[dict]:
    """Mean ± sample std over seeds per (network, method), beside the paper's numbers."""
    out = []
    for network in ("mlp", "lenet5"):
        for method in methods:
            sel = [r for r in rows if r["network"] == network and r["method"] == method]
            if not sel:
                continue
            comp = np.array([r["compression"] for r in sel])
            acc = np.array([r["accuracy"] for r in sel])
            paper = PAPER.get((network, method), (math.nan, math.nan))
            out.append({"network": network, "method": method, "seeds": len(sel),
                        "compression_mean": comp.mean(), "compression_std": comp.std(ddof=1) if len(sel) > 1 else 0.0,
                        "accuracy_mean": acc.mean(), "accuracy_std": acc.std(ddof=1) if len(sel) > 1 else 0.0,
                        "paper_compression": paper[0], "paper_accuracy": paper[1]})
    return out


def _markdown_table(table: list[dict]) -> str:
    lines = ["| network | method | seeds | compression % (ours) | accuracy % (ours) | compression % (paper) | accuracy % (paper) |",
             "|---|---|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['network']} | {r['method']} | {r['seeds']} | {r['compression_mean']:.2f} ± "
                     f"{r['compression_std']:.2f} | {r['accuracy_mean']:.2f} ± {r['accuracy_std']:.2f} | "
                     f"{r['paper_compression']:.2f} | {r['paper_accuracy']:.2f} |")
    return "\n".join(lines)


def _write_table(table: list[dict], report: Path) -> str:
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
            w.writeheader()
            for row in table:
                w.writerow({k: (f"{row[k]:.2f}" if isinstance(row[k], float) else row[k]) for k in CSV_COLUMNS})
    atomic_write(report / "fashion-mnist.csv", write)
    return _markdown_table(table)


def agreement(table: list[dict]) -> list[str]:
    """Per row: does our mean lie within the spread of the paper's (2 × the larger std, at least 2 points)?"""
    lines = []
    for r in table:
        if (r["network"], r["method"]) not in PAPER_STD:
            continue
        std = PAPER_STD[(r["network"], r["method"])]
        verdicts = []
        for what, i, ours, ours_std in (("compression", 0, r["compression_mean"], r["compression_std"]),
                                        ("accuracy", 1, r["accuracy_mean"], r["accuracy_std"])):
            paper = (r["paper_compression"], r["paper_accuracy"])[i]
            tolerance = max(2.0, 2.0 * max(std[i], ours_std))
            delta = ours - paper
            verdicts.append((what, delta, abs(delta) <= tolerance))
        ok = all(v[2] for v in verdicts)
        detail = ", ".join(f"{w} {d:+.2f}" for w, d, _ in verdicts)
        lines.append(f"- {r['network']} {r['method']}: {'agrees' if ok else 'differs'} ({detail}; "
                     f"{r['seeds']} seed{'s' if r['seeds'] > 1 else ''})")
    return lines


GOAL_COMPRESSION, GOAL_DROP = 85.0, 2.0


def goal_lines(rows: list[dict]) -> list[str]:
    """Per network and BMRS_N variant: compression, and accuracy against each unpruned reference."""
    variants = ("bmrs-n",) + tuple(m for m in EXTRA_METHODS if m.startswith("bmrs-n"))
    table = {(r["network"], r["method"]): r for r in aggregate(rows, variants + GOAL_REFERENCES)}
    lines = []
    for network in ("mlp", "lenet5"):
        refs = {m: table[(network, m)] for m in GOAL_REFERENCES if (network, m) in table}
        for method in variants:
            r = table.get((network, method))
            if r is None or not refs:
                continue
            drops = {m: ref["accuracy_mean"] - r["accuracy_mean"] for m, ref in refs.items()}
            met = r["compression_mean"] >= GOAL_COMPRESSION and all(d <= GOAL_DROP for d in drops.values())
            against = ", ".join(f"{d:.2f} below {m}" if d >= 0 else f"{-d:.2f} above {m}" for m, d in drops.items())
            lines.append(f"- {network} {method}: {r['compression_mean']:.1f}% compression, "
                         f"{r['accuracy_mean']:.2f}% accuracy ({against}; {r['seeds']} seed"
                         f"{'s' if r['seeds'] > 1 else ''}): {'meets' if met else 'misses'} the goal")
    return lines or ["- no finished BMRS_N runs yet"]


def goal_runs_table(runs: Path, rows: list[dict]) -> str:
    """Finished exploratory runs under ``runs/goal/<network>/<name>/seed<k>`` beside the unpruned references."""
    refs = {(r["network"], r["method"]): r["accuracy_mean"] for r in aggregate(rows, GOAL_REFERENCES)}
    lines = ["| network | run | seed | KL | KL weight | fine-tuning | epochs + fine-tuning | compression % | "
             "accuracy % | vs none | vs plain |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for path in sorted((runs / "goal").glob("*/*/seed*/metrics.json")):
        m = json.loads(path.read_text())
        cfg, network = m["config"], path.parts[-4]
        acc = 100 * m["test_accuracy"]
        vs = [f"{acc - refs[(network, ref)]:+.2f}" if (network, ref) in refs else "–" for ref in GOAL_REFERENCES]
        lines.append(f"| {network} | {path.parts[-3]} | {cfg['seed']} | {cfg['kl_reduction']} | "
                     f"{cfg.get('kl_weight', 1.0):g} | {cfg.get('finetune', 'noisy')} | {cfg['epochs']} + "
                     f"{cfg['finetune_epochs']} | {m['parameter_compression_pct']:.1f} | {acc:.2f} | {' | '.join(vs)} |")
    return "\n".join(lines) if len(lines) > 2 else "(no exploratory runs in " + str(runs / "goal") + ")"


def _cost(rows: list[dict]) -> str:
    lines = []
    for network in ("mlp", "lenet5"):
        noise = [r["epoch_seconds"] for r in rows if r["network"] == network and r["method"] == "none"]
        plain = [r["epoch_seconds"] for r in rows if r["network"] == network and r["method"] == "plain"]
        if noise and plain:
            lines.append(f"- {network}: {np.mean(plain):.2f} s per epoch without noise layers, {np.mean(noise):.2f} s "
                         f"with them (×{np.mean(noise) / np.mean(plain):.2f}), one thread per run.")
    return "\n".join(lines) or "no finished none/plain pairs yet"


def _schedule(jobs: list[Job]) -> str:
    """The continuous-pruning schedule the finished runs used, in words ("the paper's" only if it was)."""
    finished = next((j for j in jobs if j.method != "none" and j.done), None)
    if finished is None:
        return "no finished pruning run yet"
    cfg = read_json(finished.folder / "metrics.json")["config"]
    subset = f", on {cfg['train_subset']:,} training examples" if cfg.get("train_subset") else ""
    return (f"{cfg['epochs']} epochs with pruning after each, then {cfg['finetune_epochs']} fine-tuning "
            f"epochs{subset}")
