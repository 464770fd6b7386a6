"""The Fashion-MNIST report's figures and analyses: the table plot, post-training curves with knees, E[θ]
histograms, ΔF after exact BMRS_N, the p₁ sweep and the mantissa test.

Each function reads finished runs (``runs``) and writes its figure (and data) into ``out``.

Examples:
    from paper.figures import mantissa_test
    mantissa_test(values)["p_value"]
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from bmrs import compact, noise_layers, prune
from bmrs.compaction import compression_report
from bmrs.criteria import BMRSU
from bmrs.defaults import CURVE_CRITERIA
from bmrs.experiments.curve import plot_curves, sweep
from bmrs.io import atomic_write, read_json, write_json
from bmrs.training import evaluate
from bmrs.training.artifacts import load_run
from bmrs.training.run import CHECKPOINT

__all__ = ["knee_distances", "mantissa_test", "CURVE_CRITERIA"]



def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    _plt().close(fig)


def _label_and_save(fig, ax, xlabel: str, ylabel: str, title: str, path: Path) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def _plot_table(table: list[dict], report: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, network in zip(axes, ("mlp", "lenet5")):
        for i, r in enumerate(t for t in table if t["network"] == network):
            color = f"C{i}"
            ax.errorbar(r["compression_mean"], r["accuracy_mean"], xerr=r["compression_std"], yerr=r["accuracy_std"],
                        fmt="o", color=color, label=f"{r['method']} (ours)")
            ax.plot(r["paper_compression"], r["paper_accuracy"], marker="x", color=color, linestyle="none")
        ax.set_title(f"{network}: ours (o, mean ± std) vs paper (x)")
        ax.set_xlabel("parameter compression (%)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, report / "fashion-mnist-table.png")


def knee_distances(result: dict) -> dict | None:
    """Kneedle knee of accuracy against compression (concave, decreasing), and each stop's distance."""
    from kneed import KneeLocator

    xs = np.array([p["compression"] for p in result["points"]])
    ys = np.array([100 * p["accuracy"] for p in result["points"]])
    order = np.argsort(xs)
    xs, ys = xs[order], ys[order]
    xs, idx = np.unique(xs, return_index=True)
    ys = ys[idx]
    if len(xs) < 3:
        return None
    knee = KneeLocator(xs, ys, curve="concave", direction="decreasing").knee
    if knee is None:
        return None
    knee_acc = float(np.interp(knee, xs, ys))
    out = {"knee_compression": float(knee), "knee_accuracy": knee_acc}
    if "stop" in result:
        out["stop_compression"] = result["stop"]["compression"]
        out["stop_accuracy"] = 100 * result["stop"]["accuracy"]
        out["compression_from_knee"] = out["stop_compression"] - knee
        out["accuracy_from_knee"] = out["stop_accuracy"] - knee_acc
    return out


def _post_training(network: str, runs: Path, report: Path, levels: int, log, cache_dir: Path | None = None) \
        -> list[dict]:
    """Curves of every criterion from the seed-0 unpruned run (cached beside the report: read from ``cache_dir``,
    default ``report``, and written into ``report``)."""
    from bmrs.data import load_dataset

    base = runs / network / "none" / "seed0"
    if not (base / "metrics.json").exists():
        log(f"post-training {network}: no finished 'none' run yet")
        return []
    cache = report / f"post-training-{network}.json"
    old_cache = (cache_dir or report) / cache.name
    # which weights the curves came from: a retrained run (new checkpoint) invalidates them
    stat = (base / CHECKPOINT if (base / CHECKPOINT).exists() else base / "metrics.json").stat()
    source = {"run": str(base), "weights": "final", "checkpoint": [stat.st_size, stat.st_mtime_ns]}
    cached = read_json(old_cache) if old_cache.exists() else {}
    if isinstance(cached, dict) and cached.get("levels") == levels and all(cached.get(k) == v
                                                                           for k, v in source.items()):
        results = cached["results"]
        write_json(cache, cached)  # (kept with the new report)
    else:
        run = load_run(base, final=True)
        cfg = run.config
        data = load_dataset(cfg.dataset, cfg.data_dir, val_fraction=cfg.val_fraction, split_seed=cfg.seed,
                            image_size=cfg.image_size, train_subset=cfg.train_subset, progress=False)
        built = run.built_model()
        results = [sweep(run.model, data, name, levels, p1=8.0, batch_size=cfg.batch_size, seed=cfg.seed,
                         progress=False, baseline=built) for name in CURVE_CRITERIA]
        for res in results:
            res["knee"] = knee_distances(res)
        write_json(cache, {"levels": levels, **source, "results": results})
    plot_curves(results, report / f"post-training-{network}.png",
                title=f"Fashion-MNIST {network}: post-training pruning ({levels} levels, no fine-tuning)")
    return results


