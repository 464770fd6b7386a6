"""Reading a finished run back: its config and its masked model, rebuilt without pickle.

Example:
    from bmrs.training.artifacts import load_run
    run = load_run("runs/fashion-mnist-lenet5-bmrs-n-s0")
    run.model, run.config.criterion
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from torch import nn

from ..errors import CheckpointError, first_line
from ..io import load_checkpoint, load_state_dict_file, read_json
from .config import TrainConfig
from .run import CHECKPOINT, COMPACT_MODEL, MASKED_MODEL, METRICS, build_for

__all__ = ["LoadedRun", "load_run"]


@dataclass
class LoadedRun:
    path: Path
    config: TrainConfig
    metrics: dict
    model: nn.Module  # the masked model (noise layers attached), in eval mode

    def compacted(self, fast_layers: bool = False) -> nn.Module:
        """The compacted network that ``bmrs train`` wrote (``model_compact.safetensors``), rebuilt without pickle.

        Example:
            small = load_run("runs/fashion-mnist-lenet5-bmrs-n-s0").compacted()
        """
        from ..saving import load

        path = self.path / COMPACT_MODEL
        if not path.exists():
            raise CheckpointError(f"{path}: no compacted model in this run (a run without noise layers has none; "
                                  f"bmrs compact --run {self.path} writes one)")
        return load(path, fast_layers=fast_layers)

    def built_model(self) -> nn.Module:
        """The network as configured, before training pruned or shrank it (fresh weights, eval mode): the
        "before" of compression figures, as ``bmrs train`` reports them.  For a ``--shrink`` run ``model``
        has already lost what it pruned, so measuring against it would report nothing removed.

        Example:
            run = load_run("runs/fashion-mnist-lenet5-bmrs-n-s0")
            compression_report(run.built_model(), compact(run.model, x), x)
        """
        data = self.metrics["data"]
        return build_for(self.config, data["in_channels"], data["num_classes"]).eval()


def load_run(path: str | Path, final: bool = False) -> LoadedRun:
    """Rebuild the masked model of a finished ``bmrs train`` run from its JSON and safetensors files.

    ``final=True`` takes the weights of the last epoch (from checkpoint.pt, loaded with
    weights_only=True) instead of the best-validation checkpoint that was tested: for analyses of a
    fully trained model, such as post-training pruning.
    """
    path = Path(path)
    metrics_path = path / METRICS
    if not metrics_path.exists():
        raise CheckpointError(f"{path}: no {METRICS} here — not a finished bmrs run (finish it with "
                              f"bmrs train --resume --output {path})")
    metrics = read_json(metrics_path)
    data = metrics.get("data") if isinstance(metrics, dict) else None
    if not isinstance(metrics, dict) or not isinstance(metrics.get("config"), dict) or not isinstance(data, dict) \
            or not all(isinstance(data.get(k), int) and data[k] > 0 for k in ("in_channels", "num_classes")):
        raise CheckpointError(f"{metrics_path}: lacks a 'config' and a 'data' with in_channels and num_classes; "
                              "it was not written by bmrs train")
    config = TrainConfig.from_dict(metrics["config"])
    model = build_for(config, metrics["data"]["in_channels"], metrics["data"]["num_classes"])
    if final:
        state = load_checkpoint(path / CHECKPOINT)["model"]
    else:
        state = load_state_dict_file(path / MASKED_MODEL)
    try:
        if config.shrink:  # the run removed pruned structures as it went: rebuild that network
            from ..compaction.shrink import restore_shrunk
            example = torch.zeros(2, metrics["data"]["in_channels"], config.image_size, config.image_size)
            model = restore_shrunk(model, state, example)
        model.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: saved weights do not fit the configured {config.model} "
                              f"({first_line(err, 100)})") from None
    return LoadedRun(path, config, metrics, model.eval())
