"""The forward hooks that apply a model's noise layers (installed by :func:`bmrs.nn.attach.install_noise`).

A noise layer is registered as a child ``bmrs_noise`` of its host module and applied by a forward hook on
the host, or on the pooling that directly follows it (pool(θ·x) = θ·pool(x) for θ ≥ 0: see
:mod:`bmrs.nn.attach`); an attention module's head gate runs before its output projection.

Examples:
    >>> import torch, bmrs
    >>> from bmrs.nn.hooks import NOISE_ATTR, _apply_noise
    >>> mlp = bmrs.attach(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)))
    >>> _apply_noise in mlp[1]._forward_hooks.values(), NOISE_ATTR in mlp[1]._modules
    (True, True)
"""

from __future__ import annotations

from torch import Tensor, nn

from .noise import MultiplicativeNoise

__all__ = ["NOISE_ATTR"]

NOISE_ATTR = "bmrs_noise"
_SPATIAL_DIMS = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
# Pooling that acts on each channel of an (N, C, *spatial) tensor alone with pool(θ·x) = θ·pool(x)
# for θ ≥ 0: max pooling pads with −inf, average pooling is linear (zero padding included).
_POOL_DIMS = {
    nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3, nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3,
    nn.AdaptiveMaxPool1d: 1, nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3,
    nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3,
}

def _apply_noise(module: nn.Module, args, *rest):
    """Forward hook applying the noise registered under ``module``: (module, args, kwargs, output) as
    registered with ``with_kwargs=True``, or (module, args, output) as models pickled before that were."""
    kwargs, output = rest if len(rest) == 2 else ({}, rest[0])
    noise = module._modules[NOISE_ATTR]
    if isinstance(output, tuple):  # e.g. MultiheadAttention returns (output, weights)
        return (noise(output[0]),) + tuple(output[1:])
    if not noise.training and not output.requires_grad and _fresh(output, args, kwargs):
        return noise.scale_(output)  # evaluation: scale the module's own new output in place
    return noise(output)


def _gate_heads(host: nn.Module, heads: Tensor) -> Tensor:
    """Apply the head gate registered under the attention module ``host`` to its (…, heads, head_dim) values."""
    return host._modules[NOISE_ATTR](heads)


def _fresh(output: Tensor, args, kwargs) -> bool:
    """The output shares no memory with the module's tensor inputs, positional or keyword (an in-place
    ReLU returns its input, which its caller may still hold)."""
    try:
        storage = output.untyped_storage().data_ptr()
        return storage != 0 and all(not isinstance(i, Tensor) or i.untyped_storage().data_ptr() != storage
                                    for inputs in (args, kwargs.values()) for i in inputs)
    except (RuntimeError, NotImplementedError):  # a tensor without plain storage (sparse, nested …)
        return False


class _NoiseAfterPool:
    """Forward hook of a pooling module: applies the noise registered under ``host`` to its output."""

    def __init__(self, host: nn.Module):
        self.host = host

    def __call__(self, module: nn.Module, args, *rest):
        return _apply_noise(self.host, args, *rest)


def _hook_target(host: nn.Module, noise: MultiplicativeNoise, modules: dict[str, nn.Module],
                 places: dict[int, list]) -> nn.Module:
    """The module whose forward hook applies ``noise``: the last of the pooling modules that directly
    follow ``host`` in a plain ``nn.Sequential`` when θ is shared by a channel's positions, else ``host``.

    ``places``: id(module) → [(parent, position)] over the model; a module used twice keeps the host.
    """
    spatial = _SPATIAL_DIMS.get(type(modules.get(noise.producer)))  # host output is (N, C, *spatial)
    if noise.granularity != "structure" or noise.dim != 1 or spatial is None \
            or len(places.get(id(host), ())) != 1:
        return host
    parent, position = places[id(host)][0]
    if type(parent).forward is not nn.Sequential.forward:  # children not run one after the other
        return host
    target = host
    for module in list(parent._modules.values())[position + 1:]:
        if _POOL_DIMS.get(type(module)) != spatial or getattr(module, "return_indices", False) \
                or len(places[id(module)]) != 1:
            break
        target = module
    return target
