"""The synthetic shapes world (DESIGN.md §3): scenes, exact renders, GenEval prompts, DPG descriptions, a stream.

A scene is 1–4 filled shapes (circle / square / triangle) in 8 palette colours on a gray S×S canvas. Everything a
benchmark needs is exact: ``render`` draws the DESIGN geometry with no anti-aliasing, ``scene_for_prompt`` builds
scenes that satisfy a GenEval metadata object under GenEval's own rules, and ``describe`` writes a long
DPG-style description whose every fact can be checked (``experiments.data.dpg_questions``).

Geometry (pixel (x, y) is inside a shape when its integer centre lies in the closed shape):
circle ``(x-cx)² + (y-cy)² <= r²``; square ``|x-cx| <= r and |y-cy| <= r``; triangle with apex (cx, cy-r) and base
corners (cx±r, cy+r): ``cy-r <= y <= cy+r and 2|x-cx| <= y-cy+r``. All three share the inclusive box
``(cx-r, cy-r, cx+r, cy+r)``, i.e. (2r+1)×(2r+1) pixels.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "green": (25, 170, 25),
    "blue": (30, 60, 230),
    "yellow": (240, 220, 30),
    "purple": (150, 40, 190),
    "orange": (245, 130, 20),
    "black": (10, 10, 10),
    "white": (245, 245, 245),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
CLASSES: tuple[str, ...] = ("circle", "square", "triangle")
BACKGROUND: tuple[int, int, int] = (128, 128, 128)
NUMBER_WORDS: dict[int, str] = {2: "two", 3: "three", 4: "four"}
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
TASKS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")

MAX_OBJECTS = 4
POSITION_THRESHOLD = 0.1  # GenEval's default `position_threshold`
_ALLOWED_SIZES = (32, 64)
_MAX_PLACEMENT_TRIES = 200  # per object, before the whole layout is redrawn


# ------------------------------------------------------------------------------------------------ scene objects


@dataclass(frozen=True)
class Obj:
    """One filled shape: class, palette colour name, integer centre (cx, cy) and radius r (pixels)."""

    cls: str
    color: str
    cx: int
    cy: int
    r: int

    def __post_init__(self) -> None:
        if self.cls not in CLASSES:
            raise ValueError(f"unknown class {self.cls!r}; valid: {CLASSES}")
        if self.color not in PALETTE:
            raise ValueError(f"unknown colour {self.color!r}; valid: {COLORS}")
        if self.r < 1:
            raise ValueError(f"radius must be >= 1, got {self.r}")

    @property
    def box(self) -> tuple[int, int, int, int]:
        """(x1, y1, x2, y2): inclusive pixel bounds of the filled shape (the same for all three classes)."""
        return (self.cx - self.r, self.cy - self.r, self.cx + self.r, self.cy + self.r)

    @property
    def name(self) -> str:
        """"red circle"."""
        return f"{self.color} {self.cls}"


@dataclass(frozen=True)
class Scene:
    """Objects on an S×S gray canvas (S = ``size``)."""

    objects: tuple[Obj, ...]
    size: int

    def to_json(self) -> dict[str, Any]:
        """Plain dict ``{"size": S, "objects": [{"cls", "color", "cx", "cy", "r"}, ...]}`` (JSON-serialisable)."""
        return {
            "size": self.size,
            "objects": [{"cls": o.cls, "color": o.color, "cx": o.cx, "cy": o.cy, "r": o.r} for o in self.objects],
        }

    @staticmethod
    def from_json(data: dict[str, Any]) -> Scene:
        """Inverse of ``to_json``."""
        objs = tuple(Obj(o["cls"], o["color"], int(o["cx"]), int(o["cy"]), int(o["r"])) for o in data["objects"])
        return Scene(objects=objs, size=int(data["size"]))


def radius_range(size: int) -> tuple[int, int]:
    """Allowed integer radii ``[ceil(S/10), floor(S/6)]`` for canvas size S (32 -> (4, 5), 64 -> (7, 10))."""
    if size not in _ALLOWED_SIZES:
        raise ValueError(f"canvas size must be one of {_ALLOWED_SIZES}, got {size}")
    return math.ceil(size / 10), size // 6


def shape_mask(cls: str, cx: float, cy: float, rx: float, ry: float, height: int, width: int) -> np.ndarray:
    """Bool (H, W) mask of a class's ideal shape with centre (cx, cy) and half-extents (rx, ry).

    With rx = ry = r and an integer centre this is exactly the rendered shape (module docstring); other values
    fit the shape to an arbitrary box (used by the detector to score components): ellipse, rectangle, or the
    upright triangle spanning the box.
    """
    ys, xs = np.mgrid[0:height, 0:width]
    dx, dy = xs - cx, ys - cy
    rx, ry = max(rx, 1e-6), max(ry, 1e-6)
    inside_y = np.abs(dy) <= ry + 1e-9
    if cls == "circle":
        if rx == ry:  # integer-exact test for the rendered disc
            return dx * dx + dy * dy <= rx * rx + 1e-9
        return (dx / rx) ** 2 + (dy / ry) ** 2 <= 1.0 + 1e-9
    if cls == "square":
        return (np.abs(dx) <= rx + 1e-9) & inside_y
    if cls == "triangle":
        # half-width grows linearly from 0 at the apex row (cy - ry) to rx at the base row (cy + ry)
        return inside_y & (np.abs(dx) * 2 * ry <= rx * (dy + ry) + 1e-9)
    raise ValueError(f"unknown class {cls!r}; valid: {CLASSES}")


def render(scene: Scene) -> np.ndarray:
    """Exact render: uint8 (S, S, 3), gray background, flat palette fills, no anti-aliasing."""
    s = scene.size
    img = np.empty((s, s, 3), dtype=np.uint8)
    img[:] = BACKGROUND
    for o in scene.objects:
        img[shape_mask(o.cls, o.cx, o.cy, o.r, o.r, s, s)] = PALETTE[o.color]
    return img


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 (S, S, 3) -> float32 (3, S, S) in [-1, 1]."""
    return torch.from_numpy(image).permute(2, 0, 1).float().div(127.5).sub(1.0)


