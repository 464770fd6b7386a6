"""Where ``attach`` puts noise layers: the default policy and explicit targets (see :mod:`bmrs.nn.attach`
for the policy), each target's width, axis and producer (the Conv/Linear whose structures it gates).

Examples:
    >>> import torch
    >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    >>> [(name, features, producer) for name, _, features, _, producer in default_targets(mlp)]
    [('1', 8, '0')]
"""

from __future__ import annotations

from typing import Iterable

from torch import nn

from ..errors import ConfigError, ModelError
from .flow import Flow, module_flow
from .heads import head_layout, transformer_placement
from .hooks import NOISE_ATTR

__all__ = ["default_targets", "explicit_targets", "sequence_first_axis"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_PRODUCERS = _CONV + (nn.Linear,)
_ACTIVATIONS = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid,
    nn.Hardtanh, nn.Hardswish, nn.Mish, nn.Softplus, nn.PReLU,
)


def _features_and_dim(module: nn.Module) -> tuple[int, int] | None:
    if isinstance(module, _CONV):
        return module.out_channels, 1
    if isinstance(module, _NORM):
        return module.num_features, 1
    if isinstance(module, nn.Linear):
        return module.out_features, -1
    if isinstance(module, nn.MultiheadAttention):
        return module.embed_dim, -1
    if isinstance(module, (nn.LayerNorm,)):
        shape = module.normalized_shape
        return (shape[-1], -1) if shape else None
    if isinstance(module, nn.GroupNorm):
        return module.num_channels, 1
    return None


def _leaf_modules(model: nn.Module) -> list[tuple[str, nn.Module, nn.Module | None, str]]:
    """(name, module, parent, attribute) of every module, skipping MultiheadAttention internals."""
    out = []

    def visit(prefix: str, module: nn.Module):
        for attr, child in module._modules.items():
            if child is None or attr == NOISE_ATTR:
                continue
            name = f"{prefix}.{attr}" if prefix else attr
            out.append((name, child, module, attr))
            if not isinstance(child, nn.MultiheadAttention):
                visit(name, child)

    visit("", model)
    return out


def default_targets(model: nn.Module) -> list[tuple[str, nn.Module, int, int, str | None]]:
    """Apply the documented default policy: [(name, module to hook, features, dim, producer)]."""
    entries = _leaf_modules(model)
    producers = [i for i, (_, m, _, _) in enumerate(entries) if isinstance(m, _PRODUCERS)]
    if not producers:
        return []
    flow = module_flow(model, _PRODUCERS)
    if flow is not None:  # the data flow: the layers feeding the output, the module after each layer
        # (flow names a shared module by its first name; entries list it under each)
        named = dict(model.named_modules())
        canonical = {id(module): name for name, module in named.items()}
        first_entry: dict[int, int] = {}
        for i, entry in enumerate(entries):
            first_entry.setdefault(id(entry[1]), i)
        output_layers = {i for i in producers if canonical.get(id(entries[i][1])) in flow.output_layers} \
            or {producers[-1]}  # (none found behind a residual sum or a concatenation: the last registered)
        next_leaf = {i: first_entry[id(named[flow.follower[canonical[id(entries[i][1])]]])] for i in producers
                     if flow.follower.get(canonical.get(id(entries[i][1]))) in named}
    else:  # registration order: the last layer registered, the next leaf registered
        output_layers = {producers[-1]}
        leaves = [i for i, (_, m, _, _) in enumerate(entries) if not m._modules or isinstance(m, nn.MultiheadAttention)]
        next_leaf = dict(zip(leaves, leaves[1:]))
    chosen = []
    for i in producers:
        if i in output_layers:
            continue
        name, module, parent, attr = entries[i]
        features, dim = _features_and_dim(module)
        j = next_leaf.get(i)
        follower = entries[j] if j is not None else None
        # (a BatchNorm would turn a Linear's zeroed unit into a constant: the noise goes after it there too)
        if follower and isinstance(follower[1], _NORM) and follower[1].num_features == features:
            chosen.append((follower[0], follower[1], features, 1, name))
            continue
        # Activation module right after it in the same Sequential: noise after the activation.
        if follower and isinstance(follower[1], _ACTIVATIONS) and isinstance(parent, nn.Sequential) \
                and follower[2] is parent:
            chosen.append((follower[0], follower[1], features, dim, name))
            continue
        chosen.append((name, module, features, dim, name))
    return transformer_placement(model, chosen)


