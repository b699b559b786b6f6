"""Editing and reconstruction pairs of the shapes world, and a parser for its long descriptions.

Edits (paper Sec. 4 / 5 at toy scale), each a pure function of (scene, rng):

- recolour: "make the red circle blue ."  (a uniquely named object changes colour)
- remove:   "remove the red circle ."
- add:      "add a green square ."        (placed where it overlaps nothing)
- move:     "move the red circle to the left ."  (its centre moves into that third of the canvas)

``parse_description`` inverts ``world.descriptions.describe`` (the VERIFI rewrite target) back into counts and
relations, so a VLM's rewrite can be checked against the prompt it rewrote (``rewrite_faithful``);
``parse_instruction`` inverts an edit instruction, so an edited image can be checked for the one change it asks
(``edit_target_present``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from world.prompts import article
from world.scene import CLASSES, COLORS, NUMBER_WORDS, Obj, Scene, gap_ok, place, radius_range, sample_scene

EDIT_KINDS: tuple[str, ...] = ("recolour", "remove", "add", "move")
MOVE_DIRECTIONS: tuple[str, ...] = ("left", "right", "top", "bottom")


def _unique(scene: Scene) -> list[Obj]:
    return [o for o in scene.objects if sum(p.name == o.name for p in scene.objects) == 1]


def _third(direction: str, size: int) -> tuple[int, int]:
    """Centre coordinates (inclusive) of the ``direction`` third of the canvas, on the axis it names."""
    third = size // 3
    return (0, third - 1) if direction in ("left", "top") else (size - third, size - 1)


def _moved(obj: Obj, direction: str, size: int, rng: np.random.Generator) -> Obj:
    """``obj`` with its centre drawn uniformly inside the ``direction`` third of the canvas (other axis kept)."""
    lo, hi = _third(direction, size)
    a, b = max(lo, obj.r), min(hi, size - 1 - obj.r)
    v = int(rng.integers(a, max(a, b), endpoint=True))
    return replace(obj, cx=v) if direction in ("left", "right") else replace(obj, cy=v)


def edit_scene(scene: Scene, rng: np.random.Generator, kind: str | None = None) -> tuple[str, Scene] | None:
    """One random edit of ``scene``: (instruction, edited scene), or None when ``kind`` cannot apply to it
    (nothing uniquely named to recolour/remove/move, a full canvas for add, no free spot to move to)."""
    if kind is None:
        kind = EDIT_KINDS[rng.integers(len(EDIT_KINDS))]
    if kind not in EDIT_KINDS:
        raise ValueError(f"unknown edit kind {kind!r}; valid: {EDIT_KINDS}")
    objs = list(scene.objects)
    uniq = _unique(scene)
    if kind == "add":
        if len(objs) >= 4:
            return None
        cls, col = CLASSES[rng.integers(len(CLASSES))], COLORS[rng.integers(len(COLORS))]
        for _ in range(50):
            new = place(rng, scene.size, [(cls, col)])
            if new is not None and all(gap_ok(new[0].box, o.box) for o in objs):
                return f"add {article(col)} {cls} .", Scene(tuple(objs) + new, scene.size)
        return None
    if not uniq or (kind == "remove" and len(objs) < 2):
        return None  # every scene keeps at least one object
    target = uniq[rng.integers(len(uniq))]
    i = objs.index(target)
    if kind == "recolour":
        new_col = [c for c in COLORS if c != target.color][rng.integers(len(COLORS) - 1)]
        objs[i] = replace(target, color=new_col)
        if sum(o.name == objs[i].name for o in objs) > 1:
            return None  # "the blue circle" must stay a unique name afterwards
        return f"make the {target.name} {new_col} .", Scene(tuple(objs), scene.size)
    if kind == "remove":
        del objs[i]
        return f"remove the {target.name} .", Scene(tuple(objs), scene.size)
    direction = MOVE_DIRECTIONS[rng.integers(len(MOVE_DIRECTIONS))]
    others = objs[:i] + objs[i + 1:]
    for _ in range(50):
        cand = _moved(target, direction, scene.size, rng)
        if all(gap_ok(cand.box, o.box) for o in others):
            objs[i] = cand
            return f"move the {target.name} to the {direction} .", Scene(tuple(objs), scene.size)
    return None


def random_edit(scene_rng: np.random.Generator, size: int = 32) -> tuple[Scene, str, Scene]:
    """(source scene, instruction, target scene), retrying until an edit applies."""
    radius_range(size)
    while True:
        src = sample_scene(scene_rng, size)
        out = edit_scene(src, scene_rng)
        if out is not None:
            return src, out[0], out[1]


# ------------------------------------------------------------------------------------------------ parsing

_NAME = r"(\w+) (circle|square|triangle)"
_INSTRUCTIONS = {
    "recolour": re.compile(rf"^make the {_NAME} (\w+) \.$"),
    "remove": re.compile(rf"^remove the {_NAME} \.$"),
    "add": re.compile(rf"^add an? {_NAME} \.$"),
    "move": re.compile(rf"^move the {_NAME} to the (left|right|top|bottom) \.$"),
}


@dataclass(frozen=True)
class EditSpec:
    """What an instruction asks: ``kind`` (EDIT_KINDS) and ``name``, the coloured class that shows the edit in the
    edited scene (recolour: the new colour; add: the added object; remove: the removed one, now absent; move: the
    moved one), plus the third it moves into."""

    kind: str
    name: str
    direction: str | None = None


def parse_instruction(text: str) -> EditSpec | None:
    """The ``EditSpec`` of an ``edit_scene`` instruction; None if it does not follow that grammar."""
    for kind, pattern in _INSTRUCTIONS.items():
        m = pattern.match(text.strip())
        if m is None or m.group(1) not in COLORS:
            continue
        if kind == "recolour":
            return EditSpec(kind, f"{m.group(3)} {m.group(2)}") if m.group(3) in COLORS else None
        return EditSpec(kind, f"{m.group(1)} {m.group(2)}", m.group(3) if kind == "move" else None)
    return None


def edit_target_present(spec: EditSpec, target: Scene, found: list[tuple[str, tuple[float, ...]]]) -> bool:
    """Does an image show the change ``spec`` asks? ``found``: its objects as (name, box), e.g. from the exact
    detector; ``target``: the edited scene. The edit's object must appear exactly as often as in ``target``
    (recolour / add: the new one is there; remove: it is gone), and a moved object must sit, by its box centre, in
    the third it was moved to. Nothing else in the image is judged (the exact edit check does that)."""
    boxes = [box for name, box in found if name == spec.name]
    if len(boxes) != sum(o.name == spec.name for o in target.objects):
        return False
    if spec.kind != "move":
        return True
    lo, hi = _third(spec.direction, target.size)
    axis = 0 if spec.direction in ("left", "right") else 1
    return all(lo <= (box[axis] + box[axis + 2]) / 2 <= hi for box in boxes)


_NUM = {"a": 1, "an": 1, **{w: n for n, w in NUMBER_WORDS.items()}}
_GROUP = re.compile(r"^(a|an|two|three|four) (\w+) (circle|square|triangle)s?$")
_REL = re.compile(
    r"^the (\w+) (circle|square|triangle) is (left of|right of|above|below) the (\w+) (circle|square|triangle)$"
)


def parse_description(text: str) -> dict[str, Any] | None:
    """Counts and relations of a ``describe`` text; None if it does not follow that grammar.

    Returns ``{"groups": {(colour, class): count}, "total": int, "relations": {(name_a, rel, name_b)}}``.
    """
    # describe() writes "background: x." and a decoded word-level rewrite "background : x ."; accept both.
    norm = " ".join(re.sub(r"([.,:])", r" \1 ", text.lower()).split())
    sentences = [s.strip() for s in norm.split(" .") if s.strip()]
    if not sentences:
        return None
    head = re.match(r"^a picture of (one object|(two|three|four) objects) on a plain gray background : (.+)$",
                    sentences[0])
    if head is None:
        return None
    total = 1 if head.group(1) == "one object" else _NUM[head.group(2)]
    groups: dict[tuple[str, str], int] = {}
    for part in re.split(r" , | and ", head.group(3)):
        m = _GROUP.match(part.strip())
        if m is None or m.group(2) not in COLORS:
            return None
        key = (m.group(2), m.group(3))
        groups[key] = groups.get(key, 0) + _NUM[m.group(1)]
    relations = set()
    for s in sentences[1:]:
        m = _REL.match(s)
        if m is not None:
            relations.add((f"{m.group(1)} {m.group(2)}", m.group(3), f"{m.group(4)} {m.group(5)}"))
    return {"groups": groups, "total": total, "relations": relations}


def rewrite_faithful(meta: dict[str, Any], rewrite: str) -> bool:
    """Does a rewrite describe exactly the prompt's objects (classes and counts), with the prompt's colours and
    its relation? The rewrite may choose what the prompt leaves open (free colours, places, sizes).

    ``meta`` is a GenEval metadata object of the shapes world (``world.prompts.sample_prompt``).
    """
    parsed = parse_description(rewrite)
    if parsed is None or parsed["total"] != sum(parsed["groups"].values()):
        return False
    by_class: dict[str, int] = {}
    for (_, cls), n in parsed["groups"].items():
        by_class[cls] = by_class.get(cls, 0) + n
    want: dict[str, int] = {}
    for cl in meta["include"]:
        want[cl["class"]] = want.get(cl["class"], 0) + int(cl["count"])
    if by_class != want:
        return False
    for cl in meta["include"]:
        if "color" in cl and parsed["groups"].get((cl["color"], cl["class"]), 0) != int(cl["count"]):
            return False
    for cl in meta["include"]:
        if "position" in cl:
            rel, target = cl["position"]
            b_cls = meta["include"][int(target)]["class"]
            names = {(a, r, b) for a, r, b in parsed["relations"]}
            inverse = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
            ok = any(a.endswith(cl["class"]) and r == rel and b.endswith(b_cls) for a, r, b in names) or any(
                a.endswith(b_cls) and r == inverse[rel] and b.endswith(cl["class"]) for a, r, b in names
            )
            if not ok:
                return False
    return True


__all__ = ["EDIT_KINDS", "EditSpec", "edit_scene", "edit_target_present", "parse_description", "parse_instruction",
           "random_edit", "rewrite_faithful"]
