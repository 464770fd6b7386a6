"""Ranking-only baselines (they need an amount): the L2 norm of incoming weights and the gradient score."""

from __future__ import annotations

from typing import Callable, Iterable

from torch import Tensor, nn

from ..errors import ConfigError, ModelError
from ..nn.noise import MultiplicativeNoise
from .base import Criterion, layers_of

__all__ = ["L2Norm", "Gradient"]


def _producer(model: nn.Module, name: str, noise: MultiplicativeNoise) -> nn.Module:
    producer = getattr(noise, "producer", None)
    modules = dict(model.named_modules())
    if producer is None or producer not in modules:
        raise ModelError(f"L2Norm: cannot find the Conv/Linear that feeds noise layer {name!r}; "
                         "attach noise right after a Conv/Linear (or its BatchNorm/activation)")
    return modules[producer]


class L2Norm(Criterion):
    """L2 norm of each structure's incoming weights (a Conv filter, a Linear row); ranking only."""

    name = "l2"
    has_rule = False

    def layer_scores(self, name, noise, model):
        weight = _producer(model, name, noise).weight.detach()
        if weight.shape[0] != noise.num_features:
            raise ModelError(f"L2Norm: {noise.producer!r} has {weight.shape[0]} outputs but noise layer "
                             f"{name!r} gates {noise.num_features}")
        return weight.reshape(weight.shape[0], -1).double().norm(dim=1)


class Gradient(Criterion):
    """First-order Taylor score |Σ activation × gradient| per structure, summed over examples.

    Call ``accumulate(model, batches)`` first (it runs forward and backward passes in eval mode,
    without touching parameters); ranking only.

    Examples:
        >>> import torch, bmrs
        >>> m = bmrs.attach(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)))
        >>> g = bmrs.criteria.Gradient()
        >>> g.accumulate(m, [(torch.randn(16, 4), torch.randint(0, 2, (16,)))])
        >>> g.scores(m)["1"].shape
        torch.Size([8])
    """

    name = "grad"
    has_rule = False

    def __init__(self):
        self._scores: dict[str, Tensor] = {}

    def accumulate(self, model: nn.Module, batches: Iterable, loss_fn: Callable | None = None,
                   max_batches: int | None = None) -> None:
        loss_fn = loss_fn or nn.functional.cross_entropy
        layers = layers_of(model)
        captured: dict[str, Tensor] = {}
        handles = []

        def capture(layer_name):
            def hook(module, inputs, output):
                output.retain_grad()
                captured[layer_name] = output
            return hook

        for name, noise in layers:
            handles.append(noise.register_forward_hook(capture(name)))
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        try:
            for i, (x, y) in enumerate(batches):
                if max_batches is not None and i >= max_batches:
                    break
                model.zero_grad(set_to_none=True)
                captured.clear()
                x = x.to(device)
                if x.is_floating_point():  # activations after frozen layers need a gradient too
                    x = x.detach().requires_grad_(True)
                loss_fn(model(x), y.to(device)).backward()
                for name, noise in layers:
                    act = captured.get(name)
                    if act is None or act.grad is None:
                        raise ConfigError(f"Gradient: the outputs of noise layer {name!r} got no gradient on these "
                                          "batches (not reached, or nothing before it needs a gradient)")
                    dim, examples = noise.dim % act.dim(), noise.example_axis(act)
                    contrib = (act * act.grad).movedim((examples, dim), (0, -1))
                    per_example = contrib.reshape(contrib.shape[0], -1, noise.num_features).sum(1).abs().sum(0)
                    self._scores[name] = self._scores.get(name, 0) + per_example.detach().double().cpu()
        finally:
            for h in handles:
                h.remove()
            model.zero_grad(set_to_none=True)
            model.train(was_training)

    def layer_scores(self, name, noise, model):
        if name not in self._scores:
            raise ConfigError("Gradient: call accumulate(model, batches) before scoring")
        return self._scores[name]
