"""Ready-made networks of the BMRS paper, built with noise layers attached.

Examples:
    >>> import torch, bmrs
    >>> from bmrs.models import build_model
    >>> model = build_model("lenet5", in_channels=1, num_classes=10, image_size=28)
    >>> model(torch.randn(2, 1, 28, 28)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import inspect

from torch import nn

from ..errors import ConfigError
from ._checks import positive_int
from .lenet5 import lenet5
from .mlp import mlp
from .pretrained import is_noise_key, load_pretrained, read_state_dict
from .resnet import BasicBlock, Bottleneck, ResNet, batchnorm_names, resnet18, resnet50
from .vit import VisionTransformer, vit, vit_noise_targets

__all__ = [
    "MODEL_NAMES",
    "build_model",
    "mlp",
    "lenet5",
    "resnet18",
    "resnet50",
    "vit",
    "ResNet",
    "BasicBlock",
    "Bottleneck",
    "VisionTransformer",
    "batchnorm_names",
    "vit_noise_targets",
    "load_pretrained",
    "read_state_dict",
    "is_noise_key",
]

MODEL_NAMES = ("mlp", "lenet5", "resnet18", "resnet50", "vit")

_BUILDERS = {"mlp": mlp, "lenet5": lenet5, "resnet18": resnet18, "resnet50": resnet50, "vit": vit}

# Inputs at most this wide get the CIFAR stem (3×3 stride-1 conv, no max-pool) in the ResNets.
SMALL_INPUT_MAX = 64


def build_model(name: str, in_channels: int, num_classes: int, image_size: int = 32, noise: bool = True,
                **kwargs) -> nn.Module:
    """Build one of :data:`MODEL_NAMES` for ``in_channels``×``image_size``×``image_size`` inputs.

    ``"mlp"`` gets ``in_dim = in_channels·image_size²``; the ResNets get ``small_input=True`` (CIFAR
    stem) when ``image_size <= 64`` unless ``small_input`` is passed; ``"vit"`` and ``"lenet5"`` get
    ``image_size``.  Other keyword arguments go to the builder (e.g. ``hidden=300`` for the MLP,
    ``depth=12`` for the ViT).  Unknown names or options raise :class:`bmrs.errors.ConfigError`.

    Examples:
        >>> import bmrs
        >>> from bmrs.models import build_model
        >>> model = build_model("mlp", in_channels=1, num_classes=10, image_size=32)
        >>> model[1].in_features, len(bmrs.noise_layers(model))
        (1024, 2)
    """
    if name not in _BUILDERS:
        raise ConfigError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    builder = _BUILDERS[name]
    positive_int("in_channels", in_channels, "build_model")
    positive_int("image_size", image_size, "build_model")
    if name == "mlp":
        args = dict(in_dim=in_channels * image_size * image_size)
    elif name in ("resnet18", "resnet50"):
        args = dict(in_channels=in_channels, small_input=kwargs.pop("small_input", image_size <= SMALL_INPUT_MAX))
    else:
        args = dict(in_channels=in_channels, image_size=image_size)
    args.update(num_classes=num_classes, noise=noise)
    accepted = set(inspect.signature(builder).parameters)
    clash = sorted(set(kwargs) & set(args))
    unknown = sorted(set(kwargs) - accepted)
    if clash or unknown:
        options = ", ".join(sorted(accepted - set(args))) or "none"
        bad = ", ".join(clash + unknown)
        raise ConfigError(f"build_model({name!r}): unexpected option(s) {bad}; its extra options are: {options}")
    args.update(kwargs)
    return builder(**args)
