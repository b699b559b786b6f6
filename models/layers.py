"""Transformer building blocks shared by the DiT, LAP and the refiner.

All attention goes through ``F.scaled_dot_product_attention`` (FlashAttention/cuDNN kernels on GPU come for
free). Key padding masks are boolean ``(B, S)`` with True = real token; they are turned into an additive bias
once per call. QK-RMSNorm is on by default: it keeps attention logits bounded in bf16 and is what the
paper's Query-Key norm analysis (Fig. 18) reads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def key_padding_bias(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """(B, S) bool, True = keep  ->  (B, 1, 1, S) additive bias (0 or -inf-ish) for SDPA, or None."""
    if mask is None:
        return None
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    bias.masked_fill_(~mask, torch.finfo(dtype).min)
    return bias[:, None, None, :]


class Attention(nn.Module):
    """Multi-head self-attention with fused QKV, optional QK-RMSNorm and optional extra keys/values.

    x (B, S, D), mask (B, S) bool  ->  (B, S, D).
    ``extra_kv`` = (k, v, extra_mask): k, v (B, heads, S', D/heads) appended to the keys/values (layerwise KV
    fusion); extra_mask (B, S') bool.
    """

    def __init__(self, dim: int, heads: int, qk_norm: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim={dim} is not divisible by heads={heads}")
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.record = False  # when True, keep q/k of the last call for analysis (QK norms, attention maps)
        self.last_qk: tuple[torch.Tensor, torch.Tensor] | None = None

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, S, D) -> (B, heads, S, D/heads)."""
        b, s, _ = x.shape
        return x.view(b, s, self.heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        extra_kv: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None,
    ) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.record:
            self.last_qk = (q.detach(), k.detach())
        if extra_kv is not None:
            ek, ev, emask = extra_kv
            k, v = torch.cat([k, ek], dim=2), torch.cat([v, ev], dim=2)
            if mask is not None or emask is not None:
                own = mask if mask is not None else torch.ones(b, s, dtype=torch.bool, device=x.device)
                other = emask if emask is not None else torch.ones(b, ek.shape[2], dtype=torch.bool, device=x.device)
                mask = torch.cat([own, other], dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_padding_bias(mask, q.dtype))
        return self.proj(out.transpose(1, 2).reshape(b, s, d))


class MLP(nn.Module):
    """(B, S, D) -> (B, S, D): Linear, GELU(tanh), Linear."""

    def __init__(self, dim: int, ratio: float = 4.0):
        super().__init__()
        hidden = int(dim * ratio)
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class TransformerBlock(nn.Module):
    """Pre-RMSNorm bidirectional transformer block (no timestep modulation).

    x (B, S, D), mask (B, S) bool -> (B, S, D). Used by LAP (over the layer axis) and the refiner (over tokens).
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, qk_norm: bool = True):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(dim, eps=1e-6), nn.RMSNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, qk_norm=qk_norm)
        self.mlp = MLP(dim, mlp_ratio)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))
