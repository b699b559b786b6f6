"""Frozen-encoder features cached on disk, so ablations that share an encoder encode each prompt once.

    FeatureCache(root, encoder).get_or_compute(prompts: list[str | Prompt])
        -> EncoderOutput(features (B, T, N, D), mask (B, T), layer_ids, token_ids (B, T) | None)

the same right-padded batch (padding exactly 0) the encoder returns, built from per-prompt entries.

Training uses it when ``encoder.cache`` is set in the config (``null`` = off, the default; ``auto`` =
``<common.paths.cache_dir()>/features``; or a folder): ``UniFusionModule.encode`` sends plain (non-VERIFI)
encodings through one lazily built cache and flushes it when training ends. VERIFI encodings are not cached here
(their rewrites are cached in memory by the module instead).

Layout: ``root/<fingerprint>-L<layer ids>/shard-*.safetensors``. The fingerprint is
``models.encoders.encoder_fingerprint`` (preset, taps, prompting, a checksum of all weights), so a different
encoder -- other layers, other seed, other template -- gets its own folder and can never read another's
entries; each shard also records the fingerprint in its metadata and is refused if it disagrees.

Entry keys: ``blake2b(fingerprint, layer ids, prompt text)`` for a text-only prompt (a ``str`` and
``Prompt(text, ())`` are the same entry). The key also covers everything else that changes a prompt's features
but is not in the fingerprint:

- images (``Prompt.images``: arrays, PIL images or paths): the encoder's tiles setting (``encoder.tiles``, which
  ``set_tiles`` changes after the fingerprint is taken) and, in order, a blake2b digest of each image as the
  encoder sees it (decoded to RGB uint8: shape + bytes), so a path and the array it decodes to share an entry and
  one changed pixel is another entry;
- autocast: features computed under ``torch.autocast`` (bf16-mixed training) are keyed by its dtype, so they never
  stand in for full-precision features (sampling outside the trainer) or the other way round.

Other image-processor settings are fixed by the preset (its name is in the fingerprint). The device is not in the
key: an entry computed on CPU serves a GPU run and vice versa (their kernels differ at float32 round-off). The
entry holds the prompt's unpadded features (T_i, N, D) (plus its token ids when the encoder returns them); the
shard metadata names each entry's prompt text (with image digests, tiles and autocast dtype where they apply).
Shards are immutable and written atomically (tmp file, then ``os.replace``) under unique names, so concurrent
writers (DDP ranks, parallel sweep jobs) never lose or corrupt each other's entries; a prompt cached twice is
harmless.

New entries are buffered and written as one shard of at most ``shard_entries`` entries / ``shard_bytes`` bytes,
when the buffer fills, on ``flush()``, on leaving a ``with`` block, and when the cache object is collected or the
interpreter exits. A shard that cannot be read (truncated, not safetensors, wrong fingerprint) raises
``CorruptShardError`` naming the file: the cache never silently mixes in or drops entries; delete the file to
recompute what it held.

Exactness: a cached row equals, bit for bit, the row the encoder computed for it. The encoder's own output for
a prompt can differ in the last ulp (~1e-7) with the padded length of the batch it sits in (different matmul
shapes), so a mixed batch matches a direct ``encoder(prompts)`` call to that tolerance, not bit for bit (the tiny
VLM's image prompts, features up to ~3: 1.2e-6). Training with the cache matches training without it to float32
round-off: 6 steps of the tiny VLM on a half-filled cache gave the same losses bit for bit and weights within
1.2e-7 (tests/test_feature_cache.py checks losses to 1e-6 and weights to 1e-5); a warm cache, whose rows all come
from the same batches as the run that wrote them, repeats that run exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from common.files import atomic_write
from common.prompt import Prompt, as_prompt, image_digest
from models.encoders import EncoderOutput, encoder_fingerprint

FORMAT = "unifusion-feature-cache/1"  # text-only keys are unchanged from the first version, so old shards still hit
_IDS = ":ids"  # suffix of an entry's token-id tensor


class CorruptShardError(ValueError):
    """A shard file of the cache cannot be read or belongs to another encoder; the message names the file."""


class _Writer:
    """The buffer of new entries; separate from FeatureCache so a finalizer can flush it without the cache."""

    def __init__(self, folder: Path, meta: dict[str, str], shard_entries: int, shard_bytes: int):
        self.folder, self.meta = folder, meta
        self.shard_entries, self.shard_bytes = shard_entries, shard_bytes
        # key -> (description of the prompt for the metadata: its text, or a dict; features, ids)
        self.pending: dict[str, tuple[Any, Tensor, Tensor | None]] = {}
        self.pending_bytes = 0
        self.written: list[tuple[Path, list[str]]] = []  # shards written and not yet indexed by the cache

    def add(self, key: str, prompt: Any, feats: Tensor, ids: Tensor | None) -> None:
        self.pending[key] = (prompt, feats, ids)
        self.pending_bytes += feats.numel() * feats.element_size()
        if len(self.pending) >= self.shard_entries or self.pending_bytes >= self.shard_bytes:
            self.flush()

    def flush(self) -> Path | None:
        if not self.pending:
            return None
        tensors: dict[str, Tensor] = {}
        prompts: dict[str, Any] = {}
        for key, (prompt, feats, ids) in self.pending.items():
            tensors[key] = feats.contiguous()
            if ids is not None:
                tensors[key + _IDS] = ids.contiguous()
            prompts[key] = prompt
        name = f"shard-{uuid.uuid4().hex}.safetensors"  # unique: writers never collide, shards never change
        meta = {**self.meta, "prompts": json.dumps(prompts)}
        atomic_write(self.folder / name, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
        self.written.append((self.folder / name, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0
        return self.folder / name


class FeatureCache:
    """Disk cache in front of a frozen encoder; ``cache(prompts)`` is ``cache.get_or_compute(prompts)``.

    Args:
        root: cache root; each encoder fingerprint gets a sub-folder.
        encoder: callable ``encoder(list[str | Prompt]) -> EncoderOutput`` with ``layer_ids`` (e.g.
            ``FrozenEncoder``); its ``tiles`` attribute (1 if absent) is read at every call.
        shard_entries / shard_bytes: bounds of one shard file (entries / bytes of features).
        pad_id: token id written at padded positions of ``token_ids``; default the tokenizer's pad id, else 0.

    Counters: ``hits``, ``misses`` (prompts), ``encoder_calls`` (batches sent to the encoder).
    Outputs are CPU tensors (the caller moves them, as ``UniFusionModule`` does with the encoder's).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        encoder: Callable[[list[str | Prompt]], EncoderOutput],
        shard_entries: int = 4096,
        shard_bytes: int = 256 * 2**20,
        pad_id: int | None = None,
    ):
        if shard_entries < 1 or shard_bytes < 1:
            raise ValueError(f"shard_entries and shard_bytes must be >= 1, got {shard_entries}, {shard_bytes}")
        self.encoder = encoder
        self.fingerprint = encoder_fingerprint(encoder)
        self.layer_ids = tuple(int(i) for i in encoder.layer_ids)
        layers = "_".join(map(str, self.layer_ids))
        self.folder = Path(root) / f"{self.fingerprint}-L{layers}"
        if pad_id is None:
            pad_id = getattr(getattr(encoder, "tokenizer", None), "pad_token_id", None)
        self.pad_id = 0 if pad_id is None else int(pad_id)
        self._meta = {"format": FORMAT, "fingerprint": self.fingerprint, "layer_ids": layers}
        self._writer = _Writer(self.folder, self._meta, shard_entries, shard_bytes)
        weakref.finalize(self, self._writer.flush)  # runs at collection or interpreter exit
        self._index: dict[str, Path] = {}  # key -> shard holding it
        self._seen: set[str] = set()  # shard file names already indexed
        self.hits = self.misses = self.encoder_calls = 0
        self.refresh()

    def __enter__(self) -> FeatureCache:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.flush()

    # ------------------------------------------------------------------------------------------ index
    def _autocast(self) -> str | None:
        """The autocast dtype active for the encoder's device (None when autocast is off)."""
        try:
            device = next(self.encoder.parameters()).device.type  # type: ignore[attr-defined]
        except (AttributeError, StopIteration, TypeError):
            device = "cpu"
        return str(torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else None

    def _entry(self, prompt: str | Prompt, where: str, autocast: str | None) -> tuple[str, Any]:
        """(key, description) of one prompt; the description goes into the shard metadata."""
        p = as_prompt(prompt)
        extra: dict[str, Any] = {}
        if p.images:
            extra["tiles"] = int(getattr(self.encoder, "tiles", 1))
            extra["images"] = [image_digest(im, f"{where}.images[{j}]") for j, im in enumerate(p.images)]
        if autocast is not None:
            extra["autocast"] = autocast
        # a text-only prompt outside autocast keeps the first version's key (text alone): old shards still hit
        ident: Any = p.text if not extra else (p.text, sorted(extra.items()))
        h = hashlib.blake2b(digest_size=16)
        h.update(repr((self.fingerprint, self.layer_ids, ident)).encode())
        return h.hexdigest(), (p.text if not extra else {"text": p.text, **extra})

    def key(self, prompt: str | Prompt) -> str:
        """32-hex-digit entry key of ``prompt`` under this encoder (its current tiles, the current autocast)."""
        return self._entry(prompt, "prompt", self._autocast())[0]

    def refresh(self) -> None:
        """Index shards written since the last look (by this or another process)."""
        if not self.folder.is_dir():
            return
        for path in sorted(self.folder.glob("shard-*.safetensors")):
            if path.name in self._seen:
                continue
            for key in self._read_keys(path):
                self._index.setdefault(key, path)
            self._seen.add(path.name)

    def _read_keys(self, path: Path) -> list[str]:
        try:
            with safe_open(str(path), framework="pt") as f:
                meta, keys = f.metadata() or {}, list(f.keys())
        except Exception as e:  # safetensors raises its own SafetensorError for bad headers / truncation
            raise CorruptShardError(
                f"feature-cache shard {path} is unreadable ({e}); delete it to recompute its entries"
            ) from e
        if meta.get("format") != FORMAT or meta.get("fingerprint") != self.fingerprint:
            raise CorruptShardError(
                f"feature-cache shard {path} is not a {FORMAT} shard of encoder {self.fingerprint} "
                f"(its metadata: format={meta.get('format')!r}, fingerprint={meta.get('fingerprint')!r}); "
                "it was copied into the wrong folder -- move or delete it"
            )
        return [k for k in keys if not k.endswith(_IDS)]

    def __len__(self) -> int:
        """Entries on disk (as indexed) plus entries waiting to be written."""
        return len(set(self._index) | set(self._writer.pending))

    def flush(self) -> Path | None:
        """Write buffered entries as one shard now; returns its path (None when nothing was pending)."""
        path = self._writer.flush()
        self._index_written()
        return path

    def _index_written(self) -> None:
        for path, keys in self._writer.written:
            for key in keys:
                self._index.setdefault(key, path)
            self._seen.add(path.name)
        self._writer.written.clear()

    # ------------------------------------------------------------------------------------------ lookup
    def _load(self, keys: Sequence[str]) -> dict[str, tuple[Tensor, Tensor | None]]:
        by_shard: dict[Path, list[str]] = {}
        for k in keys:
            by_shard.setdefault(self._index[k], []).append(k)
        out: dict[str, tuple[Tensor, Tensor | None]] = {}
        for path, ks in by_shard.items():
            try:
                with safe_open(str(path), framework="pt") as f:
                    names = set(f.keys())
                    for k in ks:
                        out[k] = (f.get_tensor(k), f.get_tensor(k + _IDS) if k + _IDS in names else None)
            except Exception as e:
                raise CorruptShardError(
                    f"feature-cache shard {path} is unreadable ({e}); delete it to recompute its entries"
                ) from e
        return out

    def get_or_compute(self, prompts: Sequence[str | Prompt]) -> EncoderOutput:
        """Features of ``prompts`` (str or ``Prompt`` with images): cached entries read, misses encoded in one
        batch and cached.

        Returns the encoder's layout: features (B, T, N, D) right-padded with exact zeros, mask (B, T) bool,
        layer_ids, token_ids (B, T) padded with ``pad_id`` (None if the encoder gives none).
        """
        if isinstance(prompts, str) or not isinstance(prompts, Sequence) or len(prompts) == 0:
            raise ValueError(f"prompts must be a non-empty list of strings or Prompts, got {type(prompts).__name__}")
        for i, p in enumerate(prompts):
            if not isinstance(p, (str, Prompt)):
                raise ValueError(f"prompts[{i}] must be a str or models.encoders.Prompt, got {type(p).__name__}")
        autocast = self._autocast()
        entries = [self._entry(p, f"prompts[{i}]", autocast) for i, p in enumerate(prompts)]
        keys = [k for k, _ in entries]
        pending = self._writer.pending
        if any(k not in self._index and k not in pending for k in keys):
            self.refresh()  # another process may have written them meanwhile
        rows: dict[str, tuple[Tensor, Tensor | None]] = {}
        for k in keys:
            if k in pending:
                rows[k] = pending[k][1:]
        rows.update(self._load([k for k in dict.fromkeys(keys) if k not in rows and k in self._index]))
        miss: dict[str, tuple[str | Prompt, Any]] = {}  # key -> (prompt, description); dedupes repeats
        for (k, desc), p in zip(entries, prompts, strict=True):
            if k not in rows:
                miss.setdefault(k, (p, desc))
        self.hits += len(prompts) - sum(k in miss for k in keys)
        self.misses += sum(k in miss for k in keys)
        if miss:
            self.encoder_calls += 1
            out = self.encoder([p for p, _ in miss.values()])
            if tuple(out.layer_ids) != self.layer_ids:
                raise ValueError(f"encoder returned layers {out.layer_ids}, cache is for {self.layer_ids}")
            feats, mask = out.features.detach().cpu(), out.mask.cpu()
            ids = out.token_ids.cpu() if out.token_ids is not None else None
            for j, (k, (_, desc)) in enumerate(miss.items()):
                n = int(mask[j].sum())
                if not bool(mask[j, :n].all()):
                    raise ValueError("the encoder's mask is not right-padded; the cache stores real tokens only")
                row = (feats[j, :n].clone(), ids[j, :n].clone() if ids is not None else None)
                rows[k] = row
                self._writer.add(k, desc, *row)
            self._index_written()
        return self._assemble([rows[k] for k in keys])

    __call__ = get_or_compute

    def _assemble(self, rows: list[tuple[Tensor, Tensor | None]]) -> EncoderOutput:
        b, t = len(rows), max(f.shape[0] for f, _ in rows)
        n, d = rows[0][0].shape[1:]
        features = torch.zeros(b, t, n, d, dtype=rows[0][0].dtype)
        mask = torch.zeros(b, t, dtype=torch.bool)
        with_ids = all(i is not None for _, i in rows)
        token_ids = torch.full((b, t), self.pad_id, dtype=torch.long) if with_ids else None
        for j, (f, i) in enumerate(rows):
            features[j, : f.shape[0]] = f
            mask[j, : f.shape[0]] = True
            if token_ids is not None and i is not None:
                token_ids[j, : i.shape[0]] = i
        return EncoderOutput(features=features, mask=mask, layer_ids=self.layer_ids, token_ids=token_ids)

    def fill(self, prompts: Sequence[str | Prompt], batch_size: int = 64) -> None:
        """Precompute ``prompts`` (e.g. a dataset's captions) in batches, then flush to disk."""
        unique: dict[str, str | Prompt] = {}
        for p in prompts:
            unique.setdefault(self.key(p), p)
        todo = list(unique.values())
        for i in range(0, len(todo), batch_size):
            self.get_or_compute(todo[i : i + batch_size])
        self.flush()
