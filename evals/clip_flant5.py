"""CLIP-FlanT5 (Lin et al., 2024), the VQAScore model behind GenAI-Bench's published tables, rebuilt on
transformers' ``CLIPVisionModel`` + ``T5ForConditionalGeneration`` (t2v_metrics' own LLaVA-style class no longer
runs on current transformers).

    scorer = make_scorer("clip-flant5-xxl")                                  # hub: zhiqiulin/clip-flant5-xxl
    scorer = make_scorer("clip-flant5-xxl", model_id="/models/clip-flant5-xxl")        # a local copy
    scorer.score(images, texts) -> (N,) tensor in [0, 1]

Architecture (t2v_metrics ``clip_t5.py`` @ c1543c7): CLIP ViT-L/14-336 -> hidden states of layer
``mm_vision_select_layer`` (-2, the penultimate) without CLS -> ``mlp2x_gelu`` projector (Linear, GELU, Linear)
-> the image tokens replace the ``<image>`` placeholder (token id -200) in the T5 *encoder* input, which is
``[embed(text before); image tokens; embed(text after)]``.

Scoring, as ``CLIPT5Model.forward``:
- prompt ``t5_chat``: ``SYSTEM_MSG + " USER: <image>\\n" + question + " ASSISTANT: "``, question
  ``Does this figure show "{text}"? Please answer yes or no.``; each side of ``<image>`` is tokenized on its own,
  so EACH chunk ends with ``</s>`` (``t5_tokenizer_image_token``): ``[system..., </s>, IMG, question..., </s>]``;
  the token list is cut at 2048 (``CONTEXT_LEN``);
- image: ``expand2square`` with the CLIP mean colour (``int(255 * mean)``), then the CLIP processor (336 px);
- score = ``exp(-mean CE)`` over the T5 labels ``[▁Yes, </s>]`` (``evals.vqascore_base.seq2seq_answer_score``), under
  bf16 autocast on CUDA.

Batching: each sample's attention mask covers exactly its real positions, so a score does not depend on its batch
mates; t2v_metrics' own batched and per-pair scores agree too (its mask covers each prompt's real tokens).

Weights: the hub checkpoint is a ``CLIPT5ForConditionalGeneration`` state dict. Its keys map as
``vision_tower.vision_tower.<clip key>`` -> ``vision.<clip key>`` (CLIP's ``vision_model.`` level follows the
installed transformers), ``mm_projector.{0,2}.*`` -> ``projector.{0,2}.*``, ``embed_tokens.weight`` (an alias of
T5's ``shared``) dropped, every other key -> ``t5.<key>`` (``map_original_key``). Tokenizer ``google/flan-t5-xxl``
(``-xl``); the original loads the slow sentencepiece tokenizer, transformers 5 gives its converted equivalent.
Loading is for clusters: ``hf download zhiqiulin/clip-flant5-xxl`` (plus ``google/flan-t5-xxl`` and
``openai/clip-vit-large-patch14-336`` for the tokenizer and the vision config/processor), then pass local paths
(``--judge-model``, ``--judge-tokenizer``, ``--judge-vision-tower``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from evals.vqascore_base import (
    ANSWER_TEMPLATE,
    QUESTION_TEMPLATE,
    VQAScorer,
    check_pairs,
    scorer_identity,
    seq2seq_answer_score,
)

IMAGE_TOKEN_INDEX = -200
CONTEXT_LEN = 2048
SYSTEM_MSG = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
              "detailed, and polite answers to the user's questions.")
# (text before <image>, text after it); the question is formatted into the second part
PROMPT_STYLES: dict[str, tuple[str, str]] = {
    "t5_chat": (SYSTEM_MSG + " USER: ", "\n{} ASSISTANT: "),
    "t5_chat_no_system": ("USER: ", "\n{} ASSISTANT: "),
    "t5_chat_no_system_no_user": ("", "\n{} : "),
}
CLIP_FLANT5_MODELS: dict[str, dict[str, str]] = {
    "clip-flant5-xxl": {"checkpoint": "zhiqiulin/clip-flant5-xxl", "tokenizer": "google/flan-t5-xxl"},
    "clip-flant5-xl": {"checkpoint": "zhiqiulin/clip-flant5-xl", "tokenizer": "google/flan-t5-xl"},
}
# keys of the original state dict that carry nothing for us: an alias of t5.shared, non-persistent buffers of old
# transformers, and a T5 weight the T5 class itself ignores on load
_IGNORED_ORIGINAL = ("embed_tokens.weight",)
_IGNORED_SUFFIXES = (".position_ids", "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight")


class CLIPFlanT5(nn.Module):
    """CLIP vision tower + ``mlp2x_gelu`` projector + T5 encoder-decoder.

    ``vision``: ``CLIPVisionModel``; ``projector``: Linear(vision hidden, d_model), GELU, Linear(d_model, d_model);
    ``t5``: ``T5ForConditionalGeneration``. ``select_layer``: which hidden state feeds the projector (-2).
    """

    def __init__(self, vision: nn.Module, t5: nn.Module, select_layer: int = -2,
                 projector: nn.Module | None = None) -> None:
        super().__init__()
        self.vision, self.t5, self.select_layer = vision, t5, select_layer
        width, d_model = vision.config.hidden_size, t5.config.d_model
        self.projector = projector if projector is not None else nn.Sequential(
            nn.Linear(width, d_model), nn.GELU(), nn.Linear(d_model, d_model))

    @classmethod
    def from_configs(cls, vision_config: Any, t5_config: Any, select_layer: int = -2) -> CLIPFlanT5:
        """Randomly initialised model from a ``CLIPVisionConfig`` and a ``T5Config``."""
        from transformers import CLIPVisionModel, T5ForConditionalGeneration

        return cls(CLIPVisionModel(vision_config), T5ForConditionalGeneration(t5_config), select_layer)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (B, 3, S, S) -> projected patch tokens (B, (S / patch)^2, d_model); CLS dropped."""
        dtype = next(self.vision.parameters()).dtype
        out = self.vision(pixel_values.to(dtype), output_hidden_states=True)
        return self.projector(out.hidden_states[self.select_layer][:, 1:])

    def encoder_inputs(self, token_ids: Sequence[Sequence[int]],
                       image_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Splice each sample's image tokens at its ``IMAGE_TOKEN_INDEX`` and right-pad with zeros.

        token_ids: B lists, each with exactly one ``IMAGE_TOKEN_INDEX``; image_tokens (B, P, d_model).
        Returns inputs_embeds (B, L, d_model), attention_mask (B, L) with L = max_i len_i + P - 1; the mask covers
        each sample's real positions.
        """
        if len(token_ids) != image_tokens.shape[0]:
            raise ValueError(f"{len(token_ids)} prompts but {image_tokens.shape[0]} images")
        embed = self.t5.get_input_embeddings()
        device = image_tokens.device
        rows = []
        for i, ids in enumerate(token_ids):
            at = [j for j, t in enumerate(ids) if t == IMAGE_TOKEN_INDEX]
            if len(at) != 1:
                raise ValueError(f"prompt {i} must hold exactly one image placeholder ({IMAGE_TOKEN_INDEX}), "
                                 f"found {len(at)}")
            before = torch.tensor(ids[: at[0]], dtype=torch.long, device=device)
            after = torch.tensor(ids[at[0] + 1:], dtype=torch.long, device=device)
            rows.append(torch.cat([embed(before), image_tokens[i].to(embed.weight.dtype), embed(after)]))
        width = max(r.shape[0] for r in rows)
        embeds = torch.zeros(len(rows), width, rows[0].shape[1], dtype=rows[0].dtype, device=device)
        mask = torch.zeros(len(rows), width, dtype=torch.long, device=device)
        for i, r in enumerate(rows):
            embeds[i, : r.shape[0]] = r
            mask[i, : r.shape[0]] = 1
        return embeds, mask


def map_original_key(key: str, target_keys: set[str] | None = None) -> str | None:
    """A ``CLIPT5ForConditionalGeneration`` state-dict key -> this wrapper's key; None for keys we drop.

    target_keys: the wrapper's keys; resolves CLIP's ``vision_model.`` level, which transformers 4 has inside
    ``CLIPVisionModel`` and transformers 5 flattens.
    """
    if key in _IGNORED_ORIGINAL or key.endswith(_IGNORED_SUFFIXES):
        return None
    if key.startswith("vision_tower.vision_tower."):
        rest = key[len("vision_tower.vision_tower."):]
        options = [rest, rest.removeprefix("vision_model."), "vision_model." + rest]
        hits = [f"vision.{r}" for r in options if target_keys is None or f"vision.{r}" in target_keys]
        return hits[0] if hits else f"vision.{rest}"
    if key.startswith("mm_projector."):
        return "projector." + key[len("mm_projector."):]
    if key.startswith("model."):  # LLaVA-style prefix; CLIPT5's get_model() is itself, so none is expected
        raise ValueError(f"unexpected key {key!r}: not a CLIPT5ForConditionalGeneration state dict")
    return "t5." + key


def load_original_state_dict(model: CLIPFlanT5, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load a state dict with the original CLIP-FlanT5 key names into ``model`` (in place).

    Every wrapper weight must be covered (T5's tied embedding aliases may come from ``shared``); unknown keys raise.
    An ``lm_head`` that differs from ``shared`` (FlanT5: untied) is untied here, because transformers 5's T5 always
    ties them at construction.
    """
    own = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    unexpected = []
    for key, value in state_dict.items():
        new = map_original_key(key, set(own))
        if new is None:
            continue
        if new not in own:
            unexpected.append(key)
        mapped[new] = value
    if unexpected:
        raise ValueError(f"{len(unexpected)} checkpoint keys have no place in the wrapper, e.g. {unexpected[:5]}")
    shared = mapped.get("t5.shared.weight")
    for alias in ("t5.encoder.embed_tokens.weight", "t5.decoder.embed_tokens.weight", "t5.lm_head.weight"):
        if alias not in mapped and shared is not None:
            mapped[alias] = shared
    head = mapped.get("t5.lm_head.weight")
    if head is not None and shared is not None and not torch.equal(head, shared):
        if model.t5.lm_head.weight is model.t5.get_input_embeddings().weight:
            model.t5.lm_head.weight = nn.Parameter(head.detach().clone())
            getattr(model.t5, "all_tied_weights_keys", {}).pop("lm_head.weight", None)
    missing = sorted(set(own) - set(mapped))
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} wrapper weights, e.g. {missing[:5]}")
    with torch.no_grad():
        params = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers())
        for key, value in mapped.items():
            params[key].copy_(value.to(params[key].dtype))


