"""Real encoder presets (models/encoders/hub.py), tested offline on tiny random configs of the same HF classes.

Each real preset is rebuilt with ``presets.with_builder``: the preset's own template, taps, VisionSpec, VerifiSpec
and tokenizer preparation, through ``build_encoder``, but with a tiny model of the preset's class and an in-memory
byte-level tokenizer that registers the preset's special tokens (and, like the real one, adds BOS/EOS by itself).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from torch import nn
from transformers import PreTrainedTokenizerFast

from models.encoders import ENCODER_PRESETS, FrozenEncoder, Prompt, build_encoder, select_layers
from models.encoders import hub as presets

VLMS = ("internvl2.5-8b", "internvl3-8b", "gemma-3-12b-it", "qwen2.5-vl-7b")
GENERATIVE = ("llama-3.1-8b", *VLMS)
TEXT = "A red cube left of two blue spheres, with the word 'Hi'."


# ---------------------------------------------------------------------------------------------- tiny stand-ins


def byte_tokenizer(
    specials: tuple[str, ...],
    *,
    eos: str,
    bos: str | None = None,
    pad: str | None = None,
    extra: dict[str, str] | None = None,
    add_bos: bool = False,
    add_eos: bool = False,
) -> PreTrainedTokenizerFast:
    """Byte-level BPE without merges (one token per UTF-8 byte, as GPT-2/Llama-3/Qwen pre-tokenize) + specials."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    core = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    named = {k: v for k, v in (("bos_token", bos), ("eos_token", eos), ("pad_token", pad)) if v is not None}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, extra_special_tokens=extra or {}, add_bos_token=add_bos, add_eos_token=add_eos, **named
    )
    tok.add_special_tokens({"additional_special_tokens": list(specials)}, replace_extra_special_tokens=False)
    return tok


def _seeded(seed: int, make: Callable[[], nn.Module]) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make().eval()


def _text_cfg(tok: PreTrainedTokenizerFast, **kw: Any) -> dict[str, Any]:
    cfg = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=4096, pad_token_id=tok.pad_token_id,
               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return {**cfg, **kw}


def tiny_llama(seed: int) -> tuple[nn.Module, Any]:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = byte_tokenizer(("<|start_header_id|>", "<|end_header_id|>"), bos="<|begin_of_text|>", eos="<|eot_id|>",
                         add_bos=True)
    return _seeded(seed, lambda: LlamaForCausalLM(LlamaConfig(**_text_cfg(tok)))), tok


def tiny_t5(seed: int) -> tuple[nn.Module, Any]:
    from transformers import T5Config, T5EncoderModel

    tok = byte_tokenizer((), eos="</s>", pad="<pad>", add_eos=True)
    cfg = T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=4, num_heads=4,
                   pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, decoder_start_token_id=0)
    return _seeded(seed, lambda: T5EncoderModel(cfg)), tok


INTERNVL_TILE, INTERNVL_TOKENS_PER_TILE = 28, 4  # 28 px tile / 7 px patches = 16 -> pixel shuffle 0.5 -> 4


def _tiny_internvl(seed: int, lm: str) -> tuple[nn.Module, Any]:
    from transformers import (
        GotOcr2ImageProcessor,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
        InternVLVideoProcessor,
    )

    image = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
             "video_token": "<video>"}
    specials = ("<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>")
    if lm == "llama":  # InternLM2.5 as converted to Llama: "<s>" BOS, added by the tokenizer itself
        tok = byte_tokenizer(specials, bos="<s>", eos="</s>", pad="</s>", extra=image, add_bos=True)
    else:  # Qwen2.5: no BOS
        tok = byte_tokenizer(specials, eos="<|im_end|>", pad="<|endoftext|>", extra=image)
    ip = GotOcr2ImageProcessor(size={"height": INTERNVL_TILE, "width": INTERNVL_TILE})
    proc = InternVLProcessor(image_processor=ip, tokenizer=tok, video_processor=InternVLVideoProcessor(),
                             image_seq_length=INTERNVL_TOKENS_PER_TILE)
    cfg = InternVLConfig(
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                           image_size=[INTERNVL_TILE] * 2, patch_size=[7, 7]),
        text_config=_text_cfg(tok, model_type=lm),
        image_token_id=tok.context_image_token_id,
        downsample_ratio=0.5,
    )
    return _seeded(seed, lambda: InternVLForConditionalGeneration(cfg)), proc


