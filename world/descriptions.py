"""Long DPG-style descriptions of shapes-world scenes, every fact of which can be checked.

``describe`` writes the total count, the coloured classes with counts, each object's coarse place and the
relations between uniquely named objects; ``world.dpg_questions`` turns the same facts into questions and
``world.edits.parse_description`` reads them back.
"""

from __future__ import annotations

from typing import Any

from common.geneval_spec import RELATIONS, relative_position
from world.prompts import article
from world.scene import NUMBER_WORDS, Obj, Scene


def place_name(obj: Obj, size: int) -> str:
    """Coarse place of the centre on a 3×3 grid: "top left", "top", ..., "middle", ..., "bottom right"."""
    col = min(3 * obj.cx // size, 2)
    row = min(3 * obj.cy // size, 2)
    vert, horiz = ("top", "", "bottom")[row], ("left", "", "right")[col]
    return " ".join(w for w in (vert, horiz) if w) or "middle"


def _count_phrase(n: int, noun: str) -> str:
    return article(noun) if n == 1 else f"{NUMBER_WORDS[n]} {noun}s"


def reading_order(scene: Scene) -> list[Obj]:
    """Objects sorted top-to-bottom, then left-to-right (by centre): the order descriptions and questions use."""
    return sorted(scene.objects, key=lambda o: (o.cy, o.cx, o.cls, o.color, o.r))


def groups(scene: Scene, order: list[Obj] | None = None) -> list[tuple[str, str, int]]:
    """(colour, class, count) per distinct coloured class, in order of first appearance in reading order (or in
    ``order``, a permutation of the scene's objects)."""
    counts: dict[tuple[str, str], int] = {}
    for o in order if order is not None else reading_order(scene):
        counts[(o.color, o.cls)] = counts.get((o.color, o.cls), 0) + 1
    return [(col, cls, n) for (col, cls), n in counts.items()]


def unique_relations(scene: Scene) -> list[tuple[Obj, Obj, str]]:
    """(A, B, rel) with "A rel B" under ``relative_position``, for pairs of objects whose colour+class is unique in
    the scene (so "the red circle" names one object). Pairs in reading order, A before B; relations in RELATIONS
    order."""
    objs = reading_order(scene)
    uniq = [o for o in objs if sum(p.name == o.name for p in objs) == 1]
    out = []
    for i, a in enumerate(uniq):
        for b in uniq[i + 1:]:
            rels = relative_position(a.box, b.box)
            out.extend((a, b, rel) for rel in RELATIONS if rel in rels)
    return out


def describe(scene: Scene, listing_order: list[Obj] | None = None,
             lead_relation: tuple[Obj, str, Obj] | None = None) -> str:
    """A long DPG-style description: total count, the coloured classes with counts, each object's coarse place,
    and the pairwise relations between uniquely named objects. Deterministic given the scene. ``listing_order``
    (a permutation of the objects) orders the first sentence's list, e.g. in the order a prompt names them;
    ``lead_relation`` (A, rel, B), which must hold, is stated right after it (and not again among the relations).

    e.g. "a picture of three objects on a plain gray background: two red circles and a blue square. a red circle
    is in the top left part. ... the blue square is right of the ... ."
    """
    objs = reading_order(scene)
    n = len(objs)
    if n == 0:
        return "a picture of a plain gray background with no objects."
    total = "one object" if n == 1 else f"{NUMBER_WORDS[n]} objects"
    parts = [_count_phrase(k, f"{col} {cls}") for col, cls, k in groups(scene, listing_order)]
    listing = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    sentences = [f"a picture of {total} on a plain gray background: {listing}."]
    if lead_relation is not None:
        a, rel, b = lead_relation
        if rel not in relative_position(a.box, b.box):
            raise ValueError(f"lead relation {a.name} {rel} {b.name} does not hold in the scene")
        sentences.append(f"the {a.name} is {rel} the {b.name}.")
    for o in objs:
        det = "the" if sum(p.name == o.name for p in objs) == 1 else "a"
        place = place_name(o, scene.size)
        where = "in the middle" if place == "middle" else f"in the {place} part"
        sentences.append(f"{det} {o.name} is {where}.")
    for a, b, rel in unique_relations(scene):
        if lead_relation is not None and (a, rel, b) == lead_relation:
            continue
        sentences.append(f"the {a.name} is {rel} the {b.name}.")
    return " ".join(sentences)


def caption(item: dict[str, Any] | Scene) -> str:
    """Caption of a GenEval metadata object (its prompt) or of a scene (``describe``)."""
    if isinstance(item, Scene):
        return describe(item)
    if isinstance(item, dict) and "prompt" in item:
        return str(item["prompt"])
    raise TypeError(f"caption() takes a Scene or a GenEval metadata dict with 'prompt', got {type(item).__name__}")
