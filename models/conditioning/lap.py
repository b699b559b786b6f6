"""Candidate (d): Layerwise Attention Pooling, LAP (paper Sec. 2.1, Sec. 3, App. A.1.1) -- UniFusion's choice.

    LayerwiseAttentionPooling: features (B, T, N, D), mask (B, T) -> (B, T, D), padded positions zero
    LAPConditioner:            features (B, T, N, D_enc), mask (B, T) -> tokens (B, T, D_dit) [+ inject]

Each token's N selected encoder layers are stacked as a length-N sequence, ``blocks`` transformer blocks attend
across that layer axis (every token independently, no mask: all layers of a real token are real), and a
``Linear(N, 1, bias=False)`` pools the N layers into one vector. Only real tokens are computed: they are gathered
to (R, N, D) and scattered back, which also makes padding invariance exact.

Analysis hooks (paper Figs. 7, 8, 18):
- ``pooling_weights()`` -> (N,): the trained pooling Linear's weight (Fig. 7).
- ``set_layer_dropout(positions)``: zero those layers' pooling weights in every later forward (Fig. 8), as a
  mask applied in forward; the trained parameter is never modified. ``()`` restores the full model.
- ``record = True``: forward fills ``recorded`` with
    ``attn``    list (one per block) of (B*T, heads, N, N) attention probabilities over the layer axis,
                softmax(q k^T / sqrt(head_dim)) with the block's QK-RMSNormed q, k; rows of padded tokens are 0;
    ``q_norm``, ``k_norm`` (B, T, blocks, N): L2 norm, over all heads, of the query / key projection of
                layer n of token (b, t) in block ``blocks`` index, taken *before* QK-RMSNorm (after it every
                head's vector has RMS 1 times a learned gain, so its norm carries no per-token signal);
    ``qk_norm`` (B, T, blocks, N) = q_norm * k_norm: what this repo plots as Fig. 18's "Query-Key norms"
                (the paper's text says Query-Key, its caption Key-Value; we follow the text). Padded tokens 0.

Relation to diffusers ``Krea2TextFusion`` (checked by tests/test_lap_krea2.py): identical data flow -- reshape to
(B*T, N, D), unmasked layer-axis blocks, ``Linear(N, 1, bias=False)`` over the layer axis, refiner blocks over
tokens with the key padding mask. Differences by design: our blocks are ``models.blocks.TransformerBlock``
(RMSNorm with plain gain and eps 1e-6, fused biased QKV, QK-RMSNorm, GELU-tanh MLP) where Krea2's have
``1 + w`` RMSNorms, GQA projections without bias, a sigmoid output gate and a SwiGLU FFN; the pooling weights
start at 1/N (mean over layers) rather than PyTorch's random Linear init; padded outputs are zeroed; and our
refiner runs after the enc -> dit projection (in D_dit), Krea2's before its ``txt_in`` (in D_text).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.blocks import TransformerBlock
from models.conditioning.base import Conditioner, Conditioning
from models.conditioning.last_layer import TokenProjection, check_features
from models.conditioning.refiner import Refiner

INJECTIONS = ("input", "per_layer")


class LayerwiseAttentionPooling(nn.Module):
    """Attend across the layer axis of each token, then pool the N layers with a learned Linear(N, 1).

    ``dim`` (default ``enc_dim``): the width the blocks work at. Narrower than the encoder, every tap is first
    RMS-normed and projected by one Linear(enc_dim -> dim) shared by all taps (a cost option, see LAPConditioner);
    the output is then (B, T, dim).
    """

    def __init__(self, enc_dim: int, num_layers: int, blocks: int = 2, heads: int = 4, dim: int | None = None):
        super().__init__()
        if not isinstance(blocks, int) or isinstance(blocks, bool) or blocks < 0:
            raise ValueError(f"LAP blocks must be an int >= 0 (0 = static learned layer weights), got {blocks!r}")
        if num_layers < 1:
            raise ValueError(f"LAP needs num_layers >= 1, got {num_layers}")
        self.num_layers = num_layers
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim < 1):
            raise ValueError(f"LAP width (lap_dim) must be a positive int or null, got {dim!r}")
        self.dim = enc_dim if dim is None else dim
        # Taps are not normed by the encoder and differ in scale, hence RMSNorm before the shared projection.
        self.down = nn.Sequential(nn.RMSNorm(enc_dim, eps=1e-6), nn.Linear(enc_dim, self.dim)) if dim else None
        self.blocks = nn.ModuleList(TransformerBlock(self.dim, heads) for _ in range(blocks))
        self.pool = nn.Linear(num_layers, 1, bias=False)
        nn.init.constant_(self.pool.weight, 1.0 / num_layers)  # start as the mean over layers
        self.register_buffer("layer_keep", torch.ones(num_layers), persistent=False)
        self.dropped: tuple[int, ...] = ()
        # dense = True: every (b, t) position goes through the blocks, padding included, and padded outputs are
        # zeroed afterwards. Real tokens get exactly the same values (each token attends only across its own
        # layers); used on meta/fake tensors (cost planning), where the data-dependent gather cannot run.
        self.dense = False
        self.record = False
        self.recorded: dict[str, torch.Tensor | list[torch.Tensor]] = {}

    def set_layer_dropout(self, positions: Sequence[int]) -> None:
        """Zero the pooling weights of these positions of the N axis (negative indices allowed; () = none)."""
        n = self.num_layers
        bad = [p for p in positions if not isinstance(p, int) or isinstance(p, bool) or not -n <= p < n]
        if bad:
            raise ValueError(f"layer dropout positions {bad} out of range for N={n} layers (valid: {-n}..{n - 1})")
        self.dropped = tuple(sorted({p % n for p in positions}))
        keep = torch.ones(n, device=self.layer_keep.device)
        keep[list(self.dropped)] = 0.0
        self.layer_keep.copy_(keep)

    def pooling_weights(self) -> torch.Tensor:
        """(N,) the trained pooling weights (layer dropout not applied), detached."""
        return self.pool.weight.detach()[0].clone()

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """features (B, T, N, D_enc), mask (B, T) bool -> (B, T, dim) pooled, padded positions zero."""
        b, t, n, _ = features.shape
        d = self.dim
        if n != self.num_layers:
            raise ValueError(f"LAP was built for N={self.num_layers} layers, features have N={n}")
        if self.dense and self.record:
            raise ValueError("LAP recording (analysis hooks) needs dense=False")
        # (R, N, D): only real tokens; the paper's (B*T, N, D) restricted to them (dense: all B*T of them)
        x = features.flatten(0, 1) if self.dense else features[mask]
        if self.down is not None:
            x = self.down(x)
        attn_maps, q_norms, k_norms = [], [], []
        for block in self.blocks:
            if self.record:
                p, qn, kn = self._probe(block, x)
                attn_maps.append(p)
                q_norms.append(qn)
                k_norms.append(kn)
            x = block(x)
        weight = self.pool.weight if not self.dropped else self.pool.weight * self.layer_keep.to(x.dtype)
        pooled = F.linear(x.transpose(1, 2), weight.to(x.dtype)).squeeze(-1)  # (R, D, N) @ (N,) -> (R, D)
        if self.dense:
            out = pooled.view(b, t, d).masked_fill(~mask[..., None], 0.0)
        else:
            out = pooled.new_zeros(b, t, d)  # pooled's dtype: under autocast it may differ from the features'
            out[mask] = pooled
        if self.record:
            self._store(mask, attn_maps, q_norms, k_norms)
        return out

    @torch.no_grad()
    def _probe(self, block: TransformerBlock, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Block input x (R, N, D) -> attention probs (R, h, N, N), raw q / k norms (R, N) each."""
        attn = block.attn
        q, k, _ = attn.qkv(block.norm1(x)).unflatten(-1, (3, attn.heads, attn.head_dim)).unbind(2)  # (R, N, h, hd)
        q_n, k_n = attn.q_norm(q).transpose(1, 2), attn.k_norm(k).transpose(1, 2)  # (R, h, N, hd)
        probs = torch.softmax(q_n @ k_n.transpose(-1, -2) * attn.head_dim**-0.5, dim=-1)
        return probs, q.flatten(2).norm(dim=-1), k.flatten(2).norm(dim=-1)

    def _store(self, mask: torch.Tensor, attn_maps: list, q_norms: list, k_norms: list) -> None:
        b, t = mask.shape
        flat = mask.reshape(-1)
        maps = []
        for p in attn_maps:
            full = p.new_zeros(b * t, *p.shape[1:])
            full[flat] = p
            maps.append(full)
        norms = {}
        for name, vals in (("q_norm", q_norms), ("k_norm", k_norms)):
            full = mask.new_zeros(b, t, len(vals), self.num_layers, dtype=torch.float32)
            if vals:
                full[mask] = torch.stack(vals, dim=1).float()  # (R, blocks, N)
            norms[name] = full
        self.recorded = {"attn": maps, **norms, "qk_norm": norms["q_norm"] * norms["k_norm"]}


