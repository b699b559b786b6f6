"""The frozen encoder's own attention keys and values, layer by layer: what layerwise KV fusion feeds the DiT.

Paper Sec. 2.1 (after Playground v3): the DiT has the encoder's depth and width, and "in each attention layer we
concatenate the Keys and Values of DiT with the respective Keys and Values of the encoder". The keys and values
here are the ones the encoder's attention itself used: one forward with ``use_cache=True``, after which HF's KV
cache holds, for every layer i, the keys after the encoder's RoPE (and QK-norm where the model has one) and the
values, before grouped heads are repeated:

    input_ids (B, L), attention_mask (B, L) bool  ->  (B, L, N, 2 * kv_heads * head_dim) float32
    with N = the encoder's number of blocks, last axis packed [k | v], each head-major:
    k of head h = out[..., h * head_dim:(h + 1) * head_dim], v of head h = out[..., kv_inner + h * head_dim: ...]

Layer i here is the attention of block i, which reads ``hidden_states[i]`` (the numbering of
models/encoders/taps.py), so the K/V "layer ids" are 0..N-1. Positions where ``attention_mask`` is False are
exactly 0. Right padding never changes a real token's keys or values (causal attention, positions 0..n-1 of each
row).

Only decoder-style encoders (Llama, Qwen, InternVL's LM, Gemma 3, ...) cache keys and values; an encoder-only
model (T5) has no cache and is refused with a clear error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class AttentionShape:
    """The head structure of a transformer's attention: what a KV-fusion DiT must copy to take its keys/values."""

    layers: int  # transformer blocks
    hidden: int  # residual width
    heads: int  # query heads
    kv_heads: int  # key/value heads (< heads: grouped-query attention)
    head_dim: int  # channels per head (not always hidden / heads: Gemma 3, Qwen 3)

    @property
    def kv_width(self) -> int:
        """Width of one layer's packed [k | v] per token: 2 * kv_heads * head_dim."""
        return 2 * self.kv_heads * self.head_dim


def text_config(model: nn.Module) -> Any:
    """The language model's config of an HF model (``text_config`` of a VLM, else the config itself)."""
    cfg = model.config
    return getattr(cfg, "text_config", None) or cfg


def attention_shape(model: nn.Module) -> AttentionShape:
    """The attention shape of an HF decoder or VLM, read from its (text) config."""
    cfg = text_config(model)
    heads = int(cfg.num_attention_heads)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return AttentionShape(layers=int(cfg.num_hidden_layers), hidden=int(cfg.hidden_size), heads=heads,
                          kv_heads=kv_heads, head_dim=int(head_dim))


def _cache_layers(cache: Any) -> list[tuple[Tensor, Tensor]]:
    """(keys, values) per layer of an HF cache, each (B, kv_heads, L, head_dim)."""
    if hasattr(cache, "layers"):  # transformers >= 4.54: one CacheLayer per layer
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache, strict=True))  # older DynamicCache


def check_kv_capable(model: nn.Module) -> None:
    """ValueError unless ``model`` is a decoder-style model whose forward keeps a KV cache."""
    import inspect

    params = inspect.signature(model.base_model.forward).parameters
    if not {"cache", "past_key_values"} & set(params):  # transformers 5 / 4 name; T5's encoder has neither
        raise ValueError(f"{type(model).__name__} keeps no KV cache: KV fusion on the encoder's own keys and values "
                         "needs a decoder-style encoder (Llama, Qwen, a VLM's LM), not an encoder-only model like T5")


@torch.no_grad()
def encoder_kv(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, **model_inputs: Tensor) -> Tensor:
    """Every layer's attention keys and values of ``model`` for a right-padded batch (module docstring).

    ``model``: an HF decoder / VLM (its ``base_model`` runs, no LM head); ``model_inputs``: the processor's image
    inputs (pixel_values, ...). Raises ValueError for a model without a KV cache or a cache that dropped tokens.
    """
    check_kv_capable(model)
    shape = attention_shape(model)
    out = model.base_model(input_ids=input_ids, attention_mask=attention_mask.long(), use_cache=True,
                           return_dict=True, **model_inputs)
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)  # transformers 5 / 4 name
    if cache is None:
        raise ValueError(f"{type(model).__name__} returned no KV cache although use_cache=True")
    layers = _cache_layers(cache)
    b, length = input_ids.shape
    want = (b, shape.kv_heads, length, shape.head_dim)
    if len(layers) != shape.layers or any(tuple(k.shape) != want or tuple(v.shape) != want for k, v in layers):
        got = sorted({tuple(k.shape) for k, _ in layers})
        raise ValueError(f"{type(model).__name__}'s cache holds {len(layers)} layers of keys {got}, expected "
                         f"{shape.layers} of {want}: a sliding-window or otherwise truncating cache cannot give every "
                         "token's keys and values")
    # (B, kv, L, hd) -> (B, L, kv * hd) per layer; [k | v] per layer; layers on axis 2
    packed = [torch.cat([t.transpose(1, 2).reshape(b, length, -1) for t in kv], dim=-1) for kv in layers]
    feats = torch.stack(packed, dim=2).float()
    return feats.masked_fill(~attention_mask.to(feats.device)[:, :, None, None].bool(), 0.0)
