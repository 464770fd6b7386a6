"""Count a model's parameters and operations, and how much compaction saved.

``macs`` is torch-pruning's operation count per example (``tp.utils.count_ops_and_params``, divided by
the batch size): multiply-accumulates of Conv/Linear/MultiheadAttention modules plus one operation per
element for activation, normalisation and pooling modules.  Operations written as plain functions
(``torch.matmul``, ``F.relu`` …) are not counted, and noise layers count zero.

Examples:
    >>> import torch, bmrs
    >>> from bmrs.compaction import count
    >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    >>> stats = count(bmrs.attach(mlp), torch.randn(2, 4))
    >>> stats["params"]                    # 4·8 + 8 + 8·3 + 3: noise-layer mu / log_sigma not counted
    67
    >>> stats["flops"] == 2 * stats["macs"]
    True
"""

from __future__ import annotations

import contextlib
import io
import threading
from typing import Any

import torch
import torch_pruning as tp
from torch_pruning.utils import op_counter
from torch import nn

from ..errors import ModelError
from ..nn.mha import HeadedMultiheadAttention
from ..nn.noise import MultiplicativeNoise
from .fold import plain_inputs

__all__ = ["count", "compression_report", "count_params"]


def count_params(model: nn.Module) -> int:
    """Number of model parameters (each shared tensor once), noise-layer parameters excluded."""
    noise = {id(p) for m in model.modules() if isinstance(m, MultiplicativeNoise) for p in m.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in noise)


def count(model: nn.Module, example_inputs: Any) -> dict[str, int]:
    """``{"params", "macs", "flops"}`` of ``model`` on ``example_inputs``; flops = 2·macs, per example.

    Examples:
        >>> import torch
        >>> from bmrs.compaction import count
        >>> count(torch.nn.Linear(10, 5), torch.randn(1, 10))
        {'params': 55, 'macs': 55, 'flops': 110}
    """
    if not isinstance(model, nn.Module):
        raise ModelError(f"count: expected an nn.Module, got {type(model).__name__}")
    example_inputs = plain_inputs(example_inputs)
    with _custom_counters(model), contextlib.redirect_stdout(io.StringIO()):  # (its note on keyword inputs)
        ops, _ = tp.utils.count_ops_and_params(model, example_inputs)
    if isinstance(example_inputs, dict):  # torch-pruning divides by the batch only for positional inputs
        first = next((t for t in example_inputs.values() if isinstance(t, torch.Tensor) and t.dim()), None)
        ops = float(ops) / (first.shape[0] if first is not None and first.shape[0] else 1)
    macs = int(round(float(ops)))
    return {"params": count_params(model), "macs": macs, "flops": 2 * macs}


def _headed_attention_macs(module: HeadedMultiheadAttention, inputs, output) -> None:
    """torch-pruning counter hook for :class:`~bmrs.nn.mha.HeadedMultiheadAttention`: its query/key/value
    projections (to the heads it has), the attention of each head and the output projection (the counter
    does not descend into a module it counts)."""
    query, key = inputs[0], inputs[1]
    length_axis = 1 if module.batch_first and query.dim() == 3 else 0
    batch = query.shape[0 if length_axis == 1 else 1] if query.dim() == 3 else 1
    queries, keys = query.shape[length_axis], key.shape[length_axis]
    inner = module.num_heads * module.head_dim
    projections = queries * query.shape[-1] * inner + keys * (key.shape[-1] + inputs[2].shape[-1]) * inner
    attention = module.num_heads * queries * keys * (2 * module.head_dim + 1)
    out = queries * inner * module.out_proj.out_features
    module.__flops__ += int((projections + attention + out) * batch)


_COUNTING = threading.Lock()  # torch-pruning's table of custom counters is one per process


@contextlib.contextmanager
def _custom_counters(model: nn.Module):
    """Within the block, torch-pruning's counter counts a subclass of a torch layer (e.g.
    :class:`~bmrs.inference.NarrowConv2d`) as that layer, and a :class:`~bmrs.nn.mha.HeadedMultiheadAttention`
    by :func:`_headed_attention_macs`; the table it had before is restored after.

    torch-pruning 1.6 looks modules up by exact type and has no argument for custom counters:
    ``count_ops_and_params`` reads the module-level ``op_counter.CUSTOM_MODULES_MAPPING`` (and empties it
    when it returns).  That table is set here for one count, under a lock, and put back even if counting fails.
    """
    known = op_counter.MODULES_MAPPING
    custom = {HeadedMultiheadAttention: _headed_attention_macs}
    for module in model.modules():
        kind = type(module)
        if kind not in known and kind not in custom and not isinstance(module, MultiplicativeNoise):
            base = next((b for b in kind.__mro__[1:] if b in known), None)
            if base is not None:
                custom[kind] = known[base]
    with _COUNTING:
        before = op_counter.CUSTOM_MODULES_MAPPING
        op_counter.CUSTOM_MODULES_MAPPING = custom
        try:
            yield
        finally:
            op_counter.CUSTOM_MODULES_MAPPING = before


def _removed_pct(before: float, after: float) -> float:
    return 100.0 * (1.0 - after / before) if before else 0.0


def compression_report(before_model: nn.Module, after_model: nn.Module, example_inputs: Any) -> dict[str, float]:
    """Parameters and FLOPs before and after, and the percentage of each removed.

    ``parameter_compression_pct`` = 100·(1 − params_after / params_before), likewise
    ``flops_removed_pct`` for FLOPs.

    Examples:
        >>> import torch
        >>> from bmrs.compaction import compression_report
        >>> x = torch.randn(1, 10)
        >>> report = compression_report(torch.nn.Linear(10, 4), torch.nn.Linear(10, 2), x)
        >>> report["params_before"], report["params_after"], report["parameter_compression_pct"]
        (44, 22, 50.0)
    """
    before, after = count(before_model, example_inputs), count(after_model, example_inputs)
    return {
        "params_before": before["params"],
        "params_after": after["params"],
        "parameter_compression_pct": _removed_pct(before["params"], after["params"]),
        "macs_before": before["macs"],
        "macs_after": after["macs"],
        "flops_before": before["flops"],
        "flops_after": after["flops"],
        "flops_removed_pct": _removed_pct(before["flops"], after["flops"]),
    }
