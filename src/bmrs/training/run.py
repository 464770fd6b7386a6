"""A whole run: continuous pruning, fine-tuning, best-checkpoint testing, compaction, artefacts.

Every epoch ends with an atomic checkpoint; ``resume=True`` continues a killed run and reaches the
same result as an uninterrupted one (each epoch reseeds from (seed, epoch), so a partly finished
epoch is simply redone).

Examples:
    from bmrs.training import TrainConfig, train
    cfg = TrainConfig(model="mlp", criterion="bmrs-n", epochs=1, finetune_epochs=1, train_subset=512)
    metrics = train(cfg, "runs/example")
    metrics["test_accuracy"], metrics["parameter_compression_pct"]
"""

from __future__ import annotations

import os
import warnings

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..criteria import Criterion, Gradient, get_criterion
from ..defaults import THRESHOLD_CRITERIA
from ..errors import ConfigError, TrainingError
from ..io import (
    FolderLock, check_writable, remove_stale_temporaries, save_checkpoint, save_state_dict, write_json,
)
from ..nn.attach import noise_layers
from ..saving import save
from ..pruning import PruningWarning, nothing_pruned_reason, prune, structure_counts
from ..compaction.shrink import shrink
from .config import TrainConfig
from .distributed import setup_distributed
from .history_plot import plot_history
from .loop import batches, divergence_bound, evaluate, train_epoch
from .optim import engine_optimizer
from .resume import restore, resume_threads

__all__ = ["train", "build_for", "builder_for", "COMPACT_MODEL", "MASKED_MODEL", "resolve_device", "epoch_seed", "CHECKPOINT", "METRICS"]

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.json"
MASKED_MODEL = "model_masked.safetensors"
#: the compacted network, written by bmrs.save (reload with bmrs.load(path) or load_run(run).compacted())
COMPACT_MODEL = "model_compact.safetensors"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    return torch.device(name)


def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919) % (2**63 - 1)


def builder_for(config: TrainConfig, in_channels: int, num_classes: int) -> dict:
    """``bmrs.models.build_model``'s arguments for a config's network (what ``bmrs.save`` records)."""
    extra = {"hidden": config.hidden, "layers": config.layers} if config.model == "mlp" else {}
    return {"name": config.model, "in_channels": in_channels, "num_classes": num_classes,
            "image_size": config.image_size, **extra}


def build_for(config: TrainConfig, in_channels: int, num_classes: int) -> nn.Module:
    """The network of a config (seeded), with noise layers of the configured granularity."""
    from ..models import build_model

    torch.manual_seed(config.seed)
    spec = builder_for(config, in_channels, num_classes)
    settings = {"low": config.low, "high": config.high, "granularity": config.granularity}
    return build_model(spec.pop("name"), noise=settings if config.noise else False, **spec)


def _criterion(config: TrainConfig) -> Criterion | None:
    if not config.prunes:
        return None
    if config.criterion == "bmrs-u":
        return get_criterion("bmrs-u", p1=config.p1, margin=config.evidence_margin)
    if config.criterion == "bmrs-n":
        return get_criterion("bmrs-n", margin=config.evidence_margin)
    if config.criterion in THRESHOLD_CRITERIA and config.threshold is not None:
        return get_criterion(config.criterion, threshold=config.threshold)
    return get_criterion(config.criterion)


def criterion_label(config: TrainConfig) -> str:
    """The criterion and how it decides, as metrics.json and the log state it (e.g. ``BMRSN(margin=1, …)``)."""
    criterion = _criterion(config)
    if criterion is None:
        return "none"
    if config.amount is not None:
        return f"{criterion!r}, top {config.amount:g} of structures by rank"
    if config.amount_schedule is not None:
        return f"{criterion!r}, ranked counts {config.amount_schedule}"
    return repr(criterion)


def _prune_epochs(config: TrainConfig) -> list[int]:
    if not config.prunes:
        return []
    return [e for e in range(1, config.epochs + 1) if e % config.prune_every == 0]


def _masked_in_place(model: nn.Module) -> int:
    return sum(int((noise.mask == 0).sum()) for _, noise in noise_layers(model))


