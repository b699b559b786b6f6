"""VERIFI rewrites kept as the token ids the VLM generated (paper Sec. 3).

The DiT is conditioned on the tokens the VLM generated, so a rewrite is stored as those ids, never as text to be
tokenised again: with a BPE tokenizer, decode -> encode is not the identity (a generated "a" + "b" can come back
as the merged "ab", a leading space can join or split a token), and the re-tokenised ids are not what the VLM
produced. The decoded text is kept beside the ids for people to read (logs, analyses) and is never encoded.

    Rewrite(ids=(...), text="...")             one generated rewrite, stop token removed
    RewriteCache(tokenizer)                    prompt key -> Rewrite, for the ids of that one tokenizer
    tokenizer_fingerprint(tokenizer) -> str    16 hex digits over everything that decides what an id means

Ids mean something only under the tokenizer that produced them, so the cache records its tokenizer's fingerprint
and refuses to be read or filled through another one (a different vocabulary, merges or special tokens).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Rewrite:
    """One VERIFI rewrite: the generated token ids (what the DiT sees) and their decoded text (for people)."""

    ids: tuple[int, ...]
    text: str


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """16-hex-digit blake2b of what maps ids to text: the tokenizer class, and for a fast (Rust) tokenizer its whole
    serialised model (vocabulary, merges, normaliser, pre-tokeniser, added tokens), otherwise its vocabulary and
    special tokens."""
    h = hashlib.blake2b(digest_size=8)
    h.update(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    special = getattr(tokenizer, "all_special_tokens", [])
    h.update(json.dumps(sorted(map(str, special))).encode())
    return h.hexdigest()


class RewriteCache:
    """Generated rewrites by prompt key, valid for one tokenizer (its fingerprint is taken at construction)."""

    def __init__(self, tokenizer: Any):
        self.fingerprint = tokenizer_fingerprint(tokenizer)
        self._entries: dict[Hashable, Rewrite] = {}
        self._verified: tuple[Any, int] | None = (tokenizer, len(tokenizer))

    def _check(self, tokenizer: Any) -> None:
        if self._verified is not None and tokenizer is self._verified[0] and len(tokenizer) == self._verified[1]:
            return  # the tokenizer fingerprinted last, unchanged in size: no need to serialise it again
        got = tokenizer_fingerprint(tokenizer)
        if got != self.fingerprint:
            raise ValueError(f"this rewrite cache holds token ids of tokenizer {self.fingerprint}, not of the "
                             f"given tokenizer {got}: ids of one tokenizer mean other tokens in another")
        self._verified = (tokenizer, len(tokenizer))

    def missing(self, keys: Iterable[Hashable]) -> list[Hashable]:
        """The keys without a rewrite, each once, in first-seen order."""
        return list(dict.fromkeys(k for k in keys if k not in self._entries))

    def put(self, key: Hashable, rewrite: Rewrite, tokenizer: Any) -> None:
        """Store the rewrite ``tokenizer`` generated for ``key``."""
        self._check(tokenizer)
        if not rewrite.ids:
            raise ValueError(f"an empty rewrite for {key!r}: the VLM generated no tokens")
        self._entries[key] = rewrite

    def get(self, key: Hashable, tokenizer: Any) -> Rewrite:
        """The rewrite of ``key``, to be read with ``tokenizer``; KeyError when there is none."""
        self._check(tokenizer)
        return self._entries[key]

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries
