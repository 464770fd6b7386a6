"""Where a training step's extra time with noise layers goes: the step split into phases, plain and noisy.

Phases: the noise bank's draw (the interval from calling the model to the end of its forward pre-hooks:
hook dispatch alone for the plain network), the rest of the forward, the loss (with the KL for the noisy
network), ``zero_grad``, the backward pass and the Adam step.  Both networks run in alternating blocks in
one process (so that the host's drift hits both alike), each phase timed with ``perf_counter``; per
phase the median over all steps.  Beside them, the draw alone (the same kernel call repeated back to
back), which shows how much more the draw costs inside a step than on its own.

Run: python -m benchmarks.step_phases [--model mlp|lenet5] [--batch 128] [--rounds 40]
     (prints a table; writes benchmarks/results/step_phases.json)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import bmrs
from bmrs.io import write_json
from bmrs.nn.attach import noise_layers
from bmrs.nn.fused_draw import sample_layers
from bmrs.training.optim import make_optimizer

from benchmarks.step_ratio import build_model

PHASES = ["draw", "forward", "loss", "zero_grad", "backward", "adam"]
MODELS = {"mlp": {"hidden": 150, "layers": 1}, "lenet5": {}}
OUT = Path(__file__).resolve().parent / "results" / "step_phases.json"


def phased_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, with_kl: bool):
    """A zero-argument training step (as ``step_ratio.train_step``) returning its phases' seconds."""
    opt = make_optimizer(model.parameters(), lr=1e-3)
    clock = time.perf_counter
    marks: list[float] = []
    model.register_forward_pre_hook(lambda module, args: marks.append(clock()))  # runs after the bank's draw

    def step() -> list[float]:
        marks.clear()
        t0 = clock()
        out = model(x)
        t1 = clock()
        loss = torch.nn.functional.cross_entropy(out, y)
        if with_kl:
            loss = loss + bmrs.kl_loss(model)
        t2 = clock()
        opt.zero_grad(set_to_none=True)
        t3 = clock()
        loss.backward()
        t4 = clock()
        opt.step()
        t5 = clock()
        return [marks[0] - t0, t1 - marks[0], t2 - t1, t3 - t2, t4 - t3, t5 - t4]
    return step


def draw_alone(model: torch.nn.Module, batch: int, calls: int) -> float | None:
    """Median seconds of the model's fused draw repeated back to back (None without the kernels)."""
    layers = [noise for _, noise in noise_layers(model)]
    mus, log_sigmas, masks, kept = zip(*(noise.tensors() for noise in layers))
    args = (mus, log_sigmas, masks, None, 0, batch, kept, [n.full_features for n in layers], layers[0].low,
            layers[0].high)
    if sample_layers(*args) is None:
        return None
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        sample_layers(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(model_name: str = "mlp", batch: int = 128, rounds: int = 40, block: int = 25, warmup: int = 300) -> dict:
    """{"plain_us"/"noisy_us": {phase: median µs}, "extra_us": noisy − plain per phase, "draw_alone_us"}.

    Example:
        >>> out = measure("mlp", batch=8, rounds=2, block=2, warmup=2)   # doctest: +SKIP
        >>> sorted(out["extra_us"]) == sorted(PHASES)                    # doctest: +SKIP
        True
    """
    x, y = torch.randn(batch, 1, 32, 32), torch.randint(0, 10, (batch,))
    noisy_model = build_model(model_name, True, **MODELS[model_name])
    steps = {False: phased_step(build_model(model_name, False, **MODELS[model_name]), x, y, False),
             True: phased_step(noisy_model, x, y, True)}
    for _ in range(warmup):
        steps[False](), steps[True]()
    times: dict[bool, list[list[float]]] = {False: [], True: []}
    for _ in range(rounds):
        for noisy in (False, True):
            times[noisy].extend(steps[noisy]() for _ in range(block))
    medians = {noisy: {phase: 1e6 * statistics.median(row[i] for row in rows) for i, phase in enumerate(PHASES)}
               for noisy, rows in times.items()}
    alone = draw_alone(noisy_model, batch, max(rounds * block, 10))
    return {"model": model_name, "batch": batch, "threads": torch.get_num_threads(), "plain_us": medians[False],
            "noisy_us": medians[True], "extra_us": {p: medians[True][p] - medians[False][p] for p in PHASES},
            "draw_alone_us": None if alone is None else 1e6 * alone}


def table(out: dict) -> str:
    """The phases as aligned text lines: plain, noisy and extra µs."""
    lines = [f"{out['model']} batch {out['batch']}, {out['threads']} threads (median µs per phase)",
             f"  {'phase':10s} {'plain':>8s} {'noisy':>8s} {'extra':>8s}"]
    for p in PHASES:
        lines.append(f"  {p:10s} {out['plain_us'][p]:8.1f} {out['noisy_us'][p]:8.1f} {out['extra_us'][p]:8.1f}")
    total = {k: sum(out[k].values()) for k in ("plain_us", "noisy_us", "extra_us")}
    lines.append(f"  {'step':10s} {total['plain_us']:8.1f} {total['noisy_us']:8.1f} {total['extra_us']:8.1f}")
    if out["draw_alone_us"] is not None:
        lines.append(f"  the draw alone, back to back: {out['draw_alone_us']:.1f} µs")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.step_phases", description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="mlp")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=40, help="alternating blocks of 25 steps (default: 40)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.batch < 1 or args.rounds < 1 or args.threads < 1:
        parser.error("--batch, --rounds and --threads must be positive")
    torch.set_num_threads(args.threads)
    out = measure(args.model, args.batch, args.rounds)
    print(table(out))
    write_json(OUT, out)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