def _prune_step(model, criterion, config, step_index, data, device) -> dict:
    amount = None
    if config.amount_schedule is not None:
        schedule = config.amount_schedule
        amount = int(schedule[min(step_index, len(schedule) - 1)]) if schedule else 0
    elif config.amount is not None:
        amount = float(config.amount)
    if isinstance(criterion, Gradient):
        criterion = Gradient()
        gen = torch.Generator().manual_seed(epoch_seed(config.seed, 10_000 + step_index))
        criterion.accumulate(model, batches(data.train, config.batch_size, gen, device), max_batches=50)
    if isinstance(amount, int):
        amount = min(amount, structure_counts(model).structures)
    with warnings.catch_warnings():  # (the run says once at its end why nothing was pruned)
        warnings.simplefilter("ignore", PruningWarning)
        report = prune(model, criterion, amount)
    return {"pruned": report.pruned, "newly_pruned": report.newly_pruned, "structures": report.structures}


def train(config: TrainConfig, output: str | Path, *, resume: bool = False, progress: bool = True,
          log: Callable[[str], None] = print, data=None) -> dict:
    """Train, prune, fine-tune, test and compact; write metrics.json and models into ``output``.

    Returns the metrics dictionary (also written to ``output/metrics.json``); under torchrun, rank 0
    returns it and the other ranks return an empty dict.

    Examples:
        config = TrainConfig(model="mlp", criterion="bmrs-u", p1=4, epochs=50, finetune_epochs=10)
        metrics = train(config, "runs/mlp-bmrs-u-4", resume=True)
        print(metrics["test_accuracy"], metrics["parameter_compression_pct"])
    """
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 writes (and holds the folder)
        return _train(config, output, resume, progress, log, data)
    check_writable(output)
    with FolderLock(output, "train"):  # a second bmrs train on this folder is refused, not interleaved
        return _train(config, output, resume, progress, log, data)


@dataclass
class _Run:
    """What a run works with between epochs: explicit state that ``_train``'s steps hand to each other."""

    config: TrainConfig
    output: Path
    device: torch.device
    dist: object  # a DistContext
    log: Callable[[str], None]
    progress: bool
    data: object  # a bmrs.data Dataset
    model: nn.Module
    optimizer: torch.optim.Optimizer
    forward: nn.Module  # the model, or its DDP wrapper
    example: torch.Tensor  # two training inputs: traces the network when shrinking it
    diverge_above: float  # from the untrained network (the same on resume)
    criterion: Criterion | None
    prune_epochs: list[int]  # the epochs that end with a pruning step
    start: int = 1  # the first epoch to train
    history: list = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"val_accuracy": -1.0, "epoch": 0, "state": None})
    masked_after_shrink: int = 0  # masked structures that a shrink left in place (it may keep some)


def _train(config: TrainConfig, output: str | Path, resume: bool, progress: bool, log: Callable[[str], None],
           data) -> dict:
    run = _prepare(config, Path(output), progress, log, data)
    _start_or_resume(run, resume)
    for epoch in range(run.start, config.total_epochs + 1):
        _run_epoch(run, epoch)
    run.dist.barrier()
    if not run.dist.is_main:
        return {}
    return finish(config, run.output, run.model, run.best, run.history, run.data, run.device, run.log)


def _prepare(config: TrainConfig, output: Path, progress: bool, log: Callable[[str], None], data) -> _Run:
    """Device, processes, data, network, optimizer and criterion of a run (before any checkpoint is read)."""
    from ..data import load_dataset

    device = resolve_device(config.device)
    dist = setup_distributed(device)
    if dist.active and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    if dist.is_main:
        check_writable(output)
        remove_stale_temporaries(output)  # half-written files of a process killed mid-write
    if config.threads:
        torch.set_num_threads(config.threads)
    if config.compile:
        from .._compile import set_compile
        set_compile(True)
    if data is None:
        data = load_dataset(config.dataset, config.data_dir, val_fraction=config.val_fraction,
                            split_seed=config.seed, download=config.download, image_size=config.image_size,
                            train_subset=config.train_subset, progress=progress)
    if device.type == "cpu" and config.noise:
        from .. import _kernels
        _kernels.get()  # build (or load) the fused kernels now, with a message, not inside the first step
    model = build_for(config, data.in_channels, data.num_classes).to(device)
    return _Run(config=config, output=output, device=device, dist=dist, log=log if dist.is_main else _silent,
                progress=progress and dist.is_main, data=data, model=model,
                optimizer=engine_optimizer(model, config, len(data.train)), forward=model,
                example=data.train.tensors[0][:2].to(device),
                diverge_above=divergence_bound(model, data.train, device), criterion=_criterion(config),
                prune_epochs=_prune_epochs(config))


