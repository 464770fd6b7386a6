"""``bmrs compact``: a finished run → compacted model file, sizes, FLOPs and CPU latency."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ConfigError
from ..io import FolderLock, remove_stale_temporaries, staged_outputs, write_json
from ..saving import save
from ..training.artifacts import load_run
from ..training.config import check_int
from ..training.run import CHECKPOINT, COMPACT_MODEL, MASKED_MODEL, METRICS, builder_for
from .timing import alternating_times

__all__ = ["compact_run"]


def compact_run(run_dir: str | Path, output: str | Path | None = None, batch_size: int = 256,
                data_dir: str | None = None, log=print, exports: tuple[str, ...] | list[str] = (),
                optimize: bool = False) -> dict:
    """Compact the run's best model; write it with ``bmrs.save`` (``model_compact.safetensors``, reloaded by
    ``bmrs.load``) and ``compact_report.json``.  The latency is measured on the compacted model as
    ``bmrs.compact`` returns it (plain torch layers), or with ``optimize`` after
    :func:`bmrs.inference.optimize` (fast CPU inference layers; the file written is the same either way).

    Examples:
        report = compact_run("runs/fashion-mnist-lenet5-bmrs-n-s0")
        report["latency_speedup_b256"]
    """
    from ..compaction import compact, compression_report, fold_noise

    check_int("batch_size", batch_size, 1, 65_536)  # (the latency batch: two inputs of this size are made)
    own = {(Path(run_dir) / f).resolve() for f in (CHECKPOINT, METRICS, MASKED_MODEL, "config.json")}
    if output is not None and {Path(output).resolve(), Path(output).with_name("compact_report.json").resolve(),
                               *(Path(output).with_suffix(f".{fmt}").resolve() for fmt in exports)} & own:
        raise ConfigError(f"--output {output} is one of the run's own files (or its report would be); name "
                          "another file")
    run = load_run(run_dir)
    size = run.config.image_size
    in_channels = run.metrics["data"]["in_channels"]
    example = torch.randn(2, in_channels, size, size)
    compacted = compact(run.model, example, fast_layers=optimize)
    # against the network as built: a --shrink run's model has already lost what it pruned
    masked = run.built_model() if run.config.shrink else run.model
    report = compression_report(masked, compacted, example)
    # latency against the same network at full size without noise layers (θ folded into the weights)
    plain = fold_noise(masked, example).eval()
    compacted.eval()
    for batch in sorted({1, batch_size}):
        x = torch.randn(batch, in_channels, size, size)
        with torch.no_grad():
            compact_ms, plain_ms, _ = alternating_times(lambda: compacted(x), lambda: plain(x), rounds=30)
        report[f"latency_plain_b{batch}_ms"] = plain_ms
        report[f"latency_compact_b{batch}_ms"] = compact_ms
        report[f"latency_speedup_b{batch}"] = plain_ms / compact_ms  # (the two medians reported)
    report["threads"] = torch.get_num_threads()
    report["optimized"] = bool(optimize)
    output = Path(output) if output else Path(run_dir) / COMPACT_MODEL
    builder = builder_for(run.config, in_channels, run.metrics["data"]["num_classes"])
    with FolderLock(output.parent, "compact"):
        remove_stale_temporaries(output.parent)  # what a killed compact (or train) left there
        _write_outputs(compacted, example, output, builder, report, exports)
    log(f"parameters {report['params_before']:,} -> {report['params_after']:,} "
        f"({report['parameter_compression_pct']:.1f}% removed); FLOPs {report['flops_removed_pct']:.1f}% removed")
    for batch in sorted({1, batch_size}):
        log(f"latency batch {batch}: {report[f'latency_plain_b{batch}_ms']:.3f} ms at full size without noise "
            f"layers -> {report[f'latency_compact_b{batch}_ms']:.3f} ms compacted "
            f"(x{report[f'latency_speedup_b{batch}']:.2f}{', fast inference layers' if optimize else ''})")
    log(f"compacted model: {output} (bmrs.load reads it back)")
    for fmt in dict.fromkeys(exports):
        done = report[f"export_{fmt}"]
        log(f"{fmt} export: {done['path']} (outputs within {done['relative_error']:.1e} of the compacted model)")
    return report


def _write_outputs(compacted, example, output: Path, builder: dict, report: dict, exports) -> None:
    """The model, its report and its exports appear together, or the previous ones stay (nothing half-made)."""
    from ..compaction import export

    with staged_outputs(output.parent) as stage:
        save(compacted, stage / output.name, builder=builder)
        for fmt in dict.fromkeys(exports):
            target = output.with_suffix(f".{fmt}")
            error = export(compacted, example, stage / target.name, fmt)
            report[f"export_{fmt}"] = {"path": str(target), "relative_error": error}
        write_json(stage / "compact_report.json", report)
