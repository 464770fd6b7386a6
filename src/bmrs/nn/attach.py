"""Attach noise layers to an existing model, find them again, and collect their KL.

A noise layer is registered as a child ``bmrs_noise`` of the module whose output it multiplies
(its host), and applied by a forward hook.  The model's own parameter names are untouched, so weights
saved before attaching (e.g. torchvision-style ResNet checkpoints) still load, and ``print(model)``
shows each noise layer under its host.

Where the host is directly followed in an ``nn.Sequential`` by max/avg pooling (adaptive or not) and
the noise draws one θ ≥ 0 per (example, channel) (``granularity="structure"``), the hook sits on the
last of those pooling modules instead: pool(θ·x) = θ·pool(x), so the function, the gradients and
the Taylor scores are the same, and the multiply runs on the smaller pooled tensor (LeNet5: 4×).
The noise is then applied when that pooling module runs: calling the host on its own returns its
output without noise.

Default policy (``targets=None``):
  * after every BatchNorm that directly follows a Conv or Linear (ResNet: bn1, bn2, bn3, downsample BN);
  * else after every Conv / Linear, or after the activation *module* that directly follows it in
    the same ``nn.Sequential`` (Linear → Tanh → noise, Conv → ReLU → noise; with pooling after
    it, Conv → ReLU (noise registered here) → MaxPool → noise applied here, as above);
  * never on the layers that produce the model's output (every head of a model with several);
  * "follows" and "produces" are read from the data flow where ``torch.fx`` can trace the model (see
    :mod:`bmrs.nn.flow`), so that a head registered before the body, or norms registered after all the
    convolutions, are placed right; else from registration order (the next module registered follows, the
    last Conv/Linear registered is the output layer), as also when a residual sum or concatenation lies
    between the layers and the output;
  * in a model with attention modules bmrs knows (:mod:`bmrs.nn.heads`, ``nn.MultiheadAttention`` included):
    one θ per attention head, and none inside the attention modules nor on layers that write into the
    residual stream (:func:`~bmrs.nn.heads.transformer_placement`); naming an attention module as a target
    also gates its heads;
  * a module used in several places (shared weights) gets one noise layer and one hook, which gates its
    output wherever it runs.

Example:
    >>> import torch, bmrs
    >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    >>> mlp = bmrs.attach(mlp)
    >>> [name for name, _ in bmrs.noise_layers(mlp)]
    ['1']
    >>> bmrs.kl_loss(mlp).shape
    torch.Size([])
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn

from ..defaults import KL_REDUCTIONS
from ..errors import ConfigError, ModelError
from ..distributions.fast_sample import sample_theta
from .flow import Flow, module_flow
from .heads import HeadGate, head_layout, ready_for_gate, transformer_placement
from .mha import make_plain
from .fused_layers import kl_layers, sample_layers
from .noise import MultiplicativeNoise, draw_uniforms, sigma_of
from .uniforms import draw_key

__all__ = ["attach", "noise_layers", "kl_loss", "detach_noise", "install_noise", "NOISE_ATTR", "KL_REDUCTIONS"]

NOISE_ATTR = "bmrs_noise"
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_PRODUCERS = _CONV + (nn.Linear,)
_ACTIVATIONS = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid,
    nn.Hardtanh, nn.Hardswish, nn.Mish, nn.Softplus, nn.PReLU,
)
_SPATIAL_DIMS = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
# Pooling that acts on each channel of an (N, C, *spatial) tensor alone with pool(θ·x) = θ·pool(x)
# for θ ≥ 0: max pooling pads with −inf, average pooling is linear (zero padding included).
_POOL_DIMS = {
    nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3, nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3,
    nn.AdaptiveMaxPool1d: 1, nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3,
    nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3,
}


# How many times a registered noise layer has been applied (by its hook), and how many module registrations
# (setattr, add_module, register_module) there have been, process-wide: with them a model's noise bank
# can tell, without walking the model, that its list of noise layers is still the model's (see
# _NoiseBank.covers_model).
_applications = [0]
_registrations = [0]
_registration_hook: list = []


def _count_registration(module: nn.Module, name: str, submodule) -> None:
    _registrations[0] += 1


def _watch_registrations() -> None:
    """Count every module registration from now on (one global hook, installed once)."""
    if not _registration_hook:
        _registration_hook.append(torch.nn.modules.module.register_module_module_registration_hook(_count_registration))


def _apply_noise(module: nn.Module, args, *rest):
    """Forward hook applying the noise registered under ``module``: (module, args, kwargs, output) as
    registered with ``with_kwargs=True``, or (module, args, output) as models pickled before that were."""
    kwargs, output = rest if len(rest) == 2 else ({}, rest[0])
    _applications[0] += 1
    noise = module._modules[NOISE_ATTR]
    if isinstance(output, tuple):  # e.g. MultiheadAttention returns (output, weights)
        return (noise(output[0]),) + tuple(output[1:])
    if not noise.training and not output.requires_grad and _fresh(output, args, kwargs):
        return noise.scale_(output)  # evaluation: scale the module's own new output in place
    return noise(output)


def _gate_heads(host: nn.Module, heads: Tensor) -> Tensor:
    """Apply the head gate registered under the attention module ``host`` to its (…, heads, head_dim) values."""
    _applications[0] += 1
    return host._modules[NOISE_ATTR](heads)


def _fresh(output: Tensor, args, kwargs) -> bool:
    """The output shares no memory with the module's tensor inputs, positional or keyword (an in-place
    ReLU returns its input, which its caller may still hold)."""
    try:
        storage = output.untyped_storage().data_ptr()
        return storage != 0 and all(not isinstance(i, Tensor) or i.untyped_storage().data_ptr() != storage
                                    for inputs in (args, kwargs.values()) for i in inputs)
    except (RuntimeError, NotImplementedError):  # a tensor without plain storage (sparse, nested …)
        return False


class _NoiseAfterPool:
    """Forward hook of a pooling module: applies the noise registered under ``host`` to its output."""

    def __init__(self, host: nn.Module):
        self.host = host

    def __call__(self, module: nn.Module, args, *rest):
        return _apply_noise(self.host, args, *rest)


def _hook_target(host: nn.Module, noise: MultiplicativeNoise, modules: dict[str, nn.Module],
                 places: dict[int, list]) -> nn.Module:
    """The module whose forward hook applies ``noise``: the last of the pooling modules that directly
    follow ``host`` in a plain ``nn.Sequential`` when θ is shared by a channel's positions, else ``host``.

    ``places``: id(module) → [(parent, position)] over the model; a module used twice keeps the host.
    """
    spatial = _SPATIAL_DIMS.get(type(modules.get(noise.producer)))  # host output is (N, C, *spatial)
    if noise.granularity != "structure" or noise.dim != 1 or spatial is None \
            or len(places.get(id(host), ())) != 1:
        return host
    parent, position = places[id(host)][0]
    if type(parent).forward is not nn.Sequential.forward:  # children not run one after the other
        return host
    target = host
    for module in list(parent._modules.values())[position + 1:]:
        if _POOL_DIMS.get(type(module)) != spatial or getattr(module, "return_indices", False) \
                or len(places[id(module)]) != 1:
            break
        target = module
    return target


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
        # batch (distributed training): rows are coded by their global index in the counter-based
        # uniform stream, so every example's θ matches a single process
        self.row_first = 0
        self.kl_stashes: list[_KLStash] = []
        # _registrations when a walk of the model last found exactly these layers (-1: never)
        self.confirmed = -1
        # the last training forward applied these layers once each, each to its own draw, and no other
        # noise layer (set when the model's forward returns)
        self.complete = False
        self._applications_at_draw = 0

    def __getstate__(self) -> dict:
        # copies and pickles of the model leave this step's draw (and its graph) behind, and walk the
        # model again before trusting the layer list (the registration count is this process's)
        return {**self.__dict__, "kl_stashes": [], "confirmed": -1, "complete": False}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update({"_applications_at_draw": 0, **state})  # (banks pickled before it existed)

    def draw(self, model: nn.Module, args) -> None:
        self.clear()
        self.kl_stashes = []
        self.complete = False
        self._applications_at_draw = _applications[0]
        if not model.training:
            return
        if self.row_first:  # a distributed shard: layers drawing for themselves count rows from here too
            for noise in self.layers:
                noise.__dict__["row_first"] = self.row_first
            self._rows_offset = True
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
                noise.hold_theta(part)

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

    def finish(self) -> None:
        """At the end of the model's forward: note whether it applied exactly this bank's layers, each once
        to the θ drawn for it (then ``covers_model`` needs no walk), and drop any θ left unused."""
        self.complete = (bool(self.kl_stashes) and _applications[0] - self._applications_at_draw == len(self.layers)
                         and all(noise.__dict__["pending_theta"] is None for noise in self.layers))
        self.clear()

    def covers_model(self) -> bool:
        """True when ``self.layers`` are known to be all of the model's noise layers without walking it: a
        walk found exactly them and no module has been registered anywhere since, and the last forward
        applied each of them once and no other (so none was deleted, nor added past the registration hooks,
        as ``nn.ModuleList.insert`` does)."""
        return self.complete and self.confirmed == _registrations[0]

    def confirm(self, layers: list[MultiplicativeNoise]) -> None:
        """Record a walk of the model that found ``layers``: if they are exactly this bank's, ``covers_model``
        holds until the next module registration."""
        if len(layers) == len(self.layers) and all(a is b for a, b in zip(layers, self.layers)):
            self.confirmed = _registrations[0]

    def clear(self, *_) -> None:
        for noise in self.layers:
            noise.hold_theta(None)
        if self.__dict__.get("_rows_offset"):
            for noise in self.layers:
                noise.__dict__["row_first"] = 0
            self._rows_offset = False


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
        bank.finish()


def noise_layers(model: nn.Module) -> list[tuple[str, MultiplicativeNoise]]:
    """(name of the module the noise follows, noise layer) for every attached noise layer, in order."""
    found = []
    for name, module in model.named_modules():
        noise = module._modules.get(NOISE_ATTR) if hasattr(module, "_modules") else None
        if isinstance(noise, MultiplicativeNoise):
            found.append((name, noise))
    return found


def _features_and_dim(module: nn.Module) -> tuple[int, int] | None:
    if isinstance(module, _CONV):
        return module.out_channels, 1
    if isinstance(module, _NORM):
        return module.num_features, 1
    if isinstance(module, nn.Linear):
        return module.out_features, -1
    if isinstance(module, nn.MultiheadAttention):
        return module.embed_dim, -1
    if isinstance(module, (nn.LayerNorm,)):
        shape = module.normalized_shape
        return (shape[-1], -1) if shape else None
    if isinstance(module, nn.GroupNorm):
        return module.num_channels, 1
    return None


def _leaf_modules(model: nn.Module) -> list[tuple[str, nn.Module, nn.Module | None, str]]:
    """(name, module, parent, attribute) of every module, skipping MultiheadAttention internals."""
    out = []

    def visit(prefix: str, module: nn.Module):
        for attr, child in module._modules.items():
            if child is None or attr == NOISE_ATTR:
                continue
            name = f"{prefix}.{attr}" if prefix else attr
            out.append((name, child, module, attr))
            if not isinstance(child, nn.MultiheadAttention):
                visit(name, child)

    visit("", model)
    return out


def _default_targets(model: nn.Module) -> list[tuple[str, nn.Module, int, int, str | None]]:
    """Apply the documented default policy: [(name, module to hook, features, dim, producer)]."""
    entries = _leaf_modules(model)
    producers = [i for i, (_, m, _, _) in enumerate(entries) if isinstance(m, _PRODUCERS)]
    if not producers:
        return []
    flow = module_flow(model, _PRODUCERS)
    if flow is not None:  # the data flow: the layers feeding the output, the module after each layer
        # (flow names a shared module by its first name; entries list it under each)
        named = dict(model.named_modules())
        canonical = {id(module): name for name, module in named.items()}
        first_entry: dict[int, int] = {}
        for i, entry in enumerate(entries):
            first_entry.setdefault(id(entry[1]), i)
        output_layers = {i for i in producers if canonical.get(id(entries[i][1])) in flow.output_layers} \
            or {producers[-1]}  # (none found behind a residual sum or a concatenation: the last registered)
        next_leaf = {i: first_entry[id(named[flow.follower[canonical[id(entries[i][1])]]])] for i in producers
                     if flow.follower.get(canonical.get(id(entries[i][1]))) in named}
    else:  # registration order: the last layer registered, the next leaf registered
        output_layers = {producers[-1]}
        leaves = [i for i, (_, m, _, _) in enumerate(entries) if not m._modules or isinstance(m, nn.MultiheadAttention)]
        next_leaf = dict(zip(leaves, leaves[1:]))
    chosen = []
    for i in producers:
        if i in output_layers:
            continue
        name, module, parent, attr = entries[i]
        features, dim = _features_and_dim(module)
        j = next_leaf.get(i)
        follower = entries[j] if j is not None else None
        # (a BatchNorm would turn a Linear's zeroed unit into a constant: the noise goes after it there too)
        if follower and isinstance(follower[1], _NORM) and follower[1].num_features == features:
            chosen.append((follower[0], follower[1], features, 1, name))
            continue
        # Activation module right after it in the same Sequential: noise after the activation.
        if follower and isinstance(follower[1], _ACTIVATIONS) and isinstance(parent, nn.Sequential) \
                and follower[2] is parent:
            chosen.append((follower[0], follower[1], features, dim, name))
            continue
        chosen.append((name, module, features, dim, name))
    return transformer_placement(model, chosen)


def _producer_of(entries, index: int, flow: Flow | None) -> str | None:
    """Name of the Conv/Linear whose outputs the module at ``index`` gates (None if unclear): back along
    the data flow through norms and activations where it is known, else the last one registered before."""
    name, module, _, _ = entries[index]
    if isinstance(module, _PRODUCERS):
        return name
    if isinstance(module, nn.MultiheadAttention):
        return f"{name}.out_proj"
    if isinstance(module, _NORM + _ACTIVATIONS):
        modules = {entry[0]: entry[1] for entry in entries}
        current = name
        while flow is not None and isinstance(modules.get(flow.source.get(current)), _PRODUCERS + _NORM + _ACTIVATIONS):
            current = flow.source[current]
            if isinstance(modules[current], _PRODUCERS):
                return current
        for prev_name, prev, _, _ in reversed(entries[:index]):
            if isinstance(prev, _PRODUCERS):
                return prev_name
            if not isinstance(prev, _NORM + _ACTIVATIONS) and not prev._modules:
                return None
    return None


def _explicit_targets(model: nn.Module, targets: Iterable) -> list[tuple[str, nn.Module, int, int, str | None]]:
    if isinstance(targets, (str, type)):  # one name or type: the list of it
        targets = [targets]
    try:
        targets = list(targets)
    except TypeError:
        raise ConfigError(f"attach: targets must be a list of module names or nn.Module types, got {targets!r}") from None
    entries = _leaf_modules(model)
    index_of = {name: i for i, (name, _, _, _) in enumerate(entries)}
    by_name = {name: (name, m) for name, m, _, _ in entries}
    only_layers = all(isinstance(t, str) and isinstance(by_name.get(t, (None, None))[1], _PRODUCERS) for t in targets)
    flow = None if only_layers else module_flow(model, _PRODUCERS)  # (norms and activations need it)
    chosen, seen = [], set()
    for target in targets:
        if isinstance(target, str):
            if target not in by_name:
                raise ModelError(f"attach: no module named {target!r} in {type(model).__name__}; "
                                 f"see [name for name, _ in model.named_modules()]")
            matches = [by_name[target]]
        elif isinstance(target, type) and issubclass(target, nn.Module):
            matches = [(name, m) for name, m, _, _ in entries if isinstance(m, target)]
        else:
            raise ConfigError(f"attach: targets must be module names or nn.Module types, got {target!r}")
        for name, module in matches:
            if name in seen:
                continue
            seen.add(name)
            layout = head_layout(module)
            if layout is not None:  # an attention module: one θ per head
                chosen.append((name, module, layout.heads, -2, None))
                continue
            spec = _features_and_dim(module)
            producer = _producer_of(entries, index_of[name], flow)
            if spec is None and producer is not None:  # an activation: it has its producer's width
                spec = _features_and_dim(entries[index_of[producer]][1])
            if spec is None:
                raise ModelError(f"attach: cannot tell how many structures {name!r} ({type(module).__name__}) "
                                 "outputs; target the Conv/Linear/BatchNorm before it instead")
            chosen.append((name, module, *spec, producer))
    return chosen


def attach(
    model: nn.Module,
    targets: Iterable | None = None,
    *,
    low: float = -20.0,
    high: float = 0.0,
    granularity: str = "structure",
    batch_dim: int | None = None,
) -> nn.Module:
    """Insert a noise layer after each target (see the module docstring for the default policy).

    ``targets``: module names (``"layer1.0.bn1"``) or nn.Module types (``nn.Linear``).
    ``batch_dim``: the axis of the layers' (three- or more-dimensional) inputs that indexes examples, each
    of which draws its own θ: 0 for batch-first tensors, 1 for sequence-first (tokens, examples, features)
    ones.  Default: 1 inside a module built with ``batch_first=False`` (``nn.MultiheadAttention`` and the
    ``nn.Transformer`` layers' default), else 0; pass 1 for a model that is sequence-first throughout.
    Returns the same model, modified in place.

    Example:
        >>> import torch, bmrs
        >>> cnn = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        ...                           torch.nn.Flatten(), torch.nn.LazyLinear(10))
        >>> [name for name, _ in bmrs.noise_layers(bmrs.attach(cnn))]
        ['1']
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"attach expects an nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise ConfigError("attach needs the Python model, not a TorchScript one (torch.jit.script or trace): attach "
                          "noise and train first, then compact and script the small model")
    if noise_layers(model):
        raise ModelError("attach: the model already has noise layers; attach once (or compact it first)")
    chosen = _default_targets(model) if targets is None else _explicit_targets(model, targets)
    # a module used in several places (shared weights) is one target: one noise layer, one hook
    modules_seen: set[int] = set()
    chosen = [entry for entry in chosen if not (id(entry[1]) in modules_seen or modules_seen.add(id(entry[1])))]
    if not chosen:
        raise ModelError(
            f"attach: found nothing to attach noise to in {type(model).__name__} (no Conv/Linear/BatchNorm "
            "layer other than the output layer); pass targets=[...] naming the layers to gate"
        )
    modules = dict(model.named_modules())  # (MultiplicativeNoise checks batch_dim)
    entries = []
    for name, module, features, dim, producer in chosen:
        examples_at = _sequence_first_axis(modules, name) if batch_dim is None else batch_dim
        layout = head_layout(module) if dim == -2 else None
        noise = MultiplicativeNoise(features, dim=dim, low=low, high=high, granularity=granularity,
                                    batch_dim=examples_at, head_dim=layout.head_dim if layout else None)
        noise.producer = producer  # the Conv/Linear whose output structures this layer gates
        param = next(module.parameters(), None)
        if param is not None:
            noise = noise.to(device=param.device)
        entries.append((module, noise))
    install_noise(model, entries)
    return model


