"""A small pre-LN Vision Transformer with timm-style names (patch_embed.proj, blocks.N.attn.qkv, …).

Noise layers gate, in every block, the attention heads (one θ per head on ``attn.proj``'s input,
:mod:`bmrs.nn.heads`) and the MLP hidden units (after ``mlp.fc1``, one θ per unit shared over
tokens).  What writes into the residual stream (the patch embedding, ``attn.proj``, ``mlp.fc2``) gets
no noise: its channels are read by every later block and the final LayerNorm, so none could be removed.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..nn import attach
from ._checks import positive_int, noise_options

__all__ = ["PatchEmbed", "Attention", "Mlp", "Block", "VisionTransformer", "vit", "vit_noise_targets"]


class PatchEmbed(nn.Module):
    """Non-overlapping patches → tokens with a strided Conv2d (``proj``), as timm's PatchEmbed."""

    def __init__(self, image_size: int, patch_size: int, in_channels: int, dim: int):
        super().__init__()
        self.image_size, self.patch_size = image_size, patch_size
        self.grid_size = image_size // patch_size
        self.num_patches = self.grid_size ** 2
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ConfigError(f"vit: expects {self.image_size}×{self.image_size} images, got {tuple(x.shape[-2:])}; "
                              "build it with image_size matching the data")
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, tokens, dim)


class Attention(nn.Module):
    """Multi-head self-attention written with plain ops (so ``qkv`` and ``proj`` are ordinary Linears)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.num_heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        n, t, c = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (n, heads, t, head_dim)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = attn.softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(n, t, self.num_heads * self.head_dim)  # (heads may be pruned)
        return self.proj(out)


class Mlp(nn.Module):
    """fc1 → GELU → fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, heads: int, mlp_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """Patch embedding + class token + learned positional embedding → blocks → LayerNorm → head on the class token."""

    def __init__(self, image_size: int = 32, patch_size: int = 4, in_channels: int = 3, num_classes: int = 10,
                 dim: int = 192, depth: int = 6, heads: int = 3, mlp_dim: int = 384):
        super().__init__()
        self.patch_embed = PatchEmbed(image_size, patch_size, in_channels, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.norm(self.blocks(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.forward_features(x)[:, 0])


def vit_noise_targets(model: VisionTransformer) -> list[str]:
    """The modules :func:`vit` gates: the heads of ``blocks.N.attn`` and the hidden units of ``blocks.N.mlp.fc1``.

    Examples:
        >>> from bmrs.models import vit, vit_noise_targets
        >>> vit_noise_targets(vit(depth=1, noise=False))
        ['blocks.0.attn', 'blocks.0.mlp.fc1']
    """
    return [f"blocks.{i}.{part}" for i in range(len(model.blocks)) for part in ("attn", "mlp.fc1")]


def vit(image_size: int = 32, patch_size: int = 4, in_channels: int = 3, num_classes: int = 10, dim: int = 192,
        depth: int = 6, heads: int = 3, mlp_dim: int = 384, noise: bool | dict = True) -> VisionTransformer:
    """A pre-LN ViT (defaults: ViT-Tiny width, 6 blocks, 4×4 patches of 32×32 images) with 2·depth noise layers.

    Examples:
        >>> import torch, bmrs
        >>> model = bmrs.models.vit(depth=2)
        >>> model(torch.randn(2, 3, 32, 32)).shape, [n.num_features for _, n in bmrs.noise_layers(model)]
        (torch.Size([2, 10]), [3, 384, 3, 384])

        Each block has a noise layer on its attention (one per head) and one on its MLP's hidden units.
    """
    for name, value in (("image_size", image_size), ("patch_size", patch_size), ("in_channels", in_channels),
                        ("num_classes", num_classes), ("dim", dim), ("depth", depth), ("heads", heads),
                        ("mlp_dim", mlp_dim)):
        positive_int(name, value, "vit")
    if image_size % patch_size:
        raise ConfigError(f"vit: patch_size {patch_size} must divide image_size {image_size}")
    if dim % heads:
        raise ConfigError(f"vit: heads {heads} must divide dim {dim}")
    model = VisionTransformer(image_size, patch_size, in_channels, num_classes, dim, depth, heads, mlp_dim)
    options = noise_options(noise, "vit")
    return model if options is None else attach(model, targets=vit_noise_targets(model), **options)
