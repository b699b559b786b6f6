"""A perfect text-to-image generator of the shapes world, for ``evals.generate --callable``: it reads each GenEval
prompt back into its metadata (``world.prompts.parse_prompt``) and renders a scene that satisfies it, drawn from
the image's own seed. GenEval's ``shapes`` judge must score its folders 1.0."""

from __future__ import annotations

import numpy as np
from PIL import Image

from world.prompts import parse_prompt, scene_for_prompt
from world.scene import render

CALLS: list[int] = []  # batch sizes seen (in-process tests read it)


def generate(prompts: list[str], seeds: list[int]) -> list[Image.Image]:
    CALLS.append(len(prompts))
    return [Image.fromarray(render(scene_for_prompt(parse_prompt(p), np.random.default_rng(s))))
            for p, s in zip(prompts, seeds, strict=True)]


def seed_colour(prompts: list[str], seeds: list[int]) -> list:
    """A solid 8x8 image per request whose colour encodes its seed (R, G = seed in base 256, B = prompt length),
    so a test can read back which seed and prompt made each file."""
    return [np.full((8, 8, 3), (s % 256, (s // 256) % 256, len(p) % 256), dtype=np.uint8)
            for p, s in zip(prompts, seeds, strict=True)]
