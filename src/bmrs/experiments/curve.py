"""Post-training pruning: accuracy against compression for each criterion, BMRS stopping points marked.

Starting from a trained run, each criterion prunes the globally most prunable structures at
increasing fractions (masks only grow, so optional fine-tuning at one level carries to the next),
and the test accuracy and the compacted network's parameter compression are recorded.  For
BMRS_N and BMRS_U the point where ΔF ≥ 0 stops is recorded too: the threshold-free answer.

Examples:
    from bmrs.experiments.curve import run_curve
    result = run_curve("runs/fmnist-mlp-none-s0", ["bmrs-n", "l2"], "out", levels=11)
"""

from __future__ import annotations

import copy
import csv
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..criteria import Gradient, get_criterion
from ..defaults import CURVE_CRITERIA
from ..errors import ConfigError
from ..io import FolderLock, atomic_write, check_writable, remove_stale_temporaries, staged_outputs, write_json
from ..pruning import prune, structure_counts
from ..evidence import precision_prior
from ..training.artifacts import load_run
from ..training.config import check_int
from ..training.loop import batches, evaluate, train_epoch
from ..training.optim import make_optimizer

__all__ = ["run_curve", "sweep", "plot_curves"]

def _criterion(name: str, p1: float):
    return get_criterion("bmrs-u", p1=p1) if name == "bmrs-u" else get_criterion(name)


def _compression(baseline, model, example) -> float:
    from ..compaction import compact, compression_report

    return compression_report(baseline, compact(model, example), example)["parameter_compression_pct"]


def sweep(model, data, criterion_name: str, levels: int, *, finetune_epochs: int = 0, p1: float = 8.0,
          batch_size: int = 128, lr: float = 1e-3, seed: int = 0, progress: bool = True,
          baseline=None) -> dict:
    """One criterion's curve from a trained model (not modified): levels, accuracy, compression, stop.

    Compression is measured against ``baseline`` (default: ``model``), the network before any pruning:
    pass ``LoadedRun.built_model()`` for a run that shrank its network as it trained."""
    baseline = model if baseline is None else baseline
    base = copy.deepcopy(model)
    example = data.test.tensors[0][:2]
    crit = _criterion(criterion_name, p1)
    if isinstance(crit, Gradient):
        crit.accumulate(base, batches(data.train, batch_size, torch.Generator().manual_seed(seed)), max_batches=50)
    points = []
    current = copy.deepcopy(base)
    optimizer = make_optimizer(current.parameters(), lr=lr)
    total = structure_counts(current).structures
    for fraction in tqdm(np.linspace(0.0, 1.0, levels), desc=criterion_name, leave=False, disable=not progress):
        k = min(int(round(fraction * total)), total)
        prune(current, crit, k)
        for epoch in range(finetune_epochs):
            gen = torch.Generator().manual_seed(seed * 7919 + len(points) * 31 + epoch)
            train_epoch(current, optimizer, data.train, batch_size=batch_size, generator=gen, progress=False)
        accuracy = evaluate(current, data.test)["accuracy"]
        points.append({"fraction": float(fraction), "structures_pruned": structure_counts(current).pruned,
                       "accuracy": accuracy, "compression": _compression(baseline, current, example)})
    result = {"criterion": criterion_name, "points": points}
    if criterion_name in ("bmrs-n", "bmrs-u"):
        stopped = copy.deepcopy(base)
        report = prune(stopped, crit)
        result["stop"] = {"fraction": report.pruned / total, "structures_pruned": report.pruned,
                          "accuracy": evaluate(stopped, data.test)["accuracy"],
                          "compression": _compression(baseline, stopped, example)}
    return result


def plot_curves(results: list[dict], path: str | Path, title: str = "") -> None:
    """Accuracy against parameter compression, one line per criterion, BMRS stops as stars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for res in results:
        xs = [p["compression"] for p in res["points"]]
        ys = [100 * p["accuracy"] for p in res["points"]]
        (line,) = ax.plot(xs, ys, marker=".", label=res["criterion"])
        if "stop" in res:
            ax.plot(res["stop"]["compression"], 100 * res["stop"]["accuracy"], marker="*", markersize=14,
                    color=line.get_color(), markeredgecolor="black", linestyle="none",
                    label=f"{res['criterion']} stops (ΔF ≥ 0)")
    ax.set_xlabel("parameter compression (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title or "post-training pruning")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def _write_csv(results: list[dict], path: Path) -> None:
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["criterion", "fraction", "structures_pruned", "compression_pct", "accuracy"])
            for res in results:
                for p in res["points"]:
                    writer.writerow([res["criterion"], f"{p['fraction']:.4f}", p["structures_pruned"],
                                     f"{p['compression']:.3f}", f"{p['accuracy']:.4f}"])
    atomic_write(path, write)


def run_curve(run_dir, criteria: list[str], output, *, levels: int = 21, finetune_epochs: int = 0,
              p1: float = 8.0, data_dir: str | None = None, progress: bool = True, log=print) -> list[dict]:
    """Sweep every criterion on a finished run; write curve.json, curve.csv and curve.png in ``output``."""
    from ..data import load_dataset

    unknown = [c for c in criteria if c not in CURVE_CRITERIA]
    if unknown or not criteria:
        raise ConfigError(f"unknown criteria {unknown}; choose from {', '.join(CURVE_CRITERIA)}")
    check_int("levels", levels)
    check_int("finetune_epochs", finetune_epochs)
    run = load_run(run_dir)
    if "bmrs-u" in criteria:  # checked before the sweeps, not after the first one
        precision_prior(p1, run.config.low, run.config.high)
    check_writable(output)
    output = Path(output)
    with FolderLock(output, "curve"):  # one sweep writes a folder at a time; a killed one left only temporaries
        remove_stale_temporaries(output)
        cfg = run.config
        data = load_dataset(cfg.dataset, data_dir or cfg.data_dir, val_fraction=cfg.val_fraction,
                            split_seed=cfg.seed, image_size=cfg.image_size, train_subset=cfg.train_subset,
                            progress=progress)
        results, built = [], run.built_model()
        for name in criteria:
            res = sweep(run.model, data, name, levels, finetune_epochs=finetune_epochs, p1=p1,
                        batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed, progress=progress,
                        baseline=built)
            results.append(res)
            stop = f", stops at {res['stop']['compression']:.1f}% / {100 * res['stop']['accuracy']:.2f}%" \
                if "stop" in res else ""
            log(f"{name}: {len(res['points'])} levels{stop}")
        with staged_outputs(output) as stage:  # curve.json, .csv and .png from one sweep, or the previous three
            write_json(stage / "curve.json", {"run": str(run_dir), "levels": levels,
                                              "finetune_epochs": finetune_epochs, "results": results})
            _write_csv(results, stage / "curve.csv")
            plot_curves(results, stage / "curve.png", title=f"{cfg.dataset} {cfg.model}: post-training pruning")
    log(f"curve: {output / 'curve.png'}")
    return results
