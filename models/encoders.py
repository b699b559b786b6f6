"""The frozen text/vision-language encoder and its preset registry (DESIGN.md §2).

``FrozenEncoder`` wraps any HF text backbone (decoder-only like Llama/Qwen, or a T5 encoder) plus its tokenizer
and returns only the selected hidden states:

    texts: list[str]  --template, tokenize, right-pad-->  input_ids (B, L)
        --model, hooks on the selected layers-->  (B, L, N, D)
        --drop the template prefix-->  EncoderOutput(features (B, T, N, D) float32, mask (B, T) bool)

"Layer i" is HF ``hidden_states[i]``: 0 = the input of the first block (the embeddings), i = the output of
block i-1 ... i.e. of the i-th block, and ``num_layers`` = the model's final-normed ``last_hidden_state``
(intermediate layers are not normed). Layers are captured with forward hooks, never with
``output_hidden_states=True``, and blocks deeper than the deepest selected layer are skipped.

Presets: ``ENCODER_PRESETS[name]`` is an ``EncoderPreset``; ``build_encoder(name, ...)`` builds one. A real
model is one registry entry, e.g.::

    ENCODER_PRESETS["qwen3-vl-4b"] = EncoderPreset(
        builder=hub_builder("Qwen/Qwen3-VL-4B-Instruct"), stride=3, template=..., description=...)
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

# ---------------------------------------------------------------------------------------------- layer choice


def select_layers(
    num_layers: int,
    layers: Sequence[int] | None = None,
    stride: int | None = None,
    start: int | None = None,
) -> tuple[int, ...]:
    """Hidden-state ids to tap, ascending, each in ``[0, num_layers]`` (DESIGN.md §2).

    - ``layers``: explicit ids; negative ids count Python-style over the ``num_layers + 1`` hidden states
      (-1 = ``num_layers`` = last, final-normed).
    - ``stride`` k: ``range(start, num_layers + 1, k)`` with default ``start = k - 1`` (Krea2 / UniFusion tap
      2, 5, ..., 35 of a 36-layer model).
    - neither: ``(num_layers,)``, the last layer only.
    """
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
    n_states = num_layers + 1
    if layers is not None and stride is not None:
        raise ValueError(f"give either layers={list(layers)} or stride={stride}, not both")
    if layers is not None:
        if start is not None:
            raise ValueError(f"start={start} only applies with stride; got explicit layers={list(layers)}")
        ids = list(layers)
        if not ids:
            raise ValueError("layers is empty; give at least one hidden-state id")
        resolved = []
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, int):
                raise ValueError(f"layer ids must be ints, got {i!r} in {ids}")
            if not -n_states <= i < n_states:
                raise ValueError(
                    f"layer id {i} out of range: valid ids are 0..{num_layers} (or {-n_states}..-1) "
                    f"for a model with {num_layers} layers"
                )
            resolved.append(i % n_states)
        if len(set(resolved)) != len(resolved):
            raise ValueError(f"duplicate layer ids in {ids} (resolved to {resolved} over 0..{num_layers})")
        return tuple(sorted(resolved))
    if stride is None:
        if start is not None:
            raise ValueError(f"start={start} only applies with stride; give stride too")
        return (num_layers,)
    if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= num_layers:
        raise ValueError(f"stride must be an int in 1..{num_layers} (num_layers), got {stride!r}")
    start = stride - 1 if start is None else start
    if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start <= num_layers:
        raise ValueError(f"start must be an int in 0..{num_layers}, got {start!r}")
    return tuple(range(start, num_layers + 1, stride))


# ---------------------------------------------------------------------------------------------- the encoder


@dataclass
class EncoderOutput:
    """Selected hidden states of a batch of prompts, template prefix removed, padding zeroed."""

    features: Tensor  # (B, T, N, D) float32; exactly 0 where mask is False
    mask: Tensor  # (B, T) bool, True = real token (right-padded)
    layer_ids: tuple[int, ...]  # the N hidden-state ids, ascending
    token_ids: Tensor | None = None  # (B, T) long, the kept token ids, pad id where mask is False
    positions: Tensor | None = None  # (B, T) long, where each kept token sits in the encoded sequence; -1 = pad
    rewrites: list[str | None] | None = None  # VERIFI: the decoded rewrite of each prompt


class _StopForward(Exception):
    """Raised by the hook of the deepest selected block so that deeper blocks never run."""


# Where the transformer blocks live, tried in order (text LLMs, HF composite VLMs, T5 encoders, GPT-2 style).
_BLOCK_PATHS = (
    "layers",
    "model.layers",
    "language_model.layers",
    "model.language_model.layers",
    "language_model.model.layers",
    "encoder.block",
    "block",
    "h",
    "transformer.h",
)


def _resolve(module: nn.Module, path: str) -> Any:
    obj: Any = module
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _find_blocks(model: nn.Module, path: str | None) -> nn.ModuleList:
    paths = (path,) if path is not None else _BLOCK_PATHS
    for p in paths:
        blocks = _resolve(model, p)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            return blocks
    raise ValueError(
        f"cannot find the transformer blocks of {type(model).__name__}: tried attribute paths {list(paths)}; "
        "pass blocks_path='dotted.path.to.ModuleList'"
    )


@dataclass  # not frozen: Lightning's batch transfer rebuilds dataclasses in a batch field by field
class Prompt:
    """One conditioning request: user text plus optional reference images.

    ``images``: PIL images or uint8 arrays (H, W, 3), each of any size and aspect ratio. They reach the DiT only
    as the VLM's image tokens (no VAE or CLIP tokens): the placeholder of each image is put before the text in
    the user turn and the preset's processor expands it into the model's image tokens.
    """

    text: str
    images: tuple[Any, ...] = ()


def as_prompt(p: str | Prompt) -> Prompt:
    """A str is a text-only Prompt."""
    if isinstance(p, Prompt):
        return p
    if isinstance(p, str):
        return Prompt(p)
    raise ValueError(f"a prompt must be a str or models.encoders.Prompt, got {type(p).__name__}")


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


@dataclass
class _Row:
    ids: list[int]
    keep: list[int]  # positions in ids the DiT sees, ascending
    vision: dict[str, Tensor]  # processor outputs other than ids/mask (pixel_values, image_grid_thw, ...)
    seq_keys: tuple[str, ...] = ()  # vision entries aligned with ids (token_type_ids...), padded like ids
    rewrite: str | None = None


def _decode_image(img: Any, where: str) -> Any:
    """PIL RGB image of a PIL image / uint8 (H, W, 3) array / file path; a clear error for anything else."""
    import numpy as np
    from PIL import Image

    try:
        if isinstance(img, Image.Image):
            img.load()
            return img.convert("RGB")
        if isinstance(img, str) or hasattr(img, "__fspath__"):
            from evals.files import open_rgb  # the project's one image reader: full decode, file named on failure

            return open_rgb(img)
        arr = np.asarray(img)
    except Exception as e:  # noqa: BLE001 - any decoder failure becomes one message naming the input
        raise ValueError(f"{where}: the image failed to decode ({type(e).__name__}: {e})") from e
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3 or min(arr.shape[:2]) < 1:
        raise ValueError(f"{where}: an image array must be uint8 (H, W, 3), got {arr.dtype} {arr.shape}")
    return Image.fromarray(arr)



def image_digest(image: Any, where: str = "image") -> str:
    """32-hex-digit blake2b of an image as the encoder sees it (decoded to RGB uint8: shape + bytes), so an array,
    its PIL image and a PNG of the same pixels share one digest: the key of cached features and rewrites."""
    import numpy as np

    arr = np.ascontiguousarray(np.asarray(_decode_image(image, where), dtype=np.uint8))
    h = hashlib.blake2b(digest_size=16)
    h.update(repr(arr.shape).encode())
    h.update(arr.tobytes())
    return h.hexdigest()

class FrozenEncoder(nn.Module):
    """A frozen HF text encoder or VLM that returns selected hidden states of the user's content.

    Args:
        model: an HF model: a base model (``LlamaModel``, ``T5EncoderModel``) or a generative one
            (``*ForCausalLM``, ``*ForConditionalGeneration``: needed for VERIFI). Features come from its
            ``base_model`` forward (which returns ``last_hidden_state``); VERIFI generates with ``model.generate``.
        tokenizer: its tokenizer; called with ``add_special_tokens=False``, BOS/EOS are added here.
        layer_ids: hidden-state ids (see ``select_layers``; negatives allowed), stored ascending.
        template: the chat format with exactly one ``{}`` where the user content goes. Everything before it
            (and BOS) and everything after it is dropped from the output: the kept tokens are the user content.
        drop_prefix: ``"auto"`` = everything before the user content (found by tokenizing), or an explicit count.
        max_length: the encoder's context limit for one sequence (template, images and BOS/EOS included).
        name: preset name, part of ``encoder_fingerprint``.
        add_bos / add_eos: prepend BOS / append EOS (Llama: BOS; T5: EOS, which is kept like the content).
        blocks_path: dotted attribute path of the block ``ModuleList`` when auto-detection fails.
        processor: an HF processor (image processor + tokenizer) for image inputs; None = text only.
        vision: how this model takes images (``VisionSpec``); required with ``processor``.
        verifi: the VERIFI rewrite prompt (``VerifiSpec``); None = the preset cannot rewrite.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        layer_ids: Sequence[int],
        template: str = "{}",
        drop_prefix: int | str = "auto",
        max_length: int = 64,
        name: str = "",
        *,
        add_bos: bool = False,
        add_eos: bool = False,
        blocks_path: str | None = None,
        processor: Any = None,
        vision: VisionSpec | None = None,
        verifi: VerifiSpec | None = None,
    ):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self._blocks = _find_blocks(model, blocks_path)
        self._layer_ids = select_layers(len(self._blocks), layers=list(layer_ids))

        if template.count("{}") != 1:
            raise ValueError(f"template must contain exactly one '{{}}' placeholder, got {template!r}")
        self.template = template
        self._prefix, self._suffix = template.split("{}")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be a positive int, got {max_length!r}")
        cfg = getattr(model, "config", None)
        max_pos = getattr(getattr(cfg, "text_config", cfg), "max_position_embeddings", None)
        if isinstance(max_pos, int) and max_length > max_pos:
            raise ValueError(f"max_length={max_length} exceeds the model's max_position_embeddings={max_pos}")
        self.max_length = max_length
        self.add_bos, self.add_eos = add_bos, add_eos
        self._bos_id = self._special_id("bos", add_bos)
        self._eos_id = self._special_id("eos", add_eos)
        pad = getattr(tokenizer, "pad_token_id", None)
        # The pad id never reaches an output (padding invariance), so any valid id will do when none is set.
        self._pad_id = int(pad) if pad is not None else (self._eos_id if self._eos_id is not None else 0)

        # Tokens before the content: BOS + the prefix's tokens; "auto" also checks they are the same in every prompt.
        self._prefix_ids = self._ids(self._prefix) if self._prefix else []
        self._suffix_ids = self._ids(self._suffix) if self._suffix else []
        if drop_prefix == "auto":
            self.drop_prefix = len(self._prefix_ids) + int(add_bos)
        elif isinstance(drop_prefix, int) and not isinstance(drop_prefix, bool) and drop_prefix >= 0:
            self.drop_prefix = drop_prefix
        else:
            raise ValueError(f"drop_prefix must be 'auto' or a non-negative int, got {drop_prefix!r}")
        self._check_prefix = drop_prefix == "auto"

        if (processor is None) != (vision is None):
            raise ValueError("give both processor= and vision= for an image-capable encoder, or neither")
        self.processor, self.vision = processor, vision
        self.tiles = vision.default_tiles if vision is not None else 1
        if vision is not None:
            self._image_token_ids = {int(i) for i in tokenizer.convert_tokens_to_ids(list(vision.image_tokens))}
            self.set_tiles(self.tiles)
        self.verifi = verifi
        if verifi is not None:
            if verifi.template.count("{}") != 1:
                raise ValueError(f"VERIFI template must contain exactly one '{{}}', got {verifi.template!r}")
            if not hasattr(model, "generate"):
                raise ValueError(f"VERIFI needs a generative model (with .generate), not {type(model).__name__}")
            self._stop_id = int(tokenizer.convert_tokens_to_ids(verifi.stop))

        self.model.requires_grad_(False)
        self.train(False)

    # -------------------------------------------------------------------------------------- properties
    @property
    def num_layers(self) -> int:
        """Number of transformer blocks (hidden states are 0..num_layers)."""
        return len(self._blocks)

    @property
    def hidden_size(self) -> int:
        """Width D of every hidden state."""
        return int(self.model.get_input_embeddings().weight.shape[-1])

    @property
    def layer_ids(self) -> tuple[int, ...]:
        """The N selected hidden-state ids, ascending."""
        return self._layer_ids

    def train(self, mode: bool = True) -> FrozenEncoder:
        """Always eval: dropout off, whatever Lightning or a caller asks."""
        return super().train(False)

    def set_tiles(self, tiles: int) -> None:
        """Number of image tiles per input image (InternVL: grid tiles + thumbnail); ValueError if impossible."""
        if self.vision is None:
            raise ValueError(f"encoder {self.name!r} takes no images, so tiles={tiles} means nothing")
        if self.vision.set_tiles is None:
            if tiles != 1:
                raise ValueError(f"encoder {self.name!r} encodes images without tiling; tiles must be 1, got {tiles}")
        else:
            self.vision.set_tiles(self.processor, tiles)
        self.tiles = tiles

    # -------------------------------------------------------------------------------------- tokenizing
    def _special_id(self, kind: str, wanted: bool) -> int | None:
        if not wanted:
            return None
        tok_id = getattr(self.tokenizer, f"{kind}_token_id", None)
        if tok_id is None:
            raise ValueError(f"add_{kind}=True but the tokenizer has no {kind}_token")
        return int(tok_id)

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _user_content(self, prompt: Prompt, i: int) -> tuple[str, list[Any]]:
        if not isinstance(prompt.text, str):
            raise ValueError(f"prompt {i}: text must be a str, got {type(prompt.text).__name__}")
        if not prompt.images:
            return prompt.text, []
        if self.vision is None:
            raise ValueError(f"prompt {i} has {len(prompt.images)} image(s) but encoder {self.name!r} is text-only")
        images = [_decode_image(im, f"prompt {i}, image {j}") for j, im in enumerate(prompt.images)]
        head = "".join(self.vision.placeholder + self.vision.separator for _ in images)
        return head + prompt.text, images

    def _tokenize_row(self, text: str, images: list[Any]) -> tuple[list[int], dict[str, Tensor], tuple[str, ...]]:
        if not images:
            return self._ids(text), {}, ()
        out = self.processor(text=[text], images=[images], return_tensors="pt", add_special_tokens=False)
        ids = out["input_ids"][0].tolist()
        vision, seq = {}, []
        for k, v in out.items():
            if k in ("input_ids", "attention_mask"):
                continue
            vision[k] = v
            if v.dim() >= 2 and v.shape[0] == 1 and v.shape[1] == len(ids):
                seq.append(k)
        return ids, vision, tuple(seq)

    def _wrap(self, ids: list[int], vision: dict[str, Tensor], seq: tuple[str, ...], eos: bool = True) -> list[int]:
        """Add BOS/EOS (``eos=False``: BOS only, for a generation prompt) to ids and, with 0s, to the vision
        entries aligned with them."""
        eos = eos and self.add_eos
        for k in seq:
            pads = (int(self.add_bos), int(eos))
            vision[k] = torch.nn.functional.pad(vision[k], (*(0, 0) * (vision[k].dim() - 2), *pads))
        return ([self._bos_id] if self.add_bos else []) + ids + ([self._eos_id] if eos else [])

    def _check_length(self, n: int, i: int, text: str) -> None:
        if n > self.max_length:
            raise ValueError(
                f"prompt {i} is {n} tokens long with its template, images and BOS/EOS, over the encoder's limit "
                f"max_length={self.max_length} (preset {self.name!r}): {text[:80]!r}"
            )

    def _row(self, prompt: Prompt, i: int) -> _Row:
        """Plain conditioning: the whole user content (text + image tokens) is kept."""
        user, images = self._user_content(prompt, i)
        ids, vision, seq = self._tokenize_row(self._prefix + user + self._suffix, images)
        if self._check_prefix and ids[: len(self._prefix_ids)] != self._prefix_ids:
            raise ValueError(
                f"prompt {i} changes how the template prefix {self._prefix!r} tokenizes; pass an explicit drop_prefix"
            )
        n_suf = len(self._suffix_ids)
        if n_suf and ids[len(ids) - n_suf:] != self._suffix_ids:
            raise ValueError(f"prompt {i} changes how the template suffix {self._suffix!r} tokenizes")
        ids = self._wrap(ids, vision, seq)
        self._check_length(len(ids), i, prompt.text)
        end = len(ids) - n_suf - int(self.add_eos)
        keep = list(range(self.drop_prefix, end)) + ([len(ids) - 1] if self.add_eos else [])
        if not keep:
            raise ValueError(f"prompt {i} has no tokens left after dropping the template: {prompt.text!r}")
        return _Row(ids, keep, vision, seq)

    def tokenize(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Templated, BOS/EOS-wrapped, right-padded token ids of text prompts.

        Returns ``input_ids`` (B, L) long and ``attention_mask`` (B, L) bool (True = real), L = longest row.
        Raises ValueError for a prompt longer than ``max_length`` or one with no tokens after the template.
        """
        rows = [self._row(p, i) for i, p in enumerate(self._prompts(texts))]
        ids, mask, _ = self._pad(rows)
        return ids, mask

    @staticmethod
    def _prompts(prompts: Sequence[str | Prompt]) -> list[Prompt]:
        if isinstance(prompts, (str, Prompt)) or not isinstance(prompts, Sequence) or len(prompts) == 0:
            raise ValueError(f"prompts must be a non-empty list of str/Prompt, got {type(prompts).__name__}")
        out = []
        for i, p in enumerate(prompts):
            try:
                out.append(as_prompt(p))
            except ValueError as e:
                raise ValueError(f"prompts[{i}]: {e}") from None
        return out

    def _pad(self, rows: list[_Row], left: bool = False) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Pad rows to (B, L) (right by default, left for generation) and merge their vision inputs."""
        length = max(len(r.ids) for r in rows)
        input_ids = torch.full((len(rows), length), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.bool)
        merged: dict[str, list[Tensor]] = {}
        for b, r in enumerate(rows):
            sl = slice(length - len(r.ids), length) if left else slice(0, len(r.ids))
            input_ids[b, sl] = torch.tensor(r.ids, dtype=torch.long)
            mask[b, sl] = True
            for k, v in r.vision.items():
                if k in r.seq_keys:  # aligned with the ids: pad to the batch length
                    extra = length - v.shape[1]
                    pads = (extra, 0) if left else (0, extra)
                    v = torch.nn.functional.pad(v, (*(0, 0) * (v.dim() - 2), *pads))
                merged.setdefault(k, []).append(v)
        rows_with = {k: len(v) for k, v in merged.items()}
        for k, n in rows_with.items():
            if k in {s for r in rows for s in r.seq_keys} and n != len(rows):
                # a text-only row in a mixed batch still needs its (all-zero) entry of a sequence-aligned input
                merged[k] = [
                    r.vision[k] if k in r.vision else torch.zeros((1, length), dtype=merged[k][0].dtype)
                    for r in rows
                ]
        return input_ids, mask, {k: torch.cat(v) for k, v in merged.items()}

    # -------------------------------------------------------------------------------------- VERIFI
    def _verifi_rows(self, prompts: list[Prompt], rewrites: Sequence[str] | None, seed: int) -> list[_Row]:
        if self.verifi is None:
            raise ValueError(f"encoder preset {self.name!r} has no VERIFI prompt (a generative VLM preset does)")
        prefix, suffix = self.verifi.template.split("{}")
        heads: list[_Row] = []
        for i, p in enumerate(prompts):
            user, images = self._user_content(p, i)
            ids, vision, seq = self._tokenize_row(prefix + user + suffix, images)
            ids = self._wrap(ids, vision, seq, eos=False)
            heads.append(_Row(ids, [], vision, seq))
        if rewrites is None:
            new_ids = self._generate(heads, seed)
        else:
            if len(rewrites) != len(prompts):
                raise ValueError(f"{len(rewrites)} rewrites for {len(prompts)} prompts")
            new_ids = [self._ids(" " + r) for r in rewrites]
        rows = []
        for i, (h, gen) in enumerate(zip(heads, new_ids, strict=True)):
            ids = h.ids + gen
            self._check_length(len(ids), i, prompts[i].text)
            images = [j for j, t in enumerate(h.ids) if t in getattr(self, "_image_token_ids", ())]
            keep = images + list(range(len(h.ids), len(ids)))
            if not gen:
                raise ValueError(f"prompt {i}: the VERIFI rewrite is empty: {prompts[i].text!r}")
            vision = {}
            for k, v in h.vision.items():
                vision[k] = torch.nn.functional.pad(v, (*(0, 0) * (v.dim() - 2), 0, len(gen))) if k in h.seq_keys else v
            text = self.tokenizer.decode(gen, skip_special_tokens=True).strip()
            rows.append(_Row(ids, keep, vision, h.seq_keys, rewrite=text))
        return rows

    @torch.no_grad()
    def _generate(self, heads: list[_Row], seed: int) -> list[list[int]]:
        """Generated token ids per row (stop token and everything after it removed), batched with left padding."""
        assert self.verifi is not None
        input_ids, mask, vision = self._pad(heads, left=True)
        device = self.model.get_input_embeddings().weight.device
        v = self.verifi
        with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
            torch.manual_seed(seed)  # sampled rewrites are a function of the seed
            out = self.model.generate(
                input_ids=input_ids.to(device),
                attention_mask=mask.long().to(device),
                **{k: t.to(device) for k, t in vision.items()},
                max_new_tokens=v.max_new_tokens,
                do_sample=v.do_sample,
                temperature=v.temperature if v.do_sample else None,
                top_p=None,
                top_k=None,
                eos_token_id=self._stop_id,
                pad_token_id=self._pad_id,
                use_cache=True,
            )
        new = out[:, input_ids.shape[1]:].tolist()
        result = []
        for row in new:
            result.append(row[: row.index(self._stop_id)] if self._stop_id in row else row)
        return result

    def rewrite(self, prompts: Sequence[str | Prompt], seed: int = 0) -> list[str]:
        """The VERIFI rewrites (decoded text) of prompts, without encoding them."""
        return [r.rewrite or "" for r in self._verifi_rows(self._prompts(prompts), None, seed)]

    # -------------------------------------------------------------------------------------- running
    @torch.no_grad()
    def encode_ids(self, input_ids: Tensor, attention_mask: Tensor, **model_inputs: Tensor) -> Tensor:
        """Selected hidden states of token ids: (B, L) long, (B, L) bool -> (B, L, N, D) float32.

        ``model_inputs``: the processor's image inputs (pixel_values, ...). No template dropping; positions where
        ``attention_mask`` is False are exactly 0.
        """
        device = self.model.get_input_embeddings().weight.device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        model_inputs = {k: v.to(device) for k, v in model_inputs.items()}
        wanted, deepest, last = set(self._layer_ids), max(self._layer_ids), self.num_layers
        captured: dict[int, Tensor] = {}

        def first_input(module: nn.Module, args: tuple, kwargs: dict) -> None:
            captured[0] = args[0] if args else kwargs["hidden_states"]
            if deepest == 0:
                raise _StopForward

        def block_output(layer: int) -> Callable:
            def hook(module: nn.Module, args: tuple, output: Any) -> None:
                captured[layer] = output[0] if isinstance(output, (tuple, list)) else output
                if layer == deepest:
                    raise _StopForward

            return hook

        handles = []
        if 0 in wanted:
            handles.append(self._blocks[0].register_forward_pre_hook(first_input, with_kwargs=True))
        for layer in wanted - {0, last}:
            handles.append(self._blocks[layer - 1].register_forward_hook(block_output(layer)))
        base = self.model.base_model  # features come from the base model: no LM head, no logits
        try:
            out = base(input_ids=input_ids, attention_mask=attention_mask.long(), return_dict=True,
                       use_cache=False, **model_inputs)
            if last in wanted:
                if getattr(out, "last_hidden_state", None) is None:
                    raise ValueError(f"{type(base).__name__} returns no last_hidden_state; wrap a base model")
                captured[last] = out.last_hidden_state
        except _StopForward:
            pass  # the deepest selected block has run; nothing deeper is needed
        finally:
            for h in handles:
                h.remove()
        feats = torch.stack([captured[i] for i in self._layer_ids], dim=2).float()
        return feats.masked_fill(~attention_mask[:, :, None, None].bool(), 0.0)

    def forward(
        self,
        prompts: Sequence[str | Prompt],
        verifi: bool = False,
        rewrites: Sequence[str] | None = None,
        seed: int = 0,
    ) -> EncoderOutput:
        """Encode prompts: B str/Prompt -> EncoderOutput (features (B, T, N, D), mask (B, T)).

        Plain: the kept tokens are the user content (image tokens, then text; plus EOS if added), the template
        dropped. ``verifi=True``: the VLM rewrites each prompt (or ``rewrites`` are given, e.g. cached ones) and
        the kept tokens are the image tokens + the rewrite's tokens only; the user's text is not kept.
        """
        items = self._prompts(prompts)
        if rewrites is not None and not verifi:
            raise ValueError("rewrites= only applies with verifi=True")
        rows = self._verifi_rows(items, rewrites, seed) if verifi else [self._row(p, i) for i, p in enumerate(items)]
        input_ids, mask, vision = self._pad(rows)
        feats = self.encode_ids(input_ids, mask, **vision)
        t = max(len(r.keep) for r in rows)
        b, d = len(rows), feats.device
        positions = torch.full((b, t), -1, dtype=torch.long)
        for i, r in enumerate(rows):
            positions[i, : len(r.keep)] = torch.tensor(r.keep, dtype=torch.long)
        keep_mask = positions >= 0
        idx = positions.clamp(min=0).to(d)
        out = torch.gather(feats, 1, idx[:, :, None, None].expand(-1, -1, *feats.shape[2:]))
        out = out.masked_fill(~keep_mask.to(d)[:, :, None, None], 0.0)
        token_ids = torch.gather(input_ids, 1, positions.clamp(min=0)).masked_fill(~keep_mask, self._pad_id)
        return EncoderOutput(
            features=out,
            mask=keep_mask.to(d),
            layer_ids=self._layer_ids,
            token_ids=token_ids.to(d),
            positions=positions.to(d),
            rewrites=[r.rewrite for r in rows] if verifi else None,
        )


# ---------------------------------------------------------------------------------------------- presets

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


def _seeded(seed: int, make: Callable[[], nn.Module]) -> nn.Module:
    # fork_rng restores the global CPU RNG afterwards, so building an encoder never shifts a run's randomness.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


def _tiny_llama(seed: int) -> tuple[nn.Module, Any]:
    from transformers import LlamaConfig, LlamaModel

    from experiments.data.vocab import ALL_TOKENS
    from models.tokenizer import shapes_tokenizer

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

    from experiments.data.vocab import ALL_TOKENS
    from models.tokenizer import shapes_tokenizer

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
    )


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


