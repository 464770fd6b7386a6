"""Fold head gates into the output projection and remove the heads they prune (see :mod:`bmrs.nn.heads`).

E[θ]·mask of each head scales that head's input columns of the output projection; a head whose value
is 0 then contributes nothing, and its query, key and value rows and its output columns are removed,
with the module's head count updated.  Exact: the attention of the other heads is untouched.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..nn.attach import NOISE_ATTR, noise_layers
from ..nn.heads import HeadGate, HeadLayout, head_layout
from ..nn.mha import make_plain

__all__ = ["fold_head_gates"]


def _rows(layout: HeadLayout, keep: list[int]) -> dict[int, tuple[nn.Linear, list[int]]]:
    """Per projection Linear (a fused qkv appears once): the rows of the kept heads, in order."""
    out: dict[int, tuple[nn.Linear, list[int]]] = {}
    for linear, offset in layout.projections:
        rows = out.setdefault(id(linear), (linear, []))[1]
        rows.extend(offset + h * layout.head_dim + i for h in keep for i in range(layout.head_dim))
    return out


def _keep_rows(linear: nn.Linear, rows: list[int]) -> None:
    index = torch.tensor(rows, dtype=torch.long, device=linear.weight.device)
    linear.weight = nn.Parameter(linear.weight.detach()[index].clone(), requires_grad=linear.weight.requires_grad)
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.detach()[index].clone(), requires_grad=linear.bias.requires_grad)
    linear.out_features = len(rows)


def _keep_columns(linear: nn.Linear, columns: list[int]) -> None:
    index = torch.tensor(columns, dtype=torch.long, device=linear.weight.device)
    linear.weight = nn.Parameter(linear.weight.detach()[:, index].clone(), requires_grad=linear.weight.requires_grad)
    linear.in_features = len(columns)


def _remove_gate(host: nn.Module, out: nn.Linear) -> None:
    del host._modules[NOISE_ATTR]
    for key, hook in list(out._forward_pre_hooks.items()):
        if isinstance(hook, HeadGate) and hook.host is host:
            del out._forward_pre_hooks[key]


@torch.no_grad()
def fold_head_gates(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Fold every head gate of ``model`` (in place) and remove the heads it prunes.

    Returns {attention module name: (heads before, heads after)}.  A module keeps at least one head
    (all zero when every head was pruned), as compaction never empties a layer.

    Examples:
        >>> import torch, bmrs
        >>> from bmrs.models.vit import Attention
        >>> attn = bmrs.attach(torch.nn.Sequential(Attention(dim=8, heads=2)), targets=["0"])
        >>> bmrs.noise_layers(attn)[0][1].mask[0] = 0
        >>> fold_head_gates(attn.eval()), attn[0].qkv.out_features, attn[0].proj.in_features
        ({'0': (2, 1)}, 12, 4)
    """
    changed = {}
    for name, noise in noise_layers(model):
        if noise.head_dim is None:
            continue
        host = model.get_submodule(name)
        layout = head_layout(host)
        theta: Tensor = noise.expected_theta().detach().to(layout.out.weight.dtype)
        scale = theta.repeat_interleave(layout.head_dim)
        layout.out.weight.mul_(scale)
        keep = [h for h in range(layout.heads) if float(theta[h]) != 0.0] or [0]
        if len(keep) < layout.heads:
            if layout.keep_heads is not None:  # a module that removes its own query/key/value rows
                layout.keep_heads(keep)
            else:
                for linear, rows in _rows(layout, keep).values():
                    _keep_rows(linear, rows)
                for module, attr, factor in layout.counters:
                    setattr(module, attr, len(keep) * factor)
            _keep_columns(layout.out, [h * layout.head_dim + i for h in keep for i in range(layout.head_dim)])
        _remove_gate(host, layout.out)
        make_plain(host)  # an nn.MultiheadAttention that kept every head is one again
        changed[name] = (layout.heads, len(keep))
    return changed
