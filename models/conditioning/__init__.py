"""Conditioning candidates (paper Sec. 2.1) and their registry.

    build_conditioner("lap", enc_dim=..., num_layers=..., dit_dim=..., dit_depth=..., refiner_blocks=2)

Every candidate is a ``Conditioner`` (models/conditioning/base.py): frozen-encoder features (B, T, N, D_enc) +
mask (B, T) -> ``Conditioning``. Common options: ``heads`` (refiner / LAP attention heads, default 4) and
``refiner_blocks`` (default 0; only for candidates that feed DiT input tokens). Each candidate's own options are
its constructor's keyword-only arguments. A new candidate is one file plus one line in ``CANDIDATES``.
"""

from __future__ import annotations

import inspect
from typing import Any

from models.conditioning.base import Conditioner, Conditioning
from models.conditioning.hsi import HiddenStateInjection
from models.conditioning.kv_fusion import KVFusion
from models.conditioning.lap import LAPConditioner, LayerwiseAttentionPooling
from models.conditioning.last_layer import LastLayer
from models.conditioning.refiner import Refiner

CANDIDATES: dict[str, type[Conditioner]] = {
    "last_layer": LastLayer,
    "kv_fusion": KVFusion,
    "hsi": HiddenStateInjection,
    "lap": LAPConditioner,
}

__all__ = [
    "CANDIDATES",
    "Conditioner",
    "Conditioning",
    "HiddenStateInjection",
    "KVFusion",
    "LAPConditioner",
    "LastLayer",
    "LayerwiseAttentionPooling",
    "Refiner",
    "build_conditioner",
    "candidate_options",
    "encoder_features",
]


def candidate_options(name: str) -> dict[str, Any]:
    """The options (keyword-only constructor arguments) candidate ``name`` accepts, with their defaults."""
    cls = _lookup(name)
    params = inspect.signature(cls.__init__).parameters.values()
    return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def encoder_features(name: str, options: dict[str, Any] | None = None) -> str:
    """What candidate ``name`` with ``options`` (the config's ``conditioner`` section) reads from the frozen
    encoder: "hidden" (the tapped hidden states) or "kv" (every layer's attention keys and values)."""
    return _lookup(name).encoder_features(options or {})


def build_conditioner(
    name: str, *, enc_dim: int, num_layers: int, dit_dim: int, dit_depth: int, **options: Any
) -> Conditioner:
    """Instantiate candidate ``name``; unknown names raise ValueError, unknown options TypeError (both list
    the valid choices); ``refiner_blocks > 0`` on a candidate that feeds no input tokens raises ValueError."""
    cls = _lookup(name)
    valid = candidate_options(name)
    refiner_blocks = options.get("refiner_blocks", 0)
    if not isinstance(refiner_blocks, int) or isinstance(refiner_blocks, bool) or refiner_blocks < 0:
        raise ValueError(f"refiner_blocks must be an int >= 0, got {refiner_blocks!r}")
    if not cls.feeds_tokens:
        if refiner_blocks:
            users = [n for n, c in CANDIDATES.items() if c.feeds_tokens]
            raise ValueError(f"{name} feeds no DiT input tokens, so it cannot take a refiner "
                             f"(refiner_blocks={refiner_blocks}); candidates with one: {', '.join(users)}")
        options.pop("refiner_blocks", None)
    heads = options.get("heads", 4)
    if not isinstance(heads, int) or isinstance(heads, bool) or heads < 1:
        raise ValueError(f"heads must be an int >= 1, got {heads!r}")
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TypeError(f"{name} got unknown option(s) {unknown}; valid: {', '.join(valid)}")
    return cls(enc_dim, num_layers, dit_dim, dit_depth, **options)


def _lookup(name: str) -> type[Conditioner]:
    if name not in CANDIDATES:
        raise ValueError(f"unknown conditioning candidate {name!r}; valid: {', '.join(CANDIDATES)}")
    return CANDIDATES[name]
