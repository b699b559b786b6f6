"""Conditioning candidates (paper Sec. 2.1) and their registry.

    build_conditioner("lap", enc_dim=..., num_layers=..., dit_dim=..., dit_depth=..., refiner_blocks=2)

Every candidate is a ``Conditioner`` (models/conditioning/base.py): frozen-encoder features (B, T, N, D_enc) +
mask (B, T) -> ``Conditioning``. Common options: ``heads`` (refiner / LAP attention heads, default 4),
``refiner_heads`` (the refiner's, at the DiT width; default ``heads``) and ``refiner_blocks`` (default 0; only for
candidates that feed DiT input tokens). Each candidate's own options are its constructor's keyword-only arguments
(LAP: ``lap_heads`` at the LAP width, ``lap_dim``). A new candidate is one file plus one line in ``CANDIDATES``.
``check_heads`` checks every head count against the width it splits, naming the config key.
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
    "check_heads",
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
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TypeError(f"{name} got unknown option(s) {unknown}; valid: {', '.join(valid)}")
    check_heads(name, enc_dim=enc_dim, dit_dim=dit_dim, **options)
    return cls(enc_dim, num_layers, dit_dim, dit_depth, **options)


def check_heads(name: str, *, enc_dim: int, dit_dim: int, **options: Any) -> None:
    """Every attention of candidate ``name`` splits its width into whole heads, else ValueError naming the config
    key (``conditioner.<option>``), the width and where that width comes from.

    LAP blocks work at ``lap_dim`` (default: the encoder width) with ``lap_heads`` (default ``heads``); refiners at
    the DiT width with ``refiner_heads`` (default ``heads``). KV fusion has no attention of its own.
    """
    heads = options.get("heads", 4)
    checks = []  # (key, module, width, what the width is)
    if name == "lap":
        lap_dim = options.get("lap_dim")
        width, what = (lap_dim, "conditioner.lap_dim") if lap_dim is not None else (enc_dim, "the encoder width")
        checks.append(("lap_heads", "LAP", width, what))
    if options.get("refiner_blocks", 0) and _lookup(name).feeds_tokens:
        checks.append(("refiner_heads", "refiner", dit_dim, "the DiT width dit.dim"))
    for key, value in [("heads", heads), *((k, options[k]) for k, *_ in checks if options.get(k) is not None)]:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"conditioner.{key} must be an int >= 1, got {value!r}")
    for key, module, width, what in checks:
        n = options.get(key)
        used = f"conditioner.{key}={n}" if n is not None else \
            f"conditioner.heads={heads} (the {module}'s heads while conditioner.{key} is unset)"
        n = heads if n is None else n
        if width % n:
            fits = [h for h in range(1, width + 1) if width % h == 0 and 32 <= width // h <= 256]
            raise ValueError(f"{used} does not divide {what} {width}; head counts that do, with head dims "
                             f"32..256: {fits or 'none'}")


def _lookup(name: str) -> type[Conditioner]:
    if name not in CANDIDATES:
        raise ValueError(f"unknown conditioning candidate {name!r}; valid: {', '.join(CANDIDATES)}")
    return CANDIDATES[name]
