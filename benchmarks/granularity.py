"""Noise sampling granularity: one θ per (example, structure) versus one per element.

Measures, side by side in one run, the training-step time of each granularity and the validation
accuracy after a short LeNet5 BMRS_U run on a real Fashion-MNIST slice (the criterion that prunes in
short runs), to choose the default by measurement.

Run: python benchmarks/granularity.py   (writes benchmarks/results/granularity.json)
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from bmrs.data import load_dataset
from bmrs.training import TrainConfig, train
from bmrs.training.optim import make_optimizer
from bmrs.training.run import build_for

CASES = [("lenet5", 32), ("mlp", 128)]


def step_ms(model_name: str, batch_size: int, granularity: str, steps: int = 60) -> float:
    cfg = TrainConfig(model=model_name, granularity=granularity, batch_size=batch_size)
    model = build_for(cfg, 1, 10)
    optimizer = make_optimizer(model.parameters(), lr=1e-3)
    x, y = torch.randn(batch_size, 1, 32, 32), torch.randint(0, 10, (batch_size,))
    from bmrs import kl_loss
    times = []
    for i in range(steps + 10):
        start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y) + kl_loss(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if i >= 10:
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    torch.set_num_threads(1)
    out = {"threads": 1, "step_ms": [], "short_run": []}
    for name, batch in CASES:
        row = {"model": name, "batch_size": batch}
        for gran in ("structure", "element"):
            row[gran] = step_ms(name, batch, gran)
        row["element_over_structure"] = row["element"] / row["structure"]
        out["step_ms"].append(row)
        print(f"{name} batch {batch}: structure {row['structure']:.2f} ms, element {row['element']:.2f} ms "
              f"(×{row['element_over_structure']:.2f})")
    data = load_dataset("fashion-mnist", train_subset=6000, progress=False)
    for gran in ("structure", "element"):
        # (for an MLP the two granularities coincide: there is no spatial axis to share θ across)
        cfg = TrainConfig(model="lenet5", criterion="bmrs-u", p1=4, granularity=gran, epochs=6, finetune_epochs=2,
                          batch_size=32, lr=1e-2, train_subset=6000, seed=0)
        start = time.perf_counter()
        metrics = train(cfg, f"/tmp/bmrs-granularity-{gran}", progress=False, log=lambda *_: None, data=data)
        row = {"granularity": gran, "val_accuracy": metrics["val_accuracy"], "test_accuracy": metrics["test_accuracy"],
               "structures_pruned_pct": metrics["structures_pruned_pct"], "seconds": time.perf_counter() - start}
        out["short_run"].append(row)
        print(f"lenet5 bmrs-u-4 {gran}: test acc {row['test_accuracy']:.4f}, pruned {row['structures_pruned_pct']:.1f}%, "
              f"{row['seconds']:.1f} s")
    path = Path(__file__).parent / "results" / "granularity.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"written {path}")


if __name__ == "__main__":
    main()