def _theta_histograms(runs: Path, report: Path) -> str:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    lines = []
    for ax, network in zip(axes, ("mlp", "lenet5")):
        before = runs / network / "none" / "seed0"
        after = runs / network / "bmrs-u-4" / "seed0"
        if not (before / "metrics.json").exists() or not (after / "metrics.json").exists():
            continue
        bins = np.linspace(-9, 0.1, 50)
        ev_before = np.concatenate([n.posterior().mean.detach().double().numpy()
                                    for _, n in noise_layers(load_run(before, final=True).model)])
        model = load_run(after).model
        ev = np.concatenate([n.posterior().mean.detach().double().numpy() for _, n in noise_layers(model)])
        kept = np.concatenate([(n.mask > 0).numpy() for _, n in noise_layers(model)])
        ax.hist(np.log10(ev_before), bins=bins, alpha=0.5, label="trained without pruning (last epoch)")
        ax.hist(np.log10(ev[kept]), bins=bins, alpha=0.6, label="BMRS_U-4: kept")
        ax.hist(np.log10(ev[~kept]), bins=bins, alpha=0.6, label="BMRS_U-4: pruned")
        ax.set_xlabel("log10 E[θ]")
        ax.set_ylabel("structures")
        ax.set_title(f"{network}: E[θ] before and after pruning (seed 0)")
        ax.legend(fontsize=8)
        lines.append(f"- {network}: median E[θ] {np.median(ev_before):.3g} without pruning; with BMRS_U-4 "
                     f"{np.median(ev[kept]):.3g} for kept and {np.median(ev[~kept]) if (~kept).any() else float('nan'):.3g} "
                     f"for pruned structures.")
    fig.tight_layout()
    _save(fig, report / "theta-histograms.png")
    return "\n".join(lines)


def _delta_f_after_exact_bmrs_n(runs: Path, report: Path) -> str:
    """Where the posteriors of an exact-BMRS_N run end up: ΔF_N against their KL to the prior."""
    from bmrs.criteria import BMRSN

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    lines, configs = [], []
    for i, network in enumerate(("mlp", "lenet5")):
        run_dir = runs / network / "bmrs-n-exact" / "seed0"
        if not (run_dir / "metrics.json").exists():
            continue
        run = load_run(run_dir)
        model = run.model
        configs.append(run.config)
        df = torch_cat([v for v in BMRSN().scores(model).values()])
        kl = torch_cat([n.kl().detach().double() for _, n in noise_layers(model)])
        ax.scatter(kl, -df, s=8, color=f"C{i}", alpha=0.6, label=network)
        lines.append(f"- {network}: {len(df)} structures, largest ΔF_N {df.max():.4f}, median {np.median(df):.3f}; "
                     f"median KL to the prior {np.median(kl):.4f}; ΔF_N > −½ ln 2π for {int((df > -0.919).sum())}.")
    if not lines:
        plt.close(fig)
        return "no finished exact BMRS_N run yet"
    ax.axhline(0.5 * math.log(2 * math.pi), color="black", linestyle="--", label="½ ln 2π (public code's offset)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    _label_and_save(fig, ax, "KL(q ‖ prior) per structure", "−ΔF_N (all < 0: nothing pruned)",
                    f"exact BMRS_N after {configs[0].epochs} + {configs[0].finetune_epochs} epochs (seed 0)",
                    report / "delta-f-exact-bmrs-n.png")
    return "\n".join(lines)


