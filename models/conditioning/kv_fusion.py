"""Candidate (b): layerwise key-value fusion (paper Sec. 2.1, Fig. 1b; Playground v3).

DiT block i attends over its own keys/values concatenated with keys/values of encoder layer i, under the text
mask; its queries are only its own tokens, and no condition tokens enter the DiT sequence, so a refiner has
nothing to refine (``feeds_tokens = False``). ``kv_source`` says whose keys and values those are:

- ``encoder`` (default, the paper's candidate): the frozen encoder's own keys (after its RoPE) and values, taken
  from its attention (models/encoders/kv.py). The DiT must copy the encoder's depth, width and head structure,
  grouped KV heads included (``check_dit_shape``), so the encoder decides the DiT's size:

      features (B, T, N, 2 * kv_heads * head_dim) = packed [k | v] of the N encoder layers, mask (B, T)
          ->  kv: N tensors (B, T, 2 * kv_heads * head_dim), unchanged; tokens None

- ``hidden`` (an ablation: a learned cross-attention on hidden states): each selected hidden state gets RMSNorm +
  Linear(enc -> dit) and DiT block i learns its own K/V projection of it; any DiT width works:

      features (B, T, N, D_enc), mask (B, T)  ->  kv: N = dit_depth tensors (B, T, D_dit); tokens None

Either way encoder layer i is paired with DiT block i, so the number of encoder layers must equal the DiT depth
(the "tight coupling" the paper criticises).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from models.conditioning.base import Conditioner, Conditioning
from models.conditioning.last_layer import TokenProjection, check_features

KV_SOURCES = ("encoder", "hidden")


class KVFusion(Conditioner):
    """Per encoder layer i: ``kv[i]`` for DiT block i (the encoder's packed K/V, or a projected hidden state)."""

    layer_per_block = True

    feeds_tokens = False

    def __init__(self, enc_dim: int, num_layers: int, dit_dim: int, dit_depth: int, *, heads: int = 4,
                 kv_source: str = "encoder"):
        # heads is accepted for a uniform config but unused: the attention heads belong to the DiT blocks.
        if kv_source not in KV_SOURCES:
            raise ValueError(f"conditioner.kv_source must be one of {', '.join(KV_SOURCES)}, got {kv_source!r}")
        if num_layers != dit_depth:
            raise ValueError(f"kv_fusion pairs encoder layer i with DiT block i: needs num_layers == dit_depth, "
                             f"got num_layers={num_layers}, dit_depth={dit_depth}")
        super().__init__(enc_dim, num_layers, dit_dim, dit_depth)
        self.kv_source = kv_source
        self.kv_context = kv_source  # how the DiT blocks read kv[i] (models/dit.py)
        if kv_source == "hidden":
            self.proj = nn.ModuleList(TokenProjection(enc_dim, dit_dim) for _ in range(num_layers))

    @classmethod
    def encoder_features(cls, options: dict[str, Any]) -> str:
        return "kv" if options.get("kv_source", "encoder") == "encoder" else "hidden"

    def encode(self, features: torch.Tensor, mask: torch.Tensor) -> Conditioning:
        """features (B, T, N, D_enc), mask (B, T) -> Conditioning(kv=[(B, T, D)] * depth, mask) (module docstring)."""
        check_features(self, features, mask)
        if self.kv_source == "encoder":  # used as they are; padded lanes zeroed (masked_fill: garbage never leaks)
            return Conditioning(mask=mask, kv=list(features.masked_fill(~mask[:, :, None, None], 0.0).unbind(dim=2)))
        kv = [proj(features[:, :, i], mask) for i, proj in enumerate(self.proj)]
        return Conditioning(mask=mask, kv=kv)


def dit_shape(dit: dict[str, Any]) -> dict[str, int]:
    """The attention shape a ``dit`` config section gives every block (``kv_heads`` / ``head_dim`` default to
    ``heads`` / ``dim // heads``)."""
    return {"depth": dit["depth"], "dim": dit["dim"], "heads": dit["heads"],
            "kv_heads": dit.get("kv_heads") or dit["heads"],
            "head_dim": dit.get("head_dim") or dit["dim"] // dit["heads"]}


def check_dit_shape(dit: dict[str, Any], shape: Any, encoder: str) -> None:
    """KV fusion on the encoder's own keys and values: the ``dit`` config section must copy the attention shape
    (models/encoders/kv.py ``AttentionShape``) of encoder ``encoder``; a ValueError names every key that does not."""
    want = {"depth": shape.layers, "dim": shape.hidden, "heads": shape.heads, "kv_heads": shape.kv_heads,
            "head_dim": shape.head_dim}
    have = dit_shape(dit)
    bad = [f"dit.{k}={have[k]} (needs {v})" for k, v in want.items() if have[k] != v]
    if bad:
        fix = {k: v for k, v in want.items() if k != "head_dim" or v != shape.hidden // shape.heads}
        raise ValueError(
            f"candidate kv_fusion with conditioner.kv_source=encoder attends over encoder {encoder!r}'s own keys and "
            f"values, so its DiT takes that encoder's depth, width and heads: {', '.join(bad)}; set "
            "dit: {" + ", ".join(f"{k}: {v}" for k, v in fix.items()) + "} (or conditioner.kv_source: hidden)")
