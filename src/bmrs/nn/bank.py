"""The noise bank: the registry of a model's noise layers, which draws θ for all of them in one batched
call per training step (see :class:`_NoiseBank`); :func:`noise_layers`, the walk that lists them;
:func:`check_registry`, the debug check that the two agree; :func:`shard_rows`, a distributed shard's offset.

The registry is explicit state: ``attach`` creates it, ``shrink`` rebuilds it, ``detach`` removes it, and
``kl_loss`` (which walks the model at every call: about 5 µs for an MLP, 60 µs for a ResNet-18) puts the
walk's result in it when a model was edited by hand.  No global hook or counter is involved.

Examples:
    >>> import torch, bmrs
    >>> mlp = bmrs.attach(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)))
    >>> [name for name, _ in noise_layers(mlp)], len(mlp._bmrs_bank.layers)
    (['1'], 1)
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn

from ..distributions.fast_sample import sample_theta
from ..errors import ModelError
from .fused_layers import sample_layers
from .hooks import NOISE_ATTR
from .noise import MultiplicativeNoise, draw_uniforms, sigma_of
from .uniforms import draw_key

__all__ = ["noise_layers", "check_registry", "shard_rows"]

class _KLStash:
    """The KL a fused draw formed beside θ (:func:`fused_layers.sample_layers`), per layer and as the paper's
    mean over all of them, for ``kl_loss`` to reuse while the layers' parameters and the grad mode are
    unchanged and no backward pass has spent its graph (the node sets ``spent``)."""

    def __init__(self, members: list[MultiplicativeNoise], versions: tuple, kl: Tensor, mean: Tensor, spent: Tensor):
        self.members, self.versions, self.kl, self.mean, self.spent = members, versions, kl, mean, spent
        self.grad_enabled = torch.is_grad_enabled()
        # the node's backward sets the flag and bumps its version: reading _version needs no operator
        # (bool(spent) is one, and a cold one when kl_loss runs after the forward's matrix products)
        self.spent_version = spent._version

    def matches(self, members: list[MultiplicativeNoise]) -> bool:
        return (self.spent._version == self.spent_version and self.grad_enabled == torch.is_grad_enabled()
                and len(members) == len(self.members) and all(a is b for a, b in zip(members, self.members))
                and self.versions == _versions(members))


def _versions(members: list[MultiplicativeNoise]) -> tuple:
    """What identifies the values of the layers' posterior parameters."""
    mus, log_sigmas, _, _ = zip(*map(MultiplicativeNoise.tensors, members))
    return _versions_of(mus, log_sigmas)


def _versions_of(mus, log_sigmas) -> tuple:
    """_versions from the layers' mu and log σ tensors, already read."""
    return tuple((id(mu), mu._version, id(log_sigma), log_sigma._version) for mu, log_sigma in zip(mus, log_sigmas))


