"""``bmrs prune``: your own model and trained checkpoint → pruned, compacted model file (``bmrs.save``).

The model comes from ``--model pkg.module:factory`` (a function or class building it, imported from the
current folder or the installed packages); the checkpoint is a state dict in safetensors or a
weights-only torch file (a ``{"state_dict": …}`` or ``{"model": …}`` wrapper is unwrapped, so a PyTorch
Lightning checkpoint is read as it is; ``--key-prefix net.`` then strips the LightningModule's attribute
name from its keys, and keys without the prefix, e.g. a loss module's, are left out).  A checkpoint
with noise layers (trained after ``bmrs.attach``) is pruned by any criterion; a plain network only by
weight magnitude (``--criterion l2 --amount F``), with θ = 1 so that compaction changes nothing else.

Examples:
    report = prune_checkpoint("mypkg.nets:small_cnn", "trained.safetensors", input_shape=(3, 32, 32))
    report["params_after"], report["output"]
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..defaults import CRITERION_RULES, EVIDENCE_MARGIN
from ..errors import CheckpointError, ConfigError, ModelError, first_line

if TYPE_CHECKING:  # torch is imported when a command runs, not when the command line is built
    import torch
    from torch import nn

__all__ = ["prune_checkpoint", "load_factory", "parse_shape", "add_prune_command", "run_prune", "PRUNE_CRITERIA"]

#: criteria that need no data (Gradient does: it is left to the Python API)
PRUNE_CRITERIA = tuple(name for name in CRITERION_RULES if name != "grad")


def load_factory(spec: str) -> Callable[[], nn.Module]:
    """The callable named by ``"pkg.module:factory"`` (the current folder is searched first, as ``python -m``
    does); ConfigError naming what is wrong.

    Examples:
        >>> load_factory("bmrs.models:lenet5").__name__
        'lenet5'
    """
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute or not all(p.isidentifier() for p in module_name.split(".")):
        raise ConfigError(f"--model {spec!r}: expected MODULE:FACTORY, e.g. mypkg.nets:build_model")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # the module or one of its imports is missing, or it fails at import
        raise ConfigError(f"--model {spec!r}: cannot import {module_name} ({type(err).__name__}: "
                          f"{first_line(err)})") from None
    factory = module
    for part in attribute.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise ConfigError(f"--model {spec!r}: {module_name} has no {attribute!r}")
    if not callable(factory):
        raise ConfigError(f"--model {spec!r}: {attribute} is a {type(factory).__name__}, not a function or class")
    return factory


def parse_shape(text: str) -> tuple[int, ...]:
    """``"3,32,32"`` → ``(3, 32, 32)``: one example's input shape, without the batch axis.

    Examples:
        >>> parse_shape("1, 32, 32")
        (1, 32, 32)
    """
    try:
        shape = tuple(int(v) for v in str(text).split(","))
    except ValueError:
        shape = ()
    if not shape or any(v < 1 for v in shape):
        raise ConfigError(f"--input-shape {text!r}: expected positive comma-separated sizes of one example, e.g. 1,32,32")
    return shape


def _build(factory, spec: str) -> nn.Module:
    from torch import nn

    try:
        model = factory()
    except Exception as err:
        raise ModelError(f"--model {spec!r}: building the model failed ({type(err).__name__}: {first_line(err)})") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"--model {spec!r} returned a {type(model).__name__}, not an nn.Module")
    return model


def _read_weights(path: Path, key_prefix: str | None = None) -> dict[str, torch.Tensor]:
    """The checkpoint's state dict (unwrapped from a Lightning-style ``{"state_dict": …}``), with ``key_prefix``
    stripped from the keys that start with it and the others left out."""
    import torch

    from ..io import load_state_dict_file

    state = load_state_dict_file(path)  # safetensors, or torch.load(weights_only=True)
    if isinstance(state.get("state_dict"), dict):  # a Lightning checkpoint, or another such wrapper
        state = state["state_dict"]
    if not state or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError(f"{path}: not a state dict (names → tensors), nor one wrapped as state_dict or model")
    if key_prefix:
        kept = {key[len(key_prefix):]: value for key, value in state.items() if key.startswith(key_prefix)}
        if not kept:
            raise CheckpointError(f"--key-prefix {key_prefix!r}: no key of {path} starts with it (its keys look like "
                                  f"{_some(state)})")
        state = kept
    return state


def _some(keys, most: int = 3) -> str:
    """A few of ``keys``, quoted, and how many more."""
    keys = sorted(keys)
    shown = ", ".join(repr(k) for k in keys[:most])
    return shown + (f" and {len(keys) - most} more" if len(keys) > most else "")


def _suggested_prefix(keys, own: set[str]) -> str:
    """The shortest leading ``a.`` or ``a.b.`` … of ``keys`` whose stripping gives every key of ``own`` ('' if
    none does): what ``--key-prefix`` should be."""
    first = min(own)
    candidates = {key[: -len(first)] for key in keys if key.endswith(f".{first}")}
    for prefix in sorted(candidates, key=len):
        if own <= {key[len(prefix):] for key in keys if key.startswith(prefix)}:
            return prefix
    return ""


def _load(model: nn.Module, state: dict, path: Path, spec: str, key_prefix: str | None = None) -> None:
    """Load ``state`` strictly; CheckpointError naming a few missing and unexpected keys (and the ``--key-prefix``
    that would make them match, counted from the checkpoint's own keys before ``key_prefix`` was stripped)."""
    own = set(model.state_dict())
    missing, unexpected = sorted(own - set(state)), sorted(set(state) - own)
    if missing or unexpected:
        parts = [f"missing {_some(missing)}"] if missing else []
        parts += [f"unexpected {_some(unexpected)}"] if unexpected else []
        prefix = _suggested_prefix(unexpected, own) if own else ""
        prefix = f"{key_prefix or ''}{prefix}" if prefix else ""
        hint = (f"the model's keys are there after {prefix!r}: pass --key-prefix {prefix}" if prefix
                else "pass the factory that built the trained model, or --key-prefix to strip a wrapper's name")
        raise CheckpointError(f"{path}: its keys do not match the model that {spec} builds ({'; '.join(parts)}); "
                              f"{hint}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        detail = first_line(err, 160).rstrip(":")
        raise CheckpointError(f"{path} does not fit the model that {spec} builds ({detail}); pass the factory that "
                              "built the trained model") from None


def prune_checkpoint(model_spec: str, checkpoint: str | Path, input_shape: tuple[int, ...],
                     criterion: str = "bmrs-n", output: str | Path | None = None, amount: float | None = None,
                     p1: float = 8.0, margin: float = EVIDENCE_MARGIN, log=print, key_prefix: str | None = None) -> dict:
    """Prune and compact a trained model; write it with ``bmrs.save`` (``bmrs.load(output, factory)`` reads it).

    ``key_prefix``: stripped from the checkpoint's keys (e.g. ``"net."`` for a Lightning checkpoint whose
    LightningModule holds the model as ``self.net``); keys without it are left out.

    Returns the compression report (``compression_report``'s keys, ``pruned``, ``structures``, ``output``).
    """
    import torch

    from ..compaction import compact, compression_report
    from ..criteria import get_criterion
    from ..nn.attach import attach, noise_layers
    from ..nn.noise import LOG_SIGMA_RANGE
    from ..pruning import PruningWarning, prune
    from ..saving import save
    from ..training.config import check_float

    if criterion not in PRUNE_CRITERIA:
        raise ConfigError(f"--criterion {criterion!r}: choose one of {', '.join(PRUNE_CRITERIA)}")
    if amount is not None:
        check_float("amount", amount, 0.0, 1.0, low_open=False)
    if not 0 < check_float("p1", p1) < 23:
        raise ConfigError(f"p1 must be a number of bits in (0, 23), got {p1!r}; the paper uses 8 or 4", field="p1")
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise CheckpointError(f"{checkpoint}: no such checkpoint file; pass the trained weights (.safetensors or .pt)")
    output = Path(output) if output else checkpoint.with_name(f"{checkpoint.stem}-pruned.safetensors")
    if output.resolve() == checkpoint.resolve():
        raise ConfigError(f"--output {output} is the checkpoint itself; name another file")
    options = {"bmrs-u": {"p1": p1, "margin": margin}, "bmrs-n": {"margin": margin}}.get(criterion, {})
    rule = get_criterion(criterion, **options)
    factory = load_factory(model_spec)
    state = _read_weights(checkpoint, key_prefix)
    model = _build(factory, model_spec)
    noisy = any(".bmrs_noise." in f".{key}" for key in state)
    if noisy:
        if not noise_layers(model):
            attach(model)  # as the model was trained: bmrs.attach(factory())
        _load(model, state, checkpoint, model_spec, key_prefix)
    else:
        if criterion != "l2":
            raise ConfigError(f"--criterion {criterion} reads the posteriors of noise layers, and {checkpoint} holds a "
                              "network trained without them; prune it by weight magnitude (--criterion l2 --amount "
                              "F) or train it after bmrs.attach")
        _load(model, state, checkpoint, model_spec, key_prefix)
        attach(model)
        with torch.no_grad():  # θ = 1 (E[θ] rounds to 1 in float32): the network's function is kept
            for _, noise in noise_layers(model):
                noise.mu.zero_()
                noise.log_sigma.fill_(LOG_SIGMA_RANGE[0])
    model.eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PruningWarning)
        report = prune(model, rule, amount)
    for warning in caught:
        log(f"note: {warning.message}")
    example = torch.randn(2, *input_shape, dtype=next(model.parameters()).dtype)
    small = compact(model, example)
    result = {**compression_report(model, small, example), "pruned": report.pruned,
              "structures": report.structures, "output": str(output)}
    save(small, output)
    log(f"pruned {report.pruned} of {report.structures} structures ({report.pruned_pct:.1f}%) with {rule!r}")
    log(f"parameters {result['params_before']:,} -> {result['params_after']:,} "
        f"({result['parameter_compression_pct']:.1f}% removed); FLOPs {result['flops_removed_pct']:.1f}% removed")
    log(f"compacted model: {output} (bmrs.load({str(output)!r}, {model_spec.split(':')[1]}) reads it back)")
    return result


def add_prune_command(sub, add_global_options) -> None:
    """Register ``bmrs prune`` among the command line's subcommands (``sub``: argparse's subparsers)."""
    p = sub.add_parser("prune", help="prune and compact your own trained model",
                       description="Prune a trained model of your own (its factory and checkpoint), compact it and "
                                   "write it with bmrs.save; bmrs.load(OUTPUT, factory) reads it back.")
    add_global_options(p, argparse.SUPPRESS)
    p.add_argument("--model", required=True, metavar="MODULE:FACTORY",
                   help="the function or class that builds your model, e.g. mypkg.nets:build_model")
    p.add_argument("--checkpoint", required=True, help="its trained weights: .safetensors or a weights-only torch file")
    p.add_argument("--input-shape", required=True, type=str, metavar="C,H,W",
                   help="one example's input shape without the batch axis (traces the model), e.g. 1,32,32")
    p.add_argument("--criterion", default="bmrs-n", choices=PRUNE_CRITERIA,
                   help="pruning criterion; a network trained without noise layers takes l2 with --amount only "
                        "(default: %(default)s)")
    p.add_argument("--amount", type=float, default=None,
                   help="fraction of structures to prune (needed by l2; replaces the rule of the others)")
    p.add_argument("--p1", type=float, default=8.0, help="BMRS_U precision in bits (default: 8)")
    p.add_argument("--evidence-margin", type=float, default=EVIDENCE_MARGIN, metavar="NATS",
                   help="bmrs-n and bmrs-u prune where ΔF >= -NATS (default: %(default)g)")
    p.add_argument("--output", default=None,
                   help="compacted model file (default: CHECKPOINT's name with -pruned.safetensors)")
    p.add_argument("--key-prefix", default=None, metavar="PREFIX",
                   help="strip PREFIX from the checkpoint's keys and leave out the keys without it, e.g. net. for a "
                        "Lightning checkpoint of a LightningModule holding the model as self.net")


def run_prune(args) -> int:
    """``bmrs prune``'s action on its parsed arguments."""
    prune_checkpoint(args.model, args.checkpoint, parse_shape(args.input_shape), criterion=args.criterion,
                     output=args.output, amount=args.amount, p1=args.p1, margin=args.evidence_margin,
                     key_prefix=args.key_prefix)
    return 0