def _sequence_first_axis(modules: dict[str, nn.Module], name: str) -> int:
    """1 when the module ``name`` or one around it was built with ``batch_first=False``, or holds an
    ``nn.MultiheadAttention`` that was (as ``nn.TransformerEncoderLayer`` does by default): its tensors
    are (tokens, examples, features).  Else 0."""
    parts = name.split(".") if name else []
    for depth in range(len(parts), -1, -1):
        module = modules.get(".".join(parts[:depth]))
        if getattr(module, "batch_first", None) is False or any(
                isinstance(child, nn.MultiheadAttention) and not child.batch_first
                for child in getattr(module, "_modules", {}).values()):
            return 1
    return 0


def install_noise(model: nn.Module, entries: list[tuple[nn.Module, MultiplicativeNoise]]) -> None:
    """Register each noise layer under its module, its forward hook (on that module or on the
    pooling after it: see the module docstring), and the model's noise bank."""
    modules, places = dict(model.named_modules()), {}
    for parent in model.modules():
        for position, child in enumerate(parent._modules.values()):
            places.setdefault(id(child), []).append((parent, position))
    for module, noise in entries:
        module.add_module(NOISE_ATTR, noise)
        if noise.head_dim is not None:  # gates the heads at the input of the output projection
            ready_for_gate(module).out.register_forward_pre_hook(HeadGate(module, noise.head_dim, _gate_heads))
            continue
        target = _hook_target(module, noise, modules, places)
        target.register_forward_hook(_apply_noise if target is module else _NoiseAfterPool(module), with_kwargs=True)
    _watch_registrations()
    model._bmrs_bank = _NoiseBank([noise for _, noise in noise_layers(model)])
    model.register_forward_pre_hook(_bank_draw)
    model.register_forward_hook(_bank_clear)


