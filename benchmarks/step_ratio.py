"""Training step with noise layers ÷ the same network without them, measured in fresh processes.

One step is the forward pass, the loss (with the KL for the noisy network), the backward pass and the
training engine's Adam.  In each process the plain and the noisy step are timed in alternating blocks
(``alternating_times``), so that the host's drift within the process hits both alike; this VM's speed
also differs from one process to the next (the same code gave 1.22-1.33 on the Fashion-MNIST MLP over
nine processes), so ``python -m benchmarks`` runs this in several processes and reports the median.

Run: python -m benchmarks.step_ratio [--repeats 50] [--threads 2] [--compile] [--no-kernels]
     (one process; prints the cases as JSON)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

import torch

import bmrs
from bmrs.experiments.timing import alternating_times
from bmrs.training import TrainConfig
from bmrs.training.optim import make_optimizer
from bmrs.training.run import build_for

CASES = [  # name, model, kwargs, batch
    ("lenet5_b64", "lenet5", {}, 64),
    ("lenet5_b32", "lenet5", {}, 32),
    ("mlp_fmnist_b128", "mlp", {"hidden": 150, "layers": 1}, 128),
    ("mlp1000_b256", "mlp", {"hidden": 1000, "layers": 2}, 256),
]


def build_model(name: str, noise: bool, **kw) -> torch.nn.Module:
    """The network the training engine builds for ``name`` (1 × 32 × 32 inputs, 10 classes)."""
    cfg = TrainConfig(model=name, criterion="bmrs-n" if noise else "none", noise=noise, **kw)
    return build_for(cfg, 1, 10)


def train_step(model, x, y, with_kl: bool):
    """A zero-argument training step of ``model`` on (x, y) with the training engine's Adam."""
    opt = make_optimizer(model.parameters(), lr=1e-3)

    def step():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        if with_kl:
            loss = loss + bmrs.kl_loss(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def _without_kernels(step):
    def run():
        bmrs._kernels.set_enabled(False)
        try:
            step()
        finally:
            bmrs._kernels.set_enabled(True)
    return run


def measure(repeats: int) -> dict:
    """{case: plain and noisy ms, their ratio (and the noisy step on the PyTorch reference code beside the
    fused kernels, when they are on)} in this process."""
    out = {}
    for key, name, kw, batch in CASES:
        x, y = torch.randn(batch, 1, 32, 32), torch.randint(0, 10, (batch,))
        plain = train_step(build_model(name, False, **kw), x, y, False)
        noisy = train_step(build_model(name, True, **kw), x, y, True)
        t_plain, t_noise, ratio = alternating_times(plain, noisy, repeats)
        out[key] = {"plain_ms": t_plain, "noise_ms": t_noise, "ratio": ratio}
        if bmrs._kernels.get() is not None:
            t_ref, t_fused, gain = alternating_times(_without_kernels(noisy), noisy, max(repeats // 2, 5))
            out[key].update(reference_noise_ms=t_ref, kernels_noise_ms=t_fused, kernel_time_ratio=gain)
    return out


def measure_in_processes(processes: int, repeats: int, flags: list[str]) -> dict:
    """``measure`` in ``processes`` fresh processes: per case the median of each figure, and every
    process's ratio (``ratios``)."""
    runs = [json.loads(subprocess.run([sys.executable, "-m", "benchmarks.step_ratio", "--repeats", str(repeats),
                                       *flags], capture_output=True, text=True, check=True).stdout)
            for _ in range(processes)]
    out = {}
    for key, _, _, _ in CASES:
        rows = [run[key] for run in runs]
        out[key] = {field: statistics.median(row[field] for row in rows) for field in rows[0]}
        out[key]["ratios"] = [row["ratio"] for row in rows]
        out[key]["processes"] = processes
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.step_ratio", description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50, help="alternating rounds per case (default: 50)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the noise kernels")
    parser.add_argument("--no-kernels", action="store_true", help="the PyTorch reference code, not the fused kernels")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    bmrs._compile.set_compile(args.compile)
    bmrs._kernels.set_enabled(not args.no_kernels)
    print(json.dumps(measure(args.repeats)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
