"""Blinding of images: what an annotator or vendor receives is pixels only.

A generator may write its name, settings or workflow into an image (PNG text chunks, EXIF); file names and
folders name the system. Images leave the study only as freshly encoded PNGs of their pixels.
"""

from __future__ import annotations

import io
from pathlib import Path

from evals.ab.db import Image


def pixels_png(path: str | Path) -> bytes:
    """The image at ``path`` re-encoded as a PNG of its RGB pixels: no metadata chunks, no EXIF."""
    from PIL import Image as PILImage

    with PILImage.open(path) as img:
        pixels = img.convert("RGB")
    buf = io.BytesIO()
    pixels.save(buf, format="PNG")
    return buf.getvalue()


def image_png(image: Image) -> bytes:
    """A study image as blinded PNG bytes (gold renders are stored that way already)."""
    return image.data if image.data is not None else pixels_png(image.path)
