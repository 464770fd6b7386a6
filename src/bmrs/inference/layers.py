"""Drop-in CPU inference layers for the narrow networks that compaction leaves behind.

Four PyTorch CPU kernels stop scaling down with the layer once a network is pruned:

* oneDNN pads a convolution's channels to its vector block, so a first layer pruned from 6 filters to
  2 on a 1-channel image costs as much as before.  :class:`NarrowConv2d` runs such layers through a
  direct convolution (``bmrs._kernels``, registers accumulate a block of output channels per input
  load) whose cost follows the multiply-adds that are left;
* ``max_pool2d`` on CPU walks each window with index bookkeeping, several times slower than the
  convolution before it.  :class:`TiledMaxPool2d` takes non-overlapping windows as element-wise maxima
  of strided views;
* the float32 matrix product (MKL here) runs an output width that is a whole number of 16-float vectors
  far faster than a ragged one: at batch 256 with 1,024 inputs, a ``Linear`` with 29 outputs took
  164 µs and one with 32 took 102-109 µs.  :class:`AlignedLinear` multiplies by its weight padded with
  zero rows to such a width and keeps the columns it has;
* float32 ``torch.tanh`` runs at about a seventh of ``torch.sigmoid``'s speed here (46 µs against
  6.4 µs for 256 × 150 values), more than the pruned layers around it.  :class:`FastTanh` evaluates it a
  vector of lanes at a time (SLEEF's 3.5-ulp tanh, ``bmrs._kernels``).

All four are subclasses of the torch layer they replace, with the same parameters, state dict and
``repr``; they take their fast path only for inference (no gradient needed) on CPU, and defer to the
torch layer otherwise — under autograd, ``torch.compile``, tracing and ONNX export, on other devices
and dtypes — so outputs are those of the torch layer (to float32 rounding for the convolution, the
linear layer and within a few ulps for tanh, bit for bit for the pooling).

Examples:
    >>> import torch
    >>> from bmrs.inference.layers import use_fast_layers
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 5), torch.nn.ReLU(), torch.nn.MaxPool2d(2))
    >>> use_fast_layers(net)
    2
    >>> type(net[2]).__name__, isinstance(net[2], torch.nn.MaxPool2d)
    ('TiledMaxPool2d', True)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import _kernels

__all__ = ["NarrowConv2d", "TiledMaxPool2d", "AlignedLinear", "FastTanh", "aligned_width", "use_fast_layers"]

# oneDNN is faster once a layer reads and writes enough channels to fill its vector blocks; measured on
# AVX-512 at batch 256 with 5×5 kernels, the direct kernel wins up to about 12 input × output channels.
MAX_DIRECT_CHANNEL_PRODUCT = 12
# The matrix product's vector of float32 outputs (AVX-512), and the fewest rows for which padding pays: a
# single row is a matrix-vector product, about as fast either way.
ALIGN = 16
MIN_ALIGNED_ROWS = 32
# The fewest inputs for which padding pays, measured at batch 256 over 8-1,024 inputs and 10-45 outputs
# (bmrs._kernels' aligned_linear_f32 keeping the columns): from 64 inputs the padded product won (by up to
# 36% at 1,024) or broke even; below, padding 25-45 outputs to 32-48 cost up to 20% more, while padding
# fewer than 16 outputs to 16 won at every input count (by 8-38%).  Without the compiled kernels the
# columns are kept by a Python slice and copy, 2-3 µs more, and padding pays only from 128 inputs.
MIN_ALIGNED_INPUTS = 64
MIN_ALIGNED_INPUTS_WITHOUT_KERNELS = 128


def _inference_only(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None) -> bool:
    """No gradient can flow through this call (input ``x``, optional parameters), and nothing is tracing or
    compiling it: the checks of ``_kernels.usable_for``, so that a caller past them takes ``_kernels.get()``.
    Runs on every call of a fast layer, where a microsecond counts: hence no generator or ``*args``."""
    if torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad)
                                    or (bias is not None and bias.requires_grad)):
        return False
    return not (torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling())


class NarrowConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose float32 CPU inference runs a direct convolution (for few channels).

    Takes the fast path for stride 1, dilation 1, one group, zero (or no) padding and a 4-D float32
    CPU input when no gradient is needed; any other call is ``nn.Conv2d.forward``.

    Examples:
        >>> import torch
        >>> conv = NarrowConv2d.from_conv(torch.nn.Conv2d(1, 2, 5, padding=2))
        >>> x = torch.randn(3, 1, 28, 28)
        >>> with torch.no_grad():
        ...     bool(torch.allclose(conv(x), torch.nn.functional.conv2d(x, conv.weight, conv.bias, padding=2),
        ...                         atol=1e-5))
        True
    """

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> "NarrowConv2d":
        """The same layer (sharing its parameters) as a NarrowConv2d."""
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                  dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                  padding_mode=conv.padding_mode, device="meta")
        new.weight, new.bias = conv.weight, conv.bias
        new.train(conv.training)
        return new

    def _direct_padding(self) -> tuple[int, int] | None:
        """(pad_h, pad_w) when the direct kernel computes this layer, else None."""
        if self.stride != (1, 1) or self.dilation != (1, 1) or self.groups != 1:
            return None
        if self.padding == "valid":
            return 0, 0
        if isinstance(self.padding, str):  # "same" with an even kernel pads asymmetrically
            return None
        if self.padding_mode != "zeros" and self.padding != (0, 0):
            return None
        return self.padding

    def forward(self, x: Tensor) -> Tensor:
        padding = self._direct_padding()
        if (padding is not None and x.dim() == 4 and x.dtype == torch.float32 and x.is_cpu
                and self.weight.dtype == torch.float32 and self.weight.is_cpu
                and _inference_only(x, self.weight, self.bias)):
            kernels = _kernels.get()
            if kernels is not None:
                return kernels.direct_conv2d(x, self.weight, self.bias, *padding)
        return super().forward(x)


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


class TiledMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` whose inference takes non-overlapping windows as maxima of strided views.

    Serves kernel == stride, no padding, dilation 1, ``ceil_mode=False`` and no indices (the windows
    tile the input; the rows and columns past the last whole window are dropped, as ``max_pool2d``
    does).  NaN propagates as in ``max_pool2d``.  Any other configuration, or a call that needs
    gradients, is ``nn.MaxPool2d.forward``.

    Examples:
        >>> import torch
        >>> pool = TiledMaxPool2d(2)
        >>> x = torch.randn(2, 3, 7, 8)
        >>> bool(torch.equal(pool(x), torch.nn.functional.max_pool2d(x, 2)))
        True
    """

    @classmethod
    def from_pool(cls, pool: nn.MaxPool2d) -> "TiledMaxPool2d":
        """The same layer as a TiledMaxPool2d."""
        new = cls(pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.return_indices, pool.ceil_mode)
        new.train(pool.training)
        return new

    def tiles(self) -> bool:
        """Whether the windows tile the input (the configuration the fast path serves)."""
        return (_pair(self.kernel_size) == _pair(self.stride) and _pair(self.padding) == (0, 0)
                and _pair(self.dilation) == (1, 1) and not self.ceil_mode and not self.return_indices)

    def forward(self, x: Tensor) -> Tensor:
        if not (self.tiles() and x.dim() in (3, 4) and _inference_only(x)):
            return super().forward(x)
        kh, kw = _pair(self.kernel_size)
        rows, cols = x.shape[-2] // kh, x.shape[-1] // kw
        if rows == 0 or cols == 0 or kh * kw == 1:
            return super().forward(x)  # an empty output (max_pool2d's error) or a copy
        x = x[..., : rows * kh, : cols * kw]
        out = x[..., 0::kh, :]
        for i in range(1, kh):
            out = torch.maximum(out, x[..., i::kh, :])
        pooled = out[..., 0::kw]
        for j in range(1, kw):
            pooled = torch.maximum(pooled, out[..., j::kw])
        return pooled


def aligned_width(out_features: int) -> int:
    """The output width an :class:`AlignedLinear` computes at: the next multiple of 16 below 32 outputs, and
    above for widths that are not a multiple of 8 and more than 2 past a multiple of 16; else the width
    itself.  Measured at batch 256 over widths 1-80 (MKL on AVX-512): padding those widths cut the time
    by 10-60%, where padding a multiple of 8, or 1-2 past a multiple of 16, cost up to 20% more.

    Examples:
        >>> [aligned_width(n) for n in (10, 29, 32, 40, 45, 49, 150)]
        [16, 32, 32, 40, 48, 49, 160]
    """
    rest = out_features % ALIGN
    if rest == 0 or not (out_features < 2 * ALIGN or (out_features % 8 != 0 and rest > 2)):
        return out_features
    return out_features + ALIGN - rest


def _pads(linear: nn.Linear, kernels: bool = True) -> bool:
    """Whether padding ``linear``'s output width pays: a ragged width, and fewer than 16 outputs or at least
    MIN_ALIGNED_INPUTS inputs (with ``kernels``; else at least MIN_ALIGNED_INPUTS_WITHOUT_KERNELS)."""
    if aligned_width(linear.out_features) == linear.out_features:
        return False
    if not kernels:
        return linear.in_features >= MIN_ALIGNED_INPUTS_WITHOUT_KERNELS
    return linear.in_features >= MIN_ALIGNED_INPUTS or linear.out_features < ALIGN


class AlignedLinear(nn.Linear):
    """``nn.Linear`` whose float32 CPU inference on at least 32 rows multiplies by its weight padded with zero
    rows to :func:`aligned_width` and returns the first ``out_features`` columns (contiguous), where that pays:
    fewer than 16 outputs, or at least 64 inputs (128 without the compiled kernels, which keep the columns
    in one pass).

    The parameters live in zero-padded buffers: ``weight`` and ``bias`` are views of their first
    ``out_features`` rows, so every write to them (an optimizer step, fused or not, ``.data`` or a state-dict
    load) reaches the padded product, and nothing is copied per call.  A parameter replaced by another
    tensor is moved into a new padded buffer at the next such call.  The parameters, state dict and ``repr``
    are the ``nn.Linear``'s.  Any other call (a gradient needed, tracing, compiling, other
    devices and dtypes, fewer rows) is ``nn.Linear.forward``.  Outputs are the ``nn.Linear``'s to float32
    rounding (the product may sum in another order).

    Examples:
        >>> import torch
        >>> layer = AlignedLinear.from_linear(torch.nn.Linear(128, 29))
        >>> x = torch.randn(40, 128)
        >>> with torch.no_grad():
        ...     y = layer(x)
        >>> y.shape, y.is_contiguous(), bool(torch.allclose(y, x @ layer.weight.T + layer.bias, atol=1e-5))
        (torch.Size([40, 29]), True, True)
    """

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "AlignedLinear":
        """The same layer (sharing its parameters) as an AlignedLinear."""
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        new.weight, new.bias = linear.weight, linear.bias
        new.train(linear.training)
        return new

    def _padded(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """The zero-padded buffers whose first rows are ``weight`` and ``bias``, these parameters moved into
        new ones when they are not (a first call, a parameter replaced, a copy of the module).  The values are
        unchanged: the parameters take views of the buffers as their data, so writes to them land there.
        (A copy keyed on the parameters' versions went stale: fused Adam writes without a version bump.)"""
        held = self.__dict__.get("_aligned")  # (padded weight, padded bias, the parameters' data pointers)
        if held is not None and held[2] == (weight.data_ptr(), None if bias is None else bias.data_ptr()):
            return held[0], held[1]  # (a pointer test: the layout checks cost 3 µs of a 130 µs MLP)
        width = aligned_width(self.out_features)
        with torch.inference_mode(False), torch.no_grad():  # buffers that training may use later
            padded = weight.new_zeros(width, self.in_features)
            padded[: self.out_features] = weight
            weight.data = padded[: self.out_features]
            padded_bias = None
            if bias is not None:
                padded_bias = bias.new_zeros(width)
                padded_bias[: self.out_features] = bias
                bias.data = padded_bias[: self.out_features]
        self.__dict__["_aligned"] = (padded, padded_bias,
                                     (weight.data_ptr(), None if bias is None else bias.data_ptr()))
        return padded, padded_bias

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """The parameters as tensors of their own (not views of the padded buffers): a state dict that shares
        a larger storage is refused by safetensors (``save_model``)."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name in ("weight", "bias"):
            value = destination.get(prefix + name)
            if value is not None and value.untyped_storage().nbytes() > value.numel() * value.element_size():
                destination[prefix + name] = value.detach().clone() if not keep_vars else value

    def forward(self, x: Tensor) -> Tensor:
        params = self._parameters  # past nn.Module's attribute lookup: a microsecond a call at these sizes
        weight, bias = params["weight"], params["bias"]
        if (x.dtype == torch.float32 and x.is_cpu and weight.dtype == torch.float32
                and weight.is_cpu and x.dim() >= 2 and x.numel() >= MIN_ALIGNED_ROWS * self.in_features
                and _inference_only(x, weight, bias)):
            kernels = _kernels.get()
            if _pads(self, kernels is not None):
                padded, padded_bias = self._padded(weight, bias)
                if kernels is not None:
                    return kernels.aligned_linear_f32(x, padded, padded_bias, self.out_features)
                return nn.functional.linear(x, padded, padded_bias)[..., : self.out_features].contiguous()
        return super().forward(x)


class FastTanh(nn.Tanh):
    """``nn.Tanh`` whose float32 CPU inference evaluates tanh a vector of lanes at a time (SLEEF's tanh,
    within 3.5 ulps, tested to 4; torch's own is within 1).  Any other call (a gradient needed, tracing,
    compiling, other devices and dtypes, no compiled kernels) is ``nn.Tanh.forward``.

    Examples:
        >>> import torch
        >>> x = torch.randn(4, 5)
        >>> with torch.no_grad():
        ...     bool(torch.allclose(FastTanh()(x), torch.tanh(x), rtol=1e-6, atol=0))
        True
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32 and x.is_cpu and _inference_only(x):
            kernels = _kernels.get()
            if kernels is not None:
                return kernels.tanh_f32(x)
        return super().forward(x)


def use_fast_layers(model: nn.Module, max_channel_product: int = MAX_DIRECT_CHANNEL_PRODUCT) -> int:
    """Swap, in place, the layers of ``model`` that have a faster inference form; returns how many.

    Each ``nn.Conv2d`` (exactly that type) with ``in_channels × out_channels <= max_channel_product``
    becomes a :class:`NarrowConv2d`, each tiling ``nn.MaxPool2d`` a :class:`TiledMaxPool2d` and each
    ``nn.Linear`` whose width :func:`aligned_width` pads, with fewer than 16 outputs or at least 64 inputs, an
    :class:`AlignedLinear` (and each ``nn.Tanh`` a
    :class:`FastTanh`), sharing parameters (hooks registered on the old modules are not carried over).  Outputs do not
    change (see the module docstring); training calls are unaffected.  :func:`bmrs.inference.optimize` is
    the public step (it also checks that the model has been compacted); ``bmrs.compact(...,
    fast_layers=True)`` calls it on what it returns.

    Examples:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3), torch.nn.MaxPool2d(3, stride=2))
        >>> use_fast_layers(net)     # too many channels; overlapping windows
        0
    """
    if max_channel_product < 0:
        raise ValueError(f"max_channel_product must be >= 0, got {max_channel_product}")
    swaps = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is nn.Conv2d and child.in_channels * child.out_channels <= max_channel_product:
                swaps.append((parent, name, NarrowConv2d.from_conv(child)))
            elif type(child) is nn.MaxPool2d and (pool := TiledMaxPool2d.from_pool(child)).tiles():
                swaps.append((parent, name, pool))
            elif type(child) is nn.Linear and _pads(child):
                swaps.append((parent, name, AlignedLinear.from_linear(child)))
            elif type(child) is nn.Tanh:
                swaps.append((parent, name, FastTanh()))
    for parent, name, layer in swaps:
        setattr(parent, name, layer)
    return len(swaps)
