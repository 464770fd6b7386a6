"""The training engine: continuous pruning, fine-tuning, checkpoints, post-training sweeps."""

from .config import CRITERION_NAMES, TrainConfig
from .loop import evaluate, train_epoch
from .run import train

__all__ = ["TrainConfig", "CRITERION_NAMES", "train", "train_epoch", "evaluate"]
