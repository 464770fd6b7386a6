"""Pruning criteria: per-structure scores and keep/prune decisions.

Every criterion scores each structure of every noise layer of a model and decides which to prune:

* ``BMRSN()`` — ΔF against a near-Dirac spike at θ ≈ 0; prune where ΔF ≥ −1 nat (evidence for
  keeping a structure that is not worth a mention is a tie, which goes to the smaller model) or
  where E[θ] < 2⁻²³ (switched off); ``BMRSN(margin=0)`` is the exact ΔF ≥ 0.
* ``BMRSU(p1=8)`` — ΔF against a log-uniform over low-precision θ; the same rule.
* ``SNR(threshold=1.0)`` — prune where E[θ]/√Var[θ] < threshold.
* ``ExpectedValue(threshold=0.1)`` — prune where E[θ] < threshold.
* ``L2Norm()`` — norm of each structure's incoming weights; needs an amount to prune.
* ``Gradient()`` — |activation × gradient| accumulated over batches; needs an amount.

``decide(model, amount=k)`` instead ranks all structures globally and prunes the ``k`` most
prunable (``k`` an int count or a float fraction of all structures); structures already masked
always count among them.  ``prunability`` orders structures for that ranking: higher = pruned first.

Example:
    >>> import torch, bmrs
    >>> from bmrs import criteria
    >>> m = bmrs.attach(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)))
    >>> decisions = criteria.BMRSN().decide(m)              # {layer name: bool tensor, True = prune}
    >>> sorted(decisions), int(decisions["1"].sum())        # nothing is prunable at initialisation
    (['1'], 0)
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from .errors import ConfigError, ModelError
from .nn.attach import noise_layers
from .nn.noise import MultiplicativeNoise
from .reduction import FLOAT32_MANTISSA_BITS, SPIKE_VARIANCE, delta_f, precision_prior, spike_prior

__all__ = [
    "Criterion",
    "ModelReduction",
    "BMRSN",
    "BMRSU",
    "PublishedBMRSN",
    "SNR",
    "ExpectedValue",
    "L2Norm",
    "Gradient",
    "CRITERIA",
    "EVIDENCE_MARGIN",
    "get_criterion",
]

Decisions = dict[str, Tensor]


def _layers(model: nn.Module) -> list[tuple[str, MultiplicativeNoise]]:
    layers = noise_layers(model)
    if not layers:
        raise ModelError("the model has no noise layers; call bmrs.attach(model) and train it first")
    return layers


class Criterion:
    """Base class: subclasses define ``scores`` and either a threshold rule or only ranking."""

    name = "criterion"
    #: whether a larger score means "prune first" (ΔF) or "keep first" (SNR, E[θ], norms)
    higher_prunes = False
    #: whether ``decide`` without an amount is defined (threshold-free or thresholded rule)
    has_rule = True

    @torch.no_grad()
    def scores(self, model: nn.Module) -> dict[str, Tensor]:
        """Raw per-structure scores, {noise layer name: float64 tensor}."""
        return {name: self.layer_scores(name, noise, model).double() for name, noise in _layers(model)}

    def layer_scores(self, name: str, noise: MultiplicativeNoise, model: nn.Module) -> Tensor:
        raise NotImplementedError

    def rule(self, scores: Tensor) -> Tensor:
        """The criterion's own decision (True = prune) from its scores."""
        raise ConfigError(f"{self.name} has no threshold rule: pass amount= (a count or a fraction)")

    def prunability(self, scores: Tensor) -> Tensor:
        return scores if self.higher_prunes else -scores

    def switched_off(self, model: nn.Module) -> Decisions:
        """{layer: bool tensor} of structures pruned whatever their scores (none by default)."""
        return {}

    def decide(self, model: nn.Module, amount: int | float | None = None) -> Decisions:
        """{layer: bool tensor (True = prune)}; by the rule, or the global top ``amount`` if given.

        Switched-off structures are pruned by the rule and ranked first (after those already pruned)."""
        scores, off = self.scores(model), self.switched_off(model)
        masks = {name: noise.mask.detach().cpu() == 0 for name, noise in _layers(model)}
        if amount is None:
            return {name: self.rule(s).cpu() | off.get(name, False) | masks[name] for name, s in scores.items()}
        first = math.inf if self.higher_prunes else -math.inf
        ranked = {name: torch.where(off[name], torch.full_like(s.cpu(), first), s.cpu()) if name in off else s
                  for name, s in scores.items()}
        removed = sum(noise.removed for _, noise in _layers(model))
        return _global_top(ranked, masks, self.prunability, amount, removed)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _plain_number(value):
    """A NumPy or 0-d torch number as the Python int or float it holds (other values unchanged)."""
    if isinstance(value, Tensor) and value.dim() == 0 and not value.dtype.is_complex and value.dtype != torch.bool:
        return value.item()
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, int, float)):
        return float(value)
    return value