class LAPConditioner(Conditioner):
    """LAP -> RMSNorm -> Linear(enc -> dit) (-> Refiner) as DiT input tokens.

    ``injection="per_layer"`` (App. A.1.1): additionally one dedicated LAP per later DiT block; LAP_i's projected
    output (zero-init Linear) is ``inject[i]``, added after block i (i < depth-1; ``inject[depth-1] = None``),
    i.e. every DiT block gets its own pooled view: block 0 through the input tokens, block i+1 through inject[i].
    ``layer_dropout`` applies to every LAP of the conditioner.

    Heads and widths: ``lap_heads`` (default ``heads``) heads of the LAP blocks at the LAP width, ``lap_dim``
    (default: the encoder width) the LAP width, ``refiner_heads`` (default ``heads``) heads of the refiner at
    the DiT width. At paper scale the LAP at the full encoder width costs as much as a large part of the DiT
    (README, "LAP + refiner overhead"): ``lap_dim`` narrows every LAP of the conditioner.
    """

    def __init__(
        self,
        enc_dim: int,
        num_layers: int,
        dit_dim: int,
        dit_depth: int,
        *,
        heads: int = 4,
        refiner_blocks: int = 0,
        injection: str = "input",
        lap_blocks: int = 2,
        layer_dropout: Sequence[int] = (),
        lap_heads: int | None = None,
        lap_dim: int | None = None,
        refiner_heads: int | None = None,
    ):
        super().__init__(enc_dim, num_layers, dit_dim, dit_depth)
        if injection not in INJECTIONS:
            raise ValueError(f"unknown injection {injection!r}; valid: {', '.join(INJECTIONS)}")
        self.injection = injection
        lap_heads = heads if lap_heads is None else lap_heads
        refiner_heads = heads if refiner_heads is None else refiner_heads
        self.lap = LayerwiseAttentionPooling(enc_dim, num_layers, lap_blocks, lap_heads, lap_dim)
        width = self.lap.dim
        self.proj = TokenProjection(width, dit_dim)
        self.refiner = Refiner(dit_dim, refiner_blocks, refiner_heads) if refiner_blocks else None
        n_inject = dit_depth - 1 if injection == "per_layer" else 0
        self.inject_laps = nn.ModuleList(
            LayerwiseAttentionPooling(enc_dim, num_layers, lap_blocks, lap_heads, lap_dim) for _ in range(n_inject)
        )
        self.inject_proj = nn.ModuleList(TokenProjection(width, dit_dim, zero_init=True) for _ in range(n_inject))
        self.set_layer_dropout(layer_dropout)

    @property
    def layer_dropout(self) -> tuple[int, ...]:
        """The N-axis positions whose pooling weights are currently zeroed."""
        return self.lap.dropped

    def set_layer_dropout(self, positions: Sequence[int]) -> None:
        """Zero these layer positions' pooling weights in every LAP (see LayerwiseAttentionPooling)."""
        for lap in (self.lap, *self.inject_laps):
            lap.set_layer_dropout(positions)

    def encode(self, features: torch.Tensor, mask: torch.Tensor) -> Conditioning:
        """features (B, T, N, D_enc), mask (B, T) -> tokens (B, T, D_dit) [+ inject, depth entries]."""
        check_features(self, features, mask)
        tokens = self.proj(self.lap(features, mask), mask)
        if self.refiner is not None:
            tokens = self.refiner(tokens, mask)
        if self.injection == "input":
            return Conditioning(mask=mask, tokens=tokens)
        inject: list[torch.Tensor | None] = [
            proj(lap(features, mask), mask) for lap, proj in zip(self.inject_laps, self.inject_proj, strict=True)
        ]
        inject.append(None)
        return Conditioning(mask=mask, tokens=tokens, inject=inject)
