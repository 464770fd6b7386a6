"""Noise layers and attaching them to models."""

from .attach import attach, detach_noise, kl_loss, noise_layers
from .noise import MultiplicativeNoise

__all__ = ["MultiplicativeNoise", "attach", "detach_noise", "kl_loss", "noise_layers"]