# ------------------------------------------------------------------------------------------------ layout & rules


def _gap_ok(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    """True when inclusive boxes a and b have at least one empty pixel row or column between them."""
    return a[2] + 2 <= b[0] or b[2] + 2 <= a[0] or a[3] + 2 <= b[1] or b[3] + 2 <= a[1]


def relative_position(box_a: tuple[float, ...], box_b: tuple[float, ...], threshold: float = POSITION_THRESHOLD
                      ) -> set[str]:
    """GenEval's ``relative_position(A, B)``: the set of relations "A rel B" (image y points down).

    Centres and dims from (x1, y1, x2, y2); ``offset = cA - cB``; each component shrinks by ``threshold * (dA + dB)``
    (clamped at 0); all-zero -> empty set; else the unit vector ``revised / |offset|`` gives "left of" (dx < -0.5),
    "right of" (dx > 0.5), "above" (dy < -0.5), "below" (dy > 0.5).
    """
    a, b = np.asarray(box_a[:4], dtype=float), np.asarray(box_b[:4], dtype=float)
    ca, cb = (a[:2] + a[2:]) / 2, (b[:2] + b[2:]) / 2
    da, db = np.abs(a[2:] - a[:2]), np.abs(b[2:] - b[:2])
    offset = ca - cb
    revised = np.maximum(np.abs(offset) - threshold * (da + db), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
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


def _robust_relations(a: Obj, b: Obj) -> set[str]:
    """Relations of a to b that hold for inclusive boxes AND for exclusive (x2+1) boxes, whichever a scorer uses."""
    incl = relative_position(a.box, b.box)
    excl = relative_position(tuple(v + (1 if k >= 2 else 0) for k, v in enumerate(a.box)),
                             tuple(v + (1 if k >= 2 else 0) for k, v in enumerate(b.box)))
    return incl & excl


def _place(rng: np.random.Generator, size: int, specs: list[tuple[str, str]]) -> tuple[Obj, ...] | None:
    """Place (cls, colour) specs one by one at random non-overlapping spots; None if one cannot be placed."""
    lo, hi = radius_range(size)
    placed: list[Obj] = []
    for cls, color in specs:
        for _ in range(_MAX_PLACEMENT_TRIES):
            r = int(rng.integers(lo, hi, endpoint=True))
            cx = int(rng.integers(r, size - 1 - r, endpoint=True))
            cy = int(rng.integers(r, size - 1 - r, endpoint=True))
            cand = Obj(cls, color, cx, cy, r)
            if all(_gap_ok(cand.box, o.box) for o in placed):
                placed.append(cand)
                break
        else:
            return None
    return tuple(placed)


def sample_scene(rng: np.random.Generator, size: int = 32, n_objects: int | None = None) -> Scene:
    """Random scene: ``n_objects`` (default uniform 1–4) objects of random class and colour, non-overlapping."""
    radius_range(size)  # validates size
    if n_objects is None:
        n_objects = int(rng.integers(1, MAX_OBJECTS, endpoint=True))
    if not 1 <= n_objects <= MAX_OBJECTS:
        raise ValueError(f"n_objects must be in 1..{MAX_OBJECTS}, got {n_objects}")
    specs = [(CLASSES[rng.integers(len(CLASSES))], COLORS[rng.integers(len(COLORS))]) for _ in range(n_objects)]
    while True:
        objs = _place(rng, size, specs)
        if objs is not None:
            return Scene(objs, size)


# ------------------------------------------------------------------------------------------------ GenEval prompts


def _article(word: str) -> str:
    """GenEval's ``with_article``: "an" before a vowel."""
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _pick(rng: np.random.Generator, options: tuple[str, ...], k: int) -> list[str]:
    return [options[i] for i in rng.choice(len(options), size=k, replace=False)]


def sample_prompt(rng: np.random.Generator, task: str) -> dict[str, Any]:
    """One GenEval metadata object ``{"tag", "include", "exclude"?, "prompt"}`` for ``task`` in this world.

    Mirrors GenEval's ``create_prompts.py``: distinct classes for two-object / position / colour-attribution
    prompts, distinct colours for colour attribution, counts 2–4 with an exclude of N+1, position ``include[0]``
    the target B and ``include[1]`` the object A with ``"position": [rel, 0]``; same prompt templates and articles.
    """
    if task == "single_object":
        (c,) = _pick(rng, CLASSES, 1)
        return {"tag": task, "include": [{"class": c, "count": 1}], "prompt": f"a photo of {_article(c)}"}
    if task == "two_object":
        a, b = _pick(rng, CLASSES, 2)
        return {"tag": task, "include": [{"class": a, "count": 1}, {"class": b, "count": 1}],
                "prompt": f"a photo of {_article(a)} and {_article(b)}"}
    if task == "counting":
        (c,) = _pick(rng, CLASSES, 1)
        n = int(rng.integers(2, 4, endpoint=True))
        return {"tag": task, "include": [{"class": c, "count": n}], "exclude": [{"class": c, "count": n + 1}],
                "prompt": f"a photo of {NUMBER_WORDS[n]} {c}s"}
    if task == "colors":
        (c,) = _pick(rng, CLASSES, 1)
        (col,) = _pick(rng, COLORS, 1)
        return {"tag": task, "include": [{"class": c, "count": 1, "color": col}],
                "prompt": f"a photo of {_article(col)} {c}"}
    if task == "position":
        a, b = _pick(rng, CLASSES, 2)
        rel = RELATIONS[rng.integers(len(RELATIONS))]
        return {"tag": task, "include": [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [rel, 0]}],
                "prompt": f"a photo of {_article(a)} {rel} {_article(b)}"}
    if task == "color_attr":
        a, b = _pick(rng, CLASSES, 2)
        ca, cb = _pick(rng, COLORS, 2)
        return {"tag": task,
                "include": [{"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}],
                "prompt": f"a photo of {_article(ca)} {a} and {_article(cb)} {b}"}
    raise ValueError(f"unknown task {task!r}; valid: {TASKS}")


def _check_meta(meta: dict[str, Any]) -> None:
    if meta.get("tag") not in TASKS:
        raise ValueError(f"unknown tag {meta.get('tag')!r}; valid: {TASKS}")
    clauses = list(meta.get("include", [])) + list(meta.get("exclude", []))
    if not meta.get("include"):
        raise ValueError("metadata needs a non-empty 'include' list")
    for cl in clauses:
        if cl.get("class") not in CLASSES:
            raise ValueError(f"unknown class {cl.get('class')!r}; valid: {CLASSES}")
        if "color" in cl and cl["color"] not in PALETTE:
            raise ValueError(f"unknown colour {cl['color']!r}; valid: {COLORS}")
        if "position" in cl:
            rel, target = cl["position"]
            if rel not in RELATIONS:
                raise ValueError(f"unknown relation {rel!r}; valid: {RELATIONS}")
            if not 0 <= int(target) < len(meta["include"]):
                raise ValueError(f"position target {target} out of range of include (len {len(meta['include'])})")
    total = sum(int(cl.get("count", 1)) for cl in meta["include"])
    if not 1 <= total <= MAX_OBJECTS:
        raise ValueError(f"metadata asks for {total} objects; this world holds 1..{MAX_OBJECTS} per image")


def satisfies(meta: dict[str, Any], scene: Scene) -> bool:
    """GenEval's correctness rule applied to the scene's ground truth (objects in scene order = score order).

    Include clauses: the first ``count`` objects of the class must exist and carry the colour if one is
    required; a position clause needs the relation against the target group's found objects. Exclude clauses
    fail when the class occurs ``count`` times or more.
    """
    _check_meta(meta)
    by_cls: dict[str, list[Obj]] = {c: [o for o in scene.objects if o.cls == c] for c in CLASSES}
    matched: list[list[Obj] | None] = []
    ok = True
    for cl in meta["include"]:
        found = by_cls[cl["class"]][: int(cl["count"])]
        good = len(found) >= int(cl["count"])
        if good and "color" in cl:
            good = sum(o.color == cl["color"] for o in found) >= int(cl["count"])
        if good and "position" in cl:
            rel, target = cl["position"]
            tgt = matched[int(target)] if int(target) < len(matched) else None
            good = tgt is not None and all(rel in relative_position(a.box, b.box) for a in found for b in tgt)
        matched.append(found if good else None)
        ok = ok and good
    for cl in meta.get("exclude", []):
        if len(by_cls[cl["class"]]) >= int(cl["count"]):
            ok = False
    return ok


def scene_for_prompt(meta: dict[str, Any], rng: np.random.Generator, size: int = 32) -> Scene:
    """A random scene that satisfies ``meta`` under GenEval's rules (``satisfies`` holds; checked, not hoped).

    The scene holds exactly the included objects (``count`` of each class, the required colour or a random one),
    no distractors: so counts are exact, the top-``count`` objects of a class are unambiguous, and excluded kinds
    never appear. Position relations are rejection-sampled to hold for inclusive and exclusive box conventions.
    """
    _check_meta(meta)
    specs: list[tuple[str, str]] = []
    for cl in meta["include"]:
        for _ in range(int(cl["count"])):
            specs.append((cl["class"], cl.get("color") or COLORS[rng.integers(len(COLORS))]))
    clauses = meta["include"]
    while True:
        objs = _place(rng, size, specs)
        if objs is None:
            continue
        scene = Scene(objs, size)
        # map each include clause to its objects (specs are laid out clause by clause)
        groups, k = [], 0
        for cl in clauses:
            groups.append(objs[k: k + int(cl["count"])])
            k += int(cl["count"])
        pos_ok = all(
            cl["position"][0] in _robust_relations(a, b)
            for cl, grp in zip(clauses, groups, strict=True) if "position" in cl
            for a in grp for b in groups[int(cl["position"][1])]
        )
        if pos_ok and satisfies(meta, scene):
            return scene


def _distinct_prompts(task: str) -> int:
    """How many distinct metadata objects ``sample_prompt(·, task)`` can produce."""
    nc, nk = len(CLASSES), len(COLORS)
    return {"single_object": nc, "two_object": nc * (nc - 1), "counting": nc * len(NUMBER_WORDS),
            "colors": nc * nk, "position": nc * (nc - 1) * len(RELATIONS),
            "color_attr": nc * (nc - 1) * nk * (nk - 1)}[task]


def write_geneval_metadata(path: str | Path, n_per_task: int, seed: int) -> list[dict[str, Any]]:
    """Write an ``evaluation_metadata.jsonl`` (one JSON object per line) and return its objects.

    For each task in TASKS order, prompts are drawn with ``sample_prompt`` from ``default_rng(seed)`` and
    de-duplicated until ``n_per_task`` distinct ones are found. Tasks with fewer distinct prompts contribute all
    of them: single_object 3, two_object 6, counting 9, colors 24, position 24 (color_attr has 336).
    """
    if n_per_task < 1:
        raise ValueError(f"n_per_task must be >= 1, got {n_per_task}")
    rng = np.random.default_rng(seed)
    out: list[dict[str, Any]] = []
    for task in TASKS:
        want = min(n_per_task, _distinct_prompts(task))
        seen: set[str] = set()
        while len(seen) < want:
            meta = sample_prompt(rng, task)
            key = json.dumps(meta, sort_keys=True)
            if key not in seen:
                seen.add(key)
                out.append(meta)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(m) + "\n" for m in out))
    return out


def render_geneval_folder(metadata: list[dict[str, Any]], out_dir: str | Path, n_samples: int = 4, seed: int = 0,
                          size: int = 32) -> Path:
    """Clean renders in GenEval's official layout; returns ``out_dir``.

    ``<out>/<NNNNN>/metadata.jsonl`` holds the prompt's ONE metadata object (``json.dump``, as GenEval's generator
    writes it) and ``<out>/<NNNNN>/samples/<k:05d>.png`` the k-th render of ``scene_for_prompt`` with
    ``default_rng([seed, NNNNN, k])``.
    """
    out_dir = Path(out_dir)
    for idx, meta in enumerate(metadata):
        sub = out_dir / f"{idx:05d}"
        (sub / "samples").mkdir(parents=True, exist_ok=True)
        with open(sub / "metadata.jsonl", "w") as fp:
            json.dump(meta, fp)
        for k in range(n_samples):
            scene = scene_for_prompt(meta, np.random.default_rng([seed, idx, k]), size)
            Image.fromarray(render(scene)).save(sub / "samples" / f"{k:05d}.png")
    return out_dir


# ------------------------------------------------------------------------------------------------ descriptions


def place_name(obj: Obj, size: int) -> str:
    """Coarse place of the centre on a 3×3 grid: "top left", "top", ..., "middle", ..., "bottom right"."""
    col = min(3 * obj.cx // size, 2)
    row = min(3 * obj.cy // size, 2)
    vert, horiz = ("top", "", "bottom")[row], ("left", "", "right")[col]
    return " ".join(w for w in (vert, horiz) if w) or "middle"


def _count_phrase(n: int, noun: str) -> str:
    return _article(noun) if n == 1 else f"{NUMBER_WORDS[n]} {noun}s"


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


# ------------------------------------------------------------------------------------------------ training stream


TRAIN_TASKS: tuple[str, ...] = ("t2i", "reconstruction", "edit")


def stream_item(seed: int, index: int, size: int = 32, long_caption_prob: float = 0.2,
                caption_block: int = 1, tasks: dict[str, float] | None = None) -> dict[str, Any]:
    """Item ``index`` of the stream: a pure function of (seed, index) through ``default_rng([seed, index])``.

    With probability ``long_caption_prob`` a random scene captioned by ``describe``; otherwise a task drawn
    uniformly from TASKS, a ``sample_prompt`` for it, a ``scene_for_prompt`` and the prompt as caption.
    ``caption_block`` > 1 draws that long-or-short coin once per block of indices (one batch), so a batch is all
    short prompts or all long descriptions: a batch pads to its longest caption, and a single ~150-token
    description in every batch would triple the condition length of every step.
    Returns ``{"image": float32 (3, S, S) in [-1, 1], "caption": str, "scene": dict, "index": int}``.
    """
    task = batch_task(tasks, seed, index // caption_block)
    if task != "t2i":
        return _image_item(seed, index, size, task)
    rng = np.random.default_rng([seed, index])
    coin = rng.random()
    if caption_block > 1:
        coin = np.random.default_rng([seed, index // caption_block, 1]).random()
    if coin < long_caption_prob:
        scene = sample_scene(rng, size)
        text = describe(scene)
    else:
        meta = sample_prompt(rng, TASKS[rng.integers(len(TASKS))])
        scene = scene_for_prompt(meta, rng, size)
        text = meta["prompt"]
    return {"image": to_tensor(render(scene)), "caption": text, "scene": scene.to_json(), "index": index}


def batch_task(tasks: dict[str, float] | None, seed: int, batch: int) -> str:
    """The task of batch ``batch`` of a training stream (shapes or HF): drawn from ``data.tasks`` with rng
    ``[seed, batch, 2]``; "t2i" when no other task has weight."""
    if not tasks or not any(w > 0 for t, w in tasks.items() if t != "t2i"):
        return "t2i"
    return _draw_task(tasks, np.random.default_rng([seed, batch, 2]))


def _draw_task(tasks: dict[str, float], rng: np.random.Generator) -> str:
    bad = sorted(set(tasks) - set(TRAIN_TASKS))
    if bad or not tasks or any(v < 0 for v in tasks.values()) or sum(tasks.values()) <= 0:
        raise ValueError(f"data.tasks must map some of {TRAIN_TASKS} to non-negative weights, got {tasks}")
    names = sorted(tasks)
    w = np.asarray([tasks[n] for n in names], dtype=float)
    return names[int(rng.choice(len(names), p=w / w.sum()))]


def _image_item(seed: int, index: int, size: int, task: str) -> dict[str, Any]:
    """A reconstruction (image -> same image) or editing (image + instruction -> edited image) item; the
    condition is a ``models.encoders.Prompt`` whose image reaches the DiT only through the VLM."""
    from experiments.data.edits import random_edit
    from models.encoders import Prompt

    rng = np.random.default_rng([seed, index, 3])
    if task == "reconstruction":
        scene = sample_scene(rng, size)
        prompt, target = Prompt("", (render(scene),)), scene
    else:
        src, instruction, target = random_edit(rng, size)
        prompt = Prompt(instruction, (render(src),))
    return {"image": to_tensor(render(target)), "caption": prompt, "scene": target.to_json(), "index": index}


def check_rank(rank: int, world_size: int) -> None:
    """A training rank/world size pair a stream can shard by (ValueError otherwise)."""
    if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
        raise ValueError(f"rank must be in [0, world_size) with world_size >= 1, got rank={rank!r}, "
                         f"world_size={world_size!r}")


def owns_batch(offset: int, rank: int = 0, world_size: int = 1, worker: int = 0, workers: int = 1) -> bool:
    """Whether DataLoader worker ``worker`` of training rank ``rank`` reads the batch ``offset`` batches after a
    stream's start.

    Ranks take turns first (rank r reads batches r, r + world_size, ...: one training step consumes the next
    world_size batches, one per rank), then a rank's workers take turns over its batches (the DataLoader's
    round-robin fetch order), so every rank gets its batches in order and no batch is read twice.
    """
    return offset % world_size == rank and (offset // world_size) % workers == worker


class ShapesStream(IterableDataset):
    """Infinite, exactly resumable stream of (image, caption) items of the shapes world.

    Item i is ``stream_item(seed, i, ...)``; iteration starts at ``start_index``, the *global* data position (over
    all training ranks). Under a DataLoader with W workers, worker k yields indices ``start_index + k + j*W``
    (j = 0, 1, ...). If ``batch_size`` is given, workers take whole batches instead (worker k yields batches k,
    k+W, ...), which matches the DataLoader's round-robin fetch order, so batches arrive exactly in index order for
    any W; it also makes each batch all-short or all-long captions (``stream_item``'s ``caption_block``).
    With ``world_size`` > 1 (DDP/FSDP) rank r of the training job sees only its share (``owns_batch``: batches,
    or items without ``batch_size``, r, r + world_size, ...): a step's global batch is world_size × batch_size
    distinct items (times accumulate_grad_batches), and a run resumed at step s starts at
    ``s * accumulate_grad_batches * world_size * batch_size`` (``datamodule.trainer_position``).
    """

    def __init__(self, seed: int, size: int = 32, long_caption_prob: float = 0.2, start_index: int = 0,
                 batch_size: int | None = None, tasks: dict[str, float] | None = None, rank: int = 0,
                 world_size: int = 1):
        super().__init__()
        radius_range(size)
        if not 0.0 <= long_caption_prob <= 1.0:
            raise ValueError(f"long_caption_prob must be in [0, 1], got {long_caption_prob}")
        if start_index < 0:
            raise ValueError(f"start_index must be >= 0, got {start_index}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}")
        check_rank(rank, world_size)
        self.seed, self.size, self.long_caption_prob = seed, size, long_caption_prob
        self.start_index, self.batch_size = start_index, batch_size
        self.rank, self.world_size = rank, world_size
        if tasks is not None:
            _draw_task(tasks, np.random.default_rng(0))  # validates
        self.tasks = tasks

    def indices(self, worker_id: int = 0, num_workers: int = 1) -> Iterator[int]:
        """The (infinite) index sequence worker ``worker_id`` of ``num_workers`` of this rank yields."""
        b = self.batch_size or 1
        stride = self.world_size * num_workers  # consecutive blocks of this worker lie this many blocks apart
        block = self.rank + self.world_size * worker_id  # its first block (owns_batch's rule, solved for offset)
        while True:
            yield from range(self.start_index + block * b, self.start_index + (block + 1) * b)
            block += stride

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        for i in self.indices(wid, nw):
            yield stream_item(self.seed, i, self.size, self.long_caption_prob, self.batch_size or 1, self.tasks)
