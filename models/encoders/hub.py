"""Real encoder presets (hub ids / local paths) of the paper's encoders: ``HUB_PRESETS``, merged into
``models.encoders.ENCODER_PRESETS``.

Each preset's code path is tested offline on a tiny config of the same transformers architecture class
(tests/test_presets.py); the weights themselves load with ``from_pretrained`` on clusters.

| preset         | weights (``from_pretrained``)    | class                              | blocks | default taps  |
|----------------|----------------------------------|------------------------------------|--------|---------------|
| llama-3.1-8b   | meta-llama/Llama-3.1-8B-Instruct | LlamaForCausalLM                   | 32     | 1, 4, ..., 31 |
| internvl2.5-8b | OpenGVLab/InternVL2_5-8B-MPO-hf  | InternVLForConditionalGeneration   | 32     | 1, 4, ..., 31 |
| internvl3-8b   | OpenGVLab/InternVL3-8B-hf        | InternVLForConditionalGeneration   | 28     | 3, 6, ..., 27 |
| gemma-3-12b-it | google/gemma-3-12b-it            | Gemma3ForConditionalGeneration     | 48     | 2, 5, ..., 47 |
| qwen2.5-vl-7b  | Qwen/Qwen2.5-VL-7B-Instruct      | Qwen2_5_VLForConditionalGeneration | 28     | 3, 6, ..., 27 |
| t5-v1_1-xxl    | google/t5-v1_1-xxl               | T5EncoderModel                     | 24     | 24 (last)     |

Taps (docs/DESIGN.md §2, "layer i" = ``hidden_states[i]``): every 3rd hidden state (paper Sec. 3), ending at
``num_layers - 1`` like Krea2's 2, 5, ..., 35 of 36 blocks: the top tap is the last block output *before* the
final norm, so every tap has the same (unnormed) scale, and the raw embeddings (0) are never tapped. T5 is the
paper's baseline: its final-normed last layer, as SD3/Flux/Imagen condition on it.

Where the weights come from: ``$UNIFUSION_MODEL_<NAME>`` (``env_var(name)``, e.g. ``UNIFUSION_MODEL_LLAMA_3_1_8B``)
when set (a local directory, e.g. from ``hf download <repo> --local-dir DIR``), else the hub id above. Real
presets load the generative class (VERIFI generates with it) in bf16.

``attention``: each LM's layers, width, query / KV heads and head width as its ``config.json`` gives them: the shape
a DiT doing KV fusion on the encoder's keys and values copies (config load checks the DiT against this table;
building the module checks it against the loaded model's own config).

Templates are each model's own chat template rendered for one user turn (no generation prompt); BOS, when the
model has one, is written in the template, so it is dropped with the rest and the kept tokens are the user content.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from models.encoders.kv import AttentionShape
from models.encoders.spec import Builder, EncoderPreset, VerifiSpec, VisionSpec
from models.tiny_vlm import set_internvl_tiles

# VERIFI (paper Sec. 3): the VLM rewrites the request into a detailed description of the target image.
VERIFI_SYSTEM = (
    "You write prompts for a text-to-image model. Describe in detail the image the user asks for; if the user "
    "gives an image with an instruction, describe the image that results from applying the instruction to it. "
    "Name every object with its colour, shape, size, count and position, the spatial relations between objects, "
    "any visible text, the style and the background. Reply with the description only."
)

# --------------------------------------------------------------------------------------------- chat templates

# Llama 3.1 Instruct: its chat template always opens with this system header, even without a system message.
_LLAMA_HEAD = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
    "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
)
_LLAMA_USER = "<|start_header_id|>user<|end_header_id|>\n\n"
LLAMA31_TEMPLATE = _LLAMA_HEAD + "<|eot_id|>" + _LLAMA_USER + "{}<|eot_id|>"
LLAMA31_VERIFI = (
    _LLAMA_HEAD + VERIFI_SYSTEM + "<|eot_id|>" + _LLAMA_USER + "{}<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)

# InternVL "-hf" conversions: ChatML without a default system turn; an image renders as "<IMG_CONTEXT>\n"
# before the text. InternVL2.5-8B's LM is InternLM2.5 (converted to Llama), whose tokenizer prepends BOS "<s>";
# InternVL3-8B's LM is Qwen2.5 (no BOS).
_CHATML_USER = "<|im_start|>user\n{}<|im_end|>\n"
_CHATML_VERIFI = "<|im_start|>system\n" + VERIFI_SYSTEM + "<|im_end|>\n" + _CHATML_USER + "<|im_start|>assistant\n"

# Gemma 3: "<bos>" is in its chat template; it has no system role (a system message is prepended to the first
# user turn followed by a blank line); an image renders as "<start_of_image>" right before the text.
GEMMA3_TEMPLATE = "<bos><start_of_turn>user\n{}<end_of_turn>\n"
GEMMA3_VERIFI = "<bos><start_of_turn>user\n" + VERIFI_SYSTEM + "\n\n{}<end_of_turn>\n<start_of_turn>model\n"

# Qwen2.5-VL: ChatML with the default system turn its template adds when none is given (replaced by VERIFI's).
QWEN25VL_TEMPLATE = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n" + _CHATML_USER
QWEN25VL_VERIFI = _CHATML_VERIFI

# ---------------------------------------------------------------------------------------------- hub specs


@dataclass(frozen=True)
class HubSpec:
    """Where a real preset's weights come from and what its tokenizer must provide."""

    repo_id: str
    model_class: str  # transformers class; the generative one wherever VERIFI is possible
    num_layers: int  # text blocks of the real model: the default taps are chosen for this depth
    processor: bool = False  # load AutoProcessor (VLM: images) instead of AutoTokenizer
    special_tokens: tuple[str, ...] = ()  # used by the templates: each must be one token of the tokenizer


