"""Atomic file writes: every result another tool reads is written to a temporary file and renamed into place,
so an interrupted job never leaves a truncated file behind."""

from __future__ import annotations

import os
from pathlib import Path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through ``<path>.tmp`` + ``os.replace``; creates parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


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
