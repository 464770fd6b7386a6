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


def _train(config: TrainConfig, output: str | Path, resume: bool, progress: bool, log: Callable[[str], None],
           data) -> dict:
    from ..data import load_dataset

    device = resolve_device(config.device)
    dist = setup_distributed(device)
    if dist.active and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    if dist.is_main:
        check_writable(output)
        remove_stale_temporaries(output)  # half-written files of a process killed mid-write
    output = Path(output)
    if not dist.is_main:
        log = _silent
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
    diverge_above = divergence_bound(model, data.train, device)  # from the untrained network (same on resume)
    example = data.train.tensors[0][:2].to(device)  # traces the network when shrinking it
    optimizer = engine_optimizer(model, config, len(data.train))
    criterion = _criterion(config)
    prune_epochs = _prune_epochs(config)
    eligible_from = prune_epochs[-1] if prune_epochs else 1

    ckpt_path = output / CHECKPOINT
    start, history = 1, []
    best = {"val_accuracy": -1.0, "epoch": 0, "state": None}
    if (output / METRICS).exists() and not ckpt_path.exists():
        raise ConfigError(f"{output} holds a finished run (metrics.json) without its checkpoint; choose another "
                          "--output, or delete metrics.json to train there again")
    if resume and ckpt_path.exists():
        state, model, optimizer = restore(ckpt_path, config, model, example, len(data.train))
        resume_threads(state.get("threads"), config.threads, log)
        start, history = state["epoch"] + 1, state["history"]
        best = {"val_accuracy": state["best_val_accuracy"], "epoch": state["best_epoch"],
                "state": state["best_state"]}
        log(f"resuming {output} after epoch {state['epoch']}")
    elif ckpt_path.exists() and not resume:
        raise ConfigError(f"{output} already holds a run; pass --resume to continue it or choose another --output")
    dist.barrier()  # no rank may see a checkpoint that rank 0 writes before all have looked
    forward = dist.wrap(model, device)
    masked_after_shrink = 0  # masked structures that a shrink left in place (it may keep some)

    for epoch in range(start, config.total_epochs + 1):
        frozen = config.finetune == "deterministic" and epoch > config.epochs
        if frozen and dist.active and any(p.requires_grad for _, n in noise_layers(model) for p in n.parameters()):
            # DDP expects a gradient for every parameter that requires one: the frozen noise gets none
            for _, noise in noise_layers(model):
                noise.requires_grad_(False)
            forward = dist.wrap(model, device)
        torch.manual_seed(epoch_seed(config.seed, epoch))
        generator = torch.Generator().manual_seed(epoch_seed(config.seed, epoch))
        t0 = time.perf_counter()
        try:
            stats = train_epoch(model, optimizer, data.train, batch_size=config.batch_size, generator=generator,
                                kl_reduction=config.kl_reduction, kl_weight=config.kl_weight, device=device,
                                progress=progress and dist.is_main, desc=f"epoch {epoch}/{config.total_epochs}",
                                dist=dist, forward=forward, freeze_noise=frozen, diverge_above=diverge_above)
        except TrainingError as err:
            kept = (f"{output / CHECKPOINT} keeps epoch {epoch - 1}" if ckpt_path.exists() else "nothing was saved")
            raise TrainingError(f"{err}; {kept}: start again with other settings in a new --output (or delete "
                                f"{output})") from None
        seconds = time.perf_counter() - t0
        record = {"epoch": epoch, "seconds": seconds, **{f"train_{k}": v for k, v in stats.items()}}
        if epoch in prune_epochs:
            t1 = time.perf_counter()
            record.update(_prune_step(model, criterion, config, prune_epochs.index(epoch), data, device))
            dist.broadcast_masks(model)
            # shrink when masks changed since the last shrink (read after the broadcast: same on every rank)
            if config.shrink and _masked_in_place(model) > masked_after_shrink:
                model, optimizer = shrink(model, example, optimizer)
                forward = dist.wrap(model, device)
                masked_after_shrink = _masked_in_place(model)
            record["prune_seconds"] = time.perf_counter() - t1
        dist.check_agreement(model, f"epoch {epoch}")
        val = evaluate(model, data.val, device=device)
        record["val_accuracy"] = val["accuracy"]
        record["structures_pruned"] = structure_counts(model).pruned if noise_layers(model) else 0
        history.append(record)
        if epoch >= eligible_from and val["accuracy"] > best["val_accuracy"]:
            best = {"val_accuracy": val["accuracy"], "epoch": epoch,
                    "state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
        if dist.is_main:
            save_checkpoint(ckpt_path, {
                "config": config.to_dict(), "epoch": epoch, "history": history,
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "best_val_accuracy": best["val_accuracy"], "best_epoch": best["epoch"], "best_state": best["state"],
                "threads": torch.get_num_threads(),  # CPU kernels sum in thread-dependent order: resume alike
            })
        log(f"epoch {epoch:>3}/{config.total_epochs}  loss {stats['loss']:.4f}  train acc {stats['accuracy']:.4f}"
            f"  val acc {val['accuracy']:.4f}  pruned {record['structures_pruned']}  ({seconds:.1f}s)")

    dist.barrier()
    if not dist.is_main:
        return {}
    return finish(config, output, model, best, history, data, device, log)


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
            compacted = compact(model, example)
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
