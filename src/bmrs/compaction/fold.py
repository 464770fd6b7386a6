"""Fold the expected noise E[θ]·mask into the weights around each noise layer.

After folding, a copy of the model *without* noise layers computes exactly what the model with its
noise layers computes in eval mode (up to float rounding).  Where each noise layer goes:

  * after a BatchNorm / LayerNorm / GroupNorm / InstanceNorm → into its affine weight and bias
    (θ·(γ·x̂ + β) = (θγ)·x̂ + θβ); a norm without affine parameters has its consumers' input columns
    scaled instead (see the last case), or is given affine parameters where that is impossible;
  * after a Conv / Linear → into its output rows and bias;
  * after ``nn.MultiheadAttention`` → into ``out_proj``'s rows and bias;
  * after a ReLU / LeakyReLU / PReLU module that directly follows a Conv / Linear / BatchNorm
    whose output feeds nothing else → into that producer (f(θh) = θ·f(h) for θ ≥ 0);
  * after any other activation (Tanh, GELU, Sigmoid …) → into the input columns of every
    Conv / Linear that consumes it, through max/avg pooling, ReLU and flattening (a Linear after
    a Flatten of N×C×H×W gets each channel's block of H·W columns scaled).

The consumers and producers are found with torch-pruning's dependency graph, built by tracing the
model once on ``example_inputs``.  The result is checked against the noisy model on those inputs and
on random inputs of the same shapes.

Examples:
    >>> import torch, bmrs
    >>> from bmrs.compaction import fold_noise
    >>> mlp = bmrs.attach(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)))
    >>> folded = fold_noise(mlp, torch.randn(2, 4))
    >>> bmrs.noise_layers(folded)
    []
    >>> x = torch.randn(5, 4)
    >>> bool(torch.allclose(folded(x), mlp.eval()(x), atol=1e-6))
    True
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ModelError
from .heads import fold_head_gates
from ..nn.attach import detach, noise_layers
from .surgery import channel_multiplier, scale_affine, scale_in, scale_out
from .trace import (
    OPTYPE, ModuleCall, Trace, _forward, _tensors, map_floating, op_name, output_mismatch, plain_inputs,
)

# (the trace and surgery names were defined here before they had modules of their own: importable from here too)
__all__ = ["fold_noise", "Trace", "ModuleCall", "plain_inputs", "output_mismatch", "op_name", "map_floating",
           "OPTYPE", "channel_multiplier", "scale_out", "scale_in"]

_CONV = nn.modules.conv._ConvNd
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm, nn.LayerNorm)
_CHANNEL_FIRST_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm)
_HOMOGENEOUS_MODULES = (nn.ReLU, nn.LeakyReLU, nn.PReLU)  # f(θx) = θ·f(x) for θ ≥ 0
# autograd ops (name without "Backward<n>") that commute with a per-channel θ ≥ 0 and keep channels
_HOMOGENEOUS_OPS = frozenset({
    "Relu", "LeakyRelu", "Clone", "Mean", "Squeeze", "Unsqueeze",  # (1-d pooling runs the 2-d one on x.unsqueeze(-2))
    "MaxPool1DWithIndices", "MaxPool2DWithIndices",
    "MaxPool3DWithIndices", "AvgPool2D", "AvgPool3D", "AdaptiveAvgPool2D", "AdaptiveAvgPool3D",
    "AdaptiveMaxPool2D", "AdaptiveMaxPool3D",
})


class IncompleteCompactionWarning(RuntimeWarning):
    """Compaction could not work out every channel (a noise layer the inputs never reach, or a graph
    torch-pruning cannot handle): the result keeps channels it could have removed."""


REL_TOL = 1e-4  # self-check: max|Δout| / max|out| allowed after folding or compaction


# -- folding one noise layer ----------------------------------------------------------------------
@dataclass
class NoiseRecord:
    """One noise layer of the working copy: where it was, its E[θ]·mask, and the graph node it gates."""

    name: str
    module: nn.Module
    theta: Tensor
    dim: int
    carrier: Any = field(default=None)  # graph node whose output channels are this layer's structures


def _describe(rec: NoiseRecord) -> str:
    return f"{rec.name or '<root>'!r} ({type(rec.module).__name__})"


def _channel_axis(module: nn.Module, ndim: int) -> int:
    """The channel axis of a module's output: 1 for Conv / BatchNorm-like, the last for Linear / MHA."""
    if isinstance(module, (_CONV,) + _CHANNEL_FIRST_NORMS):
        return 1
    return ndim - 1