def env_var(name: str) -> str:
    """The environment variable that points preset ``name`` at a local copy: ``UNIFUSION_MODEL_<NAME>``."""
    return "UNIFUSION_MODEL_" + re.sub(r"[^A-Z0-9]+", "_", name.upper()).strip("_")


def model_source(name: str) -> str:
    """What ``from_pretrained`` loads for preset ``name``: ``$UNIFUSION_MODEL_<NAME>`` if set, else the hub id."""
    return os.environ.get(env_var(name)) or HUB_SPECS[name].repo_id


def _missing_message(name: str, source: str, err: Exception) -> str:
    spec, var = HUB_SPECS[name], env_var(name)
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    local = f"/path/to/{spec.repo_id.split('/')[-1]}"
    return (
        f"cannot load encoder preset {name!r} from {source!r}: {first} "
        f"Without network access (or with HF_HUB_OFFLINE=1) the weights must already be on disk: download them "
        f"where there is network (`hf download {spec.repo_id} --local-dir {local}`) and set {var}={local} "
        f"(a directory with config.json, the weights and the tokenizer/processor files), or pre-fill the HF cache."
    )


def prepare(name: str, loaded: Any) -> Any:
    """Make a loaded tokenizer/processor of preset ``name`` tokenize its templates exactly (hub and tiny alike).

    - A processor must add no special tokens of its own: the FrozenEncoder tokenizes text-only prompts with
      ``add_special_tokens=False`` but calls the processor plainly for images, and the template already holds BOS
      (Gemma/InternLM tokenizers would prepend a second one, shifting the dropped prefix).
    - Every special token of the templates must be a single token, else the preset was pointed at the wrong model.
    """
    spec = HUB_SPECS[name]
    tok = loaded.tokenizer if spec.processor else loaded
    if spec.processor:
        if tok("a")["input_ids"] != tok("a", add_special_tokens=False)["input_ids"]:
            tok.add_bos_token = False  # the template carries BOS
            tok.add_eos_token = False
        if tok("a")["input_ids"] != tok("a", add_special_tokens=False)["input_ids"]:
            raise ValueError(f"preset {name!r}: cannot stop {type(tok).__name__} from adding BOS/EOS by itself")
    unk = getattr(tok, "unk_token_id", None)
    bad = []
    for t in spec.special_tokens:
        ids = tok(t, add_special_tokens=False)["input_ids"]
        if len(ids) != 1 or ids[0] == unk:
            bad.append(f"{t!r} -> {ids}")
    if bad:
        raise ValueError(
            f"preset {name!r}: the tokenizer loaded from {model_source(name)!r} does not have the template's special "
            f"tokens as single tokens ({', '.join(bad)}); is {env_var(name)} pointing at a different model?"
        )
    return loaded


def _hub_builder(name: str) -> Builder:
    """``<model_class>.from_pretrained(model_source(name), dtype=bf16)`` + its tokenizer/processor, prepared."""

    def build(seed: int) -> tuple[nn.Module, Any]:
        import transformers

        spec, source = HUB_SPECS[name], model_source(name)
        loader = transformers.AutoProcessor if spec.processor else transformers.AutoTokenizer
        try:
            # the processor first: it is small, so a missing model fails before gigabytes are read
            loaded = loader.from_pretrained(source)
            model = getattr(transformers, spec.model_class).from_pretrained(source, dtype=torch.bfloat16)
        except OSError as e:  # transformers raises OSError for unknown ids, no network and bad local paths
            raise OSError(_missing_message(name, source, e)) from e
        return model, prepare(name, loaded)

    return build


