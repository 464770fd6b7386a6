"""Which module feeds which in a model's forward, read from a ``torch.fx`` symbolic trace.

``attach``'s default policy needs two facts about data flow: which Conv/Linear layers produce the
model's output (they get no noise) and which module alone consumes a layer's output (a BatchNorm or
activation after it). Registration order gives both for an ``nn.Sequential`` but not for a model whose
head is registered before its body, or whose norms are registered after all its convolutions.  Models
that ``torch.fx`` cannot trace (control flow on tensor values, for one) give None: the caller then
falls back to registration order.  The trace runs on a copy, so a forward that stores what it sees on
the module leaves the model untouched.

Examples:
    >>> import torch
    >>> class HeadFirst(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.head, self.body, self.act = torch.nn.Linear(8, 2), torch.nn.Linear(4, 8), torch.nn.ReLU()
    ...     def forward(self, x):
    ...         return self.head(self.act(self.body(x)))
    >>> flow = module_flow(HeadFirst(), (torch.nn.Linear,))
    >>> sorted(flow.output_layers), flow.follower["body"], flow.source["act"]
    (['head'], 'act', 'body')
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field

from torch import fx, nn

__all__ = ["Flow", "module_flow"]


@dataclass
class Flow:
    """Module names (as ``named_modules`` gives them) and how data passes between them."""

    # layers whose output reaches the model's through operations on that one tensor alone (a residual sum
    # or a concatenation hides which layer is "the output layer": none is listed behind one)
    output_layers: set[str] = field(default_factory=set)
    follower: dict[str, str] = field(default_factory=dict)  # module → the one module that alone consumes its output
    source: dict[str, str] = field(default_factory=dict)  # module → the one module whose output alone it takes


class _LeafTracer(fx.Tracer):
    """Traces into every module with children (PyTorch's own containers and layers too, as
    ``nn.TransformerEncoderLayer``), so that the layers inside show up as calls."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return not m._modules or isinstance(m, nn.MultiheadAttention)


def _trace(model: nn.Module) -> fx.Graph | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _LeafTracer().trace(copy.deepcopy(model))
    except Exception:  # noqa: BLE001 — any failure to trace means "unknown", never an error for the caller
        return None


def _only_partner(nodes: list[fx.Node], partners: list[list[fx.Node]], name_of: dict, calls: dict) -> str | None:
    """The module each of ``nodes`` has as its one partner (user or input), if the same for all of them and
    run only there; else None."""
    if not all(len(p) == 1 for p in partners):
        return None
    names = {name_of.get(p[0]) for p in partners}
    if len(names) != 1 or None in names:
        return None
    (name,) = names
    return name if len(calls[name]) == len(nodes) else None


def module_flow(model: nn.Module, layers: tuple[type, ...]) -> Flow | None:
    """The data flow between ``model``'s modules, where ``layers`` (e.g. Conv/Linear) are the modules
    whose outputs count as the model's own output when nothing but other operations lies between; None
    when the model cannot be traced symbolically."""
    graph = _trace(model)
    if graph is None:
        return None
    by_path = dict(model.named_modules(remove_duplicate=False))
    canonical = {id(module): name for name, module in model.named_modules()}  # a shared module's first name
    name_of = {node: canonical.get(id(by_path.get(node.target))) for node in graph.nodes if node.op == "call_module"}
    calls: dict[str, list[fx.Node]] = {}
    for node, name in name_of.items():
        if name is not None:
            calls.setdefault(name, []).append(node)
    flow = Flow()
    pending, seen = [node for node in graph.nodes if node.op == "output"], set()
    while pending:  # back from the output through operations on one tensor, stopping at the layers
        for source in pending.pop().all_input_nodes:
            if source in seen:
                continue
            seen.add(source)
            if source.op == "call_module" and isinstance(by_path.get(source.target), layers):
                flow.output_layers.add(name_of[source])
            elif len(source.all_input_nodes) == 1:  # (not past a sum or concatenation of several)
                pending.append(source)
    for name, nodes in calls.items():
        # a module run in several places (shared) counts when every run of it feeds, or is fed by, a run of
        # the same module, and that module runs nowhere else
        follower = _only_partner(nodes, [list(node.users) for node in nodes], name_of, calls)
        if follower is not None:
            flow.follower[name] = follower
        source = _only_partner(nodes, [node.all_input_nodes for node in nodes], name_of, calls)
        if source is not None:
            flow.source[name] = source
    return flow
