"""A file-free word-level tokenizer over the shapes world's closed vocabulary.

The tiny offline encoder presets (``models/encoders/tiny.py``) pair randomly initialised HF models with this
tokenizer, so tests and CPU sweeps never touch the Hub. Token ids are positions in
``world.vocab.ALL_TOKENS``: "[PAD]" = 0, "[UNK]" = 1, "[BOS]" = 2, "[EOS]" = 3, then the words.

The tokenizer itself adds no special tokens: whether a model sees BOS and/or EOS is the encoder preset's
decision (``FrozenEncoder(add_bos=..., add_eos=...)``), made in one place for tiny and real models alike.
"""

from __future__ import annotations

from typing import Any

from tokenizers import Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from world.vocab import ALL_TOKENS

PAD, UNK, BOS, EOS = "[PAD]", "[UNK]", "[BOS]", "[EOS]"


def _word_level(vocab: dict[str, int]) -> Tokenizer:
    core = Tokenizer(WordLevel(vocab, unk_token=UNK))
    core.normalizer = normalizers.Lowercase()
    # Isolated punctuation splits "square." and "?." into single-character tokens that are all in the vocab.
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    return core


def _fast(vocab: dict[str, int], **extra: Any) -> PreTrainedTokenizerFast:
    """The HF tokenizer over ``_word_level(vocab)``: right padding, no special tokens added by itself."""
    return PreTrainedTokenizerFast(
        tokenizer_object=_word_level(vocab), pad_token=PAD, unk_token=UNK, bos_token=BOS, eos_token=EOS,
        padding_side="right", model_max_length=1024, **extra,
    )


def shapes_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer of the shapes world: lower-cases, splits on whitespace and isolates punctuation.

    ``"A red square."`` -> ``["a", "red", "square", "."]``; out-of-vocabulary words map to "[UNK]".
    Batches pad on the right with "[PAD]" (id 0). Built in memory, deterministic, no files.
    """
    vocab = {tok: i for i, tok in enumerate(ALL_TOKENS)}
    if len(vocab) != len(ALL_TOKENS):
        raise ValueError("world.vocab.ALL_TOKENS holds duplicate tokens; ids must be unique positions")
    for special, want in ((PAD, 0), (UNK, 1), (BOS, 2), (EOS, 3)):
        if vocab.get(special) != want:
            raise ValueError(f"{special} must have id {want} in ALL_TOKENS, found {vocab.get(special)}")

    return _fast(vocab)


# Chat markup of the tiny VLM (InternVL / Qwen "<|im_start|>" style) and its image tokens. Kept out of ALL_TOKENS
# so the word-level ids (and hence the random init) of the tiny-llama / tiny-t5 presets never change.
CHAT_SPECIAL_TOKENS: tuple[str, ...] = ("<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>")
CHAT_WORDS: tuple[str, ...] = ("system", "user", "assistant", "add", "remove", "move")


def shapes_chat_tokenizer() -> PreTrainedTokenizerFast:
    """``shapes_tokenizer``'s vocabulary + chat/image special tokens + editing words, for the tiny VLM.

    Ids: ``ALL_TOKENS`` first (same ids as ``shapes_tokenizer``), then ``CHAT_WORDS``, then
    ``CHAT_SPECIAL_TOKENS``. The special tokens are matched before pre-tokenisation, so "<|im_start|>" is one
    token; InternVL's processor finds its image tokens through the ``start_image_token`` / ``end_image_token`` /
    ``context_image_token`` / ``video_token`` attributes set here.
    """
    tokens = list(ALL_TOKENS) + list(CHAT_WORDS) + list(CHAT_SPECIAL_TOKENS)
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = _fast(
        vocab,
        extra_special_tokens={
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        },
    )
    tok.add_special_tokens({"additional_special_tokens": list(CHAT_SPECIAL_TOKENS)})
    if len(tok) != len(tokens):
        raise AssertionError(f"chat tokenizer grew to {len(tok)} tokens, expected {len(tokens)}")
    return tok
