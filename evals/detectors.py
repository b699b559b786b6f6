"""Detector backends for GenEval: one class per backend plus one line in ``DETECTORS``.

A backend turns one image into ``Detection``s (class name, box ``[x1, y1, x2, y2]``, score, optional mask) and
names the colour of any kept detections of one class (``classify_colors``). GenEval's own rules (threshold, top-16
cut, NMS, clauses) live in ``evals.geneval`` and are the same for every backend.

- ``shapes``: the exact detector of the synthetic world (``world.detector``); its colour is the
  quantised palette colour, so ``classify_colors`` just reads it back.
- ``hf-mask2former``: COCO Mask2Former through transformers (mmdet's post-processing), colours by the CLIP
  zero-shot classifier on the mask composited on ``#999`` and cropped to the box (GenEval's colour rule).
- ``mmdet``: the official detector (mmdet 2.x + mmcv-full 1.7, which cannot build against this repo's torch) in
  its own conda env: ``evals/mmdet_runner.py`` runs there as a persistent subprocess; its JSONL detections are
  parsed back into ``Detection``s here (``MMDetDetector``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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

    @property
    def identity(self) -> dict[str, Any]:
        """Who scored: the backend and its weights (recorded in the output folder's ``judge.json``)."""
        return {"judge": self.name, **getattr(self, "_identity", {})}

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
        # imported here: the COCO backends never load the synthetic world
        from world.detector import detect_shapes
        from world.scene import CLASSES, COLORS

        self._detect = detect_shapes
        self.classes = tuple(CLASSES)
        self.colors = tuple(COLORS)

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


def get_detector(name: str, **kwargs: Any) -> DetectorBackend:
    """Instantiate the registered backend ``name`` with its keyword arguments (``device``, ``dtype``, ...);
    unknown names raise ValueError listing the valid ones."""
    if name not in DETECTORS:
        raise ValueError(f"unknown detector {name!r}; valid: {sorted(DETECTORS)}")
    return DETECTORS[name](**kwargs)


def detector_vocabulary(name: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(classes, colours) a backend can report, known without loading it: prompts are checked against them
    before any model loads."""
    if name not in DETECTORS:
        raise ValueError(f"unknown detector {name!r}; valid: {sorted(DETECTORS)}")
    if name == "shapes":
        from world.scene import CLASSES, COLORS

        return tuple(CLASSES), tuple(COLORS)
    return coco_object_names(), GENEVAL_COLORS


# ------------------------------------------------------------------------------------------------ COCO backends
GENEVAL_DATA = Path(__file__).parent / "data" / "geneval"
MASK2FORMER_ID = "facebook/mask2former-swin-small-coco-instance"
CLIP_ID = "openai/clip-vit-large-patch14"
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
    """GenEval's zero-shot colour classifier on transformers' CLIP: per object class, the 10 colours x
    3 templates are embedded, L2-normalised, averaged per colour and renormalised (clip_benchmark's
    ``zero_shot_classifier``); each detection's mask is composited on ``#999``, cropped to its box, embedded, and
    the colour with the highest cosine wins. GenEval uses open_clip ``ViT-L-14`` (``pretrained="openai"``); the
    default here, ``openai/clip-vit-large-patch14``, holds the same OpenAI weights in transformers' format.
    """

    def __init__(self, model_id: str = "openai/clip-vit-large-patch14", model=None, processor=None,
                 device: str | None = None, dtype: Any = None, device_map: str | None = None):
        import torch
        from transformers import CLIPModel, CLIPProcessor

        from evals.runtime import from_pretrained, input_device, pick_device, processor_from_pretrained

        device = pick_device(device)
        dtype = dtype or torch.float32  # colour decisions are argmaxes over close cosines: keep full precision
        if model is None:
            model = from_pretrained(CLIPModel, model_id, device=device, dtype=dtype, device_map=device_map,
                                    flag="--color-model", offline="--judge shapes")
        self.model = model.to(device).eval() if device_map is None else model.eval()
        self.device = input_device(self.model, device)
        self.processor = processor or processor_from_pretrained(CLIPProcessor, model_id, flag="--color-model",
                                                                offline="--judge shapes")
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
        pix["pixel_values"] = pix["pixel_values"].to(self.model.dtype)
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

    def __init__(self, model_id: str | None = None, model=None, processor=None,
                 color_classifier: CLIPColorClassifier | None = None, max_per_image: int = 100,
                 device: str | None = None, dtype: Any = None, device_map: str | None = None,
                 color_model: str | None = None):
        import torch
        from transformers import Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor

        from evals.runtime import from_pretrained, input_device, pick_device, processor_from_pretrained

        model_id = model_id or MASK2FORMER_ID
        device = pick_device(device)
        dtype = dtype or torch.float32  # scores are compared with thresholds (0.3, 0.9): keep full precision
        if model is None:
            model = from_pretrained(Mask2FormerForUniversalSegmentation, model_id, device=device, dtype=dtype,
                                    device_map=device_map, offline="--judge shapes")
        self.model = model.to(device).eval() if device_map is None else model.eval()
        self.device = input_device(self.model, device)
        self.processor = processor or processor_from_pretrained(Mask2FormerImageProcessor, model_id,
                                                                offline="--judge shapes")
        self._color_args = {"model_id": color_model or CLIP_ID, "device": device, "device_map": device_map}
        self._identity = {"model": model_id if model is None else type(model).__name__,
                          "color_model": self._color_args["model_id"]}
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
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
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
            self._colors = CLIPColorClassifier(**self._color_args)
        return self._colors(image, detections, class_name)


DETECTORS["hf-mask2former"] = HFMask2FormerDetector


# ------------------------------------------------------------------------------------------------ mmdet (own env)
MMDET_ENV = "geneval-mmdet"
MMDET_RUNNER = Path(__file__).with_name("mmdet_runner.py")
MMDET_SETUP = (
    "The mmdet detector runs in its own conda env (mmcv-full 1.7 does not build against this repo's torch). "
    "Create it once, from the repo root:\n"
    "  conda env create -f environment-geneval-mmdet.yml\n"
    "  then the build/download steps in that file's header (mmcv-full from source, mmdetection 2.x source "
    "install, the Mask2Former checkpoint), and\n"
    "  export GENEVAL_MMDET_PYTHON=$(conda run -n geneval-mmdet which python)\n"
    "  export GENEVAL_MMDET_CHECKPOINT=/path/to/mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.pth")


def find_mmdet_python() -> str:
    """The env's python: ``$GENEVAL_MMDET_PYTHON``, else the ``geneval-mmdet`` env that ``conda`` knows."""
    env = os.environ.get("GENEVAL_MMDET_PYTHON")
    if env:
        if not Path(env).is_file():
            raise FileNotFoundError(f"GENEVAL_MMDET_PYTHON={env} does not exist.\n{MMDET_SETUP}")
        return env
    conda = shutil.which("conda")
    if conda:
        try:
            out = subprocess.run([conda, "env", "list", "--json"], capture_output=True, text=True, timeout=120)
            for prefix in json.loads(out.stdout).get("envs", []):
                python = Path(prefix) / "bin" / "python"
                if Path(prefix).name == MMDET_ENV and python.is_file():
                    return str(python)
        except (OSError, subprocess.TimeoutExpired, json.JSONDecodeError):
            pass  # a broken conda is the same as none: the advice below applies
    raise FileNotFoundError(f"no {MMDET_ENV} environment found (GENEVAL_MMDET_PYTHON unset, and conda "
                            f"{'has no env of that name' if conda else 'is not on PATH'}).\n{MMDET_SETUP}")


def rle_decode(rle: dict[str, Any]) -> np.ndarray:
    """``{"size": [H, W], "counts": [...]}`` (column-major runs, 0s first; ``mmdet_runner.rle_encode``) -> bool
    (H, W)."""
    h, w = (int(v) for v in rle["size"])
    counts = np.asarray(rle["counts"], dtype=np.int64)
    if (counts < 0).any() or counts.sum() != h * w:
        raise ValueError(f"RLE counts sum to {int(counts.sum())}, expected {h} x {w} = {h * w}")
    values = np.arange(len(counts)) % 2 == 1  # runs alternate 0, 1, 0, ...
    return np.repeat(values, counts).reshape((h, w), order="F")


def parse_mmdet_row(row: dict[str, Any], classes: Sequence[str], colors: Sequence[str] = GENEVAL_COLORS
                    ) -> list[Detection]:
    """One runner output line -> ``Detection``s named by GenEval's class list (``label`` indexes it)."""
    where = row.get("path", "?")
    if row.get("error"):
        raise ValueError(f"mmdet runner could not read {where}: {row['error']}")
    dets = []
    for d in row.get("detections", []):
        try:
            label, score, box = int(d["label"]), float(d["score"]), tuple(float(v) for v in d["box"])
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{where}: detection {d!r} needs label, score and a 4-number box ({err})") from err
        if not 0 <= label < len(classes) or len(box) != 4:
            raise ValueError(f"{where}: label {label} outside the {len(classes)} classes, or box {box} not 4 numbers")
        color = d.get("color")
        if color is not None and color not in colors:
            raise ValueError(f"{where}: colour {color!r} not in {list(colors)}")
        mask = rle_decode(d["mask"]) if d.get("mask") is not None else None
        dets.append(Detection(classes[label], box, score, mask, color))
    return dets


def read_mmdet_jsonl(path: str | Path, classes: Sequence[str]) -> list[tuple[str, list[Detection]]]:
    """A runner output file -> ``[(image path, detections)]`` in file order."""
    out = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not JSON ({err})") from err
            out.append((row.get("path", ""), parse_mmdet_row(row, classes)))
    return out


class MMDetDetector(DetectorBackend):
    """GenEval's own detector (mmdet 2.x Mask2Former Swin-S + open_clip colours) through ``mmdet_runner.py`` in
    the ``geneval-mmdet`` env, kept running between images.

    python: the env's interpreter (default ``find_mmdet_python()``); checkpoint: the v2.0 ``.pth`` (default
    ``$GENEVAL_MMDET_CHECKPOINT``); config: default the installed mmdet's Swin-S config. Colours come from the
    runner for detections with score > ``color_min_score`` (GenEval's 0.3 threshold); a colour asked for a
    lower-scored detection raises rather than guessing. ``min_score``: detections at or below it are not sent.
    """

    name = "mmdet"

    def __init__(self, python: str | None = None, checkpoint: str | None = None, config: str | None = None,
                 device: str | None = None, min_score: float = 0.0, color_min_score: float = 0.3,
                 clip_model: str = "ViT-L-14") -> None:
        self.python = python or find_mmdet_python()
        checkpoint = checkpoint or os.environ.get("GENEVAL_MMDET_CHECKPOINT")
        if not checkpoint or not Path(checkpoint).is_file():
            raise FileNotFoundError(f"mmdet checkpoint not found ({checkpoint or 'GENEVAL_MMDET_CHECKPOINT unset'})."
                                    f"\n{MMDET_SETUP}")
        if device is None:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.classes, self.colors = coco_object_names(), GENEVAL_COLORS
        self.color_min_score = color_min_score
        self._identity = {"model": str(checkpoint), "clip_model": clip_model}
        self.args = ["--checkpoint", str(checkpoint), "--device", device, "--min-score", str(min_score),
                     "--color-min-score", str(color_min_score), "--clip-model", clip_model,
                     "--class-names", str(GENEVAL_DATA / "object_names.txt")]
        if config:
            self.args += ["--config", str(config)]
        self._proc: subprocess.Popen | None = None
        self._log: Any = None
        self._tmp = tempfile.TemporaryDirectory(prefix="geneval-mmdet-")
        self._log_path = Path(self._tmp.name) / "runner.log"
        self._n = 0

    def _log_tail(self) -> str:
        return self._log_path.read_text()[-2000:] if self._log_path.is_file() else ""

    def _fail(self, what: str) -> RuntimeError:
        code = None
        if self._proc is not None:
            try:
                code = self._proc.wait(timeout=30)  # stdout hit EOF: the runner is exiting
            except subprocess.TimeoutExpired:
                pass
        hint = f"\n{MMDET_SETUP}" if code == 3 else ""
        return RuntimeError(f"mmdet runner ({self.python} {MMDET_RUNNER.name}) {what} (exit {code}); its log:\n"
                            f"{self._log_tail()}{hint}")

    def _start(self) -> subprocess.Popen:
        if self._proc is None or self._proc.poll() is not None:
            self._log = open(self._log_path, "a")  # a file, not a pipe: a chatty stderr cannot block the runner
            self._proc = subprocess.Popen([self.python, str(MMDET_RUNNER), "--serve", *self.args],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True)
            if not self._await(self._proc, "MMDET_RUNNER_READY"):
                raise self._fail("did not start")
        return self._proc

    @staticmethod
    def _await(proc: subprocess.Popen, marker: str) -> bool:
        """Read stdout until a line starting with ``marker``; False when the runner exits first."""
        for line in proc.stdout:
            if line.startswith(marker):
                return True
        return False

    def detect_paths(self, paths: Sequence[str | Path]) -> list[list[Detection]]:
        """Detections of image files, one list per path (one runner request)."""
        proc = self._start()
        self._n += 1
        out = Path(self._tmp.name) / f"dets-{self._n}.jsonl"
        try:
            proc.stdin.write(json.dumps({"images": [str(p) for p in paths], "out": str(out)}) + "\n")
            proc.stdin.flush()
        except BrokenPipeError as err:
            raise self._fail("died") from err
        if not self._await(proc, "MMDET_RUNNER_DONE"):
            raise self._fail("died while detecting")
        rows = read_mmdet_jsonl(out, self.classes)
        out.unlink()
        if len(rows) != len(paths):
            raise RuntimeError(f"mmdet runner answered {len(rows)} rows for {len(paths)} images")
        return [dets for _, dets in rows]

    def detect(self, image: Image.Image) -> list[Detection]:
        """Detections of one image: written as a lossless PNG for the runner (mmdet reads files, as GenEval)."""
        path = Path(self._tmp.name) / "image.png"
        image.convert("RGB").save(path)
        return self.detect_paths([path])[0]

    def classify_colors(self, image: Image.Image, detections: list[Detection], class_name: str) -> list[str]:
        """The runner's open_clip colour of each detection."""
        for d in detections:
            if d.color is None:
                raise ValueError(f"mmdet detection of {class_name!r} (score {d.score:.3f}) has no colour: the runner "
                                 f"classifies only scores > color_min_score={self.color_min_score}; lower it to "
                                 "your GenEval threshold")
        return [d.color for d in detections]

    def close(self) -> None:
        """Stop the runner (EOF on its stdin) and remove the temporary files."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.stdin.close()
            try:
                self._proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        if self._log is not None:
            self._log.close()
        self._tmp.cleanup()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: best effort only
            pass


DETECTORS["mmdet"] = MMDetDetector
