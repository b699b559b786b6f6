"""Atomic file writes: every file another tool reads is written to a temporary file and renamed into place,
so an interrupted job never leaves a truncated file behind (``atomic_write``; every writer of the repository goes
through it)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | Path, write: Callable[[Path], object], durable: bool = False) -> Path:
    """``write(tmp)`` fills a temporary file private to this process in ``path``'s folder, which is then renamed
    over ``path``: readers see the old file or the whole new one, never a part, and concurrent writers never share
    a temporary file. ``durable``: fsync the file before and the folder after the rename, so that the new file
    also survives a crash of the machine (checkpoints). Creates parent folders; the temporary file is removed when
    ``write`` fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if durable:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)  # the rename itself
        finally:
            os.close(fd)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (``atomic_write``)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def open_rgb(path: str | Path, what: str = "image", exif_transpose: bool = False, data: bytes | None = None):
    """A fully decoded RGB ``PIL.Image`` of ``path``; a corrupt or unreadable file raises ValueError
    ``corrupt or unreadable <what>: <path> (<reason>)`` so a benchmark names the file instead of crashing on it.
    ``exif_transpose`` applies the EXIF orientation first (GenEval does, for its colour crops). ``data``: the
    file's bytes, already read (decoded instead of reading ``path`` again, which only names them)."""
    import io

    from PIL import Image, ImageOps

    try:
        with Image.open(path if data is None else io.BytesIO(data)) as img:
            img = ImageOps.exif_transpose(img) if exif_transpose else img
            return img.convert("RGB")  # convert() forces the full decode, so truncated files fail here
    except (OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"corrupt or unreadable {what}: {path} ({err})") from err
