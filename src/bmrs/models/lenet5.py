"""LeNet-5 (conv 6 → conv 16 → FC 120 → FC 84 → classes) as used in the BMRS paper."""

from __future__ import annotations

from torch import nn

from ..errors import ConfigError
from ..nn import attach
from ._checks import positive_int, noise_options

__all__ = ["lenet5"]


def _feature_size(image_size: int) -> int:
    """Side of the feature map after conv5 → pool2 → conv5 → pool2 (no padding)."""
    return ((image_size - 4) // 2 - 4) // 2


def lenet5(in_channels: int = 1, num_classes: int = 10, image_size: int = 32, noise: bool | dict = True) -> nn.Sequential:
    """conv 6 (5×5) → ReLU → maxpool 2 → noise → conv 16 (5×5) → ReLU → maxpool 2 → noise → flatten
    → FC 120 → ReLU → noise → FC 84 → ReLU → noise → FC num_classes.

    ``image_size`` (square inputs, at least 16) fixes the input size of FC 120: 16·5·5 for 32×32,
    16·4·4 for 28×28.  Noise layers come from :func:`bmrs.attach`'s default policy: each conv's sits
    under its ReLU (``"1.bmrs_noise"``) and is applied after the pool, where that is exact and 4× cheaper.

    Examples:
        >>> import torch, bmrs
        >>> from bmrs.models import lenet5
        >>> model = lenet5()
        >>> model(torch.randn(2, 1, 32, 32)).shape
        torch.Size([2, 10])
        >>> [noise.num_features for _, noise in bmrs.noise_layers(model)]
        [6, 16, 120, 84]
    """
    positive_int("in_channels", in_channels, "lenet5")
    positive_int("num_classes", num_classes, "lenet5")
    positive_int("image_size", image_size, "lenet5")
    side = _feature_size(image_size)
    if side < 1:
        raise ConfigError(f"lenet5: image_size must be at least 16 (two 5×5 convs and two 2×2 pools), got {image_size}")
    model = nn.Sequential(
        nn.Conv2d(in_channels, 6, kernel_size=5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, kernel_size=5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * side * side, 120),
        nn.ReLU(),
        nn.Linear(120, 84),
        nn.ReLU(),
        nn.Linear(84, num_classes),
    )
    options = noise_options(noise, "lenet5")
    return model if options is None else attach(model, **options)
