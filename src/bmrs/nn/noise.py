"""The multiplicative noise layer: one variable θ per structure, trained variationally."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .._kernels.constants import LOG_SIGMA_RANGE
from ..distributions import TruncatedLogNormal, TruncatedLogUniform
from ..distributions import _truncnorm as tn
from ..distributions.fast_sample import sample_theta
from ..distributions._log_interval import check_bounds
from ..errors import ConfigError
from .uniforms import counter_uniforms, draw_key

__all__ = ["MultiplicativeNoise", "LOG_SIGMA_RANGE", "GRANULARITIES"]

GRANULARITIES = ("structure", "element")


def sigma_of(log_sigma: Tensor) -> Tensor:
    """σ from the trained log σ, clamped to LOG_SIGMA_RANGE as the published code does."""
    return log_sigma.clamp(*LOG_SIGMA_RANGE).exp()


def draw_uniforms(batch: int | tuple[int, ...], codes: Tensor, dtype: torch.dtype, device,
                  row_first: int = 0, key: tuple[int, int, int, int] | None = None) -> Tensor:
    """U(0, 1) of shape (batch…, len(codes)) for sampling θ in ``dtype`` (float32 for half precision:
    float16 would lose the normal tails beyond 4σ), from the counter-based stream of
    :mod:`bmrs.nn.uniforms`: rows ``row_first …`` (the batch flattened) and the structures' column
    ``codes`` (their positions before any ``shrink``), under a fresh key unless one is given."""
    shape = (batch,) if isinstance(batch, int) else tuple(batch)
    rows = math.prod(shape)
    key = draw_key() if key is None else key
    u = counter_uniforms(key, row_first, rows, codes, dtype, device)
    return u.to(device).reshape(*shape, codes.numel())


class MultiplicativeNoise(nn.Module):
    """Multiply each structure (channel, neuron, head …) along ``dim`` by a noise variable θ.

    Training: θ is a reparameterised sample of the truncated log-normal posterior
    (ln θ ~ N(mu, σ²) on [low, high], σ = exp(log_sigma) clamped to [e⁻²⁰, e⁵]), drawn once per
    (example, structure) with ``granularity="structure"`` (the default: shared across spatial
    positions and tokens) or once per element with ``"element"`` (as the published code does).
    ``batch_dim``: the axis of inputs with three or more dimensions that indexes examples (0, or 1 for
    sequence-first (tokens, examples, features) tensors); (examples, features) inputs use 0.
    Evaluation: θ is replaced by E[θ]·mask, cached while mu, log σ, the mask and the bounds hold the
    values it was computed from (compared by value, so writes that bump no version counter, such as fused
    Adam's, are seen); inside :func:`bmrs.frozen_noise` the cached value is reused without that check.
    ``producer``: the name of the Conv/Linear whose outputs this layer gates (set by :func:`bmrs.attach`).
    Pruned structures (mask 0) output exactly zero in both modes.

    Examples:
        >>> import torch, bmrs
        >>> noise = bmrs.MultiplicativeNoise(6)            # 6 channels of an (N, 6, H, W) tensor
        >>> y = noise(torch.randn(2, 6, 4, 4))
        >>> noise.kl().shape, noise.posterior().batch_shape
        (torch.Size([6]), torch.Size([6]))
    """

    batch_dim = 0  # (layers pickled before it existed were batch-first)
    head_dim = None  # (nor gated heads)
    _held = None
    _frozen = False

    def __init__(
        self,
        num_features: int,
        dim: int = 1,
        low: float = -20.0,
        high: float = 0.0,
        granularity: str = "structure",
        init_mu: float = 0.0,
        init_log_sigma: float = -5.0,
        batch_dim: int = 0,
        head_dim: int | None = None,
        producer: str | None = None,
    ):
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ConfigError(f"num_features must be a positive integer, got {num_features!r}")
        if batch_dim not in (0, 1) or isinstance(batch_dim, bool):
            raise ConfigError(f"batch_dim must be 0 (batch-first inputs) or 1 (sequence-first), got {batch_dim!r}")
        if granularity not in GRANULARITIES:
            raise ConfigError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        if head_dim is not None and (isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1):
            raise ConfigError(f"head_dim must be a positive integer (channels per attention head), got {head_dim!r}")
        if producer is not None and not isinstance(producer, str):
            raise ConfigError(f"producer must be a module name (str) or None, got {producer!r}")
        self.num_features, self.dim, self.granularity, self.batch_dim = num_features, dim, granularity, batch_dim
        #: channels per head when this layer gates attention heads (bmrs.nn.heads), else None
        self.head_dim = head_dim
        self.set_bounds(low, high)
        self.mu = nn.Parameter(torch.full((num_features,), float(init_mu)))
        self.log_sigma = nn.Parameter(torch.full((num_features,), float(init_log_sigma)))
        self.register_buffer("mask", torch.ones(num_features))
        # Original position of each structure: the layer may have been narrowed by
        # bmrs.compaction.shrink, which removes pruned structures physically during training.
        self.register_buffer("kept_index", torch.arange(num_features))
        self.full_features = num_features
        self.producer = producer
        self._eval_cache: _ThetaCache | None = None
        self._frozen = False  # inside bmrs.frozen_noise: reuse the cached E[θ]·mask unchecked
        self._held: tuple[Tensor | None, int] | None = None  # this forward's draw from the model's noise bank

    # -- the bounds of ln θ: validated, and the cached E[θ] follows them ------------------------
    def set_bounds(self, low: float, high: float) -> None:
        """Set both bounds of ln θ at once (ConfigError unless finite numbers with low < high).

        Examples:
            >>> noise = MultiplicativeNoise(3)
            >>> noise.set_bounds(-15.0, 0.0); noise.low, noise.high
            (-15.0, 0.0)
        """
        for name, value in (("low", low), ("high", high)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) and not (
                    isinstance(value, Tensor) and value.numel() == 1):
                raise ConfigError(f"MultiplicativeNoise: {name} must be a number (a bound of ln θ), got {value!r}")
        check_bounds(torch.tensor(float(low)), torch.tensor(float(high)))
        self.__dict__["_low"], self.__dict__["_high"] = float(low), float(high)

    @property
    def low(self) -> float:
        """Lower bound of ln θ (assigning it checks it against ``high``; see :meth:`set_bounds`)."""
        return self.__dict__["_low"] if "_low" in self.__dict__ else self.__dict__["low"]  # (older pickles)

    @low.setter
    def low(self, value: float) -> None:
        self.set_bounds(value, self.high)

    @property
    def high(self) -> float:
        """Upper bound of ln θ."""
        return self.__dict__["_high"] if "_high" in self.__dict__ else self.__dict__["high"]

    @high.setter
    def high(self, value: float) -> None:
        self.set_bounds(self.low, value)

    @property
    def removed(self) -> int:
        """Structures physically removed (by ``shrink``): pruned, and no longer here."""
        return self.full_features - self.num_features

    def narrowed(self, keep: Tensor) -> "MultiplicativeNoise":
        """A copy holding only the structures at positions ``keep`` (original positions remembered).

        Examples:
            >>> import torch, bmrs
            >>> small = bmrs.MultiplicativeNoise(5).narrowed(torch.tensor([1, 3]))
            >>> small.num_features, small.full_features, small.kept_index.tolist(), small.removed
            (2, 5, [1, 3], 3)
        """
        keep = keep.to(self.mask.device)
        out = MultiplicativeNoise(int(keep.numel()), dim=self.dim, low=self.low, high=self.high,
                                  granularity=self.granularity, batch_dim=self.batch_dim,
                                  head_dim=self.head_dim, producer=self.producer).to(self.mu.device)
        with torch.no_grad():
            out.mu = nn.Parameter(self.mu.detach()[keep].clone(), requires_grad=self.mu.requires_grad)
            out.log_sigma = nn.Parameter(self.log_sigma.detach()[keep].clone(),
                                         requires_grad=self.log_sigma.requires_grad)
            out.mask.copy_(self.mask[keep])
            out.kept_index.copy_(self.kept_index[keep])
        out.full_features = self.full_features
        out.train(self.training)
        return out

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # models saved before kept_index existed hold every structure
        key = prefix + "kept_index"
        if key not in state_dict and prefix + "mask" in state_dict:
            state_dict[key] = torch.arange(state_dict[prefix + "mask"].numel())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- distributions ------------------------------------------------------------------------
    @property
    def sigma(self) -> Tensor:
        return sigma_of(self.log_sigma)

    def posterior(self) -> TruncatedLogNormal:
        """The truncated log-normal q(θ) of every structure (differentiable in mu and log_sigma)."""
        return TruncatedLogNormal(self.mu, self.sigma, self.low, self.high, validate_args=False)

    def prior(self) -> TruncatedLogUniform:
        return TruncatedLogUniform(
            torch.tensor(self.low, dtype=torch.float64), torch.tensor(self.high, dtype=torch.float64)
        )

    def kl(self) -> Tensor:
        """KL(q ‖ p) of every structure, shape (num_features,)."""
        return self.kl_of(self.mu, self.sigma)

    def kl_of(self, mu: Tensor, sigma: Tensor) -> Tensor:
        """KL to this layer's prior of posteriors with the given parameters (any shape)."""
        # The prior shares this layer's bounds, so KL(q ‖ p) is KL to the uniform on [low, high]
        # (the registered kl_divergence gives the same; calling the kernel skips its dispatch).
        return tn.kl_to_fixed_uniform(mu.reshape(-1), sigma.reshape(-1), self.low, self.high).reshape(mu.shape)

    def tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(mu, log σ, mask, kept index), read past nn.Module's attribute lookup (a microsecond each):
        the training step and every evaluation read them.

        Examples:
            >>> mu, log_sigma, mask, kept = MultiplicativeNoise(4).tensors()
            >>> mu is not None and kept.tolist() == [0, 1, 2, 3]
            True
        """
        params, buffers = self._parameters, self._buffers
        return params["mu"], params["log_sigma"], buffers["mask"], buffers["kept_index"]

    def expected_theta(self) -> Tensor:
        """E[θ]·mask, cached while mu, log σ, the mask and the bounds keep their values (see the class docstring).

        Examples:
            >>> noise = MultiplicativeNoise(3)
            >>> noise.expected_theta() is noise.expected_theta()     # cached
            True
        """
        cache = self._eval_cache
        if cache is not None and (self._frozen or cache.holds(self)):
            return cache.value
        with torch.no_grad():
            value = self.posterior().mean * self.mask
        self._eval_cache = _ThetaCache(self, value)
        return value

    # -- forward --------------------------------------------------------------------------------
    def example_axis(self, x: Tensor) -> int:
        """The axis of x that indexes examples: ``batch_dim`` for inputs of three or more dimensions
        (1 for sequence-first (tokens, examples, features) tensors), 0 for (examples, features).

        Examples:
            >>> import torch
            >>> MultiplicativeNoise(4, dim=-1, batch_dim=1).example_axis(torch.zeros(7, 3, 4))
            1
        """
        return self.batch_dim if x.dim() >= 3 else 0

    def _view(self, values: Tensor, x: Tensor) -> Tensor:
        """Reshape per-structure values (…, C) so they broadcast along ``self.dim`` of x (and values
        (examples, C) along its example axis too)."""
        dim = self.dim % x.dim()
        if x.shape[dim] != self.num_features:
            raise ConfigError(
                f"MultiplicativeNoise({self.num_features}, dim={self.dim}) got an input of shape "
                f"{tuple(x.shape)}: size {x.shape[dim]} along dim {self.dim}"
            )
        if values.dim() == 2 and x.dim() == 2:  # (examples, structures) against (examples, features)
            return values
        shape = [1] * x.dim()
        shape[dim] = self.num_features
        if values.dim() == 2:  # one sample per example and structure
            axis = self.example_axis(x)
            if axis == dim:
                raise ConfigError(f"MultiplicativeNoise: batch_dim {self.batch_dim} is the feature dim {self.dim}")
            shape[axis] = values.shape[0]
            if axis > dim:
                values = values.t()
        return values.reshape(shape)

    def draw_theta(self, mu: Tensor, sigma: Tensor, batch: int | tuple[int, ...],
                   codes: Tensor | None = None, mask: Tensor | None = None, row_first: int = 0) -> Tensor:
        """Reparameterised θ·mask of shape (batch…, len(mu)) for posteriors (mu, σ) on this layer's bounds.

        Per-structure work runs in float64, the per-sample inversion in mu's dtype
        (see :mod:`bmrs.distributions.fast_sample`).  ``codes``: the structures' column codes in the
        uniform stream (default 0 … len(mu) − 1); a layer narrowed by ``shrink`` passes its structures'
        original positions, so that it draws exactly the θ its unshrunk, masked twin draws for them.
        ``row_first``: the stream's row of the first of the (flattened) batch rows.
        """
        codes = torch.arange(mu.shape[0]) if codes is None else codes
        u = draw_uniforms(batch, codes, mu.dtype, mu.device, row_first)
        return sample_theta(mu, sigma, self.low, self.high, u, mask)

    def sample_theta(self, x: Tensor) -> Tensor:
        """A reparameterised θ broadcastable against x (per structure × example, or per element).  Rows of
        the uniform stream are examples (per element: examples, then positions), counted from the global
        index of this forward's first example (``row_first``, a distributed shard's offset, set by the
        model's noise bank), so that a shard draws the θ a single process draws for its examples."""
        pending, first = self._held or (None, 0)
        if self.granularity == "element":
            dim, axis = self.dim % x.dim(), self.example_axis(x)
            shape = x.movedim((axis, dim), (0, -1)).shape[:-1]  # (examples, positions…)
            theta = self.draw_theta(self.mu, self.sigma, shape, self.kept_index, self.mask,
                                    first * math.prod(shape[1:])).to(x.dtype)
            return theta.movedim((0, -1), (axis, dim))
        self.hold_draw(None, first)  # θ is used once; the shard's offset holds for the whole forward
        examples = x.shape[self.example_axis(x)]
        if pending is not None and pending.shape[0] == examples:
            theta = pending  # the bank's draw, mask applied
        else:
            theta = self.draw_theta(self.mu, self.sigma, examples, self.kept_index, self.mask, first)
        return self._view(theta if theta.dtype == x.dtype else theta.to(x.dtype), x)

    def hold_draw(self, theta: Tensor | None, row_first: int = 0) -> None:
        """Keep, for this layer's next training forward, θ (examples, structures) drawn for it by the model's
        noise bank (None: the layer draws for itself) and the uniform stream's row of the forward's first
        example (``row_first``: a distributed shard's offset).  The bank's draw sets it before the model's
        forward and clears it after.  A plain attribute write: ``nn.Module.__setattr__`` costs microseconds,
        and this runs for every layer at every step.

        Examples:
            >>> import torch
            >>> noise = MultiplicativeNoise(3)
            >>> noise.hold_draw(torch.full((2, 3), 0.5)); noise(torch.ones(2, 3)).tolist()
            [[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]
        """
        self.__dict__["_held"] = None if theta is None and not row_first else (theta, row_first)

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            return x * self.sample_theta(x)
        return x * self._view(self.expected_theta().to(x.dtype), x)

    def scale_(self, x: Tensor) -> Tensor:
        """Evaluation's x·E[θ]·mask written into x (no allocation: a conv layer's activations are
        megabytes, and a fresh buffer that size costs more than the multiply).  For a tensor that
        nothing else holds and that needs no gradient; in training it is ``forward``.

        Examples:
            >>> import torch
            >>> noise = MultiplicativeNoise(3).eval()
            >>> x = torch.ones(2, 3)
            >>> noise.scale_(x) is x
            True
        """
        if self.training or x.requires_grad:
            return self(x)
        theta, cache = self.expected_theta(), self._eval_cache
        views = cache.views if cache is not None and cache.value is theta else {}  # views of this very θ
        form = (x.dim(), x.dtype)
        view = views.get(form)
        if view is None or x.shape[self.dim] != self.num_features:  # (_view raises on a bad input)
            view = views[form] = self._view(theta if theta.dtype == x.dtype else theta.to(x.dtype), x)
        return x.mul_(view)

    def extra_repr(self) -> str:
        kept = int(self.mask.sum().item())
        removed = f", removed={self.removed}" if self.removed else ""
        batch = f", batch_dim={self.batch_dim}" if self.batch_dim else ""
        return (f"{self.num_features}, dim={self.dim}, low={self.low:g}, high={self.high:g}, "
                f"granularity={self.granularity!r}{batch}, kept={kept}{removed}")


class _ThetaCache:
    """A noise layer's E[θ]·mask, the values it was computed from (copies: the check compares values, not
    version counters), and the value's views by (input ndim, dtype) for :meth:`MultiplicativeNoise.scale_`."""

    def __init__(self, noise: MultiplicativeNoise, value: Tensor):
        mu, log_sigma, mask, _ = noise.tensors()
        self.inputs = tuple(t.detach().clone() for t in (mu, log_sigma, mask))
        self.bounds = (noise.low, noise.high)
        self.value, self.views = value, {}

    def holds(self, noise: MultiplicativeNoise) -> bool:
        """True when the layer's parameters, mask and bounds still have the values this was computed from."""
        mu, log_sigma, mask, _ = noise.tensors()
        return self.bounds == (noise.low, noise.high) and all(
            a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)
            for a, b in zip(self.inputs, (mu, log_sigma, mask)))
