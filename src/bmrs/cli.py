"""The ``bmrs`` command line: a thin layer over the library.

    bmrs train   [options]        continuous pruning run (default: LeNet5 + BMRS_N on Fashion-MNIST)
    bmrs curve   --run DIR        post-training sweep: accuracy against compression per criterion
    bmrs compact --run DIR        a trained run → compacted model file, size, FLOPs and latency
    bmrs prune   --model M:F --checkpoint FILE   your own trained model → pruned, compacted model file

The paper's reproduction is not installed: ``python -m paper fashion-mnist`` from a source checkout
(paper/README.md).  Bad input ends with a one-line ``bmrs: error: …`` and exit code 2 (usage) or 1 (data, checkpoint,
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

__all__ = ["main", "build_parser", "run_command", "CommandParser", "progress_wanted"]


def _add_train_options(p: argparse.ArgumentParser) -> None:
    """TrainConfig's options (bmrs.training.options makes them from its fields), and where the run goes."""
    from .training.options import GROUPS, add_train_arguments

    groups = {name: p.add_argument_group(name) for name in GROUPS}
    running = groups["running"]
    running.add_argument("--output", default=None, help="run folder (default: runs/DATASET-MODEL-CRITERION-sSEED)")
    running.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint")
    running.add_argument("--compare-to", default=None, metavar="DIR",
                         help="a finished run (e.g. the plain network: --criterion none --no-noise) whose test "
                              "accuracy and parameters the result is compared with at the end")
    add_train_arguments(p, groups)


def _add_global_options(parser: argparse.ArgumentParser, default) -> None:
    """--debug and --no-progress, accepted before the command and after it (the subcommands' copies default to
    SUPPRESS, so they never undo one given before)."""
    parser.add_argument("--debug", action="store_true", default=default, help="show tracebacks")
    parser.add_argument("--no-progress", action="store_true", default=default,
                        help="no progress bars (they are shown only on a terminal anyway; elsewhere a line per epoch)")


def progress_wanted(args) -> bool:
    """Progress bars: on a terminal, unless --no-progress."""
    return not args.no_progress and sys.stderr.isatty()


class CommandParser(argparse.ArgumentParser):
    """argparse with its usage errors on one line: ``bmrs: error: argument --hidden: invalid int value: '1e16'``
    (``name``: the program named before ``error:``)."""

    name = "bmrs"

    def error(self, message: str):
        self.exit(2, f"{self.name}: error: {message} (see {self.prog} --help)\n")



def build_parser() -> argparse.ArgumentParser:
    from .defaults import CURVE_CRITERIA

    parser = CommandParser(prog="bmrs", description="Bayesian Model Reduction for Structured pruning.")
    parser.add_argument("--version", action="version", version=f"bmrs {__version__}")
    _add_global_options(parser, False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=CommandParser)

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
    compact.add_argument("--optimize", action="store_true",
                         help="measure the latency with the fast CPU inference layers (bmrs.inference.optimize); "
                              "the model file is the same either way")
    from .experiments.prune_run import add_prune_command  # (imports no torch)
    add_prune_command(sub, _add_global_options)
    return parser


def train_config(args):
    """The TrainConfig that ``bmrs train`` builds from its parsed arguments."""
    from .training import TrainConfig
    from .training.options import config_settings

    return TrainConfig(**config_settings(args))


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

    compact_run(args.run, args.output, batch_size=args.batch_size, data_dir=args.data_dir, exports=args.export,
                optimize=args.optimize)
    return 0


def _prune(args) -> int:
    from .experiments.prune_run import run_prune

    return run_prune(args)


COMMANDS = {"train": _train, "curve": _curve, "compact": _compact, "prune": _prune}
#: what to do after Ctrl-C (or SIGTERM): each command's outputs are written as one set, so a rerun is safe
INTERRUPTED = {
    "train": "rerun the same command with --resume to continue from the last checkpoint",
    "curve": "nothing was written; rerun the same command to sweep again",
    "compact": "nothing was written; rerun the same command",
    "prune": "rerun the same command",
}


