"""The frozen text/vision-language encoder and its presets.

- ``taps``: which hidden states are tapped (``select_layers``) and where a model's blocks live;
- ``frozen``: ``FrozenEncoder`` (selected hidden states of the user's content) and ``encoder_fingerprint``;
- ``spec``: what a preset is (``EncoderPreset``, ``VisionSpec``, ``VerifiSpec``);
- ``tiny`` / ``hub``: the offline tiny presets and the paper's real encoders;
- ``registry``: ``ENCODER_PRESETS`` = the tiny presets + the real ones, and ``build_encoder(name, ...)``.

A real model is one entry in ``hub``'s table (or, from user code, one ``ENCODER_PRESETS[name] = EncoderPreset(...)``).
The request type ``Prompt`` lives in ``common.prompt`` and is re-exported here as the encoder's input type.
"""

from common.prompt import Prompt, as_prompt, image_digest
from models.encoders.frozen import EncoderOutput, FrozenEncoder, encoder_fingerprint
from models.encoders.registry import ENCODER_PRESETS, build_encoder
from models.encoders.spec import Builder, EncoderPreset, VerifiSpec, VisionSpec
from models.encoders.taps import select_layers

__all__ = [
    "ENCODER_PRESETS", "Builder", "EncoderOutput", "EncoderPreset", "FrozenEncoder", "Prompt", "VerifiSpec",
    "VisionSpec", "as_prompt", "build_encoder", "encoder_fingerprint", "image_digest", "select_layers",
]
