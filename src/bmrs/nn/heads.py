"""Attention heads as prunable structures: where a module keeps its heads, and the gate that scales them.

A head gate is a noise layer with one θ per head, registered under the attention module and applied
by a forward pre-hook on its output projection: the projection's input (…, heads·head_dim) is viewed
as (…, heads, head_dim) and each head's slice is multiplied by its θ.  Attention is linear in the
values, so this is the head's output scaled before it is mixed; a head whose θ is 0 contributes
nothing, and compaction removes its query, key and value rows and its output-projection columns.

Recognised layouts (:func:`head_layout`):

* one fused ``qkv`` Linear and an output ``proj`` with ``num_heads``/``head_dim`` (bmrs's ViT, timm);
* ``q_proj``, ``k_proj``, ``v_proj`` and ``o_proj``/``out_proj`` Linears with a head count and ``head_dim``
  (transformers' ViT and most recent models; grouped key/value heads are not supported);
* a child with ``query``, ``key``, ``value`` Linears and ``attention_head_size``, and a child ``output``
  whose ``dense`` Linear reads the heads (transformers' BERT family: ``BertAttention``);
* ``nn.MultiheadAttention`` (and ``nn.Transformer*`` layers' ``self_attn``): attaching a head gate turns it
  into a :class:`~bmrs.nn.mha.HeadedMultiheadAttention` (same parameters and results, ``out_proj`` called
  as a module), which also removes heads (:meth:`~bmrs.nn.mha.HeadedMultiheadAttention.keep_heads`).

Examples:
    >>> from bmrs.models.vit import Attention
    >>> layout = head_layout(Attention(dim=8, heads=2))
    >>> layout.heads, layout.head_dim, [offset for _, offset in layout.projections]
    (2, 4, [0, 8, 16])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import Tensor, nn

from .mha import HeadedMultiheadAttention, make_headed

__all__ = ["HeadLayout", "head_layout", "HeadGate", "transformer_placement", "ready_for_gate"]

_HEAD_COUNTS = ("num_heads", "num_attention_heads")


@dataclass
class HeadLayout:
    """Where an attention module keeps its heads.

    ``projections``: the query, key and value Linears with the row where head 0 starts (head h's rows are
    ``offset + h·head_dim`` onwards); ``out``: the output projection, whose input columns are grouped by
    head; ``counters``: attributes that hold the number of heads times a factor (updated when heads go);
    ``keep_heads``: for a module that removes its own query/key/value rows given the heads to keep (then
    ``projections`` and ``counters`` are empty).
    """

    heads: int
    head_dim: int
    out: nn.Linear
    projections: list[tuple[nn.Linear, int]]
    counters: list[tuple[nn.Module, str, int]]
    keep_heads: Callable[[list[int]], None] | None = None


def _count(module: nn.Module) -> tuple[str, int] | None:
    for attr in _HEAD_COUNTS:
        value = getattr(module, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return attr, value
    return None


def _linear(module: nn.Module, name: str) -> nn.Linear | None:
    child = getattr(module, name, None) if name in module._modules else None
    return child if isinstance(child, nn.Linear) else None


def _fused(module: nn.Module) -> HeadLayout | None:
    qkv, out, count = _linear(module, "qkv"), _linear(module, "proj"), _count(module)
    head_dim = getattr(module, "head_dim", None)
    if qkv is None or out is None or count is None or not isinstance(head_dim, int):
        return None
    inner = count[1] * head_dim
    if qkv.out_features != 3 * inner or out.in_features != inner:
        return None
    return HeadLayout(count[1], head_dim, out, [(qkv, 0), (qkv, inner), (qkv, 2 * inner)], [(module, count[0], 1)])


def _separate(module: nn.Module) -> HeadLayout | None:
    q, k, v = (_linear(module, n) for n in ("q_proj", "k_proj", "v_proj"))
    out = _linear(module, "o_proj") or _linear(module, "out_proj")
    count, head_dim = _count(module), getattr(module, "head_dim", None)
    if None in (q, k, v, out, count) or not isinstance(head_dim, int):
        return None
    inner = count[1] * head_dim
    if not q.out_features == k.out_features == v.out_features == out.in_features == inner:
        return None
    return HeadLayout(count[1], head_dim, out, [(q, 0), (k, 0), (v, 0)], [(module, count[0], 1)])


def _split(module: nn.Module) -> HeadLayout | None:
    inner = next((c for c in module._modules.values() if c is not None and
                  all(_linear(c, n) is not None for n in ("query", "key", "value"))), None)
    output = module._modules.get("output")
    out = _linear(output, "dense") if isinstance(output, nn.Module) else None
    head_dim = getattr(inner, "attention_head_size", None)
    count = _count(inner) if inner is not None else None
    if inner is None or out is None or count is None or not isinstance(head_dim, int):
        return None
    size = count[1] * head_dim
    if not inner.query.out_features == inner.key.out_features == inner.value.out_features == out.in_features == size:
        return None
    counters = [(inner, count[0], 1)]
    if isinstance(getattr(inner, "all_head_size", None), int):
        counters.append((inner, "all_head_size", head_dim))
    return HeadLayout(count[1], head_dim, out, [(inner.query, 0), (inner.key, 0), (inner.value, 0)], counters)


def _torch_mha(module: nn.Module) -> HeadLayout | None:
    if type(module) not in (nn.MultiheadAttention, HeadedMultiheadAttention):
        return None
    keep = module.keep_heads if isinstance(module, HeadedMultiheadAttention) else None
    return HeadLayout(module.num_heads, module.head_dim, module.out_proj, [], [], keep)


def head_layout(module: nn.Module) -> HeadLayout | None:
    """The heads of an attention module (see the module docstring), or None if it is not one bmrs knows."""
    for recognise in (_torch_mha, _fused, _separate, _split):
        layout = recognise(module)
        if layout is not None:
            return layout
    return None


def ready_for_gate(module: nn.Module) -> HeadLayout:
    """``module``'s head layout, after turning an ``nn.MultiheadAttention`` into a
    :class:`~bmrs.nn.mha.HeadedMultiheadAttention` (in place) so that a gate can reach its heads."""
    if type(module) is nn.MultiheadAttention:
        make_headed(module)
    return head_layout(module)


class HeadGate:
    """Forward pre-hook of an attention module's output projection: scales each head by the θ of the head gate
    registered under ``host``.  ``gate(host, x)`` applies that noise layer to ``x`` viewed as (…, heads, head_dim).
    """

    def __init__(self, host: nn.Module, head_dim: int, gate: Callable[[nn.Module, Tensor], Tensor]):
        self.host, self.head_dim, self.gate = host, head_dim, gate

    def __call__(self, module: nn.Module, args):
        x = args[0]
        gated = self.gate(self.host, x.unflatten(-1, (-1, self.head_dim)))
        return (gated.flatten(-2), *args[1:])


def transformer_placement(model: nn.Module, chosen: list[tuple]) -> list[tuple]:
    """The default placement for a model with attention modules bmrs knows: a head gate on each of them,
    and no noise inside them nor on what writes into the residual stream (a layer whose outputs have the
    stream's width: the patch embedding, attention and MLP outputs, a pooler), whose channels every later
    block reads.  ``chosen``: attach's (name, module, features, dim, producer) entries; returned unchanged
    for a model without such attention modules.

    Examples:
        >>> import torch, bmrs
        >>> from bmrs.models import vit
        >>> [name for name, _ in bmrs.noise_layers(bmrs.attach(vit(depth=1, noise=False)))]
        ['blocks.0.attn', 'blocks.0.mlp.fc1']
    """
    attention = [(name, module, layout) for name, module in model.named_modules()
                 if (layout := head_layout(module)) is not None]
    if not attention:
        return chosen
    stream = {layout.out.out_features for _, _, layout in attention}
    inside = tuple(f"{name}." for name, _, _ in attention)
    rest = [entry for entry in chosen if not entry[0].startswith(inside) and entry[2] not in stream]
    gates = [(name, module, layout.heads, -2, None) for name, module, layout in attention]
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return sorted(gates + rest, key=lambda entry: order.get(entry[0], len(order)))
