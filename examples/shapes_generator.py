"""An example generator for ``python -m evals.generate --callable examples.shapes_generator:generate``: it draws
the shapes world's prompts (``--prompts shapes``) exactly, so the offline judges score its folders 1.0.

Your own generator has the same signature: ``fn(prompts: list[str], seeds: list[int]) -> list[PIL.Image]`` (or
uint8 ``(H, W, 3)`` arrays), one image per (prompt, seed) pair, the image depending only on its prompt and seed.

- ``generate``: reads each prompt back into the scene it asks for and renders a random scene that satisfies it,
  drawn from the image's own seed: a GenEval / GenAI-Bench prompt ("a photo of two red circles") through its
  GenEval metadata (``world.prompts.parse_prompt``), a DPG-Bench description ("a picture of three objects on a
  plain gray background: ...") through its counts and relations (``world.edits.parse_description``).
- ``blank``: the empty gray canvas for every prompt, the floor: every judge scores it 0.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from common.geneval_spec import relative_position
from world.edits import parse_description
from world.prompts import parse_prompt, scene_for_prompt
from world.scene import BACKGROUND, Scene, place, render

SIZE = 32  # the shapes world's canvas, in pixels


def _holds(rel: str, a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    """``a rel b`` for inclusive boxes and for exclusive (x2 + 1) ones, whichever convention a judge uses."""
    def excl(box: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
        return box[0], box[1], box[2] + 1, box[3] + 1

    return rel in relative_position(a, b) and rel in relative_position(excl(a), excl(b))


def scene_for_description(text: str, rng: np.random.Generator, size: int = SIZE) -> Scene:
    """A random scene with exactly the coloured objects of a ``describe`` text, in which every stated relation
    holds (rejection sampling; the stated places are not enforced: DPG's questions do not ask them)."""
    parsed = parse_description(text)
    if parsed is None:
        raise ValueError(f"not a shapes-world prompt: {text!r}")
    specs = [(cls, colour) for (colour, cls), n in parsed["groups"].items() for _ in range(n)]
    for _ in range(100_000):
        objs = place(rng, size, specs)
        if objs is None:
            continue
        named = {o.name: o for o in objs}  # relations only name objects that are unique in the scene
        if all(_holds(rel, named[a].box, named[b].box) for a, rel, b in parsed["relations"]):
            return Scene(objs, size)
    raise ValueError(f"no scene found for {text!r}")


def draw(prompt: str, seed: int) -> Image.Image:
    """The image of one prompt, drawn from ``seed`` alone."""
    rng = np.random.default_rng(seed)
    if prompt.startswith("a photo of"):
        scene = scene_for_prompt(parse_prompt(prompt), rng, SIZE)
    else:
        scene = scene_for_description(prompt, rng, SIZE)
    return Image.fromarray(render(scene))


def generate(prompts: list[str], seeds: list[int]) -> list[Image.Image]:
    """One exact render per (prompt, seed)."""
    return [draw(p, s) for p, s in zip(prompts, seeds, strict=True)]


def blank(prompts: list[str], seeds: list[int]) -> list[Image.Image]:
    """The empty canvas per (prompt, seed): what a generator that draws nothing scores."""
    return [Image.new("RGB", (SIZE, SIZE), BACKGROUND) for _ in prompts]
