"""CPU latency of masked models (noise layers in eval mode) against their compacted copies.

Builds LeNet-5 (1×28×28 inputs) and a 3×1000 MLP (784 inputs), attaches noise layers with the
default policy, masks ~80% of the structures of every noise layer at random, compacts, and times
both models at batch 256 and batch 1: the median of ``--repeats`` timed calls after ``--warmup``
untimed ones, under ``torch.inference_mode()`` with ``torch.set_num_threads(--threads)``.
Prints a table and writes ``benchmarks/results/compaction_speed.json``.

Usage:
    python benchmarks/compaction_speed.py [--threads 1] [--repeats 50] [--warmup 10]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import torch
from torch import nn

import bmrs
from bmrs.compaction import compact, count
from bmrs.experiments.timing import median_latency
from bmrs.inference import optimize

RESULTS = Path(__file__).resolve().parent / "results" / "compaction_speed.json"
PRUNED_FRACTION = 0.8


def lenet5() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10),
    )


def mlp_3x1000() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 1000), nn.ReLU(), nn.Linear(1000, 1000), nn.ReLU(),
        nn.Linear(1000, 1000), nn.ReLU(), nn.Linear(1000, 10),
    )


MODELS = {"lenet5": (lenet5, (1, 28, 28)), "mlp_3x1000": (mlp_3x1000, (1, 28, 28))}


def masked_model(build, gen: torch.Generator) -> nn.Module:
    """The model with noise layers, random posteriors and ~80% of every layer's structures masked."""
    model = bmrs.attach(build())
    with torch.no_grad():
        for _, noise in bmrs.noise_layers(model):
            n = noise.num_features
            noise.mu.copy_(torch.empty(n).uniform_(-3.0, 0.5, generator=gen))
            noise.log_sigma.copy_(torch.empty(n).uniform_(-6.0, 0.0, generator=gen))
            mask = torch.ones(n)
            mask[torch.randperm(n, generator=gen)[: round(PRUNED_FRACTION * n)]] = 0
            noise.mask.copy_(mask)
    return model.eval()


def median_ms(model: nn.Module, x: torch.Tensor, warmup: int, repeats: int) -> float:
    return 1000.0 * median_latency(model, x, repeats=repeats, warmup=warmup)


def bench(name: str, threads: int, warmup: int, repeats: int) -> list[dict]:
    build, shape = MODELS[name]
    torch.manual_seed(0)
    model = masked_model(build, torch.Generator().manual_seed(0))
    small = optimize(compact(model, torch.randn(2, *shape)))  # with the fast CPU inference layers
    one = torch.randn(1, *shape)
    before, after = count(model, one), count(small, one)
    rows = []
    for batch in (256, 1):
        x = torch.randn(batch, *shape)
        with torch.inference_mode():
            err = float((small(x) - model(x)).abs().max() / model(x).abs().max())
        masked, compacted = median_ms(model, x, warmup, repeats), median_ms(small, x, warmup, repeats)
        rows.append({
            "model": name, "batch": batch, "threads": threads,
            "masked_ms": round(masked, 4), "compacted_ms": round(compacted, 4),
            "speedup": round(masked / compacted, 2),
            "params_masked": before["params"], "params_compacted": after["params"],
            "macs_masked": before["macs"], "macs_compacted": after["macs"],
            "mac_ratio": round(after["macs"] / before["macs"], 4),
            "max_rel_output_diff": err,
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [row for name in MODELS for row in bench(name, args.threads, args.warmup, args.repeats)]
    header = f"{'model':<12}{'batch':>6}{'masked ms':>12}{'compact ms':>12}{'speedup':>9}{'MAC ratio':>11}"
    print(f"torch {torch.__version__}, torch.set_num_threads({args.threads}), "
          f"{PRUNED_FRACTION:.0%} of structures masked")
    print(header)
    for r in rows:
        print(f"{r['model']:<12}{r['batch']:>6}{r['masked_ms']:>12.3f}{r['compacted_ms']:>12.3f}"
              f"{r['speedup']:>9.2f}{r['mac_ratio']:>11.4f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "threads": args.threads, "warmup": args.warmup, "repeats": args.repeats,
            "statistic": "median wall time per forward call", "pruned_fraction": PRUNED_FRACTION,
            "machine": platform.machine(), "processor": platform.processor() or platform.platform(),
            "cpu_count": os.cpu_count()}
    args.out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
