"""Noise layers and attaching them to models."""

from .attach import attach, detach, detach_noise, kl_loss, noise_layers
from .frozen import frozen_noise
from .noise import MultiplicativeNoise
from .param_groups import NOISE_LR_SCALE, param_groups

__all__ = ["MultiplicativeNoise", "attach", "detach", "detach_noise", "frozen_noise", "kl_loss", "noise_layers",
           "param_groups", "NOISE_LR_SCALE"]