def torch_cat(tensors) -> np.ndarray:
    return np.concatenate([t.detach().double().numpy().reshape(-1) for t in tensors])


def _p1_sweep(runs: Path, report: Path, log) -> str:
    """BMRS_U at every p₁ from 1 to 22 on the seed-0 unpruned models (post-training, no retraining)."""
    from bmrs.data import load_dataset

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax2 = ax.twinx()
    rows = []
    for i, network in enumerate(("mlp", "lenet5")):
        base = runs / network / "none" / "seed0"
        if not (base / "metrics.json").exists():
            continue
        run = load_run(base, final=True)
        cfg = run.config
        data = load_dataset(cfg.dataset, cfg.data_dir, split_seed=cfg.seed, progress=False)
        example = data.test.tensors[0][:2]
        built = run.built_model()
        comps, accs = [], []
        for p1 in range(1, 23):
            model = load_run(base, final=True).model
            prune(model, BMRSU(p1))
            comps.append(compression_report(built, compact(model, example), example)["parameter_compression_pct"])
            accs.append(100 * evaluate(model, data.test)["accuracy"])
            rows.append({"network": network, "p1": p1, "compression": comps[-1], "accuracy": accs[-1]})
        ax.plot(range(1, 23), comps, marker="o", color=f"C{i}", label=f"{network} compression")
        ax2.plot(range(1, 23), accs, marker="x", linestyle="--", color=f"C{i}", label=f"{network} accuracy")
    if not rows:
        log("p1 sweep: no finished 'none' runs yet")
        plt.close(fig)
        return ""
    ax.set_xlabel("p₁ (bits of precision)")
    ax.set_ylabel("parameter compression (%)")
    ax2.set_ylabel("test accuracy (%)")
    ax.set_title("BMRS_U post-training on the unpruned seed-0 models")
    fig.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    _save(fig, report / "p1-sweep.png")
    write_json(report / "p1-sweep.json", rows)
    return "\n".join(f"| {r['network']} | {r['p1']} | {r['compression']:.1f} | {r['accuracy']:.2f} |" for r in rows)


def mantissa_test(values: np.ndarray) -> dict:
    """KS test of log₂(mantissa) of float32 values against Uniform(0, 1) (log-uniform mantissas)."""
    from scipy import stats

    values = values[values > 0].astype(np.float32)
    mantissa, _ = np.frexp(values)  # values = mantissa · 2^e with mantissa in [0.5, 1)
    fraction = np.log2(2.0 * mantissa.astype(np.float64))  # in [0, 1)
    result = stats.kstest(fraction, "uniform")
    return {"n": int(len(fraction)), "ks_statistic": float(result.statistic), "p_value": float(result.pvalue),
            "fractions": fraction}


def _mantissas(runs: Path, report: Path) -> str:
    values = []
    for network in ("mlp", "lenet5"):
        for seed_dir in sorted((runs / network / "none").glob("seed*")):
            if (seed_dir / "metrics.json").exists():
                model = load_run(seed_dir, final=True).model
                values.append(np.concatenate([n.posterior().mean.detach().float().numpy() for _, n in noise_layers(model)]))
    if not values:
        return "no finished 'none' runs yet"
    res = mantissa_test(np.concatenate(values))
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.hist(res["fractions"], bins=20, range=(0, 1), density=True, alpha=0.7, label="trained E[θ]")
    ax.axhline(1.0, color="black", linestyle="--", label="log-uniform mantissa")
    _label_and_save(fig, ax, "log₂(mantissa) of E[θ] (float32)", "density",
                    f"KS D = {res['ks_statistic']:.3f}, p = {res['p_value']:.2g}, n = {res['n']}",
                    report / "mantissa.png")
    verdict = "consistent with" if res["p_value"] > 0.05 else "not consistent with"
    return (f"KS test of log₂(mantissa) of E[θ] (n = {res['n']}, unpruned runs, both networks): D = "
            f"{res['ks_statistic']:.3f}, p = {res['p_value']:.3g} — {verdict} log-uniform mantissas.")