#: commands that left the installed package: where they went
MOVED = {"reproduce": "the paper's reproduction is not part of the installed package; from a source checkout of "
                      "bmrs, run `python -m paper fashion-mnist` (see paper/README.md)"}


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``bmrs`` and ``python -m bmrs``; returns the exit code."""
    for stream in (sys.stdout, sys.stderr):  # a terminal that cannot show σ or θ gets \u03c3, not a crash
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    words = sys.argv[1:] if argv is None else argv
    command = next((w for w in words if not w.startswith("-")), None)  # (the global options take no value)
    if command in MOVED:
        print(f"bmrs: error: {MOVED[command]}", file=sys.stderr)
        return 2
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return run_command(COMMANDS[args.command], args, INTERRUPTED.get(args.command, "rerun the same command"))


def run_command(command, args, interrupted: str = "rerun the same command", name: str = "bmrs") -> int:
    """``command(args)`` with the CLI's error handling: a BMRSError, an OSError or running out of memory is one line
    ``NAME: error: …`` and exit code 2 (settings) or 1 (the rest), unless ``args.debug``; Ctrl-C and SIGTERM exit
    with 130 after the advice ``interrupted``.

    Examples:
        >>> from argparse import Namespace
        >>> run_command(lambda args: 0, Namespace(debug=False))
        0
    """
    main_thread = threading.current_thread() is threading.main_thread()  # (signals reach the main thread only)
    # SIGTERM acts as Ctrl-C: temporaries removed, children stopped, the advice printed
    previous = {number: signal.signal(number, _interrupt) for number in (signal.SIGTERM, signal.SIGALRM)} \
        if main_thread else {}
    debug = getattr(args, "debug", False)
    try:
        return command(args)
    except BMRSError as err:
        if debug:
            raise
        field = getattr(err, "field", None)  # a setting given on this command line: name its option
        prefix = f"{_option_name(field)}: " if field and hasattr(args, field) else ""
        print(f"{name}: error: {prefix}{err}", file=sys.stderr)
        return 2 if isinstance(err, ConfigError) else 1
    except KeyboardInterrupt:  # (a repeat due meanwhile sees this one handled and waits: finally stops it)
        print(f"{name}: interrupted; {interrupted}", file=sys.stderr)
        return 130
    except OSError as err:
        if debug:
            raise
        print(f"{name}: error: {err.strerror or err} ({getattr(err, 'filename', '') or ''})", file=sys.stderr)
        return 1
    except (MemoryError, RuntimeError) as err:
        if debug or not _out_of_memory(err):
            raise
        print(f"{name}: error: out of memory; lower the sizes asked for (--batch-size, --hidden, --image-size, "
              "--levels …) or free memory", file=sys.stderr)
        return 1
    finally:
        if previous:
            _stop_repeating()
            for number, handler in previous.items():
                signal.signal(number, handler)


def _option_name(field: str) -> str:
    """The option that sets ``field`` (a TrainConfig field's own, else --FIELD-NAME)."""
    from .training.options import option_name

    return option_name(field)


#: after SIGTERM the KeyboardInterrupt is raised again every this many seconds until the command stops: one raised
#: where a library swallows exceptions (a bare ``except:``, a finalizer, C code clearing errors) is lost.  Not while
#: one is on its way out: cleanup in an ``except`` or ``finally`` block (children stopped, temporaries removed) runs
#: to its end.
INTERRUPT_REPEAT_S = 0.5
_repeating = {"on": False}


def _interrupt(signum, frame):
    if signum == signal.SIGALRM and not _repeating["on"]:
        return  # (a repeat that was already cancelled)
    _repeating["on"] = True
    signal.setitimer(signal.ITIMER_REAL, INTERRUPT_REPEAT_S)
    if signum == signal.SIGALRM and isinstance(sys.exc_info()[1], KeyboardInterrupt):
        return  # the interrupt is propagating, its cleanup running
    raise KeyboardInterrupt


def _stop_repeating() -> None:
    if _repeating["on"]:
        _repeating["on"] = False
        signal.setitimer(signal.ITIMER_REAL, 0)


def _out_of_memory(err: BaseException) -> bool:
    """A failed allocation: MemoryError (NumPy's too), or PyTorch's allocator refusing one."""
    return isinstance(err, MemoryError) or "can't allocate memory" in str(err) or "out of memory" in str(err)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
