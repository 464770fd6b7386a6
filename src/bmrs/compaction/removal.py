"""Which masked channels can be removed exactly, and removing them with torch-pruning (used by
:func:`bmrs.compaction.plan`).

A channel is removed only when removing it provably leaves the function unchanged (see
:mod:`bmrs.compaction.compact`).  Every removal is recorded per tensor: the original indices kept along
each axis that shrank.

Examples:
    >>> import torch
    >>> layer = torch.nn.Linear(3, 2)
    >>> with torch.no_grad():
    ...     layer.weight[1] = 0
    ...     layer.bias[1] = 0
    >>> nonzero_channels(layer, "out").tolist()
    [True, False]
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from ..errors import ModelError
from .fold import OPTYPE, Folded, op_name
from .trace import Trace

# Reaching one of these keeps the channel (torch-pruning would change what they compute).
_BLOCKING_TYPES = frozenset({
    OPTYPE.LN, OPTYPE.GN, OPTYPE.IN, OPTYPE.MHA, OPTYPE.EMBED, OPTYPE.LSTM, OPTYPE.PARAMETER,
    OPTYPE.CUSTOMIZED, OPTYPE.OUTPUT, OPTYPE.EXPAND, OPTYPE.UNBIND,
})
_PASS_TYPES = frozenset({OPTYPE.RESHAPE, OPTYPE.CONCAT, OPTYPE.SPLIT, OPTYPE.SLICE})
# Channel-wise autograd ops with op(0) = 0 (a zero channel stays zero through them).
_ZERO_PRESERVING_OPS = frozenset({
    "Add", "Sub", "Mul", "Neg", "Clone", "Relu", "LeakyRelu", "Gelu", "Tanh", "Elu", "Silu", "Mish",
    "Hardtanh", "Hardswish", "Abs", "Mean", "Sum", "Squeeze", "Unsqueeze", "MaxPool1DWithIndices",
    "MaxPool2DWithIndices", "MaxPool3DWithIndices", "AvgPool2D", "AvgPool3D", "AdaptiveAvgPool2D", "AdaptiveAvgPool3D",
    "AdaptiveMaxPool2D", "AdaptiveMaxPool3D",
})
# Channel-wise ops that map 0 to something else: a channel may pass them, but is not zero after them.
_CHANNELWISE_OPS = frozenset({
    "Sigmoid", "Softplus", "Hardsigmoid", "Exp", "Div", "Pow", "Sqrt", "Rsqrt", "Log", "LogSigmoid",
    "Sin", "Cos", "Erf",
})



def remove_masked_channels(folded: Folded) -> tuple[dict[str, tuple[int, str]], dict[str, list]]:
    """Prune, noise layer by noise layer, every masked channel of ``folded.model`` whose removal is exact.

    Returns ({noise layer: (pruned structures that stay, why)} for the layers where some stay,
    {tensor name: per axis the original indices kept, or None where the axis is whole}) for the tensors
    that shrank.  Raises :class:`bmrs.errors.ModelError` naming the noise layer if torch-pruning fails."""
    trace = folded.trace
    records = [rec for rec in folded.records if rec.carrier is not None]
    # original channel number of each current position of every gated node (pruning shifts positions)
    kept = {rec.carrier: list(range(rec.theta.numel())) for rec in records}
    masked = {rec.name: set((rec.theta == 0).nonzero().flatten().tolist()) for rec in records}
    recorder = _Recorder(folded.model)
    for rec in records:
        if rec.carrier.type in _BLOCKING_TYPES:
            continue
        positions = [pos for pos, orig in enumerate(kept[rec.carrier]) if orig in masked[rec.name]]
        if not positions:
            continue
        try:
            _prune(trace, rec.carrier, positions, kept, recorder)
        except ModelError:
            raise
        except Exception as err:  # torch-pruning failed on this graph: say where, never fall back silently
            raise ModelError(f"compact: torch-pruning failed removing the channels pruned by noise layer "
                             f"{rec.name or '<root>'!r} ({type(err).__name__}: {err}); please report it with "
                             "the model, or set that layer's mask to ones (bmrs.noise_layers) to keep its "
                             "channels") from err
    stayed = {}
    for rec in records:
        left = len(masked[rec.name] & set(kept[rec.carrier]))
        if left:
            why = (f"they are read by a {rec.carrier.type.name}" if rec.carrier.type in _BLOCKING_TYPES else
                   "their channels also reach a residual sum an unpruned layer writes, a normalisation over "
                   "channels or the model's output, or removing them would empty a layer")
            stayed[rec.name or "<root>"] = (left, why)
    return stayed, recorder.result()


class _Recorder:
    """Per tensor (by name), the original index of each current position along every axis that shrank."""

    def __init__(self, model: nn.Module):
        self.names = {id(module): name for name, module in model.named_modules()}
        self.kept: dict[str, list] = {}

    def prune(self, dep, idxs: list[int]) -> None:
        """Run one dependency of a pruning group and record what it removed."""
        module = dep.target.module
        prefix = self.names.get(id(module))
        tensors = (lambda: {}) if prefix is None else (lambda: dict(
            [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]))
        before = {name: tuple(t.shape) for name, t in tensors().items()}
        dep(idxs)
        removed = sorted(set(int(i) for i in idxs))
        for name, tensor in tensors().items():
            old, new = before.get(name), tuple(tensor.shape)
            if old is None or old == new:
                continue
            key = f"{prefix}.{name}" if prefix else name
            axes = self.kept.setdefault(key, [None] * len(old))
            for axis, (a, b) in enumerate(zip(old, new)):
                if a == b:
                    continue
                if a - b != len(removed) or (removed and removed[-1] >= a):
                    raise ModelError(f"compact: cannot tell which elements of {key} torch-pruning kept "
                                     f"(axis {axis}: {a} → {b} after removing {len(removed)}); please report it")
                current = axes[axis] if axes[axis] is not None else list(range(a))
                drop = set(removed)
                axes[axis] = [orig for pos, orig in enumerate(current) if pos not in drop]

    def result(self) -> dict[str, list]:
        return {name: [None if ax is None else torch.tensor(ax, dtype=torch.long) for ax in axes]
                for name, axes in self.kept.items()}


def _prune(trace: Trace, node, positions: list[int], kept: dict, recorder: _Recorder) -> None:
    graph = trace.graph
    pruning_fn = graph.get_pruner_of_module(node.module).prune_out_channels
    group = graph.get_pruning_group(node.module, pruning_fn, positions)
    removable = sorted(_removable_roots(trace, group))
    while removable:
        group = graph.get_pruning_group(node.module, pruning_fn, removable)
        if graph.check_pruning_group(group):
            break
        removable = removable[:-1]  # some layer would be left empty: keep one (all-zero) channel
    if not removable:
        return
    for dep, idxs in group:  # group.prune(), one dependency at a time, recording what each removes
        recorder.prune(dep, idxs)
    for item in group:
        target = item.dep.target
        if target in kept and graph.is_out_channel_pruning_fn(item.dep.handler):
            drop = set(item.idxs)
            kept[target] = [orig for pos, orig in enumerate(kept[target]) if pos not in drop]


# -- when is removing a channel exact? ------------------------------------------------------------
def _removable_roots(trace: Trace, group) -> set[int]:
    """Root channels of the group whose removal leaves every reader of the channel unchanged."""
    graph = trace.graph
    produced: dict = defaultdict(lambda: defaultdict(list))  # node → root → output positions
    consumed: dict = defaultdict(lambda: defaultdict(list))  # Conv/Linear node → root → input columns
    for item in group:
        table = produced if graph.is_out_channel_pruning_fn(item.dep.handler) else consumed
        for idx, root in zip(item.idxs, item.root_idxs):
            table[item.dep.target][root].append(idx)
    zeros = _ZeroAnalysis(trace, produced)
    roots = {root for table in (produced, consumed) for per in table.values() for root in per}
    return {root for root in roots if _root_removable(trace, zeros, produced, consumed, root)}


def _root_removable(trace: Trace, zeros: "_ZeroAnalysis", produced: dict, consumed: dict, root: int) -> bool:
    writers = [node for node, per in produced.items() if root in per and node.grad_fn not in trace.owner]
    readers = [node for node, per in consumed.items() if root in per and node.grad_fn not in trace.owner]
    if any(node.grad_fn in trace.output_fns for node in writers):
        return False  # the channel is part of the model's output
    if any(_blocks(trace, node) for node in writers + readers):
        return False
    return all(_reader_ignores(trace, zeros, node, per[root], root)
               for node, per in consumed.items() if root in per)


def _blocks(trace: Trace, node) -> bool:
    """Whether this node makes a channel through it unremovable."""
    if node.type in _BLOCKING_TYPES:
        return True
    if trace.is_module_node(node) and trace.calls[node.module].calls != 1:
        return True
    if node.type == OPTYPE.CONV and node.module.groups > 1:
        return True  # torch-pruning does not map input channels of grouped convolutions correctly
    if node.type == OPTYPE.ELEMENTWISE:
        return op_name(node.grad_fn) not in _ZERO_PRESERVING_OPS | _CHANNELWISE_OPS
    return False


def _reader_ignores(trace: Trace, zeros: "_ZeroAnalysis", node, columns: list[int], root: int) -> bool:
    """A Conv/Linear ignores input channel ``root``: its columns are zero or it reads exact zeros."""
    if node.type not in (OPTYPE.CONV, OPTYPE.LINEAR) or not trace.is_module_node(node):
        return False
    if zeros.channels_zero(node.module, columns, "in"):
        return True
    source = trace.input_node(node.module)
    return source is not None and zeros.is_zero(source, root)


@torch.no_grad()
def nonzero_channels(layer: nn.Module, side: str) -> torch.Tensor:
    """One flag per output (weights or bias) or input channel of a Conv/Linear: has a non-zero weight."""
    weight = layer.weight != 0  # NaN counts as non-zero
    if isinstance(layer, nn.Linear):
        flags = weight.any(dim=1) if side == "out" else weight.any(dim=0)
    elif (side == "out") != layer.transposed:  # the channel is weight dim 0
        flags = weight.flatten(1).any(dim=1)
    else:  # the channel is weight dim 1 within each group
        groups, rows, cols = layer.groups, weight.shape[0], weight.shape[1]
        flags = weight.reshape(groups, rows // groups, cols, -1).any(dim=3).any(dim=1).flatten()
    if side == "out" and layer.bias is not None:
        flags = flags | (layer.bias != 0)
    return flags


def _bias_zero(layer: nn.Module, idxs: list[int]) -> bool:
    return layer.bias is None or not torch.count_nonzero(layer.bias.detach()[idxs])


def _norm_zero(norm: nn.Module, idxs: list[int]) -> bool:
    """γ = β = 0: the BatchNorm outputs exact zeros on these channels whatever its input."""
    if norm.weight is None or norm.bias is None:
        return False
    return not torch.count_nonzero(norm.weight.detach()[idxs]) and not torch.count_nonzero(norm.bias.detach()[idxs])


class _ZeroAnalysis:
    """Is a node's output exactly zero on the channel of a given root, for every input?"""

    def __init__(self, trace: Trace, produced: dict):
        self.trace, self.produced, self.memo, self.flags = trace, produced, {}, {}

    def channels_zero(self, layer: nn.Module, idxs: list[int], side: str) -> bool:
        """Whether these channels of a Conv/Linear have all-zero weights (and bias, for outputs)."""
        key = (layer, side)
        if key not in self.flags:
            self.flags[key] = nonzero_channels(layer, side)
        return not bool(self.flags[key][idxs].any())

    def is_zero(self, node, root: int) -> bool:
        key = (node, root)
        if key not in self.memo:
            self.memo[key] = False  # a cycle is never proof of zero
            self.memo[key] = self._compute(node, root)
        return self.memo[key]

    def _compute(self, node, root: int) -> bool:
        idxs = self.produced.get(node, {}).get(root)
        if idxs is None or node.grad_fn in self.trace.owner:
            return False
        kind, module = node.type, node.module
        if kind in (OPTYPE.CONV, OPTYPE.LINEAR):
            return self.trace.is_module_node(node) and self.channels_zero(module, idxs, "out")
        if kind == OPTYPE.DEPTHWISE_CONV:
            if self.channels_zero(module, idxs, "out"):
                return True
            return _bias_zero(module, idxs) and self._inputs_zero(node, root, True)
        if kind == OPTYPE.BN:
            return _norm_zero(module, idxs)
        if kind == OPTYPE.PRELU:
            return self._inputs_zero(node, root, True)
        if kind in _PASS_TYPES:
            return self._inputs_zero(node, root, False)
        if kind == OPTYPE.ELEMENTWISE and op_name(node.grad_fn) in _ZERO_PRESERVING_OPS:
            return self._inputs_zero(node, root, True, any_zero=op_name(node.grad_fn) == "Mul")
        return False

    def _inputs_zero(self, node, root: int, every: bool, any_zero: bool = False) -> bool:
        """All inputs carrying the channel are zero on it (``every``: and every input carries it;
        ``any_zero``: one zero factor suffices, for products)."""
        if self.trace.is_module_node(node):
            fns = list(self.trace.calls[node.module].in_fns)
        else:
            fns = [fn for fn, _ in node.grad_fn.next_functions]
        inputs = [self.trace.node_of.get(fn) if fn is not None else None for fn in fns]
        if not inputs or any(inp is None for inp in inputs):
            return False  # an input without history (model input, constant) or a parameter
        carrying = [inp for inp in inputs if root in self.produced.get(inp, {})]
        if not carrying or (every and len(carrying) != len(inputs)):
            return False
        if any_zero:
            return any(self.is_zero(inp, root) for inp in carrying)
        return all(self.is_zero(inp, root) for inp in carrying)
