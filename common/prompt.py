"""The conditioning request ``Prompt`` (text plus reference images) and the digest that keys its images.

A prompt's images reach the DiT only as the VLM's image tokens; ``image_digest`` names an image by its decoded
pixels, so an array, its PIL image and a PNG of the same pixels share one key (feature cache, VERIFI rewrites).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any


@dataclass  # not frozen: Lightning's batch transfer rebuilds dataclasses in a batch field by field
class Prompt:
    """One conditioning request: user text plus optional reference images.

    ``images``: PIL images or uint8 arrays (H, W, 3), each of any size and aspect ratio. They reach the DiT only
    as the VLM's image tokens (no VAE or CLIP tokens): the placeholder of each image is put before the text in
    the user turn and the preset's processor expands it into the model's image tokens.
    """

    text: str
    images: tuple[Any, ...] = ()


def as_prompt(p: str | Prompt) -> Prompt:
    """A str is a text-only Prompt."""
    if isinstance(p, Prompt):
        return p
    if isinstance(p, str):
        return Prompt(p)
    raise ValueError(f"a prompt must be a str or common.prompt.Prompt, got {type(p).__name__}")


def decode_image(img: Any, where: str) -> Any:
    """PIL RGB image of a PIL image / uint8 (H, W, 3) array / file path; a clear error for anything else."""
    import numpy as np
    from PIL import Image

    try:
        if isinstance(img, Image.Image):
            img.load()
            return img.convert("RGB")
        if isinstance(img, str) or hasattr(img, "__fspath__"):
            from common.files import open_rgb  # the project's one image reader: full decode, file named on failure

            return open_rgb(img)
        arr = np.asarray(img)
    except Exception as e:  # noqa: BLE001 - any decoder failure becomes one message naming the input
        raise ValueError(f"{where}: the image failed to decode ({type(e).__name__}: {e})") from e
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3 or min(arr.shape[:2]) < 1:
        raise ValueError(f"{where}: an image array must be uint8 (H, W, 3), got {arr.dtype} {arr.shape}")
    return Image.fromarray(arr)


def image_digest(image: Any, where: str = "image") -> str:
    """32-hex-digit blake2b of an image as the encoder sees it (decoded to RGB uint8: shape + bytes), so an array,
    its PIL image and a PNG of the same pixels share one digest: the key of cached features and rewrites."""
    import numpy as np

    arr = np.ascontiguousarray(np.asarray(decode_image(image, where), dtype=np.uint8))
    h = hashlib.blake2b(digest_size=16)
    h.update(repr(arr.shape).encode())
    h.update(arr.tobytes())
    return h.hexdigest()
