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


class FrozenEncoder(nn.Module):
    """A frozen HF backbone that returns selected hidden states of templated prompts.

    Args:
        model: an HF base model whose forward takes ``input_ids, attention_mask`` and returns
            ``last_hidden_state`` (``LlamaModel``, ``T5EncoderModel``, ``Qwen3VLModel``...; not a ``*ForCausalLM``).
        tokenizer: its tokenizer; called with ``add_special_tokens=False``, BOS/EOS are added here.
        layer_ids: hidden-state ids (see ``select_layers``; negatives allowed), stored ascending.
        template: a string with exactly one ``{}`` where the prompt goes, e.g. ``"describe : {}"``.
        drop_prefix: tokens removed from the front of every sequence: ``"auto"`` = everything before the prompt
            (BOS and the template prefix, found by tokenizing), or an explicit count (Qwen-Image's 34, SANA...).
        max_length: longest accepted token sequence (template + prompt + BOS/EOS); longer raises ValueError.
        name: preset name, part of ``encoder_fingerprint``.
        add_bos / add_eos: prepend the tokenizer's BOS / append its EOS (Llama: BOS; T5: EOS; Qwen: neither).
        blocks_path: dotted attribute path of the block ``ModuleList`` when auto-detection fails.
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
        max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if isinstance(max_pos, int) and max_length > max_pos:
            raise ValueError(f"max_length={max_length} exceeds the model's max_position_embeddings={max_pos}")
        self.max_length = max_length
        self.add_bos, self.add_eos = add_bos, add_eos
        self._bos_id = self._special_id("bos", add_bos)
        self._eos_id = self._special_id("eos", add_eos)
        pad = getattr(tokenizer, "pad_token_id", None)
        # The pad id never reaches an output (padding invariance), so any valid id will do when none is set.
        self._pad_id = int(pad) if pad is not None else (self._eos_id if self._eos_id is not None else 0)

        # Tokens before the prompt: BOS + the prefix's tokens; "auto" also checks they are the same in every prompt.
        self._prefix_ids = self._ids(self._prefix) if self._prefix else []
        if drop_prefix == "auto":
            self.drop_prefix = len(self._prefix_ids) + int(add_bos)
        elif isinstance(drop_prefix, int) and not isinstance(drop_prefix, bool) and drop_prefix >= 0:
            self.drop_prefix = drop_prefix
        else:
            raise ValueError(f"drop_prefix must be 'auto' or a non-negative int, got {drop_prefix!r}")
        self._check_prefix = drop_prefix == "auto"

        self.model.requires_grad_(False)
        if hasattr(getattr(model, "config", None), "use_cache"):
            model.config.use_cache = False  # a frozen feature extractor never decodes; skip the KV cache
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

    def tokenize(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Templated, BOS/EOS-wrapped, right-padded token ids.

        Returns ``input_ids`` (B, L) long and ``attention_mask`` (B, L) bool (True = real), L = longest row.
        Raises ValueError for a prompt longer than ``max_length`` or one with no tokens after the prefix.
        """
        if isinstance(texts, str) or not isinstance(texts, Sequence) or len(texts) == 0:
            raise ValueError(f"texts must be a non-empty list of strings, got {type(texts).__name__}")
        rows = []
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise ValueError(f"texts[{i}] must be a str, got {type(text).__name__}")
            ids = self._ids(self._prefix + text + self._suffix)
            if self._check_prefix and ids[: len(self._prefix_ids)] != self._prefix_ids:
                raise ValueError(
                    f"prompt {i} changes how the template prefix {self._prefix!r} tokenizes; "
                    "pass an explicit drop_prefix=<int>"
                )
            ids = ([self._bos_id] if self.add_bos else []) + ids + ([self._eos_id] if self.add_eos else [])
            if len(ids) > self.max_length:
                raise ValueError(
                    f"prompt {i} is {len(ids)} tokens long after the template (BOS/EOS included), "
                    f"over max_length={self.max_length}: {text[:80]!r}"
                )
            if len(ids) <= self.drop_prefix:
                raise ValueError(f"prompt {i} has no tokens left after dropping {self.drop_prefix}: {text!r}")
            rows.append(ids)
        length = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), length), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.bool)
        for i, r in enumerate(rows):
            input_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = True
        return input_ids, mask

    # -------------------------------------------------------------------------------------- running
    @torch.no_grad()
    def encode_ids(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Selected hidden states of token ids: (B, L) long, (B, L) bool -> (B, L, N, D) float32.

        No prefix dropping; positions where ``attention_mask`` is False are exactly 0.
        """
        device = self.model.get_input_embeddings().weight.device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
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
        try:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask.long(), return_dict=True)
            if last in wanted:
                if getattr(out, "last_hidden_state", None) is None:
                    raise ValueError(
                        f"{type(self.model).__name__} returns no last_hidden_state; wrap the base model "
                        "(e.g. LlamaModel, T5EncoderModel), not a model with a head"
                    )
                captured[last] = out.last_hidden_state
        except _StopForward:
            pass  # the deepest selected block has run; nothing deeper is needed
        finally:
            for h in handles:
                h.remove()
        feats = torch.stack([captured[i] for i in self._layer_ids], dim=2).float()
        return feats.masked_fill(~attention_mask[:, :, None, None].bool(), 0.0)

    def forward(self, texts: list[str]) -> EncoderOutput:
        """Encode prompts: list of B strings -> EncoderOutput (features (B, T, N, D), mask (B, T)).

        T counts the kept tokens (the prompt's, plus EOS if added), longest row; the prefix is dropped.
        """
        input_ids, mask = self.tokenize(texts)
        feats = self.encode_ids(input_ids, mask)
        k = self.drop_prefix
        # Right padding + a shared prefix length: dropping the first k columns keeps every row aligned.
        return EncoderOutput(
            features=feats[:, k:],
            mask=mask[:, k:].to(feats.device),
            layer_ids=self._layer_ids,
            token_ids=input_ids[:, k:].to(feats.device),
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
