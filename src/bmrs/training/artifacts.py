"""Reading a finished run back: its config and its masked model, rebuilt without pickle.

Examples:
    from bmrs.training.artifacts import load_run
    run = load_run("runs/fashion-mnist-lenet5-bmrs-n-s0")
    run.model, run.config.criterion
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from torch import nn

from ..errors import CheckpointError, ConfigError, first_line
from ..nn.attach import noise_layers
from ..io import load_checkpoint, load_state_dict_file, read_json
from .config import TrainConfig, check_int
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

        Examples:
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

        Examples:
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
    config = _config_of(metrics_path, metrics["config"])
    for key in ("in_channels", "num_classes"):
        try:
            check_int(key, metrics["data"][key], 1, 100_000)
        except ConfigError as err:
            raise CheckpointError(f"{metrics_path}: field data.{key}: {err}; the file is damaged") from None
    model = build_for(config, metrics["data"]["in_channels"], metrics["data"]["num_classes"])
    if final:
        state = load_checkpoint(path / CHECKPOINT)["model"]
    else:
        state = load_state_dict_file(path / MASKED_MODEL)
    try:
        if config.shrink:  # the run removed pruned structures as it went: rebuild that network
            from ..compaction.shrink import restore_shrunk
            check_kept_index(model, state, path / (CHECKPOINT if final else MASKED_MODEL))
            example = torch.zeros(2, metrics["data"]["in_channels"], config.image_size, config.image_size)
            model = restore_shrunk(model, state, example)
        model.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: saved weights do not fit the configured {config.model} "
                              f"({first_line(err, 100)})") from None
    return LoadedRun(path, config, metrics, model.eval())


def _config_of(path: Path, data: dict) -> TrainConfig:
    """The TrainConfig of a run's metrics.json; a damaged field is a CheckpointError naming the file and field."""
    try:
        return TrainConfig.from_dict(data)
    except ConfigError as err:
        field = f"field config.{err.field}: " if err.field else ""
        raise CheckpointError(f"{path}: {field}{err}; the file is damaged (it was not written so by bmrs train)") \
            from None
    except TypeError as err:  # e.g. a number where a list is expected, compared with one
        raise CheckpointError(f"{path}: a field of 'config' has the wrong type ({first_line(err)}); the file is "
                              "damaged") from None


def check_kept_index(model: nn.Module, state: dict, path: Path) -> None:
    """Each noise layer's saved ``kept_index``: increasing, distinct integers below the layer's width (else a
    CheckpointError naming the file and the field), checked before a shrunk network is rebuilt from it."""
    for name, noise in noise_layers(model):
        key = f"{name + '.' if name else ''}bmrs_noise.kept_index"
        kept = state.get(key)
        if kept is None:
            continue
        width = noise.num_features
        ok = (isinstance(kept, torch.Tensor) and kept.dim() == 1 and not kept.dtype.is_floating_point
              and kept.dtype != torch.bool and kept.numel() <= width)
        if ok and kept.numel():
            values = kept.long()
            ok = bool(values.min() >= 0) and bool(values.max() < width) and bool((values.diff() > 0).all())
        if not ok:
            raise CheckpointError(f"{path}: field {key} must hold distinct increasing structure indices in "
                                  f"[0, {width}), got {_describe(kept)}; the file is damaged")


def _describe(value) -> str:
    if not isinstance(value, torch.Tensor):
        return type(value).__name__
    shown = value.flatten()[:6].tolist()
    return f"{value.dtype} {tuple(value.shape)} {shown}{' …' if value.numel() > 6 else ''}"