class _NoiseBank:
    """Draws θ for every structure-granularity noise layer of a model in one batched call per step.

    Registered by ``attach`` as a forward pre-hook on the model: before each training forward it
    samples one θ per (example, structure) for all layers at once (a few dozen tensor operations
    instead of that many per layer) and leaves each layer its slice; a layer whose input batch does
    not match (e.g. a sequence-first tensor) or that is called outside the model's forward samples
    for itself.  A forward hook clears the slices afterwards.
    """

    def __init__(self, layers: list[MultiplicativeNoise]):
        self.layers = layers
        # the index in the global batch of this process's first row when it holds a slice of a larger
        # batch (distributed training, set through shard_rows): rows are coded by their global index in the
        # counter-based uniform stream, so every example's θ matches a single process
        self.row_first = 0
        self.kl_stashes: list[_KLStash] = []

    def __getstate__(self) -> dict:
        # copies and pickles of the model leave this step's draw (and its graph) behind
        return {**self.__dict__, "kl_stashes": []}

    def sync(self, layers: list[MultiplicativeNoise]) -> None:
        """Make ``layers`` (a walk of the model, in order) the registry, if they are not already."""
        if len(layers) != len(self.layers) or not all(a is b for a, b in zip(layers, self.layers)):
            self.layers, self.kl_stashes = list(layers), []

    def draw(self, model: nn.Module, args) -> None:
        self.clear()
        self.kl_stashes = []
        if not model.training:
            return
        if self.row_first:  # a distributed shard: layers drawing for themselves count rows from here too
            for noise in self.layers:
                noise.hold_draw(None, self.row_first)
        layers = [n for n in self.layers if n.granularity == "structure" and n.training]
        first = next((a for a in args if isinstance(a, Tensor) and a.dim() > 0), None)
        # the examples of the model's input (a layer whose input counts other examples draws for itself)
        batch = None if first is None or not layers else \
            first.shape[layers[0].batch_dim if first.dim() > layers[0].batch_dim else 0]
        if batch is None or not layers:
            return
        for members in _bounds_groups(layers):
            head = members[0]
            mus, log_sigmas, masks, kept = zip(*map(MultiplicativeNoise.tensors, members))
            # the kernel draws the key itself (as draw_key() would) and weights the KL as kl_loss's "mean"
            # does when these layers are all the model's (the only case in which kl_loss takes that sum)
            fused = sample_layers(mus, log_sigmas, masks, None, self.row_first, batch, kept,
                                  [n.full_features for n in members], head.low, head.high,
                                  _mean_weights(members, len(members)))
            if fused is not None:
                parts, kl, mean, spent = fused
                self.kl_stashes.append(_KLStash(members, _versions_of(mus, log_sigmas), kl, mean, spent))
            else:  # the reference path, on uniforms of the same stream
                key = draw_key()
                u = draw_uniforms(batch, _bank_codes(members), head.mu.dtype, head.mu.device, self.row_first, key)
                theta = sample_theta(*_concat_posteriors(members), head.low, head.high, u, torch.cat(masks))
                parts = torch.split(theta, [n.num_features for n in members], dim=1)
            for noise, part in zip(members, parts):
                noise.hold_draw(part, self.row_first)

    def stashed_kl(self, members: list[MultiplicativeNoise]) -> Tensor | None:
        """The per-layer KL (n,) the last draw formed for exactly these layers, if their parameters are
        unchanged, its graph not yet spent by a backward pass, and the grad mode the same; else None."""
        for stash in self.kl_stashes:
            if stash.matches(members):
                return stash.kl
        return None

    def stashed_mean_kl(self, layers: list[MultiplicativeNoise]) -> Tensor | None:
        """kl_loss's "mean" of these layers, when the last draw covered exactly them in one call (and
        stashed_kl would serve); else None.  Handed out once (the caller may change it in place): a
        second call in the same step gets None and forms the sum afresh from the per-layer KL."""
        stashes = self.kl_stashes
        if len(stashes) == 1 and stashes[0].mean is not None and stashes[0].matches(layers):
            mean, stashes[0].mean = stashes[0].mean, None
            return mean
        return None

    def clear(self, *_) -> None:
        """Drop what the last draw left with the layers (θ not used, the shard's offset)."""
        for noise in self.layers:
            noise.hold_draw(None)


def _bank_codes(members: list[MultiplicativeNoise]) -> Tensor:
    """The column codes of the layers side by side: each structure's position before any ``shrink``,
    offset by the full widths of the layers before it (the fused kernel forms the same)."""
    offsets, codes = 0, []
    for noise in members:
        codes.append(noise.kept_index.cpu() + offsets)
        offsets += noise.full_features
    return torch.cat(codes)


def _bank_draw(model: nn.Module, args):
    bank = getattr(model, "_bmrs_bank", None)
    if bank is not None:
        bank.draw(model, args)


def _bank_clear(model: nn.Module, args, output):
    bank = getattr(model, "_bmrs_bank", None)
    if bank is not None:
        bank.clear()


def noise_layers(model: nn.Module) -> list[tuple[str, MultiplicativeNoise]]:
    """(name of the module the noise follows, noise layer) for every attached noise layer, in order."""
    found = []
    for name, module in model.named_modules():
        noise = module._modules.get(NOISE_ATTR) if hasattr(module, "_modules") else None
        if isinstance(noise, MultiplicativeNoise):
            found.append((name, noise))
    return found


