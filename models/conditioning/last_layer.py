"""Candidate (a): one encoder layer as the DiT's condition tokens (paper Sec. 2.1, Fig. 1a).

    features (B, T, N, D_enc), mask (B, T)  ->  tokens (B, T, D_dit), padded positions zero

The encoder picks which hidden states arrive (e.g. ``layers: [-1]`` for the last, ``[-2]`` for the
penultimate); ``layer`` indexes the N axis of what arrived. RMSNorm + Linear, as FuseDiT / Lumina-2 / Qwen-Image
``context_embedder``, then an optional bidirectional refiner (App. A.1.2: "bi-directional refiner on
penultimate layer features").

Also home of the two pieces every candidate shares: ``check_features`` and ``TokenProjection``.
"""

from __future__ import annotations

import torch
from torch import nn

from models.conditioning.base import Conditioner, Conditioning
from models.conditioning.refiner import Refiner


def check_features(module: Conditioner, features: torch.Tensor, mask: torch.Tensor) -> None:
    """Raise a clear error unless features is (B, T, num_layers, enc_dim) and mask is a (B, T) bool tensor."""
    expect = ("B", "T", module.num_layers, module.enc_dim)
    if features.dim() != 4 or tuple(features.shape[2:]) != expect[2:]:
        raise ValueError(f"features must be (B, T, N={module.num_layers}, D={module.enc_dim}), "
                         f"got {tuple(features.shape)}")
    if mask.dtype != torch.bool or tuple(mask.shape) != tuple(features.shape[:2]):
        raise ValueError(f"mask must be a bool (B, T) = {tuple(features.shape[:2])} tensor, "
                         f"got {mask.dtype} {tuple(mask.shape)}")


class TokenProjection(nn.Module):
    """RMSNorm + Linear(in -> out); padded positions zeroed. x (B, T, in), mask (B, T) -> (B, T, out).

    ``zero_init`` zeroes the Linear so the output starts at exactly 0 (injections start as no-ops).
    """

    def __init__(self, in_dim: int, out_dim: int, zero_init: bool = False):
        super().__init__()
        self.norm = nn.RMSNorm(in_dim, eps=1e-6)
        self.linear = nn.Linear(in_dim, out_dim)
        if zero_init:
            nn.init.zeros_(self.linear.weight)
            nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # masked_fill, not a multiply: garbage (even inf) in padded lanes must not leak as NaN.
        return self.linear(self.norm(x)).masked_fill(~mask[..., None], 0.0)


class LastLayer(Conditioner):
    """Tokens from one selected encoder layer: features[:, :, layer] -> RMSNorm -> Linear (-> Refiner)."""

    def __init__(
        self,
        enc_dim: int,
        num_layers: int,
        dit_dim: int,
        dit_depth: int,
        *,
        layer: int = -1,
        heads: int = 4,
        refiner_blocks: int = 0,
        refiner_heads: int | None = None,
    ):
        super().__init__(enc_dim, num_layers, dit_dim, dit_depth)
        if not isinstance(layer, int) or not -num_layers <= layer < num_layers:
            raise ValueError(f"layer={layer!r} out of range for N={num_layers} selected layers "
                             f"(valid: {-num_layers}..{num_layers - 1})")
        self.layer = layer
        self.proj = TokenProjection(enc_dim, dit_dim)
        refiner_heads = heads if refiner_heads is None else refiner_heads
        self.refiner = Refiner(dit_dim, refiner_blocks, refiner_heads) if refiner_blocks else None

    def encode(self, features: torch.Tensor, mask: torch.Tensor) -> Conditioning:
        """features (B, T, N, D_enc), mask (B, T) -> Conditioning(tokens (B, T, D_dit), mask)."""
        check_features(self, features, mask)
        tokens = self.proj(features[:, :, self.layer], mask)
        if self.refiner is not None:
            tokens = self.refiner(tokens, mask)
        return Conditioning(mask=mask, tokens=tokens)
