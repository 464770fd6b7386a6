"""Figure for docs/decision-rule.md: every structure of a trained run, ΔF_N against KL(q‖p),
coloured by how much the validation NLL rises when that one structure is removed.

    python docs/figures/decision_rule.py RUN_DIR [RUN_DIR ...] --output docs/figures/decision-rule.png

RUN_DIR: finished ``bmrs train --criterion none`` runs (noise layers trained, nothing pruned).
"""

from __future__ import annotations

import argparse
import json
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import bmrs  # noqa: E402
from bmrs.data import load_dataset  # noqa: E402
from bmrs.training.artifacts import load_run  # noqa: E402


@torch.no_grad()
def structure_table(run_dir: str) -> dict:
    run = load_run(run_dir)
    cfg = run.config
    data = load_dataset(cfg.dataset, cfg.data_dir, val_fraction=cfg.val_fraction, split_seed=cfg.seed,
                        image_size=cfg.image_size, train_subset=cfg.train_subset, progress=False)
    x, y = data.val.tensors
    model = run.model.eval()

    def nll() -> float:
        return float(torch.nn.functional.cross_entropy(model(x), y))

    base = nll()
    df_n = bmrs.criteria.BMRSN(margin=0).scores(model)
    rows = []
    for name, noise in bmrs.noise_layers(model):
        kl = noise.kl().double()
        for i in range(noise.num_features):
            saved = float(noise.mask[i])
            noise.mask[i] = 0.0
            rows.append({"layer": name, "index": i, "delta_f_n": float(df_n[name][i]), "kl": float(kl[i]),
                         "sigma": float(noise.sigma[i]), "mu": float(noise.mu[i]), "ablation_dnll": nll() - base})
            noise.mask[i] = saved
    return {"run": str(run_dir), "model": cfg.model, "rows": rows}


def plot(tables: list[dict], output: str) -> None:
    fig, axes = plt.subplots(1, len(tables), figsize=(5.5 * len(tables), 4.5), squeeze=False)
    for ax, table in zip(axes[0], tables):
        rows = table["rows"]
        dnll = torch.tensor([r["ablation_dnll"] for r in rows]).clamp(min=1e-5)
        points = ax.scatter([max(r["kl"], 1e-4) for r in rows], [-r["delta_f_n"] for r in rows], s=10,
                            c=dnll.log10().tolist(), cmap="viridis")
        ax.set_xscale("log")
        ax.set_yscale("symlog", linthresh=1.0)
        ax.axhline(1.0, color="red", lw=1, ls="--", label="−ΔF_N = 1 nat (default margin)")
        ax.axhline(0.0, color="grey", lw=1, ls=":", label="−ΔF_N = 0 (exact rule)")
        ax.axvline(math.log(2), color="orange", lw=1, ls="-.", label="KL = ln 2 (one bit)")
        ax.set_xlabel("KL(q ‖ p) per structure (nats)")
        ax.set_ylabel("−ΔF_N (evidence for keeping, nats)")
        ax.set_title(f"{table['model']}: {len(rows)} structures")
        fig.colorbar(points, ax=ax, label="log10 ΔNLL when removed alone")
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(output, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--output", default="docs/figures/decision-rule.png")
    args = parser.parse_args()
    tables = [structure_table(r) for r in args.runs]
    plot(tables, args.output)
    with open(args.output.rsplit(".", 1)[0] + ".json", "w") as f:
        json.dump(tables, f, indent=1)


if __name__ == "__main__":
    main()