ENCODER_PRESETS: dict[str, EncoderPreset] = {
    "tiny-llama": EncoderPreset(
        builder=_tiny_llama,
        description="random 12-layer Llama (hidden 64) over the shapes vocabulary; BOS; taps 2,5,8,11",
        stride=3,
        add_bos=True,
    ),
    "tiny-t5": EncoderPreset(
        builder=_tiny_t5,
        description="random 6-layer T5 encoder (d_model 64) over the shapes vocabulary; EOS; last layer",
        add_eos=True,
    ),
}
ENCODER_PRESETS["tiny-vlm"] = _tiny_vlm_preset(pretrained=True)
ENCODER_PRESETS["tiny-vlm-random"] = _tiny_vlm_preset(pretrained=False)

_OVERRIDABLE = ("template", "drop_prefix", "max_length", "add_bos", "add_eos", "seed", "blocks_path")


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
    if layers is None and stride is None:
        layers, stride, start = p.layers, p.stride, p.start if start is None else start
    n = len(_find_blocks(model, opts["blocks_path"]))
    ids = select_layers(n, layers=layers, stride=stride, start=start)
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


def encoder_fingerprint(enc: FrozenEncoder) -> str:
    """16-hex-digit key for feature caches: preset name, layer ids, prompting and a checksum of all weights.

    Anything that changes the features (template, prefix dropping, BOS/EOS, weights, taps) changes it.
    """
    h = hashlib.blake2b(digest_size=8)
    meta = (enc.name, enc.layer_ids, enc.template, enc.drop_prefix, enc.add_bos, enc.add_eos)
    h.update(repr(meta).encode())
    for key, t in enc.model.state_dict().items():
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# Real presets (Llama-3.1, InternVL2.5/3, Gemma-3, Qwen2.5-VL, T5-XXL) live in their own module.
from models import presets as _presets  # noqa: E402,F401  (registers into ENCODER_PRESETS)
