"""Weight surgery: scaling the output or input channels of a Conv/Linear, or a norm's affine output.

Examples:
    >>> import torch
    >>> layer = torch.nn.Linear(2, 3)
    >>> before = layer.weight.detach().clone()
    >>> scale_out(layer, torch.tensor([1.0, 0.0, 2.0]))
    >>> bool(torch.equal(layer.weight[2], 2 * before[2])), bool(layer.weight[1].eq(0).all())
    (True, True)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import ModelError

__all__ = ["channel_multiplier", "scale_out", "scale_in", "scale_affine", "take", "keep_indices"]


def channel_multiplier(layer: nn.Module, values: Tensor, side: str) -> Tensor:
    """``values`` (one per output or input channel of a Conv/Linear) shaped to broadcast over its weight."""
    weight = layer.weight
    values = values.to(device=weight.device, dtype=weight.dtype)
    if isinstance(layer, nn.Linear):
        return values.view(-1, 1) if side == "out" else values.view(1, -1)
    tail = [1] * (weight.dim() - 2)
    # A Conv weight is (out, in/g, k…); a ConvTranspose weight is (in, out/g, k…).
    whole_dim0 = (side == "out") != layer.transposed
    if whole_dim0:
        return values.view(-1, 1, *tail)
    groups, rows, cols = layer.groups, weight.shape[0], weight.shape[1]
    grid = values.view(groups, 1, cols).expand(groups, rows // groups, cols)
    return grid.reshape(rows, cols, *tail)


@torch.no_grad()
def scale_out(layer: nn.Module, theta: Tensor) -> None:
    """Multiply the output channel c of a Conv/Linear (weight rows and bias) by theta[c]."""
    layer.weight.mul_(channel_multiplier(layer, theta, "out"))
    if layer.bias is not None:
        layer.bias.mul_(theta.to(layer.bias))


@torch.no_grad()
def scale_in(layer: nn.Module, scale: Tensor) -> None:
    """Multiply the input channel (column) c of a Conv/Linear by scale[c]."""
    layer.weight.mul_(channel_multiplier(layer, scale, "in"))


@torch.no_grad()
def scale_affine(norm: nn.Module, theta: Tensor, axis: int) -> None:
    """Multiply a norm's output by theta along ``axis`` of its affine weight, creating it if absent."""
    shape = tuple(norm.normalized_shape) if isinstance(norm, nn.LayerNorm) else (theta.numel(),)
    view = [1] * len(shape)
    view[axis] = theta.numel()
    theta = theta.reshape(view)
    if norm.weight is None:
        norm.weight = nn.Parameter(theta.expand(shape).clone())
        if getattr(norm, "bias", None) is None and not isinstance(norm, nn.LayerNorm):
            norm.bias = nn.Parameter(torch.zeros_like(norm.weight))
        _mark_affine(norm)
        return
    norm.weight.mul_(theta.to(norm.weight))
    if norm.bias is not None:
        norm.bias.mul_(theta.to(norm.bias))


def _mark_affine(norm: nn.Module) -> None:
    if isinstance(norm, nn.LayerNorm):
        norm.elementwise_affine = True
    else:
        norm.affine = True


def take(tensor: Tensor, axes) -> Tensor:
    """``tensor`` cut to the given indices along each axis (None: the whole axis)."""
    for axis, index in enumerate(axes):
        if index is not None:
            tensor = tensor.index_select(axis, index.to(tensor.device))
    return tensor


@torch.no_grad()
def keep_indices(model: nn.Module, kept: dict) -> None:
    """Cut ``model``'s tensors in place to ``kept`` ({tensor name: per axis the indices kept, or None})
    and update the sizes their modules record (Linear, Conv, BatchNorm, PReLU)."""
    by_module: dict[str, dict] = {}
    for name, axes in kept.items():
        prefix, _, attr = name.rpartition(".")
        by_module.setdefault(prefix, {})[attr] = axes
    for prefix, attrs in by_module.items():
        module = model.get_submodule(prefix)
        for attr, axes in attrs.items():
            old = getattr(module, attr)
            value = take(old.detach(), axes).clone()
            setattr(module, attr, nn.Parameter(value, requires_grad=old.requires_grad)
                    if isinstance(old, nn.Parameter) else value)
        _update_sizes(module, prefix)


def _update_sizes(module: nn.Module, name: str) -> None:
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, nn.modules.conv._ConvNd):
        rows, cols = module.weight.shape[:2]
        if module.groups > 1 and module.groups == module.in_channels == module.out_channels:  # depthwise
            module.groups = rows
        if module.transposed:
            module.in_channels, module.out_channels = rows, cols * module.groups
        else:
            module.out_channels, module.in_channels = rows, cols * module.groups
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        module.num_features = (module.running_mean if module.running_mean is not None else module.weight).shape[0]
    elif isinstance(module, nn.PReLU):
        module.num_parameters = module.weight.numel()
    else:
        raise ModelError(f"cannot narrow {name or '<root>'!r} ({type(module).__name__}): only Linear, Conv, "
                         "BatchNorm and PReLU layers have their channels removed; please report it")
