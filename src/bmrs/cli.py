"""The ``bmrs`` command line: a thin layer over the library.

    bmrs train   [options]        continuous pruning run (default: LeNet5 + BMRS_N on Fashion-MNIST)
    bmrs curve   --run DIR        post-training sweep: accuracy against compression per criterion
    bmrs compact --run DIR        a trained run → compacted model file, size, FLOPs and latency
    bmrs prune   --model M:F --checkpoint FILE   your own trained model → pruned, compacted model file

Bad input ends with a one-line ``bmrs: error: …`` and exit code 2 (usage) or 1 (data, checkpoint,
training); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from . import __version__
from .errors import BMRSError, ConfigError

__all__ = ["main", "build_parser"]


def _add_train_options(p: argparse.ArgumentParser) -> None:
    from .defaults import (
        CRITERION_NAMES, EVIDENCE_MARGIN, FINETUNE, FINETUNE_MODES, KL_REDUCTION, KL_REDUCTIONS, KL_WEIGHT,
        NOISE_LR_SCALE,
    )

    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="fashion-mnist",
                   help="mnist, fashion-mnist, cifar10 or tinyimagenet (default: %(default)s)")
    g.add_argument("--data-dir", default=None,
                   help="folder holding the dataset (else $BMRS_DATA_DIR, then system locations)")
    g.add_argument("--download", action="store_true", help="download the dataset if it is not found")
    g.add_argument("--train-subset", type=int, default=None, metavar="N",
                   help="train on the first N examples of the training split only (quick runs)")
    g.add_argument("--image-size", type=int, default=32, help="images are resized to this side (default: 32)")
    g = p.add_argument_group("network and pruning")
    g.add_argument("--model", default="lenet5", help="mlp, lenet5, resnet18, resnet50 or vit (default: %(default)s)")
    g.add_argument("--hidden", type=int, default=150, help="MLP hidden width (default: 150)")
    g.add_argument("--layers", type=int, default=1,
                   help="extra MLP hidden blocks after the first (default: 1, i.e. in→150→150→10)")
    g.add_argument("--criterion", default="bmrs-n", choices=CRITERION_NAMES,
                   help="pruning criterion; 'none' trains without pruning (default: %(default)s)")
    g.add_argument("--p1", type=float, default=8.0, help="BMRS_U precision in bits, 0 < p1 < 23 (default: 8)")
    g.add_argument("--evidence-margin", type=float, default=EVIDENCE_MARGIN, metavar="NATS",
                   help="bmrs-n and bmrs-u prune where ΔF >= -NATS (evidence for keeping a structure worth less "
                        "than NATS is a tie, which goes to the smaller model; Kass-Raftery's 'not worth a bare "
                        "mention' is 1) or where E[θ] < 2^-23; 0 is the exact rule ΔF >= 0 (default: %(default)g)")
    g.add_argument("--threshold", type=float, default=None, help="threshold of snr (1.0) or ev (0.1)")
    g.add_argument("--amount", type=float, default=None,
                   help="fraction of structures to prune (needed by l2 and grad; for snr, ev and bmrs it "
                        "replaces their own rule by ranking)")
    g.add_argument("--amount-schedule", type=_int_list, default=None, metavar="K1,K2,...",
                   help="structure counts to prune at each pruning step, instead of --amount (e.g. l2 "
                        "matching a BMRS_N run)")
    g.add_argument("--granularity", default="structure", choices=("structure", "element"),
                   help="one noise sample per example and structure, or per element (default: structure)")
    g.add_argument("--no-noise", action="store_true", help="train the plain network (criterion none only)")
    g.add_argument("--low", type=float, default=-20.0, help="lower bound of ln θ (default: -20)")
    g.add_argument("--high", type=float, default=0.0, help="upper bound of ln θ (default: 0)")
    g = p.add_argument_group("schedule")
    g.add_argument("--epochs", type=int, default=5, help="epochs with pruning after every --prune-every (default: 5)")
    g.add_argument("--finetune-epochs", type=int, default=2, help="epochs without pruning afterwards (default: 2)")
    g.add_argument("--prune-every", type=int, default=1, help="prune every P epochs (default: 1)")
    g.add_argument("--batch-size", type=int, default=32, help="mini-batch size (default: 32)")
    g.add_argument("--lr", type=float, default=1.4e-3, help="Adam learning rate (default: 1.4e-3)")
    g.add_argument("--kl", dest="kl_reduction", default=KL_REDUCTION, choices=KL_REDUCTIONS,
                   help="KL weighting: the mean over all structures, the paper's layer mean, or the evidence lower "
                        "bound ΣKL/N (default: %(default)s)")
    g.add_argument("--noise-lr-scale", type=float, default=NOISE_LR_SCALE, metavar="X",
                   help="the noise parameters (μ, log σ) train at X times --lr: they span tens where weights span "
                        "~1, and at X = 1 a posterior needs ~6,000 steps to become prior-like (default: %(default)g)")
    g.add_argument("--kl-weight", type=float, default=KL_WEIGHT,
                   help="multiply the KL term by this (e.g. --kl elbo --kl-weight 100: between the ELBO and the "
                        "paper's weighting) (default: %(default)g)")
    g.add_argument("--finetune", default=FINETUNE, choices=FINETUNE_MODES,
                   help="fine-tuning keeps the noise and KL (noisy, the paper's) or trains the pruned network "
                        "with θ fixed at E[θ]·mask and no KL (deterministic) (default: %(default)s)")
    g.add_argument("--shrink", action="store_true",
                   help="remove pruned structures after every pruning step, so later epochs run faster "
                        "(same results as masking them)")
    g.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    g = p.add_argument_group("running")
    g.add_argument("--output", default=None, help="run folder (default: runs/DATASET-MODEL-CRITERION-sSEED)")
    g.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint")
    g.add_argument("--compare-to", default=None, metavar="DIR",
                   help="a finished run (e.g. the plain network: --criterion none --no-noise) whose test accuracy "
                        "and parameters the result is compared with at the end")
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where to train (default: auto)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the noise kernels (~10-20 s once; pays off for long runs)")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError("counts must be non-negative")
    return values


def _add_global_options(parser: argparse.ArgumentParser, default) -> None:
    """--debug and --no-progress, accepted before the command and after it (the subcommands' copies default to
    SUPPRESS, so they never undo one given before)."""
    parser.add_argument("--debug", action="store_true", default=default, help="show tracebacks")
    parser.add_argument("--no-progress", action="store_true", default=default,
                        help="no progress bars (they are shown only on a terminal anyway; elsewhere a line per epoch)")


def progress_wanted(args) -> bool:
    """Progress bars: on a terminal, unless --no-progress."""
    return not args.no_progress and sys.stderr.isatty()


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line: ``bmrs: error: argument --hidden: invalid int value: '1e16'``."""

    def error(self, message: str):
        self.exit(2, f"bmrs: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from .defaults import CURVE_CRITERIA

    parser = _Parser(prog="bmrs", description="Bayesian Model Reduction for Structured pruning.")
    parser.add_argument("--version", action="version", version=f"bmrs {__version__}")
    _add_global_options(parser, False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    train = sub.add_parser("train", help="train with continuous pruning, test, compact",
                           description="Train a network with noise layers, pruning after every epoch, then "
                                       "fine-tune; test the best validation checkpoint and compact it.")
    _add_global_options(train, argparse.SUPPRESS)
    _add_train_options(train)

    curve = sub.add_parser("curve", help="post-training sweep of accuracy against compression",
                           description="Prune a trained run at increasing fractions with each criterion and "
                                       "record accuracy against parameter compression.")
    _add_global_options(curve, argparse.SUPPRESS)
    curve.add_argument("--run", required=True, help="a finished run folder (from bmrs train)")
    curve.add_argument("--criteria", default=",".join(CURVE_CRITERIA),
                       help="comma-separated criteria (default: %(default)s)")
    curve.add_argument("--p1", type=float, default=8.0, help="BMRS_U precision (default: 8)")
    curve.add_argument("--levels", type=int, default=21, help="pruning fractions from 0 to 1 (paper: 100)")
    curve.add_argument("--finetune-epochs", type=int, default=0,
                       help="fine-tuning epochs at each level (paper: 1; default: 0)")
    curve.add_argument("--output", default=None, help="folder for curve.json/csv/png (default: RUN/curve)")
    curve.add_argument("--data-dir", default=None, help="dataset folder, as for train")

    compact = sub.add_parser("compact", help="compact a trained run and measure it",
                             description="Fold E[θ] into the weights, remove pruned structures, and report "
                                         "parameters, FLOPs and CPU latency before and after.")
    _add_global_options(compact, argparse.SUPPRESS)
    compact.add_argument("--run", required=True, help="a finished run folder (from bmrs train)")
    compact.add_argument("--output", default=None, help="compacted model file, written by bmrs.save (default: RUN/model_compact.safetensors)")
    compact.add_argument("--export", action="append", default=[], choices=("onnx", "pt2"),
                         help="also write the compacted model as ONNX or torch.export (.pt2) beside it, checked "
                              "against it to 1e-5; needs no bmrs to run (repeatable)")
    compact.add_argument("--batch-size", type=int, default=256, help="batch size for the latency measurement")
    compact.add_argument("--data-dir", default=None, help="dataset folder, as for train")
    rep = sub.add_parser("reproduce", help="the paper's Fashion-MNIST table, figures and open questions",
                         description="Run every method × network × seed (resumable, skipping finished runs), "
                                     "then write the results table, CSV, plots and summary.")
    _add_global_options(rep, argparse.SUPPRESS)
    rep.add_argument("dataset", choices=("fashion-mnist",), help="the dataset to reproduce (fashion-mnist)")
    rep.add_argument("--seeds", type=_int_list, default=[0, 1, 2], help="comma-separated seeds (default: 0,1,2)")
    rep.add_argument("--workers", type=int, default=2, help="runs at once, one thread each (default: 2)")
    rep.add_argument("--epochs", type=int, default=50, help="epochs with pruning (paper: 50)")
    rep.add_argument("--finetune-epochs", type=int, default=10, help="fine-tuning epochs (paper: 10)")
    rep.add_argument("--train-subset", type=int, default=None, help="train on N examples only (quick runs)")
    rep.add_argument("--levels", type=int, default=21, help="levels of the post-training sweep (paper: 100)")
    rep.add_argument("--runs", default="runs/reproduce/fashion-mnist", help="folder of the runs")
    rep.add_argument("--report", default="docs/results", help="folder of the report")
    rep.add_argument("--report-only", action="store_true", help="only rebuild the report from finished runs")
    rep.add_argument("--force", action="store_true",
                     help="replace a report even if it was built from more finished runs than there are now")
    from .experiments.prune_run import add_prune_command  # (imports no torch)
    add_prune_command(sub, _add_global_options)
    return parser


def train_config(args):
    """The TrainConfig that ``bmrs train`` builds from its parsed arguments."""
    from .training import TrainConfig

    return TrainConfig(
        dataset=args.dataset, model=args.model, criterion=args.criterion, p1=args.p1, threshold=args.threshold,
        amount=args.amount, amount_schedule=args.amount_schedule, epochs=args.epochs, finetune_epochs=args.finetune_epochs, prune_every=args.prune_every,
        batch_size=args.batch_size, lr=args.lr, seed=args.seed, kl_reduction=args.kl_reduction, kl_weight=args.kl_weight,
        evidence_margin=args.evidence_margin, noise_lr_scale=args.noise_lr_scale, finetune=args.finetune, shrink=args.shrink,
        granularity=args.granularity, low=args.low, high=args.high, noise=not args.no_noise, hidden=args.hidden, layers=args.layers,
        image_size=args.image_size, train_subset=args.train_subset, data_dir=args.data_dir,
        download=args.download, device=args.device, threads=args.threads, compile=args.compile,
    )


def _train(args) -> int:
    from .training import train

    config = train_config(args)
    output = args.output or f"runs/{config.dataset}-{config.model}-{config.criterion}-s{config.seed}"
    if args.compare_to:
        from .training.compare import baseline_metrics
        baseline = baseline_metrics(args.compare_to)  # checked before training, not after
    metrics = train(config, output, resume=args.resume, progress=progress_wanted(args))
    if args.compare_to and metrics:
        from .training.compare import comparison_line
        print(comparison_line(metrics, baseline, args.compare_to))
    return 0


def _curve(args) -> int:
    from .experiments.curve import run_curve
    from .extras import require

    require("matplotlib", "plots", "drawing curve.png")  # before the sweep, not after it

    criteria = [c.strip() for c in args.criteria.split(",") if c.strip()]
    output = args.output or str(Path(args.run) / "curve")
    run_curve(args.run, criteria, output, levels=args.levels, finetune_epochs=args.finetune_epochs, p1=args.p1,
              data_dir=args.data_dir, progress=progress_wanted(args))
    return 0


def _compact(args) -> int:
    from .experiments.compact_run import compact_run

    compact_run(args.run, args.output, batch_size=args.batch_size, data_dir=args.data_dir, exports=args.export)
    return 0


def _reproduce(args) -> int:
    from .experiments.reproduce import reproduce
    from .extras import require

    for module in ("matplotlib", "scipy", "kneed"):  # the report's figures, tests and knee points
        require(module, "paper", "the reproduction's report")
    return reproduce(args, progress=progress_wanted(args))


def _prune(args) -> int:
    from .experiments.prune_run import run_prune

    return run_prune(args)


COMMANDS = {"train": _train, "curve": _curve, "compact": _compact, "reproduce": _reproduce, "prune": _prune}
#: what to do after Ctrl-C (or SIGTERM): each command's outputs are written as one set, so a rerun is safe
INTERRUPTED = {
    "train": "rerun the same command with --resume to continue from the last checkpoint",
    "curve": "nothing was written; rerun the same command to sweep again",
    "compact": "nothing was written; rerun the same command",
    "reproduce": "rerun the same command: finished runs are kept and interrupted ones resume",
    "prune": "rerun the same command",
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``bmrs`` and ``python -m bmrs``; returns the exit code."""
    for stream in (sys.stdout, sys.stderr):  # a terminal that cannot show σ or θ gets \u03c3, not a crash
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    main_thread = threading.current_thread() is threading.main_thread()  # (signals reach the main thread only)
    # SIGTERM acts as Ctrl-C: temporaries removed, children stopped, the advice below printed
    previous = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None
    try:
        return COMMANDS[args.command](args)
    except BMRSError as err:
        if args.debug:
            raise
        field = getattr(err, "field", None)  # a setting given on this command line: name its option
        option = {"kl_reduction": "kl", "noise": "no-noise"}.get(field, (field or "").replace("_", "-"))
        prefix = f"--{option}: " if field and hasattr(args, field) else ""
        print(f"bmrs: error: {prefix}{err}", file=sys.stderr)
        return 2 if isinstance(err, ConfigError) else 1
    except KeyboardInterrupt:
        print(f"bmrs: interrupted; {INTERRUPTED.get(args.command, 'rerun the same command')}", file=sys.stderr)
        return 130
    except OSError as err:
        if args.debug:
            raise
        print(f"bmrs: error: {err.strerror or err} ({getattr(err, 'filename', '') or ''})", file=sys.stderr)
        return 1
    except (MemoryError, RuntimeError) as err:
        if args.debug or not _out_of_memory(err):
            raise
        print("bmrs: error: out of memory; lower the sizes asked for (--batch-size, --hidden, --image-size, "
              "--levels …) or free memory", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _out_of_memory(err: BaseException) -> bool:
    """A failed allocation: MemoryError (NumPy's too), or PyTorch's allocator refusing one."""
    return isinstance(err, MemoryError) or "can't allocate memory" in str(err) or "out of memory" in str(err)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
