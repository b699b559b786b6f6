"""Bidirectional refiner over the condition tokens (paper Sec. 3 "Position bias", App. A.1.2).

A decoder-only encoder lets a token see only earlier tokens, so a subject named late in the prompt is
under-represented. A few bidirectional transformer blocks over the token axis (with the key padding mask) fix
that, as LI-DiT / Lumina-2 ``context_refiner`` / Krea2 ``refiner_blocks`` do.

    x (B, T, D), mask (B, T) bool (True = real)  ->  (B, T, D), padded positions exactly zero.

Placement: the paper's Sec. 3 says "before LAP" but its final model (Sec. 4) and Krea2 run the refiner after
pooling; here it runs after pooling/projection, on the tokens the DiT receives.
"""

from __future__ import annotations

import torch
from torch import nn

from models.blocks import TransformerBlock


class Refiner(nn.Module):
    """``blocks`` pre-RMSNorm TransformerBlocks attending across tokens; padded keys masked, padded outputs 0."""

    def __init__(self, dim: int, blocks: int, heads: int = 4):
        super().__init__()
        if not isinstance(blocks, int) or isinstance(blocks, bool) or blocks < 1:
            raise ValueError(f"Refiner needs blocks >= 1 (got {blocks!r}); use refiner_blocks=0 for no refiner")
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads) for _ in range(blocks))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, T, D), mask (B, T) bool -> (B, T, D)."""
        if mask.shape != x.shape[:2]:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match tokens {tuple(x.shape[:2])}")
        for block in self.blocks:
            x = block(x, mask)
        # Padded lanes carry garbage (they attend to real keys); zero them so nothing downstream can read it.
        return x.masked_fill(~mask[..., None], 0.0)