# ------------------------------------------------------------------------------------------------ hub loading


def _missing_model_error(what: str, ident: str, err: Exception | None) -> FileNotFoundError:
    from evals.runtime import offline_hint

    return FileNotFoundError(
        f"CLIP-FlanT5: {what} {ident!r} is neither a local folder nor in the hub cache "
        f"({type(err).__name__ if err else 'not found'}: {str(err).splitlines()[0][:200] if err else ''}). It needs "
        "three models: where the hub is reachable run `hf download zhiqiulin/clip-flant5-xxl --local-dir A`, "
        "`hf download google/flan-t5-xxl --local-dir B`, `hf download openai/clip-vit-large-patch14-336 "
        "--local-dir C`, then pass `--judge-model A --judge-tokenizer B --judge-vision-tower C` (python: "
        "model_id=, tokenizer_id=, vision_tower=); or set HF_HOME to a cache that holds them, with "
        "HF_HUB_OFFLINE=1 to skip the hub. " + offline_hint("--judge oracle") + ".")


def resolve_checkpoint(ident: str, cache_dir: str | None = None, local_files_only: bool = False) -> Path:
    """A local folder holding ``config.json`` + weights: ``ident`` itself, or its hub snapshot (downloaded)."""
    path = Path(ident).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json: not a CLIP-FlanT5 checkpoint folder")
        return path
    if ident.startswith((".", "/", "~")) or path.suffix:
        raise _missing_model_error("checkpoint", ident, None)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(ident, cache_dir=cache_dir, local_files_only=local_files_only,
                                      allow_patterns=["*.json", "*.safetensors", "*.bin"]))
    except Exception as err:  # offline, gated, typo: all end in the same advice
        raise _missing_model_error("checkpoint", ident, err) from err


