"""Judge caches that cannot mix: every cached row says which judge wrote it and which image it judged.

A resumable benchmark run appends one JSONL row per judged unit (a DPG question on a tile, a GenAI-Bench image)
to ``OUT/<name>.jsonl``. Each row carries ``"judge"``, the fingerprint of the judge's identity, and ``"image"``,
the content hash of the image file it judged; ``OUT/judge.json`` holds the full identity:

- identity = ``{"judge": kind, "model": hub id or path, "mode": ..., "template": hash of the prompt text, ...}``
  plus ``"revision"`` (the hub commit) when known; the fingerprint hashes everything but the revision, so it is
  known before any weights load, and the revision is compared once they have (``confirm_revision``);
- a resume under another judge is refused (``check_judge``: before the judge loads); rows without a fingerprint
  (written before judges were recorded) are refused too: nothing says who wrote them;
- a row whose image has changed since (regenerated into the same folder) is dropped and its unit judged again
  (``drop_stale``), and the run reports how many;
- one run at a time per folder (``lock_folder``: ``OUT/.lock``, held with ``flock`` for the run's lifetime): a
  second run into the same ``--out`` (a double launch, a requeued job while the old one still runs) is refused
  with the holder's pid and host instead of judging everything twice into one cache.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from common.files import atomic_write_text

JUDGE_FILE = "judge.json"
LOCK_FILE = ".lock"
_HELD: dict[Path, list[Any]] = {}  # folder -> [open lock file, depth]: nested locks of one process are one lock


@contextlib.contextmanager
def lock_folder(out_dir: str | Path) -> Iterator[Path]:
    """Hold ``OUT/.lock`` (``fcntl.flock``, not blocking) while the block runs: another process holding it raises
    ValueError naming its pid and host. The kernel drops the lock when its holder dies, so a killed run never
    leaves a stale lock; nested calls of one process on one folder share the lock."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    key = out.resolve()
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield out
        finally:
            _HELD[key][1] -= 1
        return
    path = out / LOCK_FILE
    fp = open(path, "a+", encoding="utf-8")
    try:
        fcntl.flock(fp.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fp.seek(0)
        holder = fp.read().strip() or "unknown"
        fp.close()
        raise ValueError(f"{out} is in use by another run ({holder}): wait for it to finish, or use another "
                         "--out") from None
    fp.seek(0)
    fp.truncate()
    fp.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    fp.flush()
    _HELD[key] = [fp, 1]
    try:
        yield out
    finally:
        del _HELD[key]
        fp.close()  # releases the lock; the file stays (removing it would race with a run that just opened it)


def check_cache_file(path: str | Path) -> None:
    """A cache path that exists must be a regular file (not a folder, a FIFO, ...): say so instead of failing
    when the first rows are appended."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise ValueError(f"{path} is not a regular file (a folder?): move it away or use another --out")


def text_hash(*texts: str) -> str:
    """Short hash of prompt templates (what a judge is asked, word for word)."""
    return hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:12]


def file_digest(path: str | Path) -> str:
    """Content hash of an image file (16 hex digits of its SHA-256)."""
    h = hashlib.sha256()
    with open(path, "rb") as fp:
        for block in iter(lambda: fp.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def bytes_digest(data: bytes) -> str:
    """``file_digest`` of bytes already read (the exact bytes an image was decoded from)."""
    return hashlib.sha256(data).hexdigest()[:16]


def fingerprint(identity: Mapping[str, Any]) -> str:
    """12 hex digits over the identity without its ``revision`` (known before the weights load)."""
    core = {k: v for k, v in identity.items() if k != "revision"}
    return hashlib.sha256(json.dumps(core, sort_keys=True, default=str).encode()).hexdigest()[:12]


def describe(identity: Mapping[str, Any]) -> str:
    """``hf google/gemma-3-27b-it (mode=cot, template=1a2b3c4d5e6f)``: an identity in one readable phrase."""
    rest = ", ".join(f"{k}={v}" for k, v in identity.items() if k not in ("judge", "model") and v is not None)
    return " ".join(str(identity[k]) for k in ("judge", "model") if identity.get(k)) + (f" ({rest})" if rest else "")


def identity_of(judge: Any) -> dict[str, Any]:
    """A judge's ``identity`` attribute, else ``{"judge": judge.name}`` (simple stand-ins in tests)."""
    ident = getattr(judge, "identity", None)
    return dict(ident) if ident else {"judge": getattr(judge, "name", type(judge).__name__)}


def model_revision(model: Any) -> str | None:
    """The hub commit a transformers model was loaded from (None for local folders and hand-built models)."""
    return getattr(getattr(model, "config", None), "_commit_hash", None)


def check_judge(out_dir: str | Path, identity: Mapping[str, Any], rows: Iterable[Mapping[str, Any]] = (),
                what: str = "cache", record: bool = True) -> None:
    """Refuse to resume ``out_dir``'s cached ``rows`` under another judge: a row's fingerprint differs from
    ``identity``'s (or is missing), or ``judge.json`` names another judge while rows exist. With ``record``,
    ``judge.json`` is (re)written for this judge when nothing cached says otherwise."""
    out = Path(out_dir)
    fp = fingerprint(identity)
    path = out / JUDGE_FILE
    rows = list(rows)
    old = json.loads(path.read_text()) if path.is_file() else None
    if rows and old is not None and old.get("fingerprint") != fp:
        raise ValueError(f"{out} holds the {what} of judge {describe(old.get('identity', {}))}, not of "
                         f"{describe(identity)}: use another --out (or delete it)")
    for row in rows:
        if row.get("judge") != fp:
            who = "an unrecorded judge" if "judge" not in row else f"judge fingerprint {row['judge']}"
            raise ValueError(f"{out}/{what} holds rows of {who}, not of {describe(identity)} ({fp}): use another "
                             "--out (or delete it)")
    if record and (old is None or old.get("fingerprint") != fp):
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps({"fingerprint": fp, "identity": dict(identity)}, indent=1,
                                           default=str) + "\n")


def confirm_revision(out_dir: str | Path, identity: Mapping[str, Any]) -> None:
    """After loading: the judge's hub revision must be the recorded one (when both are known); records it when
    the folder has none yet."""
    path = Path(out_dir) / JUDGE_FILE
    revision = identity.get("revision")
    if revision is None or not path.is_file():
        return
    data = json.loads(path.read_text())
    old = data.get("identity", {}).get("revision")
    if old is not None and old != revision:
        raise ValueError(f"{out_dir} was judged by {describe(data['identity'])} at revision {old}, now revision "
                         f"{revision}: use another --out")
    if old is None:
        data["identity"]["revision"] = revision
        atomic_write_text(path, json.dumps(data, indent=1, default=str) + "\n")


def drop_stale(path: str | Path, rows: list[dict[str, Any]], digest_of: Callable[[Mapping[str, Any]], str | None]
               ) -> tuple[list[dict[str, Any]], int]:
    """Rows whose ``"image"`` hash is not the current file's (``digest_of(row)``; None = image gone) are removed
    from ``path`` (rewritten atomically) so that their units are judged again. Returns (kept rows, dropped)."""
    kept = [r for r in rows if r.get("image") is not None and r.get("image") == digest_of(r)]
    dropped = len(rows) - len(kept)
    if dropped:
        atomic_write_text(Path(path), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
    return kept, dropped


