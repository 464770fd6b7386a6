"""Shrink while training: physically remove pruned structures, keep the noise layers, slice Adam's state.

``compact`` produces the final plain network; ``shrink`` is for the middle of continuous pruning.  It
removes exactly the channels that ``compact`` would remove (same dependency graph, same proofs that a
removed channel is zero wherever it is read), but leaves every remaining noise layer in place, narrowed
to the structures it kept, and carries each tensor of the optimizer's state over to the smaller
parameters.  A narrowed noise layer draws its θ from the same random stream as before (the uniforms
are drawn for all original structures and the kept ones used) and the mean KL keeps its original
denominators, so training goes on as it would have on the masked network, only cheaper (equal up to
floating-point summation order).  Criteria that read the posteriors (BMRS, E[θ], SNR) decide the same
either way; L2 norms differ, since weights that read removed inputs are no longer part of them.

How the positions are found: a float64 copy of the network has every parameter and buffer replaced by
its own flat element index (1 + i·2⁻⁴⁰, exact), its noise by θ = mask, and is compacted; what survives
in each tensor names the original elements that stay.

Example:
    >>> import torch, bmrs
    >>> from bmrs.compaction import shrink
    >>> mlp = bmrs.attach(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)))
    >>> opt = torch.optim.Adam(mlp.parameters())
    >>> bmrs.noise_layers(mlp)[0][1].mask[:5] = 0
    >>> small, opt = shrink(mlp, torch.randn(2, 4), opt)
    >>> small[0].out_features, bmrs.noise_layers(small)[0][1].kept_index.tolist()
    (3, [5, 6, 7])
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ModelError
from ..nn.attach import NOISE_ATTR, install_noise, noise_layers
from .compact import compact
from .fold import IncompleteCompactionWarning, map_floating

__all__ = ["shrink", "restore_shrunk"]

_CODE_SCALE = 2.0 ** -40  # 1 + i·2⁻⁴⁰ is exact in float64 for i < 2⁴⁰


def _is_noise(name: str) -> bool:
    return NOISE_ATTR in name.split(".")


def _noise_prefix(name: str) -> str:
    """State-dict prefix of the noise layer hung under module ``name``."""
    return f"{name}.{NOISE_ATTR}" if name else NOISE_ATTR


def _tensors_of(model: nn.Module) -> list[tuple[str, Tensor]]:
    return list(model.named_parameters()) + list(model.named_buffers())


def _kept_elements(model: nn.Module, example_inputs: Any) -> tuple[nn.Module, dict[str, Tensor]] | None:
    """The compacted index-coded copy and, per parameter/buffer name, the flat original indices kept.

    None when some kept element's origin cannot be told (see ``_complete``): then nothing is shrunk.
    """
    coded = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        for name, tensor in _tensors_of(coded):
            if not _is_noise(name) and tensor.is_floating_point():
                tensor.copy_(1.0 + torch.arange(tensor.numel(), dtype=torch.float64).reshape(tensor.shape)
                             * _CODE_SCALE)
        for _, noise in noise_layers(coded):
            theta = noise.mask.clone()
            if not bool(theta.any()):  # compact keeps one channel of an emptied layer: keep it coded
                theta[-1] = 1.0
            noise.expected_theta = theta.clone  # fold θ = mask: codes pass unchanged or become 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        small = compact(coded, map_floating(example_inputs, Tensor.double), fast_layers=False)
    if any(issubclass(w.category, IncompleteCompactionWarning) for w in caught):
        return None  # compaction fell back to keeping channels it could not work out: nothing to shrink safely
    kept, partial = {}, {}
    for name, tensor in _tensors_of(small):
        if tensor.is_floating_point():
            codes = torch.round((tensor.detach().reshape(-1) - 1.0) / _CODE_SCALE).long()
            if bool((codes >= 0).all()):
                kept[name] = codes
            else:
                partial[name] = (codes, tensor.shape)
    originals = dict(_tensors_of(model))
    for name, (codes, shape) in partial.items():
        complete = _complete(codes, originals[name].shape, shape, name, kept)
        if complete is None:
            return None
        kept[name] = complete
    return small, kept


def _complete(codes: Tensor, old_shape, new_shape, name: str, kept: dict[str, Tensor]) -> Tensor | None:
    """Origins of a tensor some of whose kept elements were zeroed (masked channels compact kept).

    Removing channels keeps a product of per-axis index sets, so each axis' set is read off the valid
    codes; an axis left short borrows the set of a same-sized 1-d sibling (a BatchNorm's running
    statistics, which folding never scales).  None if that does not determine it.
    """
    valid = codes[codes >= 0]
    coords = torch.stack(torch.unravel_index(valid, tuple(old_shape))) if valid.numel() else None
    axes = []
    for axis, size in enumerate(new_shape):
        found = torch.unique(coords[axis]) if coords is not None else torch.empty(0, dtype=torch.long)
        if found.numel() != size and len(new_shape) == 1:
            owner = name.rsplit(".", 1)[0]
            siblings = [v for k, v in kept.items() if k.rsplit(".", 1)[0] == owner and v.numel() == size]
            found = siblings[0] if siblings else found
        if found.numel() != size:
            return None
        axes.append(found)
    grid = torch.meshgrid(*axes, indexing="ij")
    strides = torch.tensor(old_shape).flip(0).cumprod(0).flip(0).tolist()[1:] + [1]
    return sum(g.reshape(-1) * stride for g, stride in zip(grid, strides))


@torch.no_grad()
def shrink(model: nn.Module, example_inputs: Any,
           optimizer: torch.optim.Optimizer | None = None) -> tuple[nn.Module, torch.optim.Optimizer | None]:
    """(smaller model with narrowed noise layers, optimizer over its parameters with sliced state).

    Returns ``model`` and ``optimizer`` unchanged when no structure can be removed.  ``model`` itself is
    not modified.  The new optimizer has the same class, hyperparameters and step counts.
    """
    layers = noise_layers(model)
    if not layers:
        raise ModelError("shrink: the model has no noise layers; attach and train it first")
    if not any(bool((noise.mask == 0).any()) for _, noise in layers):
        return model, optimizer
    if any(noise.producer is None for _, noise in layers):
        return model, optimizer  # a layer not tied to one Conv/Linear: its kept structures are unknown
    found = _kept_elements(model, example_inputs)
    if found is None:
        return model, optimizer
    small, kept = found
    originals = dict(_tensors_of(model))
    changed = False
    for name, tensor in _tensors_of(small):
        source = originals[name]
        if name in kept:
            changed |= kept[name].numel() != source.numel()
            value = source.detach().reshape(-1)[kept[name].to(source.device)].reshape(tensor.shape)
        else:
            value = source.detach()
        tensor.data = value.clone().to(source.dtype)
        if isinstance(tensor, nn.Parameter):
            tensor.requires_grad_(source.requires_grad)
    if not changed:
        return model, optimizer
    device = next(model.parameters()).device
    small = small.to(device)
    narrowed = []
    for name, noise in layers:
        producer = small.get_submodule(noise.producer)
        rows = kept[f"{noise.producer}.weight"] // (originals[f"{noise.producer}.weight"][0].numel())
        keep = torch.unique_consecutive(rows).to(noise.mask.device)
        narrowed.append((small.get_submodule(name), noise.narrowed(keep)))
        if producer.weight.shape[0] != keep.numel():
            raise ModelError(f"shrink: could not map the structures of noise layer {name!r}")
    install_noise(small, narrowed)
    small.train(model.training)
    return small, (None if optimizer is None else _sliced_optimizer(optimizer, model, small, kept, layers))


def _sliced_optimizer(optimizer, model, small, kept, layers):
    new_params = dict(small.named_parameters())
    name_of = {id(p): name for name, p in model.named_parameters()}
    # a noise layer's mu / log_sigma: where each structure it keeps sat in the layer before this shrink
    old_index = {_noise_prefix(name): noise.kept_index.tolist() for name, noise in layers}
    noise_rows = {}
    for name, noise in noise_layers(small):
        position = {i: j for j, i in enumerate(old_index[_noise_prefix(name)])}
        noise_rows[_noise_prefix(name)] = torch.tensor([position[i] for i in noise.kept_index.tolist()])
    groups = []
    for group in optimizer.param_groups:
        params = [new_params[name_of[id(p)]] for p in group["params"]]
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": params})
    new = type(optimizer)(groups, **optimizer.defaults)
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p)
            if not state:
                continue
            name = name_of[id(p)]
            target = new_params[name]
            new.state[target] = {k: _slice_like(v, p, target, name, kept, noise_rows) for k, v in state.items()}
    return new


def _slice_like(value, old: Tensor, new: Tensor, name: str, kept, noise_rows):
    """A state tensor shaped like the old parameter, cut down like the parameter was."""
    if not isinstance(value, Tensor) or value.shape != old.shape or old.shape == new.shape:
        return value.clone() if isinstance(value, Tensor) else value
    if name in kept:
        return value.reshape(-1)[kept[name].to(value.device)].reshape(new.shape).clone()
    return value[noise_rows[name.rsplit(".", 1)[0]].to(value.device)].clone()


def restore_shrunk(model: nn.Module, state_dict: dict[str, Tensor], example_inputs: Any) -> nn.Module:
    """Rebuild the shrunk architecture that ``state_dict`` was saved from, on a freshly built ``model``.

    The saved ``kept_index`` of every noise layer says which structures are left; the others are
    masked and removed as ``shrink`` removed them.  Returns ``model`` itself if nothing was removed.
    Load the state dict into the result afterwards.
    """
    narrowed = False
    with torch.no_grad():
        for name, noise in noise_layers(model):
            kept = state_dict.get(f"{_noise_prefix(name)}.kept_index")
            if kept is None or kept.numel() == noise.num_features:
                continue
            narrowed = True
            noise.mask.zero_()
            noise.mask[kept.long().to(noise.mask.device)] = 1.0
    if not narrowed:
        return model
    small, _ = shrink(model, example_inputs)
    return small
