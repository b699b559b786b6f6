"""GenEval's task list and spatial-relation rule: one copy for the world that writes prompts, the scorer that
checks them and the figures that order them.

``relative_position`` is GenEval's (``evaluation/evaluate_images.py``): boxes ``(x1, y1, x2, y2)``, image y
pointing down.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

TASKS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
POSITION_THRESHOLD = 0.1  # GenEval's default `position_threshold`


def relative_position(box_a: Sequence[float], box_b: Sequence[float], threshold: float = POSITION_THRESHOLD
                      ) -> set[str]:
    """The set of relations "A rel B" between ``(x1, y1, x2, y2)`` boxes; empty when the boxes are too close.

    Centres and dims from the boxes; ``offset = cA - cB``; each component shrinks by ``threshold * (dA + dB)``
    (clamped at 0, sign kept); all-zero -> empty set; else the unit vector ``revised / |offset|`` gives "left of"
    (dx < -0.5), "right of" (dx > 0.5), "above" (dy < -0.5), "below" (dy > 0.5).
    All in float32, as in GenEval, whose boxes are mmdet's float32 arrays (the threshold and the 1e-3 cut are
    cast to float32 by numpy there): a box pair on the edge of a relation is decided as the official scorer does.
    """
    a, b = np.asarray(box_a[:4], dtype=np.float32), np.asarray(box_b[:4], dtype=np.float32)
    offset = (a[:2] + a[2:]) / np.float32(2) - (b[:2] + b[2:]) / np.float32(2)
    dims = np.abs(a[2:] - a[:2]) + np.abs(b[2:] - b[:2])
    revised = np.maximum(np.abs(offset) - np.float32(threshold) * dims, np.float32(0)) * np.sign(offset)
    if np.all(np.abs(revised) < np.float32(1e-3)):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    rels = set()
    if dx < -0.5:
        rels.add("left of")
    if dx > 0.5:
        rels.add("right of")
    if dy < -0.5:
        rels.add("above")
    if dy > 0.5:
        rels.add("below")
    return rels
