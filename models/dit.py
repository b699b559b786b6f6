"""Single-stream DiT (paper Sec. 2.2: "standard latent DiT with full self-attention and 2x2 patchification").

    x (B, C, H, W), s (B,) in [0, 1], cond: Conditioning  ->  v (B, C, H, W)

Condition tokens (B, T, D) and image patches (B, L, D) form one sequence ``[condition; image]`` that every block
attends over with full self-attention; the condition's key padding mask masks padded tokens, so padding never
changes an output. Timestep modulation is adaLN-zero on every token (as Flux/Krea2 single-stream blocks).
The other two conditioning channels hook in per block:
- ``cond.kv[i]``: extra keys/values of block i (layerwise KV fusion, Playground v3 style), masked by
  ``cond.mask``; the block's queries are only its own tokens. ``kv_context="encoder"``: (B, T, 2 * kv_heads *
  head_dim), the frozen encoder's own keys (after its RoPE) and values of its layer i, packed [k | v] head-major
  (models/encoders/kv.py), used as they are, so the block's heads must be the encoder's; ``kv_context="hidden"``:
  (B, T, D), a hidden state that block i projects to keys/values itself (RMSNorm + Linear, keys QK-normed).
- ``cond.inject[i]`` (B, T, D): added to the condition positions of the residual stream after block i
  (hidden-state injection).
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers.models.embeddings import get_2d_sincos_pos_embed, get_timestep_embedding
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.blocks import MLP, Attention
from models.conditioning.base import Conditioning


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (B, S, D), shift/scale (B, D)."""
    return x * (1 + scale[:, None]) + shift[:, None]


KV_CONTEXTS = ("hidden", "encoder")  # what cond.kv[i] holds: a hidden state to project, or the encoder's (k, v)


def _kv_context(kv_context: bool | str | None) -> str | None:
    """None (no extra keys/values), "hidden" or "encoder"; True means "hidden" (the original switch)."""
    if kv_context is True:
        return "hidden"
    if kv_context is False or kv_context is None:
        return None
    if kv_context not in KV_CONTEXTS:
        raise ValueError(f"kv_context must be one of {KV_CONTEXTS} or None, got {kv_context!r}")
    return kv_context


class DiTBlock(nn.Module):
    """adaLN-zero transformer block; optional extra K/V per block (KV fusion, see the module docstring)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, kv_context: bool | str | None = None,
                 kv_heads: int | None = None, head_dim: int | None = None):
        super().__init__()
        self.kv_context = _kv_context(kv_context)
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads, qk_norm=True, kv_heads=kv_heads, head_dim=head_dim)
        self.mlp = MLP(dim, mlp_ratio)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)
        if self.kv_context == "hidden":
            self.ctx_norm = nn.RMSNorm(dim, eps=1e-6)
            self.ctx_kv = nn.Linear(dim, 2 * self.attn.kv_inner)

    def context_kv(self, ctx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The extra k, v (B, kv_heads, T, head_dim) of this block.

        "encoder": ctx (B, T, 2 * kv_heads * head_dim) is the encoder's packed [k | v], unpacked as it is;
        "hidden": ctx (B, T, D) is projected, k RMS-normed like the block's own keys.
        """
        a = self.attn
        if self.kv_context == "encoder":
            if ctx.shape[-1] != 2 * a.kv_inner:
                raise ValueError(
                    f"encoder keys/values of width {ctx.shape[-1]} do not fit this DiT block: it has {a.kv_heads} KV "
                    f"heads of {a.head_dim} channels (needs 2 x {a.kv_inner}); its heads must be the encoder's")
            k, v = ctx.chunk(2, dim=-1)
            return a.split_heads(k, a.kv_heads), a.split_heads(v, a.kv_heads)
        k, v = self.ctx_kv(self.ctx_norm(ctx)).chunk(2, dim=-1)
        return a.k_norm(a.split_heads(k, a.kv_heads)), a.split_heads(v, a.kv_heads)

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        mask: torch.Tensor | None,
        ctx: torch.Tensor | None = None,
        ctx_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(c).chunk(6, dim=-1)
        if ctx is not None and self.kv_context is None:
            raise ValueError("this DiT block takes no extra keys/values (built with kv_context=None)")
        extra = (*self.context_kv(ctx), ctx_mask) if ctx is not None else None
        x = x + g1[:, None] * self.attn(modulate(self.norm1(x), sh1, sc1), mask, extra_kv=extra)
        return x + g2[:, None] * self.mlp(modulate(self.norm2(x), sh2, sc2))


