"""What an encoder preset is: how to build its backbone and how to prompt and tap it (the registry's entries).

``EncoderPreset`` is one entry of ``models.encoders.ENCODER_PRESETS``; ``VisionSpec`` says how a VLM preset
takes images and ``VerifiSpec`` how it rewrites a prompt (VERIFI).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from models.encoders.kv import AttentionShape


@dataclass(frozen=True)
class VisionSpec:
    """How a VLM preset takes images: the processor's placeholder, which tokens are image tokens, tiling.

    ``set_tiles(processor, n)`` configures the processor for n tiles and raises ValueError for an n the model
    cannot do; None = the architecture has no tiles (native resolution or a fixed crop): only ``tiles=1`` is valid.
    """

    placeholder: str
    image_tokens: tuple[str, ...]
    separator: str = "\n"
    set_tiles: Callable[[Any, int], None] | None = None
    default_tiles: int = 1


@dataclass(frozen=True)
class VerifiSpec:
    """VERIFI (paper Sec. 3): a system prompt asks the VLM for a detailed description of the target image; the
    DiT is conditioned only on the generated tokens (plus the image tokens of multimodal inputs).

    ``template`` has one ``{}`` for the user content and ends where the assistant's answer starts; ``stop`` is
    the end-of-turn token that ends the rewrite.
    """

    template: str
    stop: str
    max_new_tokens: int = 160
    do_sample: bool = False
    temperature: float = 1.0


Builder = Callable[[int], tuple[nn.Module, Any]]  # seed -> (base model, tokenizer)


@dataclass(frozen=True)
class EncoderPreset:
    """One registry entry: how to build the backbone + tokenizer and how to prompt and tap it."""

    builder: Builder
    description: str = ""
    template: str = "{}"
    drop_prefix: int | str = "auto"
    layers: tuple[int, ...] | None = None  # default taps: explicit ids, or
    stride: int | None = None  # every k-th layer from
    start: int | None = None  # start (default k - 1); neither -> last layer only
    add_bos: bool = False
    add_eos: bool = False
    max_length: int = 192  # long DPG-style shapes descriptions reach ~150 tokens
    seed: int = 0  # initialisation seed of tiny presets; hub presets ignore it
    blocks_path: str | None = None
    vision: VisionSpec | None = None  # image inputs (the builder then returns a processor, not a tokenizer)
    verifi: VerifiSpec | None = None  # VERIFI rewrite prompt (generative presets)
    # the LM's attention shape, known without building it (KV fusion's DiT copies it; checked at config load and
    # against the built model); None = an encoder-only model without a KV cache
    attention: AttentionShape | None = None
