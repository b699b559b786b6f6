"""Blinding and pinning of images: what an annotator or vendor receives is pixels only, and the pixels the study
was created with.

A generator may write its name, settings or workflow into an image (PNG text chunks, EXIF); file names and
folders name the system. Images leave the study only as freshly encoded PNGs of their pixels, shown as a viewer
shows them (EXIF orientation applied, transparency over white, 16-bit greyscale scaled to 8 bits). ``create``
decodes every file and records the SHA-256 of its bytes; a file that changed afterwards is refused, not served.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from evals.ab.db import Image

if TYPE_CHECKING:
    from PIL.Image import Image as PILImageT


class ImageChanged(RuntimeError):
    """A study image's file no longer has the bytes the study was created with."""


def digest(data: bytes) -> str:
    """SHA-256 hex digest of a file's bytes."""
    return hashlib.sha256(data).hexdigest()


def _rgb(img: PILImageT) -> PILImageT:
    from PIL import Image as PILImage
    from PIL import ImageOps

    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit greyscale: convert("RGB") would clip it to white
        grey = np.asarray(img, dtype=np.float64)
        grey = grey / 65535.0 if img.mode != "I" or grey.max() > 255 else grey / 255.0
        img = PILImage.fromarray((grey.clip(0, 1) * 255 + 0.5).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = PILImage.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PILImage.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def png_of(data: bytes, name: str | Path = "image") -> bytes:
    """The encoded image ``data`` re-encoded as a PNG of its RGB pixels: no metadata chunks, no EXIF. A file that
    does not decode completely (empty, truncated, not an image) raises ``ValueError`` naming ``name``."""
    from PIL import Image as PILImage

    try:
        with PILImage.open(io.BytesIO(data)) as img:
            img.load()  # the whole file: a truncated one fails here, not when it is served
            pixels = _rgb(img)
    except (OSError, SyntaxError, ValueError) as err:  # PIL's UnidentifiedImageError is an OSError
        raise ValueError(f"{name}: not a readable image ({type(err).__name__}: {err})") from None
    buf = io.BytesIO()
    pixels.save(buf, format="PNG")
    return buf.getvalue()


def pixels_png(path: str | Path) -> bytes:
    """The image at ``path`` re-encoded as a PNG of its RGB pixels (``png_of``)."""
    return png_of(Path(path).read_bytes(), path)


def image_png(image: Image) -> bytes:
    """A study image as blinded PNG bytes (gold renders are stored that way already). Raises ``ImageChanged`` when
    the file's bytes are not the ones pinned at ``create``."""
    if image.data is not None:
        return image.data
    data = Path(image.path).read_bytes()
    if image.sha256 is not None and digest(data) != image.sha256:
        raise ImageChanged(f"{image.path} changed after the study was created (its SHA-256 differs): a study shows "
                           "the images it was created with; create a new study for the new images")
    return png_of(data, image.path)
