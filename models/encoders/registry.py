"""The encoder preset registry: ``ENCODER_PRESETS`` (name -> ``EncoderPreset``) and ``build_encoder``.

The registry is one dict built from the preset modules, tiny (``models.encoders.tiny``) then real
(``models.encoders.hub``); a new preset is one entry in one of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from models.encoders.frozen import FrozenEncoder
from models.encoders.hub import HUB_PRESETS
from models.encoders.spec import EncoderPreset
from models.encoders.taps import find_blocks, select_layers
from models.encoders.tiny import TINY_PRESETS

ENCODER_PRESETS: dict[str, EncoderPreset] = {**TINY_PRESETS, **HUB_PRESETS}
_OVERRIDABLE = ("template", "drop_prefix", "max_length", "add_bos", "add_eos", "seed", "blocks_path")


def preset_taps(name: str, num_layers: int, layers: Sequence[int] | None = None, stride: int | None = None,
                start: int | None = None) -> tuple[int, ...]:
    """The hidden-state ids preset ``name`` taps from ``num_layers`` blocks: ``layers``/``stride``/``start`` when
    any of layers or stride is given, else the preset's own taps (``start`` still overrides the preset's)."""
    p = ENCODER_PRESETS[name]
    if layers is None and stride is None:
        layers, stride, start = p.layers, p.stride, p.start if start is None else start
    return select_layers(num_layers, layers=layers, stride=stride, start=start)


def build_encoder(
    name: str,
    layers: Sequence[int] | None = None,
    stride: int | None = None,
    start: int | None = None,
    **overrides: Any,
) -> FrozenEncoder:
    """Build preset ``name``; ``layers``/``stride``/``start`` replace the preset's taps when any is given.

    ``overrides`` replace preset fields: template, drop_prefix, max_length, add_bos, add_eos, seed, blocks_path.
    """
    if name not in ENCODER_PRESETS:
        raise ValueError(f"unknown encoder preset {name!r}; valid: {sorted(ENCODER_PRESETS)}")
    bad = sorted(set(overrides) - set(_OVERRIDABLE))
    if bad:
        raise ValueError(f"unknown override(s) {bad} for build_encoder; valid: {list(_OVERRIDABLE)}")
    p = ENCODER_PRESETS[name]
    opts = {k: overrides.get(k, getattr(p, k)) for k in _OVERRIDABLE}
    model, tokenizer = p.builder(opts.pop("seed"))
    processor = None
    if hasattr(tokenizer, "image_processor"):  # a VLM builder returns its processor
        processor, tokenizer = tokenizer, tokenizer.tokenizer
    ids = preset_taps(name, len(find_blocks(model, opts["blocks_path"])), layers, stride, start)
    return FrozenEncoder(
        model,
        tokenizer,
        ids,
        template=opts["template"],
        drop_prefix=opts["drop_prefix"],
        max_length=opts["max_length"],
        name=name,
        add_bos=opts["add_bos"],
        add_eos=opts["add_eos"],
        blocks_path=opts["blocks_path"],
        processor=processor,
        vision=p.vision if processor is not None else None,
        verifi=p.verifi,
    )
