"""The held-out part of the shapes world: images that no training stream ever shows, kept for validation.

An image is held out when the 64-bit BLAKE2b digest of its exact render (its array shape and uint8 bytes) falls in
the lowest ``1 / HELD_OUT_ONE_IN`` of the digest range. The split is defined by the pixels alone: it does not depend
on a seed, a run, a rank or the order of draws, so no training seed can reach a held-out image and the validation
set is the same for every run. Two scenes that render alike (the same objects listed in another order) fall on the
same side. Being a hash, the split is a uniform random subsample of every scene distribution of the world.

Training streams redraw an image that is held out (``is_held_out`` is checked on every image they show: targets
and the source images of edits); validation draws only held-out ones (``held_out_scene``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np

from world.scene import Scene, render

HELD_OUT_ONE_IN = 64  # ~1.6% of the world's images are held out: cheap to find, rarely redrawn by training
_PERSON = b"unifusion-val"  # BLAKE2b personalisation: this split's hash is unrelated to any other use


def is_held_out(image: np.ndarray) -> bool:
    """Whether an exact render, uint8 (S, S, 3), belongs to the held-out part of the world."""
    image = np.ascontiguousarray(image, dtype=np.uint8)
    h = hashlib.blake2b(digest_size=8, person=_PERSON)
    h.update(repr(image.shape).encode())
    h.update(image.tobytes())
    return int.from_bytes(h.digest(), "big") < 2**64 // HELD_OUT_ONE_IN


def held_out_scene(draw: Callable[[], Scene], max_draws: int = 100_000) -> tuple[Scene, np.ndarray]:
    """(scene, render) of the first ``draw()`` whose render is held out.

    ``draw`` is called again and again (it should advance its own rng), ~``HELD_OUT_ONE_IN`` times on average;
    RuntimeError after ``max_draws`` (a ``draw`` that always returns the same scene).
    """
    for _ in range(max_draws):
        scene = draw()
        image = render(scene)
        if is_held_out(image):
            return scene, image
    raise RuntimeError(f"no held-out scene in {max_draws} draws: does draw() advance its rng?")
