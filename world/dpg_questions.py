"""DPG-Bench-style question sets generated from shapes-world scene graphs, and their exact oracle answers.

Rows follow the official ``dpg_bench.csv`` header (``CSV_COLUMNS``), one row per DSG proposition, in DSG order:

1. entities, one per class present: ``entity - whole (circle)`` / "Is there a circle?" (dependency "0");
2. colours, one per coloured class: ``attribute - color (circle, red)`` / "Is the circle red?" ("Is one of the
   circles red?" when the scene has several circles); depends on the class's entity;
3. counts: the total ``other - count (object, ==3)`` / "Are there exactly three objects?" (dependency "0"), each
   class occurring 2+ times ``other - count (circle, ==2)`` (depends on its entity) and each coloured class
   occurring 2+ times ``other - count (red circle, ==2)`` (depends on its entity and colour);
4. relations between uniquely named objects (``world.descriptions.unique_relations``, GenEval's ``relative_position``):
   ``relation - spatial (red circle, blue square, left of)`` / "Is the red circle left of the blue square?";
   depends on both classes' entities.

Every proposition is a predicate over detections (``answer_question`` parses the ``tuple`` column), so the scene's
own render answers all of them True, and an edited render answers exactly the broken ones False.
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path
from typing import Any

import numpy as np

from common.geneval_spec import RELATIONS, relative_position
from world.descriptions import describe, groups, reading_order, unique_relations
from world.detector import ShapeDetection
from world.scene import CLASSES, COLORS, NUMBER_WORDS, Scene, sample_scene

CSV_COLUMNS: tuple[str, ...] = (
    "item_id", "text", "keywords", "proposition_id", "dependency", "category_broad", "category_detailed", "tuple",
    "question_natural_language",
)
_COUNT_WORDS = {1: "one", **NUMBER_WORDS}
_TUPLE_RE = re.compile(r"^(?P<cat>[a-z]+ - [a-z]+) \((?P<args>[^()]*)\)$")


def _count_question(n: int, noun: str) -> str:
    return f"Is there exactly one {noun}?" if n == 1 else f"Are there exactly {_COUNT_WORDS[n]} {noun}s?"


def questions_for_scene(item_id: str, scene: Scene, text: str) -> list[dict[str, Any]]:
    """DSG-style question rows for one scene (columns ``CSV_COLUMNS``; proposition ids from 1; dependency a
    comma-joined string of parent ids, "0" = none). See the module docstring for the order and wording."""
    if "." in item_id or not item_id:
        raise ValueError(f"item_id must be non-empty without '.', since DPG-Bench keys images by name: {item_id!r}")
    if not scene.objects:
        raise ValueError("a scene without objects has no propositions")
    rows: list[dict[str, Any]] = []

    def add(broad: str, detailed: str, args: list[str], question: str, parents: list[int]) -> int:
        pid = len(rows) + 1
        rows.append({
            "item_id": item_id, "text": text, "keywords": ", ".join(args), "proposition_id": pid,
            "dependency": ",".join(str(p) for p in sorted(set(parents))) or "0",
            "category_broad": broad, "category_detailed": detailed,
            "tuple": f"{broad} - {detailed} ({', '.join(args)})", "question_natural_language": question,
        })
        return pid

    objs = reading_order(scene)
    class_count = {c: sum(o.cls == c for o in objs) for c in CLASSES}
    entity: dict[str, int] = {}
    for o in objs:
        if o.cls not in entity:
            entity[o.cls] = add("entity", "whole", [o.cls], f"Is there a {o.cls}?", [])
    attribute: dict[tuple[str, str], int] = {}
    for color, cls, _ in groups(scene):
        q = f"Is the {cls} {color}?" if class_count[cls] == 1 else f"Is one of the {cls}s {color}?"
        attribute[(color, cls)] = add("attribute", "color", [cls, color], q, [entity[cls]])
    add("other", "count", ["object", f"=={len(objs)}"], _count_question(len(objs), "object"), [])
    for cls in entity:
        if class_count[cls] >= 2:
            add("other", "count", [cls, f"=={class_count[cls]}"], _count_question(class_count[cls], cls),
                [entity[cls]])
    for color, cls, n in groups(scene):
        if n >= 2:
            add("other", "count", [f"{color} {cls}", f"=={n}"], _count_question(n, f"{color} {cls}"),
                [entity[cls], attribute[(color, cls)]])
    for a, b, rel in unique_relations(scene):
        add("relation", "spatial", [a.name, b.name, rel], f"Is the {a.name} {rel} the {b.name}?",
            [entity[a.cls], entity[b.cls]])
    return rows


def dpg_questions_csv(items: list[tuple[str, Scene, str]]) -> tuple[str, list[dict[str, Any]]]:
    """(CSV text with the official header, rows) of the questions of every (item_id, scene, text); rows of one item
    are contiguous (the official loader groups runs of equal item_id)."""
    ids = [item_id for item_id, _, _ in items]
    if len(set(ids)) != len(ids):
        raise ValueError("item_ids must be unique")
    rows = [row for item_id, scene, text in items for row in questions_for_scene(item_id, scene, text)]
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=list(CSV_COLUMNS))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue(), rows


def write_dpg_questions_csv(path: str | Path, items: list[tuple[str, Scene, str]]) -> list[dict[str, Any]]:
    """Write ``dpg_questions_csv(items)`` to ``path``; returns the rows."""
    text, rows = dpg_questions_csv(items)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fp:
        fp.write(text)
    return rows


def make_dpg_prompt_set(n: int, seed: int, size: int = 32) -> list[tuple[str, Scene, str]]:
    """``n`` items ``("shapes<i>", scene, describe(scene))``; scene i drawn from ``default_rng([seed, i])`` with
    2–4 objects (dense prompts, as in DPG-Bench)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    items = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        scene = sample_scene(rng, size, n_objects=int(rng.integers(2, 4, endpoint=True)))
        items.append((f"shapes{i}", scene, describe(scene)))
    return items


