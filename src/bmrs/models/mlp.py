"""The fully connected network of the BMRS paper (MNIST / Fashion-MNIST experiments)."""

from __future__ import annotations

from torch import nn

from ..errors import ConfigError
from ..nn import attach
from ._checks import non_negative_int, positive_int, noise_options

__all__ = ["mlp"]


def mlp(
    in_dim: int = 1024,
    hidden: int = 150,
    layers: int = 1,
    num_classes: int = 10,
    noise: bool | dict = True,
    activation: type[nn.Module] = nn.Tanh,
) -> nn.Sequential:
    """Flatten → Linear(in_dim, hidden) → act → noise → ``layers`` × [Linear(hidden, hidden) → act → noise] → Linear head.

    ``layers=1`` (the default) is the paper's input → 150 → 150 → 10 network.  Noise layers
    (``noise=True``) come from :func:`bmrs.attach`'s default policy: one after the activation that
    follows each hidden Linear, none on the head.  ``activation`` is a module class, instantiated
    once per layer.

    Examples:
        >>> import torch, bmrs
        >>> from bmrs.models import mlp
        >>> model = mlp(in_dim=784)
        >>> model(torch.randn(2, 1, 28, 28)).shape
        torch.Size([2, 10])
        >>> [noise.num_features for _, noise in bmrs.noise_layers(model)]
        [150, 150]
    """
    positive_int("in_dim", in_dim, "mlp")
    positive_int("hidden", hidden, "mlp")
    non_negative_int("layers", layers, "mlp")
    positive_int("num_classes", num_classes, "mlp")
    if not (isinstance(activation, type) and issubclass(activation, nn.Module)):
        raise ConfigError(f"mlp: activation must be an nn.Module class such as nn.Tanh, got {activation!r}")
    modules: list[nn.Module] = [nn.Flatten(), nn.Linear(in_dim, hidden), activation()]
    for _ in range(layers):
        modules += [nn.Linear(hidden, hidden), activation()]
    modules.append(nn.Linear(hidden, num_classes))
    model = nn.Sequential(*modules)
    options = noise_options(noise, "mlp")
    return model if options is None else attach(model, **options)
