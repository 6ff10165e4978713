"""A tiny Vision Transformer whose attention and MLP sub-blocks are residual blocks."""

from __future__ import annotations

import torch
from torch import nn

from .blocks import ResidualBlock
from .registry import Architecture, register
from .structure import Plan, declare_features, declare_units


class SelfAttention(nn.Module):
    """Multi-head self-attention over a token sequence (batch, tokens, dim)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"vit dim {dim} must be divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = nn.functional.scaled_dot_product_attention(q, k, v)
        projected: torch.Tensor = self.proj(out.transpose(1, 2).reshape(b, n, d))
        return projected

    def flops(self, inp: torch.Tensor, out: torch.Tensor) -> int:
        """Multiply-accumulates of ``Q K^T`` and ``A V`` (its linear maps count on their own)."""
        b, n, d = inp.shape
        return 2 * b * n * n * d


class ViT(nn.Module):
    """Patch embedding, class token, ``depth`` pre-norm transformer layers, linear head."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        image_size: int,
        patch: int = 4,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: int = 2,
    ) -> None:
        super().__init__()
        if min(patch, dim, heads, mlp_ratio) < 1 or depth < 0:
            raise ValueError(
                "vit needs patch, dim, heads and mlp_ratio >= 1 and depth >= 0, got "
                f"patch={patch}, dim={dim}, heads={heads}, mlp_ratio={mlp_ratio}, depth={depth}"
            )
        if image_size % patch != 0:
            raise ValueError(f"vit patch size {patch} must divide the image size {image_size}")
        tokens = (image_size // patch) ** 2
        self.embed = nn.Conv2d(in_channels, dim, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers.append(
                ResidualBlock(nn.Sequential(nn.LayerNorm(dim), SelfAttention(dim, heads)))
            )
            layers.append(
                ResidualBlock(
                    nn.Sequential(
                        nn.LayerNorm(dim),
                        nn.Linear(dim, mlp_ratio * dim),
                        nn.GELU(),
                        nn.Linear(mlp_ratio * dim, dim),
                    )
                )
            )
        self.layers = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The patch embedding with the class token and the position embedding."""
        t = self.embed(x).flatten(2).transpose(1, 2)
        return torch.cat([self.cls.expand(t.shape[0], -1, -1), t], dim=1) + self.pos

    def class_token(self, t: torch.Tensor) -> torch.Tensor:
        """The class token of a token sequence: what the head classifies."""
        return t[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.fc(self.class_token(self.norm(self.layers(self.tokens(x)))))
        return logits


def vit_units(net: ViT) -> Plan:
    """Units of a ViT: the embedding, then each transformer layer (attention + MLP sub-blocks)."""
    layers = tuple(
        (("call", f"layers.{2 * k}"), ("call", f"layers.{2 * k + 1}"))
        for k in range(len(net.layers) // 2)
    )
    names = ("embedding", *(f"layer.{k}" for k in range(len(layers))))
    head = (("call", "norm"), ("class_token", ""), ("call", "fc"))
    return Plan(((("tokens", ""),), *layers), names, head)


register(Architecture("vit", ViT, {}, "tiny ViT, residual attention and MLP sub-blocks"))
declare_units(ViT, vit_units)
declare_features(ViT, "fc")
