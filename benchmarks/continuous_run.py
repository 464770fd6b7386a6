"""Wall time of a full continuous-pruning run that shrinks the network as it goes ÷ training the plain
network (no noise layers) for the same epochs: LeNet5 on the real Fashion-MNIST, the paper's schedule.

The two runs go side by side, one thread each on the two cores, so that the host's drift hits both
alike.  ``python -m benchmarks`` measures the same ratio on a short run (5 epochs on 6,000 examples),
where pruning has not yet paid for itself; this is the full schedule the goal speaks of.

Run: python -m benchmarks.continuous_run [--epochs 50] [--finetune-epochs 10]
     (about 5 minutes; writes benchmarks/results/continuous_run.json)
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from bmrs.io import write_json

RESULTS = Path(__file__).resolve().parent / "results" / "continuous_run.json"
COMMON = ["--model", "lenet5", "--batch-size", "32", "--lr", "1.4e-3", "--seed", "0", "--threads", "1"]
RUNS = {  # the plain network; pruning shrinks as it goes, with the recipe's settings added
    "plain": ["--criterion", "none", "--no-noise"],
    "pruning_shrink": ["--criterion", "bmrs-n-published", "--shrink"],
}
#: "paper": the paper's protocol (its rule, its KL at full weight, noise at the network's rate, noisy fine-tuning),
#: stated in full so that bmrs train's defaults do not change what is measured; "default": bmrs train's defaults
RECIPES = {
    "paper": ["--kl", "mean", "--kl-weight", "1", "--noise-lr-scale", "1", "--evidence-margin", "0",
              "--finetune", "noisy"],
    "default": [],
}
_EPOCH_LINE = re.compile(r"^epoch +\d+/\d+ +loss", re.MULTILINE)


def _command(key: str, epochs: int, finetune: int, output: Path, recipe: str = "paper") -> list[str]:
    """The run's command line (the plain network trains for all epochs + finetune epochs alike)."""
    settings = [*RUNS[key], *(RECIPES[recipe] if key != "plain" else [])]
    return [sys.executable, "-m", "bmrs", "train", *COMMON, *settings, "--epochs", str(epochs),
            "--finetune-epochs", str(finetune), "--output", str(output)]


def run_side_by_side(epochs: int, finetune: int, recipe: str = "paper") -> dict:
    """Start both runs at once; return each one's wall seconds and metrics."""
    folder = Path(tempfile.mkdtemp(prefix="bmrs-continuous-run-"))
    started, processes, logs = {}, {}, {}
    for key in RUNS:
        logs[key] = folder / f"{key}.log"
        started[key] = time.perf_counter()
        processes[key] = subprocess.Popen(_command(key, epochs, finetune, folder / key, recipe),
                                          stdout=logs[key].open("w"), stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL)
    seconds = {}
    with tqdm(total=2 * (epochs + finetune), desc="epochs (both runs)", unit="epoch") as bar:
        while len(seconds) < len(processes):
            time.sleep(1.0)
            for key, process in processes.items():
                if key not in seconds and process.poll() is not None:
                    seconds[key] = time.perf_counter() - started[key]
                    if process.returncode != 0:
                        raise SystemExit(f"continuous_run: the {key} run failed (exit {process.returncode}); "
                                         f"see {logs[key]}")
            done = sum(len(_EPOCH_LINE.findall(log.read_text(errors="replace"))) for log in logs.values())
            bar.update(done - bar.n)
    metrics = {key: json.loads((folder / key / "metrics.json").read_text()) for key in RUNS}
    commands = {key: "python " + " ".join(_command(key, epochs, finetune, Path(f"runs/{key}"), recipe)[1:])
                for key in RUNS}
    return {"seconds": seconds, "metrics": metrics, "commands": commands}


def measure(epochs: int = 50, finetune: int = 10, recipe: str = "paper") -> dict:
    """Both runs side by side; the ratio (shrinking ÷ plain wall time) and what each run gave."""
    out = run_side_by_side(epochs, finetune, recipe)
    seconds, shrink = out["seconds"], out["metrics"]["pruning_shrink"]
    ratio = seconds["pruning_shrink"] / seconds["plain"]
    print(f"  plain network {seconds['plain']:.0f} s, continuous pruning shrinking as it goes "
          f"{seconds['pruning_shrink']:.0f} s (×{ratio:.2f}); {shrink.get('parameter_compression_pct', 0):.1f}% of "
          f"the parameters and {shrink.get('flops_removed_pct', 0):.1f}% of the FLOPs removed ({recipe} recipe)",
          flush=True)
    return {
        "ratio": ratio, "plain_s": seconds["plain"], "pruning_shrink_s": seconds["pruning_shrink"],
        "epochs": epochs, "finetune_epochs": finetune, "recipe": recipe,
        "parameter_compression_pct": shrink.get("parameter_compression_pct"),
        "flops_removed_pct": shrink.get("flops_removed_pct"),
        "test_accuracy": {key: m.get("test_accuracy") for key, m in out["metrics"].items()},
        "epoch_seconds": {key: m.get("epoch_seconds") for key, m in out["metrics"].items()},
        "commands": out["commands"], "threads_per_run": 1,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.continuous_run", description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=50, help="epochs with pruning (default: 50)")
    parser.add_argument("--finetune-epochs", type=int, default=10, help="fine-tuning epochs (default: 10)")
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="paper",
                        help="the pruning run's settings: the paper's protocol (default) or bmrs train's defaults")
    parser.add_argument("--output", default=str(RESULTS), help="the JSON file to write")
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.finetune_epochs < 0:
        parser.error("--epochs must be at least 1 and --finetune-epochs at least 0")
    result = measure(args.epochs, args.finetune_epochs, args.recipe)
    result["command"] = "python -m benchmarks.continuous_run" + (
        "" if (args.epochs, args.finetune_epochs) == (50, 10)
        else f" --epochs {args.epochs} --finetune-epochs {args.finetune_epochs}") + (
        "" if args.recipe == "paper" else f" --recipe {args.recipe}")
    write_json(args.output, result)
    print(f"written {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
