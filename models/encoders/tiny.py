"""The tiny offline presets: random Llama / T5 encoders over the shapes vocabulary and the tiny VLM.

They need no download, so tests and CPU sweeps never touch the Hub. ``TINY_PRESETS`` is merged into
``models.encoders.ENCODER_PRESETS``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from models.encoders.kv import AttentionShape
from models.encoders.oracle import ORACLE_POSITIONS, build_oracle
from models.encoders.spec import Builder, EncoderPreset, VerifiSpec, VisionSpec


def _seeded(seed: int, make: Callable[[], nn.Module]) -> nn.Module:
    # fork_rng restores the global CPU RNG afterwards, so building an encoder never shifts a run's randomness.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


def _tiny_llama(seed: int) -> tuple[nn.Module, Any]:
    from transformers import LlamaConfig, LlamaModel

    from models.tokenizer import shapes_tokenizer
    from world.vocab import ALL_TOKENS

    tok = shapes_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(ALL_TOKENS),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=12,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        attn_implementation="sdpa",
    )
    return _seeded(seed, lambda: LlamaModel(cfg)), tok


def _tiny_t5(seed: int) -> tuple[nn.Module, Any]:
    from transformers import T5Config, T5EncoderModel

    from models.tokenizer import shapes_tokenizer
    from world.vocab import ALL_TOKENS

    tok = shapes_tokenizer()
    cfg = T5Config(
        vocab_size=len(ALL_TOKENS),
        d_model=64,
        num_layers=6,
        num_heads=4,
        d_kv=16,
        d_ff=128,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.pad_token_id,
    )
    return _seeded(seed, lambda: T5EncoderModel(cfg)), tok


def _tiny_vlm(pretrained: bool) -> Builder:
    def build(seed: int) -> tuple[nn.Module, Any]:
        from models.tiny_vlm import build_tiny_vlm, pretrained_tiny_vlm, tiny_vlm_processor

        model = pretrained_tiny_vlm() if pretrained else build_tiny_vlm(seed)
        return model, tiny_vlm_processor()

    return build


def _tiny_vlm_preset(pretrained: bool) -> EncoderPreset:
    from models import tiny_vlm as tv

    text = tv.TINY_VLM["text"]
    return EncoderPreset(
        builder=_tiny_vlm(pretrained),
        description=(
            "tiny InternVL (Qwen2 LM 4 x 192, 9 tokens per 12 px tile) over the shapes chat vocabulary, "
            + ("pretrained once on the shapes world (captions, captioning, VERIFI rewrites, edits) and cached"
               if pretrained else "randomly initialised")
            + "; taps 1, 2, 3, 4 (4 = final-normed)"
        ),
        template=tv.CHAT_PREFIX + "{}" + tv.CHAT_SUFFIX,
        stride=1,
        start=1,
        max_length=512,
        vision=VisionSpec(
            placeholder=tv.IMAGE_PLACEHOLDER,
            image_tokens=("<img>", "</img>", tv.IMAGE_PLACEHOLDER),
            separator=" ",
            set_tiles=lambda proc, n: tv.set_internvl_tiles(proc, n, max_tiles=10),
            default_tiles=5,  # 2x2 + thumbnail: a 12 px thumbnail alone loses the small shapes' colours
        ),
        verifi=VerifiSpec(template=tv.VERIFI_PREFIX + "{}" + tv.VERIFI_SUFFIX, stop=tv.END_OF_TURN),
        attention=AttentionShape(layers=text["layers"], hidden=text["hidden_size"], heads=text["heads"],
                                 kv_heads=text["kv_heads"], head_dim=text["hidden_size"] // text["heads"]),
    )


TINY_PRESETS: dict[str, EncoderPreset] = {
    "tiny-llama": EncoderPreset(
        builder=_tiny_llama,
        description="random 12-layer Llama (hidden 64) over the shapes vocabulary; BOS; taps 2,5,8,11",
        stride=3,
        add_bos=True,
        attention=AttentionShape(layers=12, hidden=64, heads=4, kv_heads=2, head_dim=16),  # = _tiny_llama's config
    ),
    "tiny-t5": EncoderPreset(
        builder=_tiny_t5,
        description="random 6-layer T5 encoder (d_model 64) over the shapes vocabulary; EOS; last layer",
        add_eos=True,
    ),
    "oracle": EncoderPreset(
        builder=build_oracle,
        description="the positive control: each caption token as one-hot word + one-hot position, no encoder "
                    "(models/encoders/oracle.py)",
        max_length=ORACLE_POSITIONS,
    ),
    "tiny-vlm": _tiny_vlm_preset(pretrained=True),
    "tiny-vlm-random": _tiny_vlm_preset(pretrained=False),
}
