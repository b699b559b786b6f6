"""The frozen text/vision-language encoder: selected hidden states of the user's content.

``FrozenEncoder`` wraps any HF text backbone (decoder-only like Llama/Qwen, or a T5 encoder) plus its tokenizer
and returns only the selected hidden states:

    texts: list[str]  --template, tokenize, right-pad-->  input_ids (B, L)
        --model, hooks on the selected layers-->  (B, L, N, D)
        --drop the template prefix-->  EncoderOutput(features (B, T, N, D) float32, mask (B, T) bool)

Layer ids follow ``models.encoders.taps`` ("layer i" = HF ``hidden_states[i]``). Layers are captured with
forward hooks, never with ``output_hidden_states=True``, and blocks deeper than the deepest selected layer are
skipped.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from common.prompt import Prompt, as_prompt, decode_image
from models.encoders.kv import attention_shape, check_kv_capable, encoder_kv
from models.encoders.rewrites import Rewrite
from models.encoders.spec import VerifiSpec, VisionSpec
from models.encoders.taps import find_blocks, select_layers, tap_hidden_states


@dataclass
class EncoderOutput:
    """Selected hidden states of a batch of prompts, template prefix removed, padding zeroed."""

    features: Tensor  # (B, T, N, D) float32; exactly 0 where mask is False
    mask: Tensor  # (B, T) bool, True = real token (right-padded)
    layer_ids: tuple[int, ...]  # the N hidden-state ids, ascending
    token_ids: Tensor | None = None  # (B, T) long, the kept token ids, pad id where mask is False
    positions: Tensor | None = None  # (B, T) long, where each kept token sits in the encoded sequence; -1 = pad
    generated: list[Rewrite] | None = None  # VERIFI: each prompt's rewrite: its generated ids and their text

    @property
    def rewrites(self) -> list[str] | None:
        """VERIFI: the decoded rewrite of each prompt, for people to read."""
        return None if self.generated is None else [g.text for g in self.generated]


@dataclass
class _Row:
    ids: list[int]
    keep: list[int]  # positions in ids the DiT sees, ascending
    vision: dict[str, Tensor]  # processor outputs other than ids/mask (pixel_values, image_grid_thw, ...)
    seq_keys: tuple[str, ...] = ()  # vision entries aligned with ids (token_type_ids...), padded like ids
    rewrite: Rewrite | None = None
    features: Tensor | None = None  # (len(ids), N, D): the tapped hidden states, taken while generating (VERIFI)


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
        self._blocks = find_blocks(model, blocks_path)
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

        self.features = "hidden"  # what encode_ids returns: the tapped hidden states, or "kv" (set_features)
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
        """The N selected hidden-state ids, ascending; with ``features="kv"`` every block 0..num_layers-1 (the
        attention of block i reads hidden state i)."""
        return tuple(range(self.num_layers)) if self.features == "kv" else self._layer_ids

    @property
    def feature_size(self) -> int:
        """Width of the features' last axis: ``hidden_size``, or with ``features="kv"`` one layer's packed keys and
        values (2 * kv_heads * head_dim)."""
        return attention_shape(self.model).kv_width if self.features == "kv" else self.hidden_size

    def set_features(self, kind: str) -> None:
        """"hidden": the tapped hidden states (default); "kv": every layer's own attention keys and values
        (models/encoders/kv.py, layerwise KV fusion). ValueError for an unknown kind or a model without a KV cache."""
        if kind not in ("hidden", "kv"):
            raise ValueError(f"encoder features must be 'hidden' or 'kv', got {kind!r}")
        if kind == "kv":
            check_kv_capable(self.model)
        self.features = kind

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
        images = [decode_image(im, f"prompt {i}, image {j}") for j, im in enumerate(prompt.images)]
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
    def _verifi_rows(self, prompts: list[Prompt], rewrites: Sequence[Sequence[int]] | None, seed: int,
                     features: bool = False) -> list[_Row]:
        """The rows of VERIFI's conditioning: each prompt's head + its rewrite (generated, or ``rewrites``); with
        ``features`` (generating only), each row also holds the tapped hidden states of its ids, taken in the
        generation's own forward passes where they cover the whole rewrite."""
        if self.verifi is None:
            raise ValueError(f"encoder preset {self.name!r} has no VERIFI prompt (a generative VLM preset does)")
        prefix, suffix = self.verifi.template.split("{}")
        heads: list[_Row] = []
        for i, p in enumerate(prompts):
            user, images = self._user_content(p, i)
            ids, vision, seq = self._tokenize_row(prefix + user + suffix, images)
            ids = self._wrap(ids, vision, seq, eos=False)
            heads.append(_Row(ids, [], vision, seq))
        states: list[Tensor | None] = [None] * len(heads)
        if rewrites is None:
            new_ids, states = self._generate(heads, seed, features=features)
        else:
            if len(rewrites) != len(prompts):
                raise ValueError(f"{len(rewrites)} rewrites for {len(prompts)} prompts")
            if any(isinstance(r, str) or not all(isinstance(t, int) for t in r) for r in rewrites):
                raise ValueError("rewrites are the token ids generation produced (e.g. Rewrite.ids), not text: "
                                 "re-tokenised text is not what the VLM generated")
            new_ids = [list(r) for r in rewrites]
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
            text = self.tokenizer.decode(gen, skip_special_tokens=True).strip()  # for people only
            rows.append(_Row(ids, keep, vision, h.seq_keys, rewrite=Rewrite(tuple(gen), text), features=states[i]))
        return rows

    @torch.no_grad()
    def _generate(self, heads: list[_Row], seed: int,
                  features: bool = False) -> tuple[list[list[int]], list[Tensor | None]]:
        """Generated token ids per row (stop token and everything after it removed), batched with left padding.

        ``features``: also each row's tapped hidden states over its head + rewrite, (len, N, D) float32, from the
        generation's forward passes (the paper's "same forward pass used for feature extraction"): the head's from
        the first pass, rewrite token j's from the pass that read it to generate token j + 1. So that a rewrite cut
        at ``max_new_tokens`` has a pass over its last token too, one token more is generated and dropped (the
        kept ids are the same: generation is sequential)."""
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
                max_new_tokens=v.max_new_tokens + int(features),
                do_sample=v.do_sample,
                temperature=v.temperature if v.do_sample else None,
                top_p=None,
                top_k=None,
                eos_token_id=self._stop_id,
                pad_token_id=self._pad_id,
                use_cache=True,
                output_hidden_states=features,
                return_dict_in_generate=True,
            )
        prompt_len = input_ids.shape[1]
        new = [row[: v.max_new_tokens] for row in out.sequences[:, prompt_len:].tolist()]
        result = [row[: row.index(self._stop_id)] if self._stop_id in row else row for row in new]
        if not features or self.features != "hidden":
            return result, [None] * len(heads)
        steps = out.hidden_states  # per generation step: one (B, L_step, D) tensor per hidden-state id
        taps = [torch.stack([step[i] for i in self._layer_ids], dim=2).float() for step in steps]  # (B, L, N, D)
        generated = torch.cat(taps[1:], dim=1) if len(taps) > 1 else taps[0][:, :0]
        states: list[Tensor | None] = []
        for b, (head, gen) in enumerate(zip(heads, result, strict=True)):
            start = prompt_len - len(head.ids)  # left padding
            states.append(torch.cat([taps[0][b, start:], generated[b, : len(gen)]]))
        return result, states

    def generate_rewrites(self, prompts: Sequence[str | Prompt], seed: int = 0) -> list[Rewrite]:
        """The VERIFI rewrites of prompts (generated token ids + decoded text), without encoding them."""
        return [r.rewrite for r in self._verifi_rows(self._prompts(prompts), None, seed)]

    def rewrite(self, prompts: Sequence[str | Prompt], seed: int = 0) -> list[str]:
        """The VERIFI rewrites of prompts as decoded text, for people to read."""
        return [r.text for r in self.generate_rewrites(prompts, seed)]

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
        if self.features == "kv":
            return encoder_kv(self.model, input_ids, attention_mask, **model_inputs)
        base = self.model.base_model  # features come from the base model: no LM head, no logits
        captured = tap_hidden_states(self._blocks, self._layer_ids, lambda: base(
            input_ids=input_ids, attention_mask=attention_mask.long(), return_dict=True, use_cache=False,
            **model_inputs))
        feats = torch.stack([captured[i] for i in self._layer_ids], dim=2).float()
        return feats.masked_fill(~attention_mask[:, :, None, None].bool(), 0.0)

    def forward(
        self,
        prompts: Sequence[str | Prompt],
        verifi: bool = False,
        rewrites: Sequence[Sequence[int]] | None = None,
        seed: int = 0,
    ) -> EncoderOutput:
        """Encode prompts: B str/Prompt -> EncoderOutput (features (B, T, N, D), mask (B, T)).

        Plain: the kept tokens are the user content (image tokens, then text; plus EOS if added), the template
        dropped. ``verifi=True``: the VLM rewrites each prompt (or ``rewrites`` are given: the token ids an earlier
        generation produced, e.g. cached ones, used as they are) and the kept tokens are the image tokens + the
        rewrite's tokens only; the user's text is not kept. Rewrites generated here bring their hidden states from
        the generation's own passes (``_generate``); given rewrites are encoded (equal up to float round-off).
        """
        items = self._prompts(prompts)
        if rewrites is not None and not verifi:
            raise ValueError("rewrites= only applies with verifi=True")
        rows = (self._verifi_rows(items, rewrites, seed, features=True) if verifi
                else [self._row(p, i) for i, p in enumerate(items)])
        input_ids, mask, vision = self._pad(rows)
        if all(r.features is not None for r in rows):  # VERIFI: taken while generating, no second pass
            feats = torch.zeros(*input_ids.shape, *rows[0].features.shape[1:], device=rows[0].features.device)
            for i, r in enumerate(rows):
                feats[i, : len(r.ids)] = r.features
        else:
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
            layer_ids=self.layer_ids,
            token_ids=token_ids.to(d),
            positions=positions.to(d),
            generated=[r.rewrite for r in rows] if verifi else None,
        )


def encoder_fingerprint(enc: FrozenEncoder) -> str:
    """16-hex-digit key for feature caches: preset name, layer ids, prompting and a checksum of all weights.

    Anything that changes the features (template, prefix dropping, BOS/EOS, weights, taps) changes it.
    """
    h = hashlib.blake2b(digest_size=8)
    meta = (enc.name, enc.layer_ids, enc.template, enc.drop_prefix, enc.add_bos, enc.add_eos)
    if enc.features != "hidden":  # appended only then: the fingerprints (feature-cache folders) of hidden states stay
        meta += (enc.features,)
    h.update(repr(meta).encode())
    for key, t in enc.model.state_dict().items():
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