GEMMA_TOKENS_PER_IMAGE = 4  # 56 px / 14 px patches = 4 x 4, pooled to 2 x 2


def tiny_gemma3(seed: int) -> tuple[nn.Module, Any]:
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessor, Gemma3Processor

    image = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    tok = byte_tokenizer(("<start_of_turn>", "<end_of_turn>", *image.values()), bos="<bos>", eos="<eos>",
                         pad="<pad>", extra=image, add_bos=True)
    proc = Gemma3Processor(image_processor=Gemma3ImageProcessor(size={"height": 56, "width": 56}), tokenizer=tok,
                           image_seq_length=GEMMA_TOKENS_PER_IMAGE)
    cfg = Gemma3Config(
        text_config=_text_cfg(tok, head_dim=8, sliding_window=16),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=56, patch_size=14),
        mm_tokens_per_image=GEMMA_TOKENS_PER_IMAGE,
        image_token_index=tok.image_token_id,
        boi_token_index=tok.boi_token_id,
        eoi_token_index=tok.eoi_token_id,
    )
    return _seeded(seed, lambda: Gemma3ForConditionalGeneration(cfg)), proc


def tiny_qwen25vl(seed: int) -> tuple[nn.Module, Any]:
    from transformers import (
        AutoConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    tok = byte_tokenizer(("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                          "<|video_pad|>"), eos="<|im_end|>", pad="<|endoftext|>")
    ids = tok.convert_tokens_to_ids
    proc = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=28 * 28 * 64),
                               tokenizer=tok, video_processor=Qwen2VLVideoProcessor())
    cfg = AutoConfig.for_model(
        "qwen2_5_vl",
        text_config=_text_cfg(tok, rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=32,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[1],
                           window_size=56),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
    )
    return _seeded(seed, lambda: Qwen2_5_VLForConditionalGeneration(cfg)), proc


TINY: dict[str, Callable[[int], tuple[nn.Module, Any]]] = {
    "llama-3.1-8b": tiny_llama,
    "internvl2.5-8b": lambda seed: _tiny_internvl(seed, "llama"),
    "internvl3-8b": lambda seed: _tiny_internvl(seed, "qwen2"),
    "gemma-3-12b-it": tiny_gemma3,
    "qwen2.5-vl-7b": tiny_qwen25vl,
    "t5-v1_1-xxl": tiny_t5,
}


@functools.cache
def tiny(name: str) -> FrozenEncoder:
    """The preset ``name`` built by build_encoder exactly as for the hub, but over its tiny stand-in."""
    key = f"test-tiny:{name}"
    ENCODER_PRESETS[key] = presets.with_builder(name, TINY[name])
    try:
        return build_encoder(key)
    finally:
        del ENCODER_PRESETS[key]


def image(h: int, w: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def ids_of(enc: FrozenEncoder, text: str) -> list[int]:
    return enc.tokenizer(text, add_special_tokens=False)["input_ids"]


def kept_ids(out: Any, row: int = 0) -> list[int]:
    return out.token_ids[row][out.mask[row]].tolist()


# ---------------------------------------------------------------------------------------------- registry


def test_registry_covers_every_real_preset() -> None:
    assert set(presets.REAL_PRESETS) == set(TINY)
    for name in presets.REAL_PRESETS:
        p, spec = ENCODER_PRESETS[name], presets.HUB_SPECS[name]
        assert (p.vision is not None) == (name in VLMS) == spec.processor, name
        assert (p.verifi is not None) == (name in GENERATIVE), name
        # the tiny stand-in is the preset's own architecture class
        assert type(TINY[name](0)[0]).__name__ == spec.model_class, name
        # every special token of the templates is declared, so prepare() checks it on the loaded tokenizer
        for template in (p.template, p.verifi.template if p.verifi else ""):
            for special in set(re.findall(r"<[^<>\s]+>", template)):
                assert special in spec.special_tokens, (name, special)


@pytest.mark.parametrize(
    ("name", "taps"),
    [
        ("llama-3.1-8b", tuple(range(1, 32, 3))),  # 32 blocks: 1, 4, ..., 31
        ("internvl2.5-8b", tuple(range(1, 32, 3))),
        ("internvl3-8b", tuple(range(3, 28, 3))),  # 28 blocks: 3, 6, ..., 27
        ("qwen2.5-vl-7b", tuple(range(3, 28, 3))),
        ("gemma-3-12b-it", tuple(range(2, 48, 3))),  # 48 blocks: 2, 5, ..., 47
        ("t5-v1_1-xxl", (24,)),  # the baseline: last (final-normed) layer
    ],
)
def test_default_taps_on_the_real_depth(name: str, taps: tuple[int, ...]) -> None:
    p, n = ENCODER_PRESETS[name], presets.HUB_SPECS[name].num_layers
    got = select_layers(n, layers=p.layers, stride=p.stride, start=p.start)
    assert got == taps
    if name != "t5-v1_1-xxl":  # Krea2 style: the top tap is the last block before the final norm, 0 never tapped
        assert got[-1] == n - 1 and 0 not in got


def test_stride_start_matches_krea2_on_36_layers() -> None:
    assert select_layers(36, stride=3, start=presets._taps_start(36)) == tuple(range(2, 36, 3))


# ---------------------------------------------------------------------------------------------- loading


@pytest.fixture
def hub_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """HF_HUB_OFFLINE=1, also for the already imported huggingface_hub (it reads the variable at import)."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.mark.parametrize("name", sorted(TINY))
def test_builder_loads_generative_class_in_bf16_from_hub_or_env(
    name: str, monkeypatch: pytest.MonkeyPatch, hub_offline: None
) -> None:
    spec = presets.HUB_SPECS[name]
    calls: list[tuple[str, str, Any]] = []
    model, loaded = TINY[name](0)
    # imported after the tiny build: a first model import can swap sys.modules["transformers"] for a new module
    import transformers

    class FakeModel:
        @classmethod
        def from_pretrained(cls, source: str, **kw: Any) -> nn.Module:
            calls.append(("model", source, kw.get("dtype")))
            return model

    class FakeLoader:
        @classmethod
        def from_pretrained(cls, source: str, **kw: Any) -> Any:
            calls.append(("loader", source, None))
            return loaded

    monkeypatch.setattr(transformers, spec.model_class, FakeModel)
    monkeypatch.setattr(transformers, "AutoProcessor" if spec.processor else "AutoTokenizer", FakeLoader)
    monkeypatch.delenv(presets.env_var(name), raising=False)
    got_model, got_loaded = ENCODER_PRESETS[name].builder(0)
    assert got_model is model and got_loaded is loaded
    assert sorted(calls) == [("loader", spec.repo_id, None), ("model", spec.repo_id, torch.bfloat16)]
    if name in GENERATIVE:
        assert hasattr(model, "generate") and "For" in spec.model_class  # VERIFI needs the generative head
    if spec.processor:  # prepared: the processor adds no BOS of its own (the template has it)
        tok = loaded.tokenizer
        assert tok("a b")["input_ids"] == tok("a b", add_special_tokens=False)["input_ids"]

    calls.clear()
    monkeypatch.setenv(presets.env_var(name), "/models/local-copy")
    ENCODER_PRESETS[name].builder(0)
    assert {c[1] for c in calls} == {"/models/local-copy"}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", sorted(TINY))
def test_missing_model_says_how_to_point_at_a_local_path(
    name: str, monkeypatch: pytest.MonkeyPatch, hub_offline: None
) -> None:
    var = presets.env_var(name)
    monkeypatch.setenv(var, "unifusion-tests/no-such-model")
    with pytest.raises(OSError) as err:
        ENCODER_PRESETS[name].builder(0)
    msg = str(err.value)
    assert name in msg and "unifusion-tests/no-such-model" in msg
    assert f"{var}=" in msg and "--local-dir" in msg and presets.HUB_SPECS[name].repo_id in msg


def test_prepare_rejects_a_tokenizer_without_the_template_tokens() -> None:
    _, llama_tok = tiny_llama(0)  # has no "</s>": the T5 preset was pointed at the wrong model
    with pytest.raises(ValueError, match=r"'</s>'.*UNIFUSION_MODEL_T5_V1_1_XXL"):
        presets.prepare("t5-v1_1-xxl", llama_tok)


# ---------------------------------------------------------------------------------------------- text path


@pytest.mark.parametrize("name", sorted(TINY))
def test_text_path_keeps_exactly_the_user_content(name: str) -> None:
    enc = tiny(name)
    p = ENCODER_PRESETS[name]
    prompts = [TEXT, "two green cones"]
    out = enc(prompts)
    eos = [enc.tokenizer.eos_token_id] if p.add_eos else []
    for b, text in enumerate(prompts):
        assert kept_ids(out, b) == ids_of(enc, text) + eos
    # the whole sequence is the chat template around the content, tokenized as one string (BOS written in it)
    input_ids, mask = enc.tokenize([TEXT])
    assert input_ids[0][mask[0]].tolist() == ids_of(enc, p.template.format(TEXT)) + eos
    # features are HF hidden_states[i] (docs/DESIGN.md §2) at the preset's taps, at the kept positions
    assert enc.layer_ids == select_layers(enc.num_layers, layers=p.layers, stride=p.stride, start=p.start)
    with torch.no_grad():
        hs = enc.model.base_model(input_ids=input_ids, attention_mask=mask.long(), output_hidden_states=True,
                                  use_cache=False).hidden_states
    pos = out.positions[0][out.mask[0]]
    for j, layer in enumerate(enc.layer_ids):
        torch.testing.assert_close(out.features[0, : len(pos), j], hs[layer][0, pos].float())


@pytest.mark.parametrize("name", sorted(TINY))
def test_prompt_over_max_length_raises_naming_the_limit(name: str) -> None:
    enc = tiny(name)
    limit = ENCODER_PRESETS[name].max_length
    assert enc.max_length == limit
    with pytest.raises(ValueError, match=f"max_length={limit}"):
        enc(["a " * limit])  # 2 bytes per word: twice the limit


# ---------------------------------------------------------------------------------------------- images


def _check_image_row(enc: FrozenEncoder, img: Image.Image, n_image_tokens: int) -> None:
    """Kept = exactly the processor's expansion of the user content alone; image tokens as predicted."""
    out = enc([Prompt(TEXT, (img,))])
    v = enc.vision
    user = v.placeholder + v.separator + TEXT
    expected = enc.processor(text=[user], images=[[img]])["input_ids"][0]
    expected = expected.tolist() if hasattr(expected, "tolist") else list(expected)
    got = kept_ids(out)
    assert got == expected
    image_ids = set(enc.tokenizer.convert_tokens_to_ids(list(v.image_tokens)))
    assert sum(t in image_ids for t in got) == n_image_tokens
    assert got[-len(ids_of(enc, TEXT)):] == ids_of(enc, TEXT)
    assert torch.isfinite(out.features).all() and out.features.shape[2] == len(enc.layer_ids)


@pytest.mark.parametrize("name", ["internvl2.5-8b", "internvl3-8b"])
@pytest.mark.parametrize("tiles", [1, 5])
def test_internvl_image_tokens_per_tile(name: str, tiles: int) -> None:
    enc = tiny(name)
    enc.set_tiles(tiles)
    try:  # a square image: 5 tiles = a 2 x 2 grid + the thumbnail
        _check_image_row(enc, image(56, 56), tiles * INTERNVL_TOKENS_PER_TILE + 2)  # + <img>, </img>
    finally:
        enc.set_tiles(1)


def test_qwen25vl_native_resolution_tokens() -> None:
    h, w = 56, 84  # multiples of 28: no resize; (h/14/2) * (w/14/2) = 2 * 3 merged patches
    _check_image_row(tiny("qwen2.5-vl-7b"), image(h, w), (h // 14 // 2) * (w // 14 // 2) + 2)  # + vision start/end


def test_gemma3_fixed_tokens_per_image() -> None:
    enc = tiny("gemma-3-12b-it")
    assert enc.model.config.mm_tokens_per_image == GEMMA_TOKENS_PER_IMAGE
    _check_image_row(enc, image(40, 90), GEMMA_TOKENS_PER_IMAGE + 2)  # any size -> fixed count, + boi/eoi


@pytest.mark.parametrize(
    ("name", "bad", "message"),
    [
        ("internvl2.5-8b", 2, r"use 1 \(thumbnail only\) or 3\.\.10"),
        ("internvl3-8b", 11, r"use 1 \(thumbnail only\) or 3\.\.10"),  # the paper trains with up to 10
        ("gemma-3-12b-it", 2, "tiles must be 1"),
        ("qwen2.5-vl-7b", 5, "tiles must be 1"),
        ("llama-3.1-8b", 1, "takes no images"),
        ("t5-v1_1-xxl", 1, "takes no images"),
    ],
)
def test_impossible_tiles_raise_naming_the_valid_values(name: str, bad: int, message: str) -> None:
    enc = tiny(name)
    with pytest.raises(ValueError, match=message):
        enc.set_tiles(bad)
    if enc.vision is not None:
        assert enc.tiles == 1
        enc.set_tiles(1)


# ---------------------------------------------------------------------------------------------- VERIFI


@pytest.mark.parametrize("name", GENERATIVE)
def test_verifi_conditions_on_exactly_the_generated_and_image_positions(name: str) -> None:
    enc = tiny(name)
    full = enc.verifi
    assert full is not None and full.stop in full.template.split("{}")[1]  # the stop ends the user turn too
    enc.verifi = dataclasses.replace(full, max_new_tokens=5)
    try:
        images = (image(56, 56),) if name in VLMS else ()
        out = enc([Prompt(TEXT, images)], verifi=True)
        # the same head and greedy generation, done directly on the HF model
        prefix, suffix = full.template.split("{}")
        v = enc.vision
        user = (v.placeholder + v.separator if images else "") + TEXT
        if images:
            head = dict(enc.processor(text=[prefix + user + suffix], images=[list(images)], return_tensors="pt"))
        else:
            head = dict(enc.tokenizer([prefix + user + suffix], add_special_tokens=False, return_tensors="pt"))
        stop = enc.tokenizer.convert_tokens_to_ids(full.stop)
        gen = enc.model.generate(**head, max_new_tokens=5, do_sample=False, eos_token_id=stop,
                                 pad_token_id=enc.tokenizer.pad_token_id or stop)
        n_head = head["input_ids"].shape[1]
        new = gen[0, n_head:].tolist()
        new = new[: new.index(stop)] if stop in new else new
        assert new, "the tiny model stopped at once; pick another seed"
        image_ids = set(enc.tokenizer.convert_tokens_to_ids(list(v.image_tokens))) if images else set()
        image_pos = [i for i, t in enumerate(head["input_ids"][0].tolist()) if t in image_ids]
        assert len(image_pos) == (INTERNVL_TOKENS_PER_TILE + 2 if "internvl" in name
                                  else GEMMA_TOKENS_PER_IMAGE + 2 if "gemma" in name
                                  else 2 * 2 + 2 if "qwen" in name else 0)
        positions = out.positions[0][out.mask[0]].tolist()
        assert positions == image_pos + list(range(n_head, n_head + len(new)))
        assert kept_ids(out)[len(image_pos):] == new
        assert out.rewrites == [enc.tokenizer.decode(new, skip_special_tokens=True).strip()]
        # the features came from the generation's passes; encoding the same ids again gives them too
        again = enc([Prompt(TEXT, images)], verifi=True, rewrites=[new])
        torch.testing.assert_close(out.features, again.features, atol=1e-4, rtol=1e-4)
    finally:
        enc.verifi = full