def _global_top(scores: dict[str, Tensor], masks: Decisions, prunability: Callable, amount,
                removed: int = 0) -> Decisions:
    """``removed``: structures already taken out by ``shrink``; ``amount`` counts them as pruned."""
    total = sum(s.numel() for s in scores.values())
    amount = _plain_number(amount)
    if isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount < 0 or \
            (isinstance(amount, float) and (amount > 1.0 or math.isnan(amount))) or \
            (isinstance(amount, int) and amount > total + removed):
        raise ConfigError(f"amount must be a count in [0, {total + removed}] or a fraction in [0, 1], got {amount!r}")
    k = int(round(amount * (total + removed))) if isinstance(amount, float) else int(amount)
    k = max(k - removed, 0)
    names = list(scores)
    flat = torch.cat([prunability(scores[n]).cpu().double() for n in names])
    already = torch.cat([masks[n] for n in names])
    flat = torch.where(already, torch.full_like(flat, math.inf), torch.nan_to_num(flat, nan=-math.inf))
    k = max(k, int(already.sum()))
    chosen = torch.zeros(total, dtype=torch.bool)
    if k > 0:
        # stable tie-break: earlier layers/structures first
        order = torch.argsort(-flat, stable=True)
        chosen[order[:k]] = True
    out, start = {}, 0
    for n in names:
        size = scores[n].numel()
        out[n] = chosen[start:start + size]
        start += size
    return out


#: Kass & Raftery (1995): a Bayes factor below e (|ΔF| < 1 nat) is "not worth more than a bare
#: mention".  Evidence for keeping a structure that weak is a tie, and a tie goes to the smaller model.
EVIDENCE_MARGIN = 1.0
#: ln 2⁻²³: a structure whose E[θ] lies below float32's unit roundoff is switched off in the network
#: that is tested (θ = E[θ]), whatever ΔF says about the reduced prior it is compared with.
SWITCHED_OFF_LOG_THETA = -FLOAT32_MANTISSA_BITS * math.log(2.0)


def check_margin(margin) -> float:
    """The evidence margin (nats) as a float, or ConfigError: a finite number ≥ 0."""
    margin = _plain_number(margin)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin < math.inf:
        raise ConfigError(f"evidence margin must be a finite number of nats >= 0 (0: the exact rule "
                          f"ΔF >= 0), got {margin!r}")
    return float(margin)


class ModelReduction(Criterion):
    """Criteria that score by ΔF against a reduced prior, with a stated decision rule.

    A structure is pruned when ΔF ≥ −margin (the evidence for keeping it is worth less than
    ``margin`` nats: a tie, which goes to the smaller model; ``margin=0`` is the exact rule ΔF ≥ 0),
    or when it is switched off: E[θ] < 2⁻²³, so that the tested network (θ = E[θ]) multiplies its
    output by less than float32's unit roundoff.  ``scores`` stay the exact ΔF.
    """

    higher_prunes = True

    def __init__(self, margin: float = EVIDENCE_MARGIN):
        self.margin = check_margin(margin)

    def reduced_prior(self, noise: MultiplicativeNoise):
        raise NotImplementedError

    def layer_scores(self, name, noise, model):
        return delta_f(noise.posterior(), noise.prior(), self.reduced_prior(noise))

    def rule(self, scores):
        return scores >= -self.margin

    @torch.no_grad()
    def switched_off(self, model: nn.Module) -> Decisions:
        """{layer: bool tensor}, True where E[θ] < 2⁻²³ (the structure's output is already gone)."""
        return {name: (noise.posterior().log_mean.double() < SWITCHED_OFF_LOG_THETA).cpu()
                for name, noise in _layers(model)}

    def _margin_repr(self) -> str:
        return f"margin={self.margin:g}"


