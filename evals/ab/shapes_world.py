"""Everything the A/B tool takes from the synthetic shapes world, in one place.

- Gold pairs: a prompt with a render that satisfies it (the known better image) against one that does not: for
  text-to-image, a *near miss* (a scene made for another prompt of the same GenEval task that fails this one,
  checked with the world's exact rule); for edits, the correctly edited scene against the unedited source.
- The demo's simulated perception: how much of a GenEval prompt the world's exact detector finds in an image.

The world is imported inside the functions, so serving a study never loads it.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

GOLD_CANVAS = 64  # world pixels of a gold render, upscaled (nearest) to the study's image size


@dataclass(frozen=True)
class GoldPair:
    """A prompt, the better and the worse image (PNG bytes), and for edits the source image."""

    prompt: str
    better: bytes
    worse: bytes
    source: bytes | None = None


def _png(array: np.ndarray, size: int) -> bytes:
    from PIL import Image

    img = Image.fromarray(array)
    if img.size != (size, size):
        img = img.resize((size, size), Image.NEAREST)  # hard edges stay hard: looks like a clean render
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def gold_pairs(n: int, edit: bool, seed: int, size: int) -> list[GoldPair]:
    """``n`` gold pairs, rendered at ``size`` x ``size`` pixels; tasks (or edit kinds) cycle so each appears."""
    from common.geneval_spec import TASKS
    from world.edits import random_edit
    from world.prompts import sample_prompt, satisfies, scene_for_prompt
    from world.scene import render

    rng = np.random.default_rng(seed)
    out: list[GoldPair] = []
    while len(out) < n:
        if edit:
            src, instruction, target = random_edit(rng, GOLD_CANVAS)
            src_png = _png(render(src), size)
            out.append(GoldPair(instruction, _png(render(target), size), src_png, src_png))
            continue
        task = TASKS[len(out) % len(TASKS)]
        meta = sample_prompt(rng, task)
        good = scene_for_prompt(meta, rng, GOLD_CANVAS)
        for _ in range(200):
            other = scene_for_prompt(sample_prompt(rng, task), rng, GOLD_CANVAS)
            if not satisfies(meta, other):
                out.append(GoldPair(meta["prompt"], _png(render(good), size), _png(render(other), size)))
                break
    return out


def adherence(image_path: str | Path, meta: dict[str, Any]) -> float:
    """Share of a GenEval prompt's objects the exact detector finds with the right class (and colour, where the
    prompt names one), averaged over the prompt's include clauses: 0 (none) .. 1 (all). A partial-credit proxy
    used only by the demo's simulated annotators; it is not GenEval's pass/fail score."""
    from PIL import Image

    from world.detector import detect_shapes

    with Image.open(image_path) as img:
        found = detect_shapes(np.asarray(img.convert("RGB")))
    credit = 0.0
    for clause in meta["include"]:
        hits = [d for d in found if d.cls == clause["class"] and clause.get("color") in (None, d.color)]
        credit += min(len(hits), int(clause["count"])) / int(clause["count"])
    return credit / len(meta["include"])