def hub_builder(repo_id: str, model_class: str = "AutoModel", dtype: str = "bfloat16", **kwargs: Any) -> Builder:
    """A builder for a real preset: ``transformers.<model_class>.from_pretrained(repo_id)`` + its tokenizer.

    Use the base-model class (``AutoModel`` gives e.g. ``Qwen3VLModel``/``LlamaModel``; ``T5EncoderModel``
    for T5). Loads lazily, on clusters; tests never call it.
    """

    def build(seed: int) -> tuple[nn.Module, Any]:
        import transformers

        cls = getattr(transformers, model_class)
        model = cls.from_pretrained(repo_id, dtype=getattr(torch, dtype), **kwargs)
        return model, transformers.AutoTokenizer.from_pretrained(repo_id)

    return build


def with_builder(name: str, make: Callable[[int], tuple[nn.Module, Any]]) -> EncoderPreset:
    """Preset ``name`` with its weights from ``make(seed)`` instead of the hub (tests: tiny configs of the same
    classes); the tokenizer/processor is prepared exactly as a hub one."""
    if name not in HUB_SPECS:
        raise ValueError(f"{name!r} is not a real preset; valid: {sorted(HUB_SPECS)}")

    def build(seed: int) -> tuple[nn.Module, Any]:
        model, loaded = make(seed)
        return model, prepare(name, loaded)

    return replace(HUB_PRESETS[name], builder=build)


def _taps_start(num_layers: int, stride: int = 3) -> int:
    """First tap of a stride ending at ``num_layers - 1`` (Krea2: 36 -> 2), skipping the embeddings (0)."""
    start = (num_layers - 1) % stride
    return start if start > 0 else stride


def _hub_preset(name: str, spec: HubSpec, description: str, **fields: Any) -> tuple[HubSpec, EncoderPreset]:
    """(spec, preset) of real preset ``name``: default taps every 3rd layer ending at ``num_layers - 1``."""
    attention = fields.get("attention")
    if attention is not None and attention.layers != spec.num_layers:
        raise AssertionError(f"{name}: attention shape has {attention.layers} layers, the model {spec.num_layers}")
    if "layers" not in fields:
        fields.setdefault("stride", 3)
        fields.setdefault("start", _taps_start(spec.num_layers, fields["stride"]))
    return spec, EncoderPreset(builder=_hub_builder(name), description=description, **fields)


# ---------------------------------------------------------------------------------------------- presets

_CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
_INTERNVL_IMAGE = ("<img>", "</img>", "<IMG_CONTEXT>")


def _internvl_vision() -> VisionSpec:
    # -hf processor: each 448 px tile -> 1024 patches -> pixel shuffle 0.5 -> 256 tokens between <img> and </img>;
    # dynamic tiling: grid tiles + a thumbnail, 1 or 3..10 tiles. The hub processor allows up to 12 grid tiles
    # (max_dynamic_patch); the paper trains with up to 10 tiles (Sec. 4), so 10 is the preset's limit.
    return VisionSpec(
        placeholder="<IMG_CONTEXT>",
        image_tokens=_INTERNVL_IMAGE,
        separator="\n",
        set_tiles=lambda proc, n: set_internvl_tiles(proc, n, max_tiles=10),
    )