def _check_axis(rec: NoiseRecord, axis: int, expected: int) -> None:
    if axis != expected:
        raise ModelError(f"fold: the noise after {_describe(rec)} gates dim {rec.dim} but that module's "
                         f"channels lie along dim {expected}; attach it with the default dim")


def _fold_untraced(rec: NoiseRecord) -> None:
    """Fold the noise of a module the example inputs never reach into the module itself (its output
    channels), where that needs no graph: a Conv/Linear, a MultiheadAttention's out_proj or a BatchNorm
    gated along its channel dim.  Its structures stay (zeroed where pruned): nothing traced shows what
    else they couple to."""
    module = rec.module
    if isinstance(module, (nn.Linear, _CONV)) and rec.dim == (1 if isinstance(module, _CONV) else -1):
        scale_out(module, rec.theta)
    elif isinstance(module, nn.MultiheadAttention) and rec.dim == -1:
        scale_out(module.out_proj, rec.theta)
    elif isinstance(module, nn.modules.batchnorm._BatchNorm) and rec.dim == 1:
        scale_affine(module, rec.theta, 0)
    else:
        raise ModelError(f"fold: the example inputs never reach {_describe(rec)}, so its noise cannot be folded "
                         "into its consumers; pass example_inputs that run every noise layer")


def _never_ran(rec: NoiseRecord, trace: Trace) -> bool:
    call = trace.calls.get(rec.module)
    return call is None or call.calls == 0 or call.out_ndim is None


def _fold_record(rec: NoiseRecord, trace: Trace) -> None:
    if _never_ran(rec, trace):
        _fold_untraced(rec)
        return
    call = trace.calls[rec.module]
    axis = rec.dim % call.out_ndim
    module = rec.module
    if isinstance(module, (nn.Linear, _CONV)):
        _check_axis(rec, axis, _channel_axis(module, call.out_ndim))
        scale_out(module, rec.theta)
    elif isinstance(module, _NORMS):
        _fold_after_norm(rec, trace, call, axis)
    elif isinstance(module, nn.MultiheadAttention):
        _check_axis(rec, axis, call.out_ndim - 1)
        scale_out(module.out_proj, rec.theta)
    else:
        _fold_after_activation(rec, trace, call, axis)
    rec.carrier = trace.node_of.get(call.out_fn)


def _fold_after_norm(rec: NoiseRecord, trace: Trace, call: ModuleCall, axis: int) -> None:
    """Into the norm's affine weight and bias; a norm without them first tries its consumers' columns."""
    norm = rec.module
    if isinstance(norm, nn.LayerNorm):
        weight_axis = axis - (call.out_ndim - len(norm.normalized_shape))
        if weight_axis < 0:
            raise ModelError(f"fold: the noise after {_describe(rec)} gates dim {rec.dim}, outside the "
                             "normalised dims; attach it with the default dim")
    else:
        _check_axis(rec, axis, 1)
        weight_axis = 0
    if norm.weight is None and call.calls == 1:
        try:  # keep the parameter count: scale the consumers rather than add affine parameters
            _fold_into_consumers(rec, trace, call, axis)
            return
        except ModelError:
            pass
    scale_affine(norm, rec.theta, weight_axis)


def _fold_after_activation(rec: NoiseRecord, trace: Trace, call: ModuleCall, axis: int) -> None:
    if call.calls != 1:
        raise ModelError(f"fold: {_describe(rec)} runs {call.calls} times per forward pass; noise after a "
                         "reused activation cannot be folded; give each use its own module")
    if isinstance(rec.module, _HOMOGENEOUS_MODULES) and _fold_into_producer(rec, trace, call, axis):
        return
    _fold_into_consumers(rec, trace, call, axis)


def _fold_into_producer(rec: NoiseRecord, trace: Trace, call: ModuleCall, axis: int) -> bool:
    """θ·f(W x + b) = f(θW x + θb) for positively homogeneous f: scale the producer if it feeds only f."""
    producer, act = trace.input_node(rec.module), trace.node_of.get(call.out_fn)
    if producer is None or act is None or not trace.is_module_node(producer):
        return False
    layer = producer.module
    if not isinstance(layer, (nn.Linear, _CONV, nn.modules.batchnorm._BatchNorm)):
        return False
    if trace.calls[layer].calls != 1 or any(out is not act for out in producer.outputs):
        return False
    if producer.grad_fn in trace.output_fns:
        return False
    if _channel_axis(layer, call.out_ndim) != axis:
        return False
    if isinstance(layer, nn.modules.batchnorm._BatchNorm):
        scale_affine(layer, rec.theta, 0)
    else:
        scale_out(layer, rec.theta)
    return True