class BMRSN(ModelReduction):
    """BMRS_N: ΔF against a truncated log-normal spike at the lower bound (variance 1e−12).

    Prunes where ΔF ≥ −``margin`` (1 nat by default: evidence for keeping a structure that is not
    worth a mention is a tie, and a tie goes to the smaller model) or where E[θ] < 2⁻²³.
    ``BMRSN(margin=0)`` is the exact rule ΔF ≥ 0, which ties on posteriors the data leaves
    prior-like (see docs/decision-rule.md).

    Example:
        >>> from bmrs.criteria import BMRSN
        >>> BMRSN(), BMRSN(margin=0)
        (BMRSN(margin=1, variance=1e-12), BMRSN(margin=0, variance=1e-12))
    """

    name = "bmrs-n"

    def __init__(self, margin: float = EVIDENCE_MARGIN, variance: float = SPIKE_VARIANCE):
        super().__init__(margin)
        spike_prior(variance=variance)  # validates
        self.variance = variance

    def reduced_prior(self, noise):
        return spike_prior(noise.low, noise.high, self.variance)

    def __repr__(self):
        return f"{type(self).__name__}({self._margin_repr()}, variance={self.variance:g})"


class PublishedBMRSN(BMRSN):
    """BMRS_N as the public reference code computes it: ΔF + ½ ln 2π, pruned where that is ≥ 0.

    The paper's code omits the 2π of the normaliser (its ``term2`` is −½ ln(σ² + s²) where the
    equation has −½ ln(2π(σ² + s²))): not the equation, kept to reproduce the published numbers.
    """

    name = "bmrs-n-published"
    OFFSET = 0.5 * math.log(2.0 * math.pi)

    def __init__(self, variance: float = SPIKE_VARIANCE):
        super().__init__(0.0, variance)

    def switched_off(self, model):  # the published rule is ΔF alone
        return {}

    def layer_scores(self, name, noise, model):
        return super().layer_scores(name, noise, model) + self.OFFSET

    def __repr__(self):
        return f"{type(self).__name__}(variance={self.variance:g})"


class BMRSU(ModelReduction):
    """BMRS_U: ΔF against a log-uniform over θ ∈ [2⁻²³, 2^(−p₁)]; larger p₁ prunes less.

    Same decision rule as :class:`BMRSN`: ΔF ≥ −``margin`` or E[θ] < 2⁻²³ (a posterior the data
    has pushed below the reduced prior's support is switched off, although its ΔF_U is very negative).

    Example:
        >>> from bmrs.criteria import BMRSU
        >>> BMRSU(p1=4)
        BMRSU(p1=4, margin=1)
    """

    name = "bmrs-u"

    def __init__(self, p1: float = 8.0, margin: float = EVIDENCE_MARGIN):
        super().__init__(margin)
        precision_prior(p1)  # validates
        self.p1 = p1

    def reduced_prior(self, noise):
        return precision_prior(self.p1, noise.low, noise.high)

    def __repr__(self):
        return f"BMRSU(p1={self.p1:g}, {self._margin_repr()})"


class _Thresholded(Criterion):
    default_threshold = 0.0

    def __init__(self, threshold: float | None = None):
        threshold = self.default_threshold if threshold is None else threshold
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
            raise ConfigError(f"{self.name}: threshold must be a finite number, got {threshold!r}")
        self.threshold = float(threshold)

    def rule(self, scores):
        return scores < self.threshold

    def __repr__(self):
        return f"{type(self).__name__}(threshold={self.threshold:g})"


class SNR(_Thresholded):
    """Signal-to-noise ratio E[θ]/√Var[θ]; prune below ``threshold`` (1.0)."""

    name = "snr"
    default_threshold = 1.0

    def layer_scores(self, name, noise, model):
        return noise.posterior().snr


class ExpectedValue(_Thresholded):
    """E[θ]; prune below ``threshold`` (0.1)."""

    name = "ev"
    default_threshold = 0.1

    def layer_scores(self, name, noise, model):
        return noise.posterior().mean


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

    Example:
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
        layers = _layers(model)
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


CRITERIA: dict[str, Callable[..., Criterion]] = {
    "bmrs-n": BMRSN,
    "bmrs-n-published": PublishedBMRSN,
    "bmrs-u": BMRSU,
    "snr": SNR,
    "ev": ExpectedValue,
    "l2": L2Norm,
    "grad": Gradient,
}


def get_criterion(name: str, **kwargs) -> Criterion:
    """Build a criterion by its command-line name (``bmrs-n``, ``bmrs-u``, ``snr``, ``ev``, ``l2``, ``grad``).

    Example:
        >>> from bmrs.criteria import get_criterion
        >>> get_criterion("bmrs-u", p1=4)
        BMRSU(p1=4, margin=1)
    """
    if name not in CRITERIA:
        raise ConfigError(f"unknown criterion {name!r}; choose one of {', '.join(CRITERIA)}")
    try:
        return CRITERIA[name](**kwargs)
    except TypeError as err:  # an option this criterion does not take
        raise ConfigError(f"criterion {name!r}: {err}") from None