_HUB: dict[str, tuple[HubSpec, EncoderPreset]] = {
    "llama-3.1-8b": _hub_preset(
        "llama-3.1-8b",
        HubSpec("meta-llama/Llama-3.1-8B-Instruct", "LlamaForCausalLM", 32,
                special_tokens=("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
        "Llama-3.1-8B-Instruct (paper Sec. 2 text-to-image ablations), text only; Llama 3.1 chat template with BOS; "
        "taps 1,4,...,31 of 32",
        template=LLAMA31_TEMPLATE,
        max_length=1024,  # VERIFI: ~130 template/system + a long DPG prompt (~300) + 160 generated, with margin
        verifi=VerifiSpec(template=LLAMA31_VERIFI, stop="<|eot_id|>"),
        attention=AttentionShape(layers=32, hidden=4096, heads=32, kv_heads=8, head_dim=128),
    ),
    "internvl2.5-8b": _hub_preset(
        "internvl2.5-8b",
        HubSpec("OpenGVLab/InternVL2_5-8B-MPO-hf", "InternVLForConditionalGeneration", 32, processor=True,
                special_tokens=("<s>", *_CHATML_TOKENS, *_INTERNVL_IMAGE)),
        "InternVL2.5-8B (paper ablations; the MPO weights are the only transformers-native -hf conversion), "
        "InternLM2.5 LM with BOS; 256 tokens per 448 px tile, tiles 1 or 3..10; taps 1,4,...,31 of 32",
        template="<s>" + _CHATML_USER,
        max_length=4096,  # 10 tiles x 256 + 2 = 2562 image tokens + VERIFI prompt and rewrite
        vision=_internvl_vision(),
        verifi=VerifiSpec(template="<s>" + _CHATML_VERIFI, stop="<|im_end|>"),
        attention=AttentionShape(layers=32, hidden=4096, heads=32, kv_heads=8, head_dim=128),  # InternLM2.5-7B
    ),
    "internvl3-8b": _hub_preset(
        "internvl3-8b",
        HubSpec("OpenGVLab/InternVL3-8B-hf", "InternVLForConditionalGeneration", 28, processor=True,
                special_tokens=(*_CHATML_TOKENS, *_INTERNVL_IMAGE)),
        "InternVL3-8B (the final UniFusion encoder), Qwen2.5-7B LM; 256 tokens per 448 px tile, tiles 1 or 3..10; "
        "taps 3,6,...,27 of 28",
        template=_CHATML_USER,
        max_length=4096,
        vision=_internvl_vision(),
        verifi=VerifiSpec(template=_CHATML_VERIFI, stop="<|im_end|>"),
        attention=AttentionShape(layers=28, hidden=3584, heads=28, kv_heads=4, head_dim=128),  # Qwen2.5-7B
    ),
    "gemma-3-12b-it": _hub_preset(
        "gemma-3-12b-it",
        HubSpec("google/gemma-3-12b-it", "Gemma3ForConditionalGeneration", 48, processor=True,
                special_tokens=("<bos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<image_soft_token>",
                                "<end_of_image>")),
        "Gemma-3-12B-it (paper App. A.1.4); fixed 896 px, 256 soft tokens per image (pan-and-scan off), no tiles; "
        "taps 2,5,...,47 of 48",
        template=GEMMA3_TEMPLATE,
        max_length=2048,
        vision=VisionSpec(
            placeholder="<start_of_image>",  # expanded to \n\n<start_of_image> 256 x soft token <end_of_image>\n\n
            image_tokens=("<start_of_image>", "<image_soft_token>", "<end_of_image>"),
            separator="",
        ),
        verifi=VerifiSpec(template=GEMMA3_VERIFI, stop="<end_of_turn>"),
        attention=AttentionShape(layers=48, hidden=3840, heads=16, kv_heads=8, head_dim=256),  # 16 x 256 != hidden
    ),
    "qwen2.5-vl-7b": _hub_preset(
        "qwen2.5-vl-7b",
        HubSpec("Qwen/Qwen2.5-VL-7B-Instruct", "Qwen2_5_VLForConditionalGeneration", 28, processor=True,
                special_tokens=(*_CHATML_TOKENS, "<|vision_start|>", "<|image_pad|>", "<|vision_end|>")),
        "Qwen2.5-VL-7B-Instruct (Qwen-Image's encoder); native resolution: (H/28)(W/28) merged 14 px patches per "
        "image, no tiles; taps 3,6,...,27 of 28",
        template=QWEN25VL_TEMPLATE,
        max_length=4096,  # a 1024 x 1024 image is 1369 + 2 tokens
        vision=VisionSpec(
            placeholder="<|vision_start|><|image_pad|><|vision_end|>",  # the processor repeats <|image_pad|>
            image_tokens=("<|vision_start|>", "<|image_pad|>", "<|vision_end|>"),
            separator="",
        ),
        verifi=VerifiSpec(template=QWEN25VL_VERIFI, stop="<|im_end|>"),
        attention=AttentionShape(layers=28, hidden=3584, heads=28, kv_heads=4, head_dim=128),
    ),
    "t5-v1_1-xxl": _hub_preset(
        "t5-v1_1-xxl",
        HubSpec("google/t5-v1_1-xxl", "T5EncoderModel", 24, special_tokens=("</s>",)),
        "T5 v1.1 XXL encoder (the paper's baseline), EOS appended and kept, no template, no VERIFI; last layer (24)",
        layers=(-1,),  # the last, final-normed layer, whatever the depth
        add_eos=True,
        max_length=512,
    ),
}
HUB_SPECS: dict[str, HubSpec] = {name: spec for name, (spec, _) in _HUB.items()}
HUB_PRESETS: dict[str, EncoderPreset] = {name: preset for name, (_, preset) in _HUB.items()}
REAL_PRESETS: tuple[str, ...] = tuple(HUB_SPECS)
