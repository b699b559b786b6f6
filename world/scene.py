"""The shapes world's scenes: objects, the canvas, the exact render and random layouts.

A scene is 1–4 filled shapes (circle / square / triangle) in 8 palette colours on a gray S×S canvas (S = 32 or
64); docs/DESIGN.md gives the world's full spec. ``render`` draws the geometry below with no anti-aliasing, so a
render's pixels are a pure function of the scene.

Geometry (pixel (x, y) is inside a shape when its integer centre lies in the closed shape):
circle ``(x-cx)² + (y-cy)² <= r²``; square ``|x-cx| <= r and |y-cy| <= r``; triangle with apex (cx, cy-r) and base
corners (cx±r, cy+r): ``cy-r <= y <= cy+r and 2|x-cx| <= y-cy+r``. All three share the inclusive box
``(cx-r, cy-r, cx+r, cy+r)``, i.e. (2r+1)×(2r+1) pixels. Objects of a scene keep at least one empty pixel row or
column between their boxes (``gap_ok``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

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

MAX_OBJECTS = 4
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


def gap_ok(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    """True when inclusive boxes a and b have at least one empty pixel row or column between them."""
    return a[2] + 2 <= b[0] or b[2] + 2 <= a[0] or a[3] + 2 <= b[1] or b[3] + 2 <= a[1]


def place(rng: np.random.Generator, size: int, specs: list[tuple[str, str]]) -> tuple[Obj, ...] | None:
    """Place (cls, colour) specs one by one at random non-overlapping spots; None if one cannot be placed."""
    lo, hi = radius_range(size)
    placed: list[Obj] = []
    for cls, color in specs:
        for _ in range(_MAX_PLACEMENT_TRIES):
            r = int(rng.integers(lo, hi, endpoint=True))
            cx = int(rng.integers(r, size - 1 - r, endpoint=True))
            cy = int(rng.integers(r, size - 1 - r, endpoint=True))
            cand = Obj(cls, color, cx, cy, r)
            if all(gap_ok(cand.box, o.box) for o in placed):
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
        objs = place(rng, size, specs)
        if objs is not None:
            return Scene(objs, size)