def detach_noise(model: nn.Module) -> nn.Module:
    """Remove every noise layer and its hook (no folding: use ``bmrs.compact`` to keep the function)."""
    for _, module in model.named_modules():
        if NOISE_ATTR in getattr(module, "_modules", {}):
            del module._modules[NOISE_ATTR]
            make_plain(module)
        for hooks in (module._forward_hooks, module._forward_pre_hooks):
            for key, hook in list(hooks.items()):
                if hook in (_apply_noise, _bank_draw, _bank_clear) or isinstance(hook, (_NoiseAfterPool, HeadGate)):
                    del hooks[key]
                    module._forward_hooks_with_kwargs.pop(key, None)
        if "_bmrs_bank" in module.__dict__:
            del module.__dict__["_bmrs_bank"]
    return model


def kl_loss(model: nn.Module, reduction: str = "mean", num_train: int | None = None) -> Tensor:
    """The KL term of the training loss.

    ``"mean"`` (the paper's): the mean KL over each layer's structures, averaged over layers, added
    unscaled to the batch-mean cross-entropy (a layer of 6 filters weighs each of its structures 20 times
    as much as a layer of 120 units does).  ``"structure-mean"``: the mean KL over all the model's
    structures, the same weight on each (``bmrs train``'s default, with a weight of its own).  Neither
    changes with the training-set size.  ``"elbo"``: Σ KL / num_train, the proper evidence lower bound
    per example.

    Example:
        >>> import torch, bmrs
        >>> m = bmrs.attach(torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 2)))
        >>> float(bmrs.kl_loss(m, "elbo", num_train=1000)) > 0
        True
    """
    if reduction not in KL_REDUCTIONS:
        raise ConfigError(f"kl_loss: reduction must be one of {', '.join(KL_REDUCTIONS)}, got {reduction!r}")
    if reduction == "elbo" and (isinstance(num_train, bool) or not isinstance(num_train, int) or num_train < 1):
        raise ConfigError(f"kl_loss(reduction='elbo') needs num_train, the training-set size; got {num_train!r}")
    bank = model.__dict__.get("_bmrs_bank")
    if reduction == "mean" and bank is not None and bank.covers_model():
        # the common training step: the mean formed by this step's draw, the model not walked (a walk
        # reads every module, which after the step's matrix products costs tens of microseconds)
        mean = bank.stashed_mean_kl(bank.layers)
        if mean is not None:
            return mean
    layers = [noise for _, noise in noise_layers(model)]
    if not layers:
        raise ModelError("kl_loss: the model has no noise layers; call bmrs.attach(model) first")
    if bank is not None:
        bank.confirm(layers)
    # one batched KL per group of bounds: the work is per operation, so concatenating all layers
    # makes the KL of a deep network as cheap as that of one layer; the mean is a weighted sum over
    # each layer's original structures (removing pruned ones changes no weight)
    if reduction == "mean" and bank is not None:
        mean = bank.stashed_mean_kl(layers)  # formed by this step's draw
        if mean is not None:
            return mean
    total = None
    for members in _bounds_groups(layers):
        coefs = _kl_weights(reduction, members, layers, num_train)
        part = _stashed_kl_sum(bank, members, coefs)
        if part is None:
            mus, log_sigmas, _, _ = zip(*map(MultiplicativeNoise.tensors, members))
            part = kl_layers(mus, log_sigmas, coefs, members[0].low, members[0].high)
        if part is None:  # the reference path
            kl = members[0].kl_of(*_concat_posteriors(members))
            weights = torch.cat([torch.full((n.num_features,), coef, dtype=kl.dtype, device=kl.device)
                                 for n, coef in zip(members, coefs)])
            part = (kl * weights).sum()
        total = part if total is None else total + part
    return total


