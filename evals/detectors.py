"""Detector backends for GenEval: one class per backend plus one line in ``DETECTORS``.

A backend turns one image into ``Detection``s (class name, box ``[x1, y1, x2, y2]``, score, optional mask) and
names the colour of any kept detections of one class (``classify_colors``). GenEval's own rules (threshold, top-16
cut, NMS, clauses) live in ``evals.geneval`` and are the same for every backend.

- ``shapes``: the exact detector of the synthetic world (``experiments.data.shapes_detector``); its colour is the
  quantised palette colour, so ``classify_colors`` just reads it back.
- ``hf-mask2former``: COCO Mask2Former through transformers (mmdet's post-processing), colours by the CLIP
  zero-shot classifier on the mask composited on ``#999`` and cropped to the box (notes A5). The official mmdet
  backend, which needs its own environment, is not here yet.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

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


# ------------------------------------------------------------------------------------------------ COCO backends
GENEVAL_DATA = Path(__file__).parent / "data" / "geneval"
GENEVAL_COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
COLOR_TEMPLATES = ("a photo of a {c} {cls}", "a photo of a {c}-colored {cls}", "a photo of a {c} object")


def coco_object_names() -> tuple[str, ...]:
    """GenEval's 80 COCO class names in the detector's label order (``evals/data/geneval/object_names.txt``)."""
    return tuple(line.strip() for line in (GENEVAL_DATA / "object_names.txt").read_text().splitlines()
                 if line.strip())


def _embedding(out):
    """get_{text,image}_features returns a tensor (transformers 4) or an output whose pooler_output is the
    projected embedding (transformers 5)."""
    return out if hasattr(out, "norm") else out.pooler_output


class CLIPColorClassifier:
    """GenEval's zero-shot colour classifier (notes A5) on transformers' CLIP: per object class, the 10 colours x
    3 templates are embedded, L2-normalised, averaged per colour and renormalised (clip_benchmark's
    ``zero_shot_classifier``); each detection's mask is composited on ``#999``, cropped to its box, embedded, and
    the colour with the highest cosine wins. GenEval uses open_clip ``ViT-L-14`` (``pretrained="openai"``); the
    default here, ``openai/clip-vit-large-patch14``, holds the same OpenAI weights in transformers' format.
    """

    def __init__(self, model_id: str = "openai/clip-vit-large-patch14", model=None, processor=None,
                 device: str | None = None):
        import torch
        from transformers import CLIPModel, CLIPProcessor

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = (model or CLIPModel.from_pretrained(model_id)).to(self.device).eval()
        self.processor = processor or CLIPProcessor.from_pretrained(model_id)
        self._weights: dict[str, object] = {}

    def _classifier(self, class_name: str):
        import torch

        if class_name not in self._weights:
            texts = [t.format(c=c, cls=class_name) for c in GENEVAL_COLORS for t in COLOR_TEMPLATES]
            tok = self.processor.tokenizer(texts, padding=True, return_tensors="pt").to(self.device)
            with torch.no_grad():
                emb = _embedding(self.model.get_text_features(**tok))
            emb = emb / emb.norm(dim=-1, keepdim=True)
            w = emb.view(len(GENEVAL_COLORS), len(COLOR_TEMPLATES), -1).mean(1)
            self._weights[class_name] = w / w.norm(dim=-1, keepdim=True)
        return self._weights[class_name]

    @staticmethod
    def crop(image: Image.Image, det: Detection) -> Image.Image:
        """The detection's mask pixels on a ``#999`` canvas, cropped to its box (GenEval's colour input)."""
        image = image.convert("RGB")
        if det.mask is not None:
            mask = Image.fromarray(np.asarray(det.mask, dtype=bool).astype(np.uint8) * 255, mode="L")
            image = Image.composite(image, Image.new("RGB", image.size, "#999"), mask)
        return image.crop(tuple(det.box))

    def __call__(self, image: Image.Image, detections: list[Detection], class_name: str) -> list[str]:
        import torch

        if not detections:
            return []
        pix = self.processor(images=[self.crop(image, d) for d in detections], return_tensors="pt").to(self.device)
        with torch.no_grad():
            feats = _embedding(self.model.get_image_features(**pix))
        feats = feats / feats.norm(dim=-1, keepdim=True)
        return [GENEVAL_COLORS[i] for i in (feats @ self._classifier(class_name).T).argmax(-1).tolist()]


class HFMask2FormerDetector(DetectorBackend):
    """COCO instance segmentation with transformers' Mask2Former (default ``facebook/mask2former-swin-small-coco-
    instance``: the official detector's architecture, Swin-S, but the detectron2-trained checkpoint, not GenEval's
    mmdet one, so scores shift slightly) + ``CLIPColorClassifier``.

    Post-processing follows mmdet 2.x ``MaskFormerFusionHead`` (instance branch), not HF's helper (which resamples
    masks to 384 px): class probabilities = softmax without the no-object column; top-``max_per_image`` over
    (query x class); mask logits upsampled to the processed input, then to the image size; binary mask = logit > 0;
    score = class prob x mean sigmoid inside the mask; box = the mask's bounding box with mmdet's +1 on x2/y2.
    Empty masks are dropped (mmdet gives them a zero box).
    """

    name = "hf-mask2former"

    def __init__(self, model_id: str = "facebook/mask2former-swin-small-coco-instance", model=None, processor=None,
                 color_classifier: CLIPColorClassifier | None = None, max_per_image: int = 100,
                 device: str | None = None):
        import torch
        from transformers import Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = (model or Mask2FormerForUniversalSegmentation.from_pretrained(model_id)).to(self.device).eval()
        self.processor = processor or Mask2FormerImageProcessor.from_pretrained(model_id)
        self.classes = coco_object_names()
        n_labels = self.model.config.num_labels
        if n_labels != len(self.classes):
            raise ValueError(f"{model_id}: {n_labels} labels, but GenEval needs the {len(self.classes)} COCO classes")
        self.colors = GENEVAL_COLORS
        self.max_per_image = max_per_image
        self._colors = color_classifier

    def detect(self, image: Image.Image) -> list[Detection]:
        import torch
        import torch.nn.functional as F

        image = image.convert("RGB")
        inputs = self.processor(images=[image], return_tensors="pt").to(self.device)
        with torch.no_grad():
            out = self.model(**inputs)
        probs = out.class_queries_logits[0].float().softmax(-1)[:, :-1]  # (Q, C)
        n_cls = probs.shape[1]
        k = min(self.max_per_image, probs.numel())
        cls_scores, flat = probs.flatten().topk(k)
        labels, queries = flat % n_cls, flat // n_cls
        logits = F.interpolate(out.masks_queries_logits[0][queries][None].float(),
                               size=inputs["pixel_values"].shape[-2:], mode="bilinear", align_corners=False)
        logits = F.interpolate(logits, size=(image.height, image.width), mode="bilinear", align_corners=False)[0]
        binary = logits > 0
        mask_scores = (logits.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
        scores = (cls_scores * mask_scores).cpu().tolist()
        dets = []
        for j, m in enumerate(binary.cpu().numpy()):
            if not m.any():
                continue
            ys, xs = np.nonzero(m)
            box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
            dets.append(Detection(self.classes[int(labels[j])], box, float(scores[j]), m))
        return dets

    def classify_colors(self, image: Image.Image, detections: list[Detection], class_name: str) -> list[str]:
        if self._colors is None:
            self._colors = CLIPColorClassifier(device=self.device)
        return self._colors(image, detections, class_name)


DETECTORS["hf-mask2former"] = HFMask2FormerDetector