def _fold_into_consumers(rec: NoiseRecord, trace: Trace, call: ModuleCall, axis: int) -> None:
    start = trace.node_of.get(call.out_fn)
    if start is None:
        raise ModelError(f"fold: cannot find where the output of {_describe(rec)} goes; "
                         "attach the noise to the Conv/Linear before it instead")
    consumers = _find_consumers(rec, trace, start)
    if not consumers:
        raise ModelError(f"fold: the output of {_describe(rec)} reaches no Conv/Linear layer; "
                         "attach the noise to the Conv/Linear before it instead")
    scales = {layer: _column_scale(rec, layer, reshaped, axis, call.out_ndim) for layer, reshaped in consumers.items()}
    for layer, scale in scales.items():
        scale_in(layer, scale)


def _find_consumers(rec: NoiseRecord, trace: Trace, start) -> dict[nn.Module, bool]:
    """Conv/Linear layers reading the noisy tensor through θ-commuting ops → whether a reshape was crossed."""
    found: dict[nn.Module, bool] = {}
    stack, seen = [(start, False)], set()
    while stack:
        node, reshaped = stack.pop()
        if node.grad_fn in trace.output_fns:
            raise ModelError(f"fold: the output of {_describe(rec)} is part of the model's output; "
                             "attach the noise to the Conv/Linear before it instead")
        for nxt in node.outputs:
            owner = trace.owner.get(nxt.grad_fn)
            target = owner if owner is not None else nxt
            if target.type in (OPTYPE.CONV, OPTYPE.LINEAR) and trace.is_module_node(target):
                _add_consumer(rec, trace, found, target.module, node, reshaped)
            elif nxt in seen:
                continue
            elif owner is None and _commutes(trace, nxt):
                seen.add(nxt)
                stack.append((nxt, reshaped or nxt.type == OPTYPE.RESHAPE))
            else:
                raise ModelError(f"fold: the output of {_describe(rec)} reaches {trace.label(nxt)}, which the "
                                 "noise cannot be folded through; attach the noise to the Conv/Linear before it")
    return found


def _commutes(trace: Trace, node) -> bool:
    """Whether the op passes channels through and satisfies op(θx) = θ·op(x) for θ ≥ 0."""
    if node.type == OPTYPE.RESHAPE:
        return True
    if node.type == OPTYPE.PRELU:
        return trace.calls[node.module].calls == 1
    if node.type != OPTYPE.ELEMENTWISE or op_name(node.grad_fn) not in _HOMOGENEOUS_OPS:
        return False
    return all(fn is not None for fn, _ in node.grad_fn.next_functions) and len(node.grad_fn.next_functions) == 1


def _add_consumer(rec: NoiseRecord, trace: Trace, found: dict, layer: nn.Module, source, reshaped: bool) -> None:
    call = trace.calls[layer]
    if call.calls != 1 or not call.in_fns or call.in_fns[0] is not source.grad_fn or layer in found:
        raise ModelError(f"fold: the output of {_describe(rec)} feeds {trace.label(trace.module_node(layer))} "
                         "in a way the noise cannot be folded into (a reused layer or several paths); "
                         "attach the noise to the Conv/Linear before it")
    found[layer] = reshaped