def _start_or_resume(run: _Run, resume: bool) -> None:
    """Continue from the run folder's checkpoint (``resume``), or check that there is none to overwrite."""
    ckpt_path = run.output / CHECKPOINT
    if (run.output / METRICS).exists() and not ckpt_path.exists():
        raise ConfigError(f"{run.output} holds a finished run (metrics.json) without its checkpoint; choose another "
                          "--output, or delete metrics.json to train there again")
    if resume and ckpt_path.exists():
        state, run.model, run.optimizer = restore(ckpt_path, run.config, run.model, run.example, len(run.data.train))
        resume_threads(state.get("threads"), run.config.threads, run.log)
        run.start, run.history = state["epoch"] + 1, state["history"]
        run.best = {"val_accuracy": state["best_val_accuracy"], "epoch": state["best_epoch"],
                    "state": state["best_state"]}
        run.log(f"resuming {run.output} after epoch {state['epoch']}")
    elif ckpt_path.exists() and not resume:
        raise ConfigError(f"{run.output} already holds a run; pass --resume to continue it or choose another --output")
    run.dist.barrier()  # no rank may see a checkpoint that rank 0 writes before all have looked
    run.forward = run.dist.wrap(run.model, run.device)


def _run_epoch(run: _Run, epoch: int) -> None:
    """Train one epoch, prune (and shrink) when it is a pruning epoch, validate, keep the best, checkpoint."""
    config, model = run.config, run.model
    frozen = config.finetune == "deterministic" and epoch > config.epochs
    if frozen and run.dist.active and any(p.requires_grad for _, n in noise_layers(model) for p in n.parameters()):
        # DDP expects a gradient for every parameter that requires one: the frozen noise gets none
        for _, noise in noise_layers(model):
            noise.requires_grad_(False)
        run.forward = run.dist.wrap(model, run.device)
    torch.manual_seed(epoch_seed(config.seed, epoch))
    generator = torch.Generator().manual_seed(epoch_seed(config.seed, epoch))
    t0 = time.perf_counter()
    try:
        stats = train_epoch(model, run.optimizer, run.data.train, batch_size=config.batch_size, generator=generator,
                            kl_reduction=config.kl_reduction, kl_weight=config.kl_weight, device=run.device,
                            progress=run.progress, desc=f"epoch {epoch}/{config.total_epochs}", dist=run.dist,
                            forward=run.forward, freeze_noise=frozen, diverge_above=run.diverge_above)
    except TrainingError as err:
        kept = (f"{run.output / CHECKPOINT} keeps epoch {epoch - 1}" if (run.output / CHECKPOINT).exists()
                else "nothing was saved")
        raise TrainingError(f"{err}; {kept}: start again with other settings in a new --output (or delete "
                            f"{run.output})") from None
    seconds = time.perf_counter() - t0
    record = {"epoch": epoch, "seconds": seconds, **{f"train_{k}": v for k, v in stats.items()}}
    prune_epochs = run.prune_epochs
    if epoch in prune_epochs:
        t1 = time.perf_counter()
        record.update(_prune_step(model, run.criterion, config, prune_epochs.index(epoch), run.data, run.device))
        run.dist.broadcast_masks(model)
        # shrink when masks changed since the last shrink (read after the broadcast: same on every rank)
        if config.shrink and _masked_in_place(model) > run.masked_after_shrink:
            run.model, run.optimizer = shrink(model, run.example, run.optimizer)
            run.forward = run.dist.wrap(run.model, run.device)
            run.masked_after_shrink = _masked_in_place(run.model)
        record["prune_seconds"] = time.perf_counter() - t1
    _validate_and_checkpoint(run, epoch, record, stats, seconds)