def _read_tensors(folder: Path, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The checkpoint tensors whose key starts with one of ``prefixes`` (reads only the shards holding them)."""
    index = next((folder / n for n in ("model.safetensors.index.json", "pytorch_model.bin.index.json")
                  if (folder / n).is_file()), None)
    if index is not None:
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({f for k, f in weight_map.items() if k.startswith(prefixes)})
    else:
        files = [n for n in ("model.safetensors", "pytorch_model.bin") if (folder / n).is_file()][:1]
    out: dict[str, torch.Tensor] = {}
    for name in files:
        if name.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(str(folder / name), framework="pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys() if k.startswith(prefixes)})
        else:
            shard = torch.load(folder / name, map_location="cpu", weights_only=True, mmap=True)
            out.update({k: v for k, v in shard.items() if k.startswith(prefixes)})
    return out


def image_processor_class() -> type:
    """The CLIP image processor that resizes as t2v_metrics' (transformers 4.x) does, through PIL: on transformers 5
    ``CLIPImageProcessor`` resizes through torchvision (pixels differ by up to one 8-bit level), and
    ``CLIPImageProcessorPil`` is the PIL one."""
    import transformers

    return getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor


def load_clip_flant5(model_id: str, tokenizer_id: str | None = None, vision_tower: str | None = None,
                     device: str = "cpu", dtype: torch.dtype = torch.float32, cache_dir: str | None = None,
                     local_files_only: bool = False, device_map: str | dict | None = None
                     ) -> tuple[CLIPFlanT5, Any, Any]:
    """(model, tokenizer, image processor) of a CLIP-FlanT5 checkpoint (hub id or local folder).

    T5 weights load through ``T5ForConditionalGeneration.from_pretrained`` (sharded, untied FlanT5 lm_head); the
    vision tower and projector from the checkpoint's ``vision_tower.vision_tower.*`` / ``mm_projector.*`` tensors
    (falling back to ``vision_tower``'s own CLIP weights if the checkpoint has none). With ``device_map`` the T5
    is spread by accelerate and the vision tower + projector sit on the T5 embedding's device.
    """
    from transformers import (
        AutoTokenizer,
        CLIPVisionConfig,
        CLIPVisionModel,
        T5ForConditionalGeneration,
    )

    folder = resolve_checkpoint(model_id, cache_dir, local_files_only)
    config = json.loads((folder / "config.json").read_text())
    if config.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
        raise ValueError(f"{folder}: projector {config['mm_projector_type']!r}, only mlp2x_gelu is supported")
    if config.get("mm_vision_select_feature", "patch") != "patch":
        raise ValueError(f"{folder}: mm_vision_select_feature must be 'patch'")
    vision_id = vision_tower or config.get("mm_vision_tower", "openai/clip-vit-large-patch14-336")
    if tokenizer_id is None:
        own = any((folder / n).is_file() for n in ("tokenizer.json", "spiece.model", "tokenizer_config.json"))
        tokenizer_id = str(folder) if own else f"google/flan-t5-{'xxl' if config.get('d_model') == 4096 else 'xl'}"
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_id, model_max_length=CONTEXT_LEN)
        processor = image_processor_class().from_pretrained(vision_id)
        vision_config = CLIPVisionConfig.from_pretrained(vision_id)
    except OSError as err:
        raise _missing_model_error("tokenizer or vision tower", f"{tokenizer_id} / {vision_id}", err) from err
    from evals.runtime import check_device_map

    check_device_map(device_map)
    t5 = T5ForConditionalGeneration.from_pretrained(str(folder), dtype=dtype,
                                                    **({"device_map": device_map} if device_map else {}))
    extra = _read_tensors(folder, ("vision_tower.", "mm_projector."))
    if any(k.startswith("vision_tower.") for k in extra):
        vision = CLIPVisionModel(vision_config).to(dtype)
    else:
        vision = CLIPVisionModel.from_pretrained(vision_id, dtype=dtype)
    model = CLIPFlanT5(vision, t5, int(config.get("mm_vision_select_layer", -2))).to(dtype)
    own = model.state_dict()
    with torch.no_grad():
        for key, value in extra.items():
            new = map_original_key(key, set(own))
            if new is None:
                continue
            if new not in own:
                raise ValueError(f"{folder}: checkpoint key {key!r} has no place in the wrapper")
            own[new].copy_(value.to(dtype))
    if not any(k.startswith("mm_projector.") for k in extra):
        raise ValueError(f"{folder}: no mm_projector.* weights: not a CLIP-FlanT5 checkpoint")
    if device_map is not None:  # T5 is placed; the rest goes where its embedding lives
        first = t5.get_input_embeddings().weight.device
        model.vision.to(first)
        model.projector.to(first)
        return model.eval(), tokenizer, processor
    return model.to(device).eval(), tokenizer, processor


# ------------------------------------------------------------------------------------------------ scorer


def expand_to_square(image: Image.Image, fill: tuple[int, ...]) -> Image.Image:
    """Pad to a square canvas of colour ``fill``, the image centred (t2v_metrics' ``expand2square``)."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def clip_flant5_identity(variant: str, model_id: str | None = None, question: str = QUESTION_TEMPLATE,
                         answer: str = ANSWER_TEMPLATE, prompt_style: str = "t5_chat") -> dict[str, Any]:
    """``evals.cache`` identity of a CLIP-FlanT5 scorer (the checkpoint defaults to the variant's hub id)."""
    model = model_id or CLIP_FLANT5_MODELS.get(variant, {}).get("checkpoint")
    return scorer_identity(variant, model, question, answer, prompt_style=prompt_style)


class CLIPFlanT5Score(VQAScorer):
    """VQAScore with CLIP-FlanT5 (module docstring). Either ``model``/``tokenizer``/``image_processor`` (tests,
    custom builds) or a checkpoint: ``model_id`` (hub id or local folder; default the ``variant``'s hub id).

    ``name`` is the variant (``clip-flant5-xxl``), so caches and tables say which model judged.
    """

    def __init__(self, variant: str = "clip-flant5-xxl", model_id: str | None = None, model: CLIPFlanT5 | None = None,
                 tokenizer: Any = None, image_processor: Any = None, tokenizer_id: str | None = None,
                 vision_tower: str | None = None, batch_size: int = 16, question: str = QUESTION_TEMPLATE,
                 answer: str = ANSWER_TEMPLATE, prompt_style: str = "t5_chat",
                 device: str | None = None, dtype: Any = "auto", device_map: str | dict | None = None) -> None:
        if prompt_style not in PROMPT_STYLES:
            raise ValueError(f"unknown prompt_style {prompt_style!r}; valid: {list(PROMPT_STYLES)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if model is None:
            if variant not in CLIP_FLANT5_MODELS and model_id is None:
                raise ValueError(f"unknown CLIP-FlanT5 variant {variant!r}; valid: {list(CLIP_FLANT5_MODELS)} "
                                 "(or pass model_id=)")
            spec = CLIP_FLANT5_MODELS.get(variant, {})
            from evals.runtime import pick_device, pick_dtype

            device = pick_device(device)
            model, tokenizer, image_processor = load_clip_flant5(
                model_id or spec["checkpoint"], tokenizer_id or (None if model_id else spec.get("tokenizer")),
                vision_tower, device=device, dtype=pick_dtype(dtype, device), device_map=device_map)
        elif tokenizer is None or image_processor is None:
            raise ValueError("model= needs tokenizer= and image_processor= too")
        self.model, self.tokenizer, self.image_processor = model.eval(), tokenizer, image_processor
        self.name, self.batch_size = variant, batch_size
        self.identity = clip_flant5_identity(variant, model_id, question, answer, prompt_style)
        self.question, self.answer, self.prompt_style = question, answer, prompt_style
        self.fill = tuple(int(255 * m) for m in image_processor.image_mean)

    def token_ids(self, text: str) -> list[int]:
        """The encoder token list of one text: ``chunk_before + [IMAGE_TOKEN_INDEX] + chunk_after`` (each chunk
        tokenized alone, so each ends with ``</s>``), cut to ``CONTEXT_LEN``."""
        before, after = PROMPT_STYLES[self.prompt_style]
        ids = self.tokenizer(before)["input_ids"] + [IMAGE_TOKEN_INDEX] + \
            self.tokenizer(after.format(self.question.format(text)))["input_ids"]
        return ids[:CONTEXT_LEN]

    def pixel_values(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(B, 3, S, S): RGB, padded to square with the CLIP mean colour, then the CLIP processor."""
        squares = [expand_to_square(im.convert("RGB"), self.fill) for im in images]
        return self.image_processor(images=squares, return_tensors="pt")["pixel_values"]

    @torch.no_grad()
    def _batch(self, images: Sequence[Image.Image], texts: Sequence[str]) -> torch.Tensor:
        device = next(self.model.vision.parameters()).device
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            feats = self.model.encode_images(self.pixel_values(images).to(device))
            embeds, mask = self.model.encoder_inputs([self.token_ids(t) for t in texts], feats)
            return seq2seq_answer_score(self.model.t5, self.tokenizer,
                                        {"inputs_embeds": embeds, "attention_mask": mask}, self.answer)

    def score(self, images: Sequence[Image.Image], texts: Sequence[str]) -> torch.Tensor:
        """(N,) scores, image i against text i, in chunks of ``batch_size``."""
        check_pairs(images, texts)
        out = [self._batch(images[i: i + self.batch_size], texts[i: i + self.batch_size])
               for i in range(0, len(texts), self.batch_size)]
        return torch.cat(out) if out else torch.zeros(0)
