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

Which structures go is :func:`bmrs.compaction.plan`'s answer: its kept indices cut every tensor of the
noisy model and each optimizer state tensor shaped like one.  Nothing is shrunk when the plan keeps
every channel (a noise layer the inputs never reach, or removal would change the outputs) or would
remove a structure its noise layer does not mask.

Examples:
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
from ..nn.attach import NOISE_ATTR, detach, install_noise, noise_layers
from .fold import IncompleteCompactionWarning
from .planning import build
from .surgery import keep_indices, take

__all__ = ["shrink", "restore_shrunk"]


def _noise_prefix(name: str) -> str:
    """State-dict prefix of the noise layer hung under module ``name``."""
    return f"{name}.{NOISE_ATTR}" if name else NOISE_ATTR


def _tensors_of(model: nn.Module) -> list[tuple[str, Tensor]]:
    return list(model.named_parameters()) + list(model.named_buffers())


def _kept_elements(model: nn.Module, example_inputs: Any) -> dict[str, list] | None:
    """{tensor name: per axis the indices kept} from the model's compaction plan; None when the plan
    keeps every channel or names a tensor the noisy model does not have (nothing is shrunk then)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IncompleteCompactionWarning)  # shrink says so by shrinking nothing
        the_plan = build(model, example_inputs, "shrink")[0]
    if the_plan.incomplete is not None or the_plan.unreached:
        return None
    names = {name for name, _ in _tensors_of(model)}
    if any(name not in names for name in the_plan.kept):
        return None  # folding gave a norm affine parameters it did not have: no place for them here
    return the_plan.kept


def _out_axis(layer: nn.Module) -> int:
    return 1 if getattr(layer, "transposed", False) else 0


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
    kept = _kept_elements(model, example_inputs)
    if not kept:
        return model, optimizer
    small = copy.deepcopy(model)
    detach(small)
    keep_indices(small, kept)
    narrowed = []
    for name, noise in layers:
        producer = small.get_submodule(noise.producer)
        axes = kept.get(f"{noise.producer}.weight")
        axis = _out_axis(producer)
        keep = (torch.arange(noise.num_features) if axes is None or axes[axis] is None else axes[axis])
        keep = keep.to(noise.mask.device)
        if producer.weight.shape[axis] != keep.numel():
            raise ModelError(f"shrink: could not map the structures of noise layer {name!r}")
        dropped = torch.ones_like(noise.mask, dtype=torch.bool)
        dropped[keep] = False
        if bool(noise.mask[dropped].any()):
            return model, optimizer  # the plan removes an unmasked (all-zero) structure: keep training it
        narrowed.append((small.get_submodule(name), noise.narrowed(keep)))
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
        return take(value, kept[name]).clone()
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