def _producer_of(entries, index: int, flow: Flow | None) -> str | None:
    """Name of the Conv/Linear whose outputs the module at ``index`` gates (None if unclear): back along
    the data flow through norms and activations where it is known, else the last one registered before."""
    name, module, _, _ = entries[index]
    if isinstance(module, _PRODUCERS):
        return name
    if isinstance(module, nn.MultiheadAttention):
        return f"{name}.out_proj"
    if isinstance(module, _NORM + _ACTIVATIONS):
        modules = {entry[0]: entry[1] for entry in entries}
        current = name
        while flow is not None and isinstance(modules.get(flow.source.get(current)), _PRODUCERS + _NORM + _ACTIVATIONS):
            current = flow.source[current]
            if isinstance(modules[current], _PRODUCERS):
                return current
        for prev_name, prev, _, _ in reversed(entries[:index]):
            if isinstance(prev, _PRODUCERS):
                return prev_name
            if not isinstance(prev, _NORM + _ACTIVATIONS) and not prev._modules:
                return None
    return None


def explicit_targets(model: nn.Module, targets: Iterable) -> list[tuple[str, nn.Module, int, int, str | None]]:
    if isinstance(targets, (str, type)):  # one name or type: the list of it
        targets = [targets]
    try:
        targets = list(targets)
    except TypeError:
        raise ConfigError(f"attach: targets must be a list of module names or nn.Module types, got {targets!r}") from None
    entries = _leaf_modules(model)
    index_of = {name: i for i, (name, _, _, _) in enumerate(entries)}
    by_name = {name: (name, m) for name, m, _, _ in entries}
    only_layers = all(isinstance(t, str) and isinstance(by_name.get(t, (None, None))[1], _PRODUCERS) for t in targets)
    flow = None if only_layers else module_flow(model, _PRODUCERS)  # (norms and activations need it)
    chosen, seen = [], set()
    for target in targets:
        if isinstance(target, str):
            if target not in by_name:
                raise ModelError(f"attach: no module named {target!r} in {type(model).__name__}; "
                                 f"see [name for name, _ in model.named_modules()]")
            matches = [by_name[target]]
        elif isinstance(target, type) and issubclass(target, nn.Module):
            matches = [(name, m) for name, m, _, _ in entries if isinstance(m, target)]
        else:
            raise ConfigError(f"attach: targets must be module names or nn.Module types, got {target!r}")
        for name, module in matches:
            if name in seen:
                continue
            seen.add(name)
            layout = head_layout(module)
            if layout is not None:  # an attention module: one θ per head
                chosen.append((name, module, layout.heads, -2, None))
                continue
            spec = _features_and_dim(module)
            producer = _producer_of(entries, index_of[name], flow)
            if spec is None and producer is not None:  # an activation: it has its producer's width
                spec = _features_and_dim(entries[index_of[producer]][1])
            if spec is None:
                raise ModelError(f"attach: cannot tell how many structures {name!r} ({type(module).__name__}) "
                                 "outputs; target the Conv/Linear/BatchNorm before it instead")
            chosen.append((name, module, *spec, producer))
    return chosen


def sequence_first_axis(modules: dict[str, nn.Module], name: str) -> int:
    """1 when the module ``name`` or one around it was built with ``batch_first=False``, or holds an
    ``nn.MultiheadAttention`` that was (as ``nn.TransformerEncoderLayer`` does by default): its tensors
    are (tokens, examples, features).  Else 0."""
    parts = name.split(".") if name else []
    for depth in range(len(parts), -1, -1):
        module = modules.get(".".join(parts[:depth]))
        if getattr(module, "batch_first", None) is False or any(
                isinstance(child, nn.MultiheadAttention) and not child.batch_first
                for child in getattr(module, "_modules", {}).values()):
            return 1
    return 0
