"""Tracing a model for compaction: torch-pruning's dependency graph plus how each module was called
(:class:`Trace`, used by folding and by ``compact``), and helpers on example inputs and outputs.

Examples:
    >>> import torch
    >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    >>> trace = Trace(mlp, torch.randn(2, 4))
    >>> trace.calls[mlp[0]].calls, trace.label(trace.module_node(mlp[2]))
    (1, "Linear '2'")
    >>> output_mismatch(torch.ones(3), torch.ones(3))
    0.0
"""

from __future__ import annotations

from collections.abc import Mapping
import re
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch_pruning as tp
from torch import Tensor, nn

__all__ = ["Trace", "ModuleCall", "plain_inputs", "output_mismatch", "op_name", "map_floating", "OPTYPE"]

OPTYPE = tp.ops.OPTYPE


def plain_inputs(inputs: Any) -> Any:
    """Example inputs as torch-pruning takes them: any mapping (a tokenizer's ``BatchEncoding``) as a dict.

    Examples:
        >>> from collections import UserDict
        >>> type(plain_inputs(UserDict(input_ids=1))).__name__
        'dict'
    """
    if isinstance(inputs, Mapping) and not isinstance(inputs, dict):
        return dict(inputs)
    return inputs


def _forward(model: nn.Module, inputs: Any):
    """Call the model the way torch-pruning does: dict → **kwargs, tuple/list → *args, else one arg."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _tensors(obj: Any) -> list[Tensor]:
    """Every tensor in a (nested) tensor / tuple / list / dict, in order."""
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for item in obj for t in _tensors(item)]
    if isinstance(obj, dict):
        return [t for item in obj.values() for t in _tensors(item)]
    return []


def output_mismatch(got: Any, want: Any) -> float:
    """max|got − want| / max|want| over every output tensor (inf if the structures differ)."""
    got, want = _tensors(got), _tensors(want)
    if len(got) != len(want) or any(g.shape != w.shape for g, w in zip(got, want)):
        return float("inf")
    scale = max([w.detach().abs().max().item() for w in want if w.numel()] + [1e-12])
    diff = max([(g.detach() - w.detach()).abs().max().item() for g, w in zip(got, want) if w.numel()] + [0.0])
    return diff / scale


def op_name(grad_fn) -> str:
    """'MaxPool2DWithIndicesBackward0' → 'MaxPool2DWithIndices'."""
    return re.sub(r"Backward\d*$", "", grad_fn.name()) if grad_fn is not None else ""



def map_floating(obj: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """The same nested tuples/lists/dicts with ``fn`` applied to every floating-point tensor."""
    if isinstance(obj, Tensor):
        return fn(obj) if obj.is_floating_point() else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(map_floating(item, fn) for item in obj)
    if isinstance(obj, dict):
        return {key: map_floating(item, fn) for key, item in obj.items()}
    return obj


@dataclass
class ModuleCall:
    """How a module was called while tracing (first call only, plus the number of calls)."""

    calls: int = 0
    in_fns: tuple = ()          # grad_fn of every tensor argument (None for inputs without autograd history)
    out_fn: Any = None          # grad_fn of the (first) output tensor
    out_ndim: int | None = None


class Trace:
    """torch-pruning's DependencyGraph of a model plus how each module was called while tracing it.

    ``graph``: the DependencyGraph; ``calls[module]``: a :class:`ModuleCall`; ``node_of[grad_fn]``: the
    graph node computing that autograd function; ``owner[grad_fn]``: the Conv/Linear/… node whose own
    forward contains that function (e.g. the reshape and ``addmm`` inside a Linear on a 3-D input);
    ``output_fns``: the autograd functions producing the model's outputs.
    """

    def __init__(self, model: nn.Module, example_inputs: Any):
        self.calls: dict[nn.Module, ModuleCall] = {}
        self.names = {module: name for name, module in model.named_modules()}
        self.output_fns: set = set()  # grad_fns of the model's output tensors
        handles = []
        for module in model.modules():
            handles.append(module.register_forward_pre_hook(self._before, with_kwargs=True))
            handles.append(module.register_forward_hook(self._after))
        try:
            with torch.enable_grad():
                self.graph = tp.DependencyGraph().build_dependency(
                    model, example_inputs=example_inputs, forward_fn=self._run, verbose=False)
        finally:
            for handle in handles:
                handle.remove()
        nodes = self.graph.module2node.values()
        self.node_of = {node.grad_fn: node for node in nodes if node.grad_fn is not None}
        self.owner = self._internal_functions()

    def _run(self, model: nn.Module, inputs: Any):
        out = _forward(model, inputs)
        self.output_fns = {t.grad_fn for t in _tensors(out) if t.grad_fn is not None}
        return out

    def _before(self, module, args, kwargs):
        call = self.calls.setdefault(module, ModuleCall())
        call.calls += 1
        if call.calls == 1:
            call.in_fns = tuple(t.grad_fn for t in _tensors(list(args) + list(kwargs.values())))

    def _after(self, module, args, output):
        call = self.calls[module]
        outs = _tensors(output)
        if call.calls == 1 and outs:
            call.out_fn, call.out_ndim = outs[0].grad_fn, outs[0].dim()

    def module_node(self, module: nn.Module):
        return self.graph.module2node.get(module)

    def is_module_node(self, node) -> bool:
        return isinstance(node.module, nn.Module) and node.module in self.calls

    def _internal_functions(self) -> dict:
        """Autograd functions that run inside a traced module's forward (between its inputs and output)."""
        module_fns = {n.grad_fn for n in self.graph.module2node.values() if self.is_module_node(n)}
        owner = {}
        for node in self.graph.module2node.values():
            if not self.is_module_node(node) or node.grad_fn is None:
                continue
            stop = set(self.calls[node.module].in_fns) | module_fns
            stack = [fn for fn, _ in node.grad_fn.next_functions]
            while stack:
                fn = stack.pop()
                if fn is None or fn in stop or fn in owner or "accumulategrad" in fn.name().lower():
                    continue
                owner[fn] = node
                stack.extend(f for f, _ in fn.next_functions)
        return owner

    def label(self, node) -> str:
        """A readable name for a graph node: the module's class and name, or the autograd op."""
        if self.is_module_node(node):
            return f"{type(node.module).__name__} {self.names.get(node.module, '')!r}"
        return f"the {op_name(node.grad_fn) or type(node.module).__name__} operation"

    def input_node(self, module: nn.Module):
        """The graph node producing the module's first tensor argument (None if untracked)."""
        fns = self.calls[module].in_fns
        return self.node_of.get(fns[0]) if fns else None
