"""``bmrs compact``: a finished run → compacted model file, sizes, FLOPs and CPU latency."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ConfigError
from ..io import write_json
from ..saving import save
from ..training.artifacts import load_run
from ..training.run import CHECKPOINT, COMPACT_MODEL, MASKED_MODEL, METRICS, builder_for
from .timing import alternating_times

__all__ = ["compact_run"]


def compact_run(run_dir: str | Path, output: str | Path | None = None, batch_size: int = 256,
                data_dir: str | None = None, log=print, exports: tuple[str, ...] | list[str] = ()) -> dict:
    """Compact the run's best model; write it with ``bmrs.save`` (``model_compact.safetensors``, reloaded by
    ``bmrs.load``) and ``compact_report.json``.

    Example:
        report = compact_run("runs/fashion-mnist-lenet5-bmrs-n-s0")
        report["latency_speedup_b256"]
    """
    from ..compaction import compact, compression_report, export, fold_noise

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch size for the latency measurement must be a positive integer, got {batch_size!r}")
    if output is not None and Path(output).resolve() in {(Path(run_dir) / f).resolve() for f in
                                                          (CHECKPOINT, METRICS, MASKED_MODEL, "config.json")}:
        raise ConfigError(f"--output {output} is one of the run's own files; name another file")
    run = load_run(run_dir)
    size = run.config.image_size
    in_channels = run.metrics["data"]["in_channels"]
    example = torch.randn(2, in_channels, size, size)
    compacted = compact(run.model, example)
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
    output = Path(output) if output else Path(run_dir) / COMPACT_MODEL
    save(compacted, output, builder=builder_for(run.config, in_channels, run.metrics["data"]["num_classes"]))
    write_json(output.with_name("compact_report.json"), report)
    log(f"parameters {report['params_before']:,} -> {report['params_after']:,} "
        f"({report['parameter_compression_pct']:.1f}% removed); FLOPs {report['flops_removed_pct']:.1f}% removed")
    for batch in sorted({1, batch_size}):
        log(f"latency batch {batch}: {report[f'latency_plain_b{batch}_ms']:.3f} ms at full size without noise "
            f"layers -> {report[f'latency_compact_b{batch}_ms']:.3f} ms compacted "
            f"(x{report[f'latency_speedup_b{batch}']:.2f})")
    log(f"compacted model: {output} (bmrs.load reads it back)")
    for fmt in dict.fromkeys(exports):
        target = output.with_suffix(f".{fmt}")
        error = export(compacted, example, target, fmt)
        report[f"export_{fmt}"] = {"path": str(target), "relative_error": error}
        log(f"{fmt} export: {target} (outputs within {error:.1e} of the compacted model)")
    if exports:
        write_json(output.with_name("compact_report.json"), report)
    return report
