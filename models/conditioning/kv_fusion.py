"""Candidate (b): layerwise key-value fusion (paper Sec. 2.1, Fig. 1b; Playground v3 / FuseDiT).

    features (B, T, N, D_enc), mask (B, T)  ->  kv: N = dit_depth tensors (B, T, D_dit), tokens None

Encoder layer i is paired with DiT block i, so the number of selected encoder layers must equal the DiT depth
(the "tight coupling" the paper criticises). Here each layer only gets RMSNorm + Linear(enc -> dit); DiT block i
owns the K/V projections of ``kv[i]`` and concatenates them to its own keys/values under ``mask``.
No condition tokens enter the DiT sequence, so a refiner has nothing to refine (``feeds_tokens = False``).
"""

from __future__ import annotations

import torch
from torch import nn

from models.conditioning.base import Conditioner, Conditioning
from models.conditioning.last_layer import TokenProjection, check_features


class KVFusion(Conditioner):
    """Per encoder layer i: RMSNorm + Linear -> ``kv[i]`` for DiT block i."""

    feeds_tokens = False

    def __init__(self, enc_dim: int, num_layers: int, dit_dim: int, dit_depth: int, *, heads: int = 4):
        # heads is accepted for a uniform config but unused: the attention heads belong to the DiT blocks.
        if num_layers != dit_depth:
            raise ValueError(f"kv_fusion pairs encoder layer i with DiT block i: needs num_layers == dit_depth, "
                             f"got num_layers={num_layers}, dit_depth={dit_depth}")
        super().__init__(enc_dim, num_layers, dit_dim, dit_depth)
        self.proj = nn.ModuleList(TokenProjection(enc_dim, dit_dim) for _ in range(num_layers))

    def encode(self, features: torch.Tensor, mask: torch.Tensor) -> Conditioning:
        """features (B, T, N, D_enc), mask (B, T) -> Conditioning(kv=[(B, T, D_dit)] * depth, mask)."""
        check_features(self, features, mask)
        kv = [proj(features[:, :, i], mask) for i, proj in enumerate(self.proj)]
        return Conditioning(mask=mask, kv=kv)
