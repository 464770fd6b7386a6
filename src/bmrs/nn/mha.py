"""``nn.MultiheadAttention`` whose heads can be gated and removed.

PyTorch's ``nn.MultiheadAttention`` computes everything inside one functional call: its output projection
is never called as a module (so no hook can gate a head before it), and it assumes ``num_heads ·
head_dim == embed_dim`` (so no head can be removed).  :class:`HeadedMultiheadAttention` is a subclass
with the same parameters, state-dict keys and results that computes attention step by step and calls
``out_proj`` as a module; :func:`make_headed` turns an existing module into one in place (as
``torch.nn.utils.parametrize`` does, by changing its class), and :meth:`HeadedMultiheadAttention.keep_heads`
removes heads.  After heads are removed the query/key/value weights are stored separately
(``q_proj_weight``, ``k_proj_weight``, ``v_proj_weight``, as ``nn.MultiheadAttention`` itself does when
``kdim``/``vdim`` differ), so ``nn.TransformerEncoderLayer``'s fused inference path, which assumes the
packed full-size layout, is not taken.

The attention weights returned with ``need_weights=True`` are those of the remaining heads.

Examples:
    >>> import torch
    >>> mha = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    >>> x = torch.randn(3, 5, 8)
    >>> want = mha(x, x, x)[0]
    >>> headed = make_headed(mha)
    >>> bool(torch.allclose(headed(x, x, x)[0], want, atol=1e-6)), type(headed).__name__
    (True, 'HeadedMultiheadAttention')
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError

__all__ = ["HeadedMultiheadAttention", "make_headed", "make_plain"]


def _additive(mask: Tensor | None, like: Tensor) -> Tensor | None:
    """A boolean mask (True = not allowed) as −inf/0, a float mask as it is, in ``like``'s dtype."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=like.dtype, device=like.device).masked_fill_(mask, float("-inf"))
    return mask.to(like.dtype)


class HeadedMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` computed step by step, with ``out_proj`` called as a module (see the module
    docstring).  Made from an existing module by :func:`make_headed`; not constructed directly."""

    def _projection_weights(self) -> tuple[Tensor, Tensor, Tensor]:
        if self.in_proj_weight is not None:
            return tuple(self.in_proj_weight.chunk(3))
        return self.q_proj_weight, self.k_proj_weight, self.v_proj_weight

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        if is_causal and attn_mask is None:
            raise ConfigError("MultiheadAttention: is_causal is a hint and needs attn_mask too (as in PyTorch)")
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        length, batch = query.shape[0], query.shape[1]
        heads, head_dim = self.num_heads, self.head_dim
        biases = (None,) * 3 if self.in_proj_bias is None else self.in_proj_bias.chunk(3)
        wq, wk, wv = self._projection_weights()
        q, k, v = F.linear(query, wq, biases[0]), F.linear(key, wk, biases[1]), F.linear(value, wv, biases[2])
        mask = _additive(attn_mask, q)
        padding = _additive(key_padding_mask, q)
        if self.bias_k is not None:
            k, v = torch.cat([k, self.bias_k.expand(1, batch, -1)]), torch.cat([v, self.bias_v.expand(1, batch, -1)])
            mask = None if mask is None else F.pad(mask, (0, 1))
            padding = None if padding is None else F.pad(padding, (0, 1))
        # (tokens, examples, heads·head_dim) → (examples, heads, tokens, head_dim)
        q, k, v = (t.reshape(t.shape[0], batch, heads, head_dim).permute(1, 2, 0, 3) for t in (q, k, v))
        if self.add_zero_attn:
            k, v = (torch.cat([t, t.new_zeros(batch, heads, 1, head_dim)], dim=2) for t in (k, v))
            mask = None if mask is None else F.pad(mask, (0, 1))
            padding = None if padding is None else F.pad(padding, (0, 1))
        scores = (q * head_dim ** -0.5) @ k.transpose(-2, -1)  # (examples, heads, tokens, keys)
        if mask is not None:
            if mask.dim() == 3:
                if mask.shape[0] != batch * heads:
                    raise ConfigError(f"MultiheadAttention: a 3-D attn_mask needs examples × heads = {batch * heads} "
                                      f"rows (this module has {heads} heads), got {mask.shape[0]}")
                mask = mask.view(batch, heads, *mask.shape[1:])
            scores = scores + mask
        if padding is not None:
            scores = scores + padding.view(batch, 1, 1, -1)
        weights = torch.softmax(scores, dim=-1)
        mixed = F.dropout(weights, p=self.dropout, training=self.training) if self.dropout > 0 else weights
        out = (mixed @ v).permute(2, 0, 1, 3).reshape(length, batch, heads * head_dim)
        if self.batch_first and batched:
            out = out.transpose(0, 1)
        out = self.out_proj(out)
        if not batched:
            out = out.squeeze(1)
        if not need_weights:
            return out, None
        weights = weights.mean(dim=1) if average_attn_weights else weights
        return out, weights if batched else weights.squeeze(0)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # the layout of a module whose heads were removed: separate query/key/value weights (see keep_heads)
        if prefix + "in_proj_weight" not in state_dict and prefix + "q_proj_weight" in state_dict:
            for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
                saved = state_dict.get(prefix + name)
                if saved is not None:
                    self._parameters[name] = nn.Parameter(torch.empty_like(saved, device=self.out_proj.weight.device))
            self._parameters["in_proj_weight"] = None
            self._qkv_same_embed_dim = False
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def keep_heads(self, keep: list[int]) -> None:
        """Keep only the heads ``keep`` (in order): their query, key and value rows (and ``bias_k``/``bias_v``
        entries); the caller removes the output projection's columns."""
        rows = torch.tensor([h * self.head_dim + i for h in keep for i in range(self.head_dim)],
                            dtype=torch.long, device=self.out_proj.weight.device)
        inner = self.num_heads * self.head_dim
        weights = self._projection_weights()
        for name, weight in zip(("q_proj_weight", "k_proj_weight", "v_proj_weight"), weights):
            self._parameters[name] = nn.Parameter(weight[rows].clone(), requires_grad=weight.requires_grad)
        self._parameters["in_proj_weight"] = None
        if self.in_proj_bias is not None:
            bias = self.in_proj_bias
            self.in_proj_bias = nn.Parameter(torch.cat([bias[i * inner + rows] for i in range(3)]).clone(),
                                             requires_grad=bias.requires_grad)
        for name in ("bias_k", "bias_v"):
            bias = self._parameters.get(name)
            if bias is not None:
                self._parameters[name] = nn.Parameter(bias[..., rows].clone(), requires_grad=bias.requires_grad)
        self._qkv_same_embed_dim = False
        self.num_heads = len(keep)


def make_headed(module: nn.MultiheadAttention) -> HeadedMultiheadAttention:
    """Turn ``module`` (in place) into a :class:`HeadedMultiheadAttention`; returns it."""
    if not isinstance(module, nn.MultiheadAttention):
        raise ConfigError(f"make_headed expects nn.MultiheadAttention, got {type(module).__name__}")
    if type(module) not in (nn.MultiheadAttention, HeadedMultiheadAttention):
        raise ConfigError(f"cannot gate the heads of {type(module).__name__} (a subclass of nn.MultiheadAttention "
                          "with its own forward); target its output instead")
    module.__class__ = HeadedMultiheadAttention
    return module


def make_plain(module: nn.Module) -> nn.Module:
    """Turn a :class:`HeadedMultiheadAttention` that still has all its heads in the packed layout back into
    ``nn.MultiheadAttention`` (in place); any other module is returned unchanged."""
    if type(module) is HeadedMultiheadAttention and module.in_proj_weight is not None \
            and module.num_heads * module.head_dim == module.embed_dim:
        module.__class__ = nn.MultiheadAttention
    return module
