"""Resuming a run: the checkpoint checked against the run's settings and model, then loaded."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..compaction.shrink import restore_shrunk
from ..errors import CheckpointError, first_line
from ..io import load_checkpoint
from .config import LIMITS, TrainConfig, comparable_settings
from .optim import engine_optimizer

__all__ = ["restore", "resume_threads"]


# what a training checkpoint holds, and of what kind (checked before any is used on --resume)
_CHECKPOINT_FIELDS = {"config": dict, "model": dict, "optimizer": dict, "epoch": int, "history": list,
                      "best_val_accuracy": (int, float), "best_epoch": int,
                      "best_state": (dict, type(None))}  # None until an epoch may be kept as the best


def restore(path: Path, config: TrainConfig, model: nn.Module, example, num_train: int) -> tuple[dict, nn.Module, torch.optim.Optimizer]:
    """Load a checkpoint into ``model`` (rebuilt narrower first if it was shrunk) and a fresh optimizer."""
    state = load_checkpoint(path)
    for key, kind in _CHECKPOINT_FIELDS.items():
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            raise CheckpointError(f"{path}: not a bmrs training checkpoint (no {key!r} of the right kind); "
                                  "delete it to start over")
    if comparable_settings(state["config"]) != comparable_settings(config.to_dict()):
        changed = sorted(k for k in comparable_settings(config.to_dict())
                         if state["config"].get(k) != config.to_dict().get(k))
        raise CheckpointError(f"{path}: checkpoint was made with different settings ({', '.join(changed)}); "
                              "use the same options to resume, or another --output")
    try:
        if config.shrink:
            from .artifacts import check_kept_index

            check_kept_index(model, state["model"], path)
            model = restore_shrunk(model, state["model"], example)
        optimizer = engine_optimizer(model, config, num_train)
        model.load_state_dict(state["model"])
        _check_optimizer_state(state["optimizer"], optimizer)
        optimizer.load_state_dict(state["optimizer"])
    except CheckpointError:
        raise  # (bmrs's own, naming the damaged field: not re-worded as another model's, nor cut short)
    except (RuntimeError, ValueError, KeyError, IndexError, TypeError) as err:
        raise CheckpointError(f"{path}: checkpoint does not fit this model ({first_line(err)}); "
                              "it belongs to another model — use another --output") from None
    problem = _progress_problem(state, model, config)
    if problem:
        raise CheckpointError(f"{path}: {problem}; the checkpoint is damaged — delete it to start over")
    return state, model, optimizer


def _progress_problem(state: dict, model: nn.Module, config: TrainConfig) -> str | None:
    """What is wrong with a checkpoint's record of progress (epoch, history, best state), if anything."""
    epoch, history, best = state["epoch"], state["history"], state["best_state"]
    if not 0 <= epoch <= config.total_epochs:
        return f"epoch {epoch} lies outside the run's 0 … {config.total_epochs}"
    if len(history) != epoch or not all(isinstance(h, dict) and isinstance(h.get("seconds"), (int, float))
                                        for h in history):
        return f"its history does not hold one record (with its seconds) for each of its {epoch} epochs"
    if best is None:
        return f"it has finished all {epoch} epochs but kept no best state" if epoch == config.total_epochs else None
    own = model.state_dict()
    if set(best) != set(own) or any(not isinstance(best[k], torch.Tensor) or best[k].shape != own[k].shape for k in own):
        return "its best state does not fit the model"
    return None


def _check_optimizer_state(saved: dict, optimizer: torch.optim.Optimizer) -> None:
    """ValueError unless every saved per-parameter tensor (Adam's moments) has its parameter's shape:
    ``load_state_dict`` checks only how many parameters there are, and the fused step then writes past the
    end of a smaller moment."""
    groups, state = saved.get("param_groups"), saved.get("state")
    if not isinstance(groups, list) or not isinstance(state, dict) or len(groups) != len(optimizer.param_groups):
        raise ValueError("the optimizer state has another layout")
    for group, mine in zip(groups, optimizer.param_groups):
        indices = group.get("params") if isinstance(group, dict) else None
        if not isinstance(indices, list) or len(indices) != len(mine["params"]):
            raise ValueError("the optimizer state has another number of parameters")
        for index, param in zip(indices, mine["params"]):
            entry = state.get(index, {})
            for name, value in (entry.items() if isinstance(entry, dict) else [("state", entry)]):
                if not isinstance(value, torch.Tensor) or (value.dim() and value.shape != param.shape):
                    raise ValueError(f"optimizer {name} of parameter {index} does not match its shape")


def resume_threads(saved: int | None, asked: int | None, log: Callable[[str], None]) -> None:
    """Resume on the thread count the run was trained with (PyTorch's CPU reductions split work by thread,
    so the last bits, and then the run, depend on it), unless --threads asks for another: then say so."""
    if not isinstance(saved, int) or isinstance(saved, bool) or not 1 <= saved <= LIMITS["threads"][1]:
        return  # (checkpoints from before the count was kept)
    if asked is None:
        torch.set_num_threads(saved)
    elif asked != saved:
        log(f"note: resuming on {asked} threads where the run used {saved}; it will not match an "
            f"uninterrupted run bit for bit (pass --threads {saved} for that)")