class DiT(nn.Module):
    """Diffusion transformer over 2x2 (configurable) patches of a (C, H, W) image or latent.

    ``activation_checkpointing`` (also settable as an attribute): in training with grad enabled, each block's
    activations are recomputed in backward instead of stored, trading ~1 extra forward for memory that no
    longer grows with depth. Same loss and gradients; off (and never used) in eval / no-grad sampling.

    ``kv_context``: None, "hidden" or "encoder" (module docstring). ``kv_heads`` / ``head_dim``: grouped KV heads and
    the per-head width of every block's attention (defaults: ``heads``, ``dim / heads``); KV fusion on the encoder's
    own keys and values sets them to the encoder's.
    """

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int = 32,
        patch: int = 2,
        dim: int = 128,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        kv_context: bool | str | None = None,
        activation_checkpointing: bool = False,
        kv_heads: int | None = None,
        head_dim: int | None = None,
    ):
        super().__init__()
        self.activation_checkpointing = activation_checkpointing
        if image_size % patch:
            raise ValueError(f"image_size={image_size} is not a multiple of patch={patch}")
        self.in_channels, self.image_size, self.patch, self.dim, self.depth = (
            in_channels, image_size, patch, dim, depth
        )
        self.grid = image_size // patch
        self.patch_embed = nn.Conv2d(in_channels, dim, kernel_size=patch, stride=patch)
        pos = get_2d_sincos_pos_embed(dim, self.grid, output_type="pt")
        self.register_buffer("pos", torch.as_tensor(pos, dtype=torch.float32)[None], persistent=False)
        self.cond_type = nn.Parameter(torch.zeros(1, 1, dim))  # tells condition tokens from image tokens
        self.t_embed = nn.Sequential(nn.Linear(256, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(
            DiTBlock(dim, heads, mlp_ratio, kv_context, kv_heads=kv_heads, head_dim=head_dim) for _ in range(depth)
        )
        self.final_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.final = nn.Linear(dim, patch * patch * in_channels)
        for m in (self.final_ada[1], self.final):  # zero-init output: the untrained model predicts v = 0
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, L, D) with L = (H/p)(W/p)."""
        return self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos.to(x.dtype)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L, p*p*C) -> (B, C, H, W)."""
        b, p, g, c = tokens.shape[0], self.patch, self.grid, self.in_channels
        x = tokens.view(b, g, g, p, p, c)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(b, c, g * p, g * p)

    def forward(self, x: torch.Tensor, s: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        img = self.patchify(x)
        b, n_img = img.shape[:2]
        t = get_timestep_embedding(s * 1000.0, 256, flip_sin_to_cos=True, downscale_freq_shift=0)
        c = self.t_embed(t.to(img.dtype))

        if cond.kv is not None and len(cond.kv) != self.depth:
            raise ValueError(f"KV fusion needs one context per DiT block: got {len(cond.kv)}, depth {self.depth}")
        if cond.inject is not None and len(cond.inject) != self.depth:
            raise ValueError(f"injection needs one entry per DiT block: got {len(cond.inject)}, depth {self.depth}")

        n_cond = 0
        mask = None
        if cond.tokens is not None:
            n_cond = cond.tokens.shape[1]
            h = torch.cat([cond.tokens.to(img.dtype) + self.cond_type, img], dim=1)
            mask = torch.cat([cond.mask, torch.ones(b, n_img, dtype=torch.bool, device=x.device)], dim=1)
        else:
            h = img
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            ctx = cond.kv[i].to(img.dtype) if cond.kv is not None else None
            ctx_mask = cond.mask if ctx is not None else None
            if recompute:  # non-reentrant: takes kwargs; the variant PyTorch recommends
                h = checkpoint(block, h, c, mask, ctx=ctx, ctx_mask=ctx_mask, use_reentrant=False)
            else:
                h = block(h, c, mask, ctx=ctx, ctx_mask=ctx_mask)
            if cond.inject is not None and cond.inject[i] is not None:
                if n_cond == 0:
                    raise ValueError("hidden-state injection needs condition tokens in the DiT sequence")
                add = cond.inject[i].to(h.dtype) * cond.mask[..., None].to(h.dtype)
                h = torch.cat([h[:, :n_cond] + add, h[:, n_cond:]], dim=1)
        shift, scale = self.final_ada(c).chunk(2, dim=-1)
        out = self.final(modulate(self.final_norm(h[:, n_cond:]), shift, scale))
        return self.unpatchify(out)


def count_parameters(module: nn.Module) -> int:
    """Trainable parameter count."""
    return int(np.sum([p.numel() for p in module.parameters() if p.requires_grad]))
