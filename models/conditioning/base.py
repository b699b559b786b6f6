"""The one interface every conditioning candidate implements.

A conditioner turns frozen-encoder features into what the DiT consumes:

    features (B, T, N, D_enc) float   N selected encoder layers (docs/DESIGN.md §2)
    mask     (B, T) bool              True = real token
    drop     (B,) bool | None         True = replace this row by the learned null condition (CFG)
        -> Conditioning

`Conditioning` has three optional channels; a candidate fills the ones it uses:

- ``tokens`` (B, T', D) + ``mask`` (B, T'): a sequence prepended to the DiT's image tokens
  (single-stream full self-attention over ``[condition; image]``).
- ``kv`` list of ``depth`` tensors (B, T', D'): block i adds keys/values from ``kv[i]`` to its attention
  (layerwise KV fusion: the encoder's own packed keys/values, or a hidden state the block projects; see
  ``Conditioner.kv_context``). Masked by ``mask``.
- ``inject`` list of ``depth`` tensors (B, T', D) or None entries: added to the condition-token positions of
  the residual stream after block i (hidden-state injection). Requires ``tokens``.

The learned null condition lives on the encoder-feature side (one learned feature vector per selected layer,
used as a single real token) so that every candidate, whatever it feeds the DiT, drops out the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Conditioning:
    """What a conditioner hands the DiT. Shapes in the module docstring."""

    mask: torch.Tensor
    tokens: torch.Tensor | None = None
    kv: list[torch.Tensor] | None = None
    inject: list[torch.Tensor | None] | None = None
    extras: dict = field(default_factory=dict)  # analysis hooks (e.g. LAP attention maps); never used by the DiT


class Conditioner(nn.Module):
    """Base class: owns the learned null condition and applies CFG dropping before ``encode``.

    Subclasses implement ``encode(features, mask) -> Conditioning``.
    """

    #: True when the candidate feeds DiT input tokens (the refiner switch applies to those only).
    feeds_tokens: bool = True
    #: How the DiT blocks read ``Conditioning.kv`` (models/dit.py: "hidden" | "encoder"); None = no kv channel.
    kv_context: str | None = None
    #: True when encoder layer i feeds DiT block i, so the number of tapped layers must equal the DiT's depth.
    layer_per_block: bool = False

    @classmethod
    def encoder_features(cls, options: dict) -> str:
        """What this candidate with these options reads from the frozen encoder: "hidden" (the tapped hidden
        states) or "kv" (every layer's attention keys and values, models/encoders/kv.py)."""
        return "hidden"

    def __init__(self, enc_dim: int, num_layers: int, dit_dim: int, dit_depth: int):
        super().__init__()
        self.enc_dim, self.num_layers, self.dit_dim, self.dit_depth = enc_dim, num_layers, dit_dim, dit_depth
        self.null_features = nn.Parameter(torch.randn(num_layers, enc_dim) * 0.02)

    def apply_null(
        self, features: torch.Tensor, mask: torch.Tensor, drop: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows with ``drop`` become one real token of learned null features; others are untouched."""
        if drop is None or not bool(drop.any()):
            return features, mask
        d = drop.to(features.device).bool()
        null_row = torch.zeros_like(features[:1])
        null_row[:, 0] = self.null_features.to(features.dtype)
        null_mask = torch.zeros_like(mask[:1])
        null_mask[:, 0] = True
        features = torch.where(d[:, None, None, None], null_row, features)
        mask = torch.where(d[:, None], null_mask, mask)
        return features, mask

    def forward(
        self, features: torch.Tensor, mask: torch.Tensor, drop: torch.Tensor | None = None
    ) -> Conditioning:
        features, mask = self.apply_null(features, mask, drop)
        return self.encode(features, mask)

    def encode(self, features: torch.Tensor, mask: torch.Tensor) -> Conditioning:  # pragma: no cover
        raise NotImplementedError