def noise_modules(model: nn.Module) -> list[MultiplicativeNoise]:
    """The noise layers of :func:`noise_layers`, in the same order, without their names (a walk of
    ``_modules`` that builds no name: about half the time, and ``kl_loss`` walks at every step)."""
    found, seen, stack = [], set(), [model]
    while stack:
        children = stack.pop()._modules
        noise = children.get(NOISE_ATTR)
        if isinstance(noise, MultiplicativeNoise) and id(noise) not in seen:
            seen.add(id(noise))
            found.append(noise)
        stack.extend(child for child in reversed(children.values()) if child is not None)
    return found


def check_registry(model: nn.Module) -> None:
    """Debug check: raise ModelError unless the model's noise bank lists exactly its noise layers, in order.

    Examples:
        >>> import torch, bmrs
        >>> net = bmrs.attach(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)))
        >>> check_registry(net)
        >>> net.add_module("extra", bmrs.attach(torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Tanh(),
        ...                                                         torch.nn.Linear(3, 3))))
        >>> check_registry(net)
        Traceback (most recent call last):
        ...
        bmrs.errors.ModelError: the noise bank lists 1 noise layer(s) but the model has 2 (edited after attach?); kl_loss re-reads the model
    """
    bank = model.__dict__.get("_bmrs_bank")
    if bank is None:
        raise ModelError("the model has no noise bank: call bmrs.attach(model) first")
    layers = noise_modules(model)
    if len(layers) != len(bank.layers) or not all(a is b for a, b in zip(layers, bank.layers)):
        raise ModelError(f"the noise bank lists {len(bank.layers)} noise layer(s) but the model has {len(layers)} "
                         "(edited after attach?); kl_loss re-reads the model")


@contextmanager
def shard_rows(model: nn.Module, first: int) -> Iterator[None]:
    """Within the block, the model's training forwards draw θ for examples ``first, first + 1, …`` of the
    counter-based stream: a distributed process holding a slice of the global batch draws the θ a single
    process draws for those examples.

    Examples:
        >>> import torch, bmrs
        >>> net = bmrs.attach(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)))
        >>> with shard_rows(net, 64):
        ...     y = net(torch.randn(2, 4))
        >>> net._bmrs_bank.row_first
        0
    """
    bank = model.__dict__.get("_bmrs_bank")
    if bank is None:
        yield
        return
    previous, bank.row_first = bank.row_first, int(first)
    try:
        yield
    finally:
        bank.row_first = previous


def _mean_weights(members: list[MultiplicativeNoise], layer_count: int) -> list[float]:
    """kl_loss's "mean" weight of each member's summed KL: the mean over the layer's original structures
    (removing pruned ones changes no weight), averaged over the model's ``layer_count`` noise layers."""
    return [1.0 / (n.full_features * layer_count) for n in members]


def _bounds_groups(layers: list[MultiplicativeNoise]) -> list[list[MultiplicativeNoise]]:
    """The layers split by (low, high, device): each group's posteriors concatenate into one batched call.

    The common case (all on the CPU with the same bounds: one group) forms no device object per layer: the
    noise bank's draw calls this at every training step, right after the previous step's matrix products,
    where each Python object it touches is a cache miss (its Python took 15-60 µs there, a few µs hot).

    Examples:
        >>> from bmrs.nn.noise import MultiplicativeNoise
        >>> a, b = MultiplicativeNoise(3), MultiplicativeNoise(4, high=-1.0)
        >>> [len(g) for g in _bounds_groups([a, a])], [len(g) for g in _bounds_groups([a, b, a])]
        ([2], [2, 1])
    """
    if layers:
        low, high = layers[0].low, layers[0].high
        if all(n.low == low and n.high == high and n._parameters["mu"].is_cpu for n in layers):
            return [layers]
    groups: dict[tuple, list[MultiplicativeNoise]] = {}
    for noise in layers:
        groups.setdefault((noise.low, noise.high, noise.tensors()[0].device), []).append(noise)
    return list(groups.values())


def _concat_posteriors(members: list[MultiplicativeNoise]) -> tuple[Tensor, Tensor]:
    """(μ, σ) of a group's layers side by side, with one log-σ clamp for all of them."""
    return torch.cat([n.mu for n in members]), sigma_of(torch.cat([n.log_sigma for n in members]))
