"""Candidate (c): hidden-state injection, HSI (paper Sec. 2.1).

    features (B, T, N, D_enc), mask (B, T)  ->  tokens (B, T, D_dit) from layer 0,
                                               inject[i] (B, T, D_dit) from layer i+1 for i < depth-1,
                                               inject[depth-1] = None

Like KV fusion, encoder layer i is matched to DiT depth i (N must equal dit_depth), but instead of K/V the
representation is *added* to the condition tokens' residual stream: layer 0 is the DiT input sequence, and the
DiT adds ``inject[i]`` after block i, i.e. to the input of block i+1. An injection after the last block could
never reach an image token, hence ``None``. Each injection is ``Linear_i(RMSNorm_i(layer i+1))`` with
``Linear_i`` zero-initialised, so training starts from the plain no-injection model (the intermediate layers
are not normed by the encoder, hence the RMSNorm). An optional refiner acts on the input tokens only.
"""

from __future__ import annotations

import torch
from torch import nn

from models.conditioning.base import Conditioner, Conditioning
from models.conditioning.last_layer import TokenProjection, check_features
from models.conditioning.refiner import Refiner


class HiddenStateInjection(Conditioner):
    """Input tokens from layer 0; zero-init per-block injections from layers 1..depth-1."""

    layer_per_block = True

    def __init__(
        self,
        enc_dim: int,
        num_layers: int,
        dit_dim: int,
        dit_depth: int,
        *,
        heads: int = 4,
        refiner_blocks: int = 0,
        refiner_heads: int | None = None,
    ):
        if num_layers != dit_depth:
            raise ValueError(f"hsi injects encoder layer i+1 after DiT block i: needs num_layers == dit_depth, "
                             f"got num_layers={num_layers}, dit_depth={dit_depth}")
        super().__init__(enc_dim, num_layers, dit_dim, dit_depth)
        self.proj = TokenProjection(enc_dim, dit_dim)
        refiner_heads = heads if refiner_heads is None else refiner_heads
        self.refiner = Refiner(dit_dim, refiner_blocks, refiner_heads) if refiner_blocks else None
        self.inject = nn.ModuleList(TokenProjection(enc_dim, dit_dim, zero_init=True) for _ in range(dit_depth - 1))

    def encode(self, features: torch.Tensor, mask: torch.Tensor) -> Conditioning:
        """features (B, T, N, D_enc), mask (B, T) -> tokens (B, T, D_dit) + inject (depth entries)."""
        check_features(self, features, mask)
        tokens = self.proj(features[:, :, 0], mask)
        if self.refiner is not None:
            tokens = self.refiner(tokens, mask)
        inject: list[torch.Tensor | None] = [p(features[:, :, i + 1], mask) for i, p in enumerate(self.inject)]
        inject.append(None)
        return Conditioning(mask=mask, tokens=tokens, inject=inject)