def _validate_and_checkpoint(run: _Run, epoch: int, record: dict, stats: dict, seconds: float) -> None:
    """Validate the epoch's network, keep it if it is the best eligible one, write the checkpoint, log a line."""
    config, model = run.config, run.model
    run.dist.check_agreement(model, f"epoch {epoch}")
    val = evaluate(model, run.data.val, device=run.device)
    record["val_accuracy"] = val["accuracy"]
    record["structures_pruned"] = structure_counts(model).pruned if noise_layers(model) else 0
    run.history.append(record)
    eligible_from = run.prune_epochs[-1] if run.prune_epochs else 1
    if epoch >= eligible_from and val["accuracy"] > run.best["val_accuracy"]:
        run.best = {"val_accuracy": val["accuracy"], "epoch": epoch,
                    "state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
    if run.dist.is_main:
        save_checkpoint(run.output / CHECKPOINT, {
            "config": config.to_dict(), "epoch": epoch, "history": run.history,
            "model": model.state_dict(), "optimizer": run.optimizer.state_dict(),
            "best_val_accuracy": run.best["val_accuracy"], "best_epoch": run.best["epoch"],
            "best_state": run.best["state"],
            "threads": torch.get_num_threads(),  # CPU kernels sum in thread-dependent order: resume alike
        })
    run.log(f"epoch {epoch:>3}/{config.total_epochs}  loss {stats['loss']:.4f}  train acc {stats['accuracy']:.4f}"
            f"  val acc {val['accuracy']:.4f}  pruned {record['structures_pruned']}  ({seconds:.1f}s)")


def _silent(_message: str) -> None:
    pass


def finish(config, output: Path, model: nn.Module, best: dict, history: list, data, device, log) -> dict:
    """Test the best checkpoint, compact it, save models and metrics.json."""
    from ..compaction import CompactionWarning, compact, compression_report

    model.load_state_dict(best["state"])
    model.eval()
    test = evaluate(model, data.test, device=device)
    example = data.test.tensors[0][:2].to(device)
    metrics = {
        "test_accuracy": test["accuracy"],
        "test_top5_accuracy": test["top5_accuracy"],
        "val_accuracy": best["val_accuracy"],
        "best_epoch": best["epoch"],
        "epoch_seconds": sum(h["seconds"] for h in history) / max(len(history), 1),
    }
    if noise_layers(model):
        counts = structure_counts(model)
        with warnings.catch_warnings(record=True) as caught:  # said as a note line, not a Python warning
            warnings.simplefilter("always", CompactionWarning)
            compacted = compact(model, example, fast_layers=True)  # (evaluated below: fast CPU inference)
        for warning in caught:
            if issubclass(warning.category, CompactionWarning):
                log(f"note: {warning.message}")
            else:
                warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
        # "before" is the network as built: a shrunk model has already lost what it pruned
        full = build_for(config, data.in_channels, data.num_classes).to(device)
        sizes = compression_report(full, compacted, example)
        compact_test = evaluate(compacted, data.test, device=device)
        metrics.update({
            "structures_pruned_pct": counts.pruned_pct,
            "structures_pruned": counts.pruned,
            "structures": counts.structures,
            "parameter_compression_pct": sizes["parameter_compression_pct"],
            "flops_removed_pct": sizes["flops_removed_pct"],
            "params_before": sizes["params_before"], "params_after": sizes["params_after"],
            "flops_before": sizes["flops_before"], "flops_after": sizes["flops_after"],
            "compacted_test_accuracy": compact_test["accuracy"],
            "layers": counts.as_dict()["layers"],
        })
        save(compacted, output / COMPACT_MODEL, builder=builder_for(config, data.in_channels, data.num_classes))
    else:
        metrics.update({"structures_pruned_pct": 0.0, "parameter_compression_pct": 0.0, "flops_removed_pct": 0.0})
    save_state_dict(output / MASKED_MODEL, model.state_dict())
    if config.prunes:
        metrics["decision_rule"] = criterion_label(config)
    metrics["data"] = {"in_channels": data.in_channels, "num_classes": data.num_classes,
                       "source": getattr(data, "source", "") or "given by the caller"}
    metrics["config"] = config.to_dict()
    metrics["history"] = history
    write_json(output / METRICS, metrics)
    plot_history(history, metrics.get("structures", 0), output / "history.png",
                 f"{config.model} on {config.dataset}, {criterion_label(config)}")
    write_json(output / "config.json", config.to_dict())
    log(f"test accuracy {metrics['test_accuracy']:.4f} (top-5 {metrics['test_top5_accuracy']:.4f}), "
        f"structures pruned {metrics['structures_pruned_pct']:.1f}%, parameters removed "
        f"{metrics['parameter_compression_pct']:.1f}%, FLOPs removed {metrics['flops_removed_pct']:.1f}%")
    if config.prunes and metrics["structures_pruned_pct"] == 0.0:
        log(f"note: {nothing_pruned_reason(model, criterion_label(config))}")
    log(f"results: {output / METRICS}")
    return metrics
