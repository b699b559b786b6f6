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
    """Multi-head self-attention with fused QKV, optional QK-RMSNorm, grouped KV heads and optional extra keys/values.

    x (B, S, D), mask (B, S) bool  ->  (B, S, D).

    ``kv_heads`` (default ``heads``) < ``heads`` is grouped-query attention: query head h reads KV head
    ``h // (heads / kv_heads)``, the grouping of Llama/Qwen (HF ``repeat_kv``), so a DiT can take a GQA encoder's
    keys and values as they are. ``head_dim`` (default ``dim / heads``) may differ from it (Gemma 3, Qwen 3): the
    heads then span ``heads * head_dim`` channels and ``proj`` maps them back to ``dim``.
    ``extra_kv`` = (k, v, extra_mask): k, v (B, kv_heads, S', head_dim) appended to the keys/values (layerwise KV
    fusion) after the block's own keys are QK-normed; extra_mask (B, S') bool.
    """

    def __init__(self, dim: int, heads: int, qk_norm: bool = True, kv_heads: int | None = None,
                 head_dim: int | None = None):
        super().__init__()
        kv_heads = heads if kv_heads is None else kv_heads
        if head_dim is None and dim % heads:
            raise ValueError(f"dim={dim} is not divisible by heads={heads}")
        if kv_heads < 1 or heads % kv_heads:
            raise ValueError(f"heads={heads} is not a multiple of kv_heads={kv_heads}")
        self.heads, self.kv_heads = heads, kv_heads
        self.head_dim = dim // heads if head_dim is None else head_dim
        self.inner, self.kv_inner = heads * self.head_dim, kv_heads * self.head_dim
        # q, k, v in one matmul: (heads + 2 kv_heads) * head_dim outputs, = 3 * dim without GQA (the original layout)
        self.qkv = nn.Linear(dim, self.inner + 2 * self.kv_inner)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(self.inner, dim)
        self.record = False  # when True, keep q/k of the last call for analysis (QK norms, attention maps)
        self.last_qk: tuple[torch.Tensor, torch.Tensor] | None = None

    def split_heads(self, x: torch.Tensor, heads: int | None = None) -> torch.Tensor:
        """(B, S, heads * head_dim) -> (B, heads, S, head_dim); ``heads`` defaults to the query heads."""
        b, s, _ = x.shape
        return x.view(b, s, heads or self.heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        extra_kv: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None,
    ) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.qkv(x).split([self.inner, self.kv_inner, self.kv_inner], dim=-1)
        q, k, v = self.split_heads(q), self.split_heads(k, self.kv_heads), self.split_heads(v, self.kv_heads)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.record:
            self.last_qk = (q.detach(), k.detach())
        if extra_kv is not None:
            ek, ev, emask = extra_kv
            if ek.shape[1] != self.kv_heads or ek.shape[-1] != self.head_dim or ev.shape != ek.shape:
                raise ValueError(f"extra keys/values must be (B, {self.kv_heads}, S', {self.head_dim}) like this "
                                 f"attention's own, got k {tuple(ek.shape)}, v {tuple(ev.shape)}")
            k, v = torch.cat([k, ek.to(k.dtype)], dim=2), torch.cat([v, ev.to(v.dtype)], dim=2)
            if mask is not None or emask is not None:
                own = mask if mask is not None else torch.ones(b, s, dtype=torch.bool, device=x.device)
                other = emask if emask is not None else torch.ones(b, ek.shape[2], dtype=torch.bool, device=x.device)
                mask = torch.cat([own, other], dim=1)
        if self.kv_heads != self.heads:  # GQA: each KV head serves heads / kv_heads consecutive query heads
            k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
            v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_padding_bias(mask, q.dtype))
        return self.proj(out.transpose(1, 2).reshape(b, s, self.inner))


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