def _column_scale(rec: NoiseRecord, layer: nn.Module, reshaped: bool, axis: int, ndim: int) -> Tensor:
    """Per-input-column scale of a consumer: θ itself, or θ repeated per flattened position."""
    width = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
    channels = rec.theta.numel()
    if width == channels:
        return rec.theta
    if reshaped and width % channels == 0:
        if axis == 1:            # N×C×H×W flattened: channel c owns columns [c·HW, (c+1)·HW)
            return rec.theta.repeat_interleave(width // channels)
        if axis == ndim - 1:     # N×T×C flattened: channel c owns columns c, c + C, c + 2C …
            return rec.theta.repeat(width // channels)
    raise ModelError(f"fold: cannot match the {channels} structures of {_describe(rec)} to the {width} input "
                     f"columns of the {type(layer).__name__} consuming them; attach the noise elsewhere")


# -- the whole fold -------------------------------------------------------------------------------
@dataclass
class Folded:
    """A folded working copy, the graph traced on it, the noise records, and (inputs, noisy outputs) pairs."""

    model: nn.Module
    trace: Trace
    records: list[NoiseRecord]
    checks: list[tuple[Any, Any]]
    requires_grad: dict[str, bool]



def _randn_like(t: Tensor) -> Tensor:
    """Standard normal noise shaped like ``t``, from a private generator (the global state is left alone)."""
    gen = torch.Generator(device=t.device).manual_seed(0)
    return torch.randn(t.shape, generator=gen, dtype=t.dtype, device=t.device)


@torch.no_grad()
def _reference_checks(noisy: nn.Module, example_inputs: Any, caller: str) -> list[tuple[Any, Any]]:
    """(inputs, outputs of the noisy model in eval mode) on the example inputs and on random ones."""
    try:
        checks = [(example_inputs, _forward(noisy, example_inputs))]
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ModelError(f"{caller}: the model does not run on example_inputs ({type(err).__name__}: {first}); "
                         "check example_inputs") from err
    probe = map_floating(example_inputs, _randn_like)
    try:
        out = _forward(noisy, probe)
    except Exception:  # the model does not accept arbitrary values (e.g. it checks its inputs)
        return checks
    if all(torch.isfinite(t).all() for t in _tensors(out) if t.is_floating_point()):
        checks.append((probe, out))
    return checks


def fold(model: nn.Module, example_inputs: Any, caller: str = "fold_noise") -> Folded:
    """Deep-copy ``model``, fold its noise layers into the weights, remove them; check the outputs."""
    if not isinstance(model, nn.Module):
        raise ModelError(f"{caller}: expected an nn.Module, got {type(model).__name__}")
    if not noise_layers(model):
        raise ModelError(f"{caller}: the model has no noise layers; attach and train it first")
    broken = [name for name, t in (*model.named_parameters(), *model.named_buffers())
              if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if broken:
        raise ModelError(f"{caller}: {broken[0]} holds NaN or infinite values"
                         f"{f' (and {len(broken) - 1} more tensors)' if len(broken) > 1 else ''}; "
                         "a diverged model cannot be folded")
    example_inputs = plain_inputs(example_inputs)
    work = copy.deepcopy(model).eval()
    checks = _reference_checks(work, example_inputs, caller)
    fold_head_gates(work)  # attention heads: folded into the output projection, pruned heads removed
    with torch.no_grad():
        records = [NoiseRecord(name, work.get_submodule(name), noise.expected_theta().detach().clone(), noise.dim)
                   for name, noise in noise_layers(work)]
    detach(work)
    requires_grad = {name: p.requires_grad for name, p in work.named_parameters()}
    for p in work.parameters():
        p.requires_grad_(True)  # tracing follows autograd
    try:
        trace = Trace(work, example_inputs)
    except Exception as err:
        raise ModelError(f"{caller}: torch-pruning could not trace the model ({type(err).__name__}: {err}); "
                         "check example_inputs") from err
    for rec in records:
        _fold_record(rec, trace)
    untraced = [rec.name for rec in records if _never_ran(rec, trace)]
    if untraced:
        warnings.warn(f"{caller}: the example inputs never reach {', '.join(map(repr, untraced))}: E[θ] is folded "
                      "into their weights but their pruned structures are not removed; pass example_inputs "
                      "that run them", IncompleteCompactionWarning, stacklevel=3)
    folded = Folded(work.eval(), trace, records, checks, requires_grad)
    mismatch = reference_mismatch(folded)
    if not mismatch <= REL_TOL:
        raise ModelError(f"{caller}: folding the noise changed the model's outputs (relative error "
                         f"{mismatch:.2e}); this architecture is not supported, please report it")
    return folded


def restore_requires_grad(folded: Folded) -> None:
    for name, p in folded.model.named_parameters():
        p.requires_grad_(folded.requires_grad.get(name, True))


def reference_mismatch(folded: Folded) -> float:
    """Worst max|Δout| / max|out| of the working copy against the noisy model over the checked inputs."""
    with torch.no_grad():
        return max(output_mismatch(_forward(folded.model, inputs), want) for inputs, want in folded.checks)


def fold_noise(model: nn.Module, example_inputs: Any) -> nn.Module:
    """A copy of ``model`` without noise layers computing what ``model`` computes in eval mode.

    E[θ]·mask of every noise layer is folded into the neighbouring weights (see the module docstring);
    ``model`` itself is left unchanged.  Raises :class:`bmrs.errors.ModelError` if the model has no noise
    layers or a noise layer sits where it cannot be folded exactly.

    Examples:
        >>> import torch, bmrs
        >>> from bmrs.compaction import fold_noise
        >>> cnn = bmrs.attach(torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4),
        ...                                       torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(64, 2)))
        >>> folded = fold_noise(cnn, torch.randn(1, 1, 6, 6))
        >>> any(isinstance(m, bmrs.MultiplicativeNoise) for m in folded.modules())
        False
    """
    folded = fold(model, example_inputs)
    restore_requires_grad(folded)
    return folded.model
