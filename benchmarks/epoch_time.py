"""Wall time of one training epoch on real Fashion-MNIST, with and without noise layers.

Run: python benchmarks/epoch_time.py   (writes benchmarks/results/epoch_time.json)
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

from bmrs.data import load_dataset
from bmrs.training import TrainConfig
from bmrs.training.loop import train_epoch
from bmrs.training.optim import make_optimizer
from bmrs.training.run import build_for

CASES = [("lenet5", 32, 1.4e-3), ("mlp", 128, 1.5e-3)]


def epoch_seconds(data, model_name: str, batch_size: int, lr: float, noise: bool) -> float:
    cfg = TrainConfig(model=model_name, criterion="bmrs-n" if noise else "none", noise=noise, batch_size=batch_size, lr=lr)
    model = build_for(cfg, data.in_channels, data.num_classes)
    optimizer = make_optimizer(model.parameters(), lr=lr)
    start = time.perf_counter()
    train_epoch(model, optimizer, data.train, batch_size=batch_size, generator=torch.Generator().manual_seed(0),
                progress=False)
    return time.perf_counter() - start


def main() -> None:
    data = load_dataset("fashion-mnist", progress=False)
    results = {"threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
               "train_examples": len(data.train), "cases": []}
    for name, batch_size, lr in CASES:
        plain = epoch_seconds(data, name, batch_size, lr, noise=False)
        noisy = epoch_seconds(data, name, batch_size, lr, noise=True)
        row = {"model": name, "batch_size": batch_size, "plain_s": plain, "noise_s": noisy, "ratio": noisy / plain}
        results["cases"].append(row)
        print(f"{name:7s} batch {batch_size:4d}: {plain:6.1f} s without noise, {noisy:6.1f} s with (×{noisy / plain:.2f})")
    out = Path(__file__).parent / "results" / "epoch_time.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written {out}")


if __name__ == "__main__":
    main()