def _kl_weights(reduction: str, members: list[MultiplicativeNoise], layers: list[MultiplicativeNoise],
                num_train: int | None) -> list[float]:
    """The weight of each member's summed KL under ``reduction`` (members: some of the model's ``layers``)."""
    if reduction == "mean":
        return _mean_weights(members, len(layers))
    if reduction == "structure-mean":  # over the original structures: removing pruned ones changes no weight
        return [1.0 / sum(n.full_features for n in layers)] * len(members)
    return [1.0 / num_train] * len(members)


def _mean_weights(members: list[MultiplicativeNoise], layer_count: int) -> list[float]:
    """kl_loss's "mean" weight of each member's summed KL: the mean over the layer's original structures
    (removing pruned ones changes no weight), averaged over the model's ``layer_count`` noise layers."""
    return [1.0 / (n.full_features * layer_count) for n in members]


def _stashed_kl_sum(bank: _NoiseBank | None, members: list[MultiplicativeNoise], coefs: list[float]) -> Tensor | None:
    """Σ_l coefs[l]·KL_l from the KL that this step's fused draw formed beside θ, when it is still valid."""
    kl = bank.stashed_kl(members) if bank is not None else None
    if kl is None:
        return None
    return torch.dot(kl, torch.tensor(coefs, dtype=kl.dtype))


def _bounds_groups(layers: list[MultiplicativeNoise]) -> list[list[MultiplicativeNoise]]:
    """The layers split by (low, high, device): each group's posteriors concatenate into one batched call.

    The common case (all on the CPU with the same bounds: one group) forms no device object per layer: the
    noise bank's draw calls this at every training step, right after the previous step's matrix products,
    where each Python object it touches is a cache miss (its Python took 15-60 µs there, a few µs hot).

    Example:
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