def _split_name(name: str) -> tuple[str | None, str]:
    """"red circle" -> ("red", "circle"); "circle" -> (None, "circle"); validates both words."""
    parts = name.split()
    if len(parts) == 1 and parts[0] in CLASSES:
        return None, parts[0]
    if len(parts) == 2 and parts[0] in COLORS and parts[1] in CLASSES:
        return parts[0], parts[1]
    raise ValueError(f"cannot parse object name {name!r}; expected '<class>' or '<colour> <class>' from "
                     f"{COLORS} x {CLASSES}")


def answer_question(question_row: dict[str, Any], detections: list[ShapeDetection], min_score: float = 0.0) -> bool:
    """The oracle's answer to one question row given an image's detections (those with score >= min_score).

    Parsed from ``tuple``: entity = some object of the class; colour = some object of the class has the colour;
    count = exactly N objects (of the class / coloured class / in total); relation = some A and some B with
    "A rel B" under GenEval's ``relative_position`` on the detection boxes.
    """
    m = _TUPLE_RE.match(str(question_row["tuple"]).strip())
    if m is None:
        raise ValueError(f"cannot parse tuple {question_row['tuple']!r}; expected '<broad> - <detailed> (args)'")
    cat, args = m["cat"], [a.strip() for a in m["args"].split(",")]
    dets = [d for d in detections if d.score >= min_score]

    def matching(name: str) -> list[ShapeDetection]:
        color, cls = _split_name(name)
        return [d for d in dets if d.cls == cls and (color is None or d.color == color)]

    if cat == "entity - whole" and len(args) == 1:
        return bool(matching(args[0]))
    if cat == "attribute - color" and len(args) == 2:
        return bool(matching(f"{args[1]} {args[0]}"))
    if cat == "other - count" and len(args) == 2 and args[1].startswith("=="):
        n = int(args[1][2:])
        return (len(dets) if args[0] == "object" else len(matching(args[0]))) == n
    if cat == "relation - spatial" and len(args) == 3 and args[2] in RELATIONS:
        return any(args[2] in relative_position(a.box, b.box) for a in matching(args[0]) for b in matching(args[1])
                   if a is not b)
    raise ValueError(f"unsupported proposition {question_row['tuple']!r}; supported: entity - whole (cls), "
                     "attribute - color (cls, colour), other - count (name, ==N), relation - spatial (A, B, rel)")
