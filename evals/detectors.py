"""Detector backends for GenEval: one class per backend plus one line in ``DETECTORS``.

A backend turns one image into ``Detection``s (class name, box ``[x1, y1, x2, y2]``, score, optional mask) and
names the colour of any kept detections of one class (``classify_colors``). GenEval's own rules (threshold, top-16
cut, NMS, clauses) live in ``evals.geneval`` and are the same for every backend.

- ``shapes``: the exact detector of the synthetic world (``experiments.data.shapes_detector``); its colour is the
  quantised palette colour, so ``classify_colors`` just reads it back.
- COCO backends (hf-mask2former, mmdet) come later: ``detect`` runs Mask2Former, ``classify_colors`` runs the CLIP
  colour classifier on the mask composited on ``#999`` and cropped to the box (notes A5).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Detection:
    """One detected instance.

    box: ``(x1, y1, x2, y2)`` in pixels; mask: bool ``(H, W)`` or None; color: set only by backends that know the
    exact colour (``shapes``), otherwise None and ``classify_colors`` computes it.
    """

    cls: str
    box: tuple[float, float, float, float]
    score: float
    mask: np.ndarray | None = None
    color: str | None = None

    def row(self) -> list[float]:
        """``[x1, y1, x2, y2, score]``: GenEval's per-box record in ``details``."""
        return [float(v) for v in self.box] + [float(self.score)]


class DetectorBackend(ABC):
    """Interface: ``detect`` one image, then ``classify_colors`` the kept detections of one class."""

    name: str
    classes: tuple[str, ...]  # object classes the backend can report (prompts must use these)
    colors: tuple[str, ...]  # colour vocabulary of ``classify_colors``

    @abstractmethod
    def detect(self, image: Image.Image) -> list[Detection]:
        """All detections in ``image`` (RGB PIL image), any order, no thresholding."""

    @abstractmethod
    def classify_colors(self, image: Image.Image, detections: list[Detection], class_name: str) -> list[str]:
        """One colour name (from ``self.colors``) per detection, in order."""


class ShapesDetector(DetectorBackend):
    """Exact detector of the shapes world: palette quantisation + connected components + shape fitting."""

    name = "shapes"

    def __init__(self) -> None:
        # imported here so evals.* imports without the synthetic world (and the COCO backends without it)
        from experiments.data import shapes
        from experiments.data.shapes_detector import detect_shapes

        self._detect = detect_shapes
        self.classes = tuple(shapes.CLASSES)
        self.colors = tuple(shapes.COLORS)

    def detect(self, image: Image.Image) -> list[Detection]:
        """Detections with exact palette colours; boxes are inclusive pixel bounds."""
        array = np.asarray(image.convert("RGB"))
        return [Detection(d.cls, tuple(float(v) for v in d.box), float(d.score), d.mask, d.color)
                for d in self._detect(array)]

    def classify_colors(self, image: Image.Image, detections: list[Detection], class_name: str) -> list[str]:
        """The palette colour each detection was found in."""
        missing = [d for d in detections if d.color is None]
        if missing:
            raise ValueError(f"shapes detections must carry their colour; {len(missing)} of class {class_name!r} "
                             "have none")
        return [d.color for d in detections]


DETECTORS: dict[str, type[DetectorBackend]] = {
    "shapes": ShapesDetector,
}


def get_detector(name: str) -> DetectorBackend:
    """Instantiate the registered backend ``name``; unknown names raise ValueError listing the valid ones."""
    if name not in DETECTORS:
        raise ValueError(f"unknown detector {name!r}; valid: {sorted(DETECTORS)}")
    return DETECTORS[name]()
