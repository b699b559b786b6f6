"""GenEval's official detector, run INSIDE the ``geneval-mmdet`` conda env (``environment-geneval-mmdet.yml``):
mmdet 2.x Mask2Former Swin-S COCO instance segmentation + the open_clip ViT-L-14 colour classifier, as
djghosh13/geneval ``evaluation/evaluate_images.py``. ``evals.detectors.MMDetDetector`` starts it with the env's
python; it is a standalone script (Python >= 3.8, stdlib imports only at the top; mmdet, numpy, torch and
open_clip are imported once the arguments are read), so the env needs nothing from this repository.

    python evals/mmdet_runner.py --checkpoint CKPT --images LIST.json --out DETS.jsonl     # batch
    python evals/mmdet_runner.py --checkpoint CKPT --serve                                 # persistent worker

``--images``: a JSON list of image paths. ``--serve``: prints ``MMDET_RUNNER_READY`` once the models are loaded,
then reads one JSON request per stdin line, ``{"images": [paths], "out": path}``, writes that JSONL atomically and
prints ``MMDET_RUNNER_DONE <n>``; EOF ends it. Library chatter goes to stderr, so stdout carries only these lines.

Output, one JSON line per input image, in input order::

    {"path": str, "height": H, "width": W, "error": null | str,
     "detections": [{"label": int, "class": str, "score": float, "box": [x1, y1, x2, y2],
                     "mask": {"size": [H, W], "counts": [int, ...]}, "color": null | str}, ...]}

``label`` indexes GenEval's ``object_names.txt`` (the detector's COCO order); ``class`` is mmdet's own name, for
reading only. ``box``/``score`` are mmdet's ``bbox_results`` row (score = class prob x mask score). ``mask``:
uncompressed COCO-style RLE, column-major (Fortran) order, runs alternating starting with 0s. ``color``: the
open_clip zero-shot colour (GenEval's 10 colours x 3 templates, the mask composited on ``#999`` and cropped to the
box) for detections with score > ``--color-min-score``, else null. Detections with score <= ``--min-score`` are
left out. An image that fails to load gets ``error`` and no detections. Exit status 3: mmdet/open_clip missing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

READY, DONE = "MMDET_RUNNER_READY", "MMDET_RUNNER_DONE"
EXIT_MISSING_DEPS = 3
DEFAULT_CONFIG = os.path.join("mask2former", "mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.py")
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
TEMPLATES = ("a photo of a {c} {cls}", "a photo of a {c}-colored {cls}", "a photo of a {c} object")
SETUP_HINT = ("run this script with the python of the geneval-mmdet conda env: conda env create -f "
              "environment-geneval-mmdet.yml, then follow the steps in that file's header")


def rle_encode(mask) -> dict:
    """Bool (H, W) -> ``{"size": [H, W], "counts": [...]}``: column-major runs, the first one of 0s."""
    import numpy as np

    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], edges, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts  # runs start with 0s by convention
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(c) for c in counts]}


class ColorClassifier:
    """GenEval's colour classifier on open_clip (``pretrained="openai"``): per class, the mean of the normalised
    text embeddings of the 3 templates per colour, renormalised (clip_benchmark's ``zero_shot_classifier``)."""

    def __init__(self, model_name: str, device: str) -> None:
        import open_clip
        import torch

        self.torch, self.device = torch, device
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(model_name, pretrained="openai",
                                                                               device=device)
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.weights = {}

    def classifier(self, cls: str):
        if cls not in self.weights:
            texts = [t.format(c=c, cls=cls) for c in COLORS for t in TEMPLATES]
            with self.torch.no_grad():
                emb = self.model.encode_text(self.tokenizer(texts).to(self.device)).float()
            emb = emb / emb.norm(dim=-1, keepdim=True)
            w = emb.view(len(COLORS), len(TEMPLATES), -1).mean(1)
            self.weights[cls] = w / w.norm(dim=-1, keepdim=True)
        return self.weights[cls]

    def __call__(self, image, mask, box, cls: str) -> str:
        """The colour of one detection: its mask's pixels on ``#999``, cropped to ``box``, CLIP zero-shot."""
        from PIL import Image

        canvas = Image.new("RGB", image.size, "#999")
        crop = Image.composite(image, canvas, Image.fromarray(mask.astype("uint8") * 255, mode="L")).crop(box)
        with self.torch.no_grad():
            feat = self.model.encode_image(self.preprocess(crop)[None].to(self.device)).float()
        feat = feat / feat.norm(dim=-1, keepdim=True)
        return COLORS[int((feat @ self.classifier(cls).T).argmax())]


class Runner:
    """Loads the detector (and the colour classifier) once; ``detect(path)`` -> one output row."""

    def __init__(self, args: argparse.Namespace) -> None:
        import mmdet
        from mmdet.apis import inference_detector, init_detector

        config = args.config or os.path.join(os.path.dirname(mmdet.__file__), "..", "configs", DEFAULT_CONFIG)
        if not os.path.isfile(config):
            raise FileNotFoundError(f"mmdet config not found: {config} (GenEval needs an editable/source install of "
                                    "mmdetection 2.x, whose configs/ sit beside the package; or pass --config)")
        if not os.path.isfile(args.checkpoint):
            raise FileNotFoundError(f"checkpoint not found: {args.checkpoint}")
        self.infer = inference_detector
        self.model = init_detector(config, args.checkpoint, device=args.device)
        self.mmdet_classes = list(getattr(self.model, "CLASSES", []) or [])
        self.names = self.mmdet_classes
        if args.class_names:
            with open(args.class_names) as f:
                self.names = [line.strip() for line in f if line.strip()]
        self.min_score, self.color_min_score = args.min_score, args.color_min_score
        self.colors = None
        self.clip_model, self.device = args.clip_model, args.device

    def detect(self, path: str) -> dict:
        import numpy as np
        from PIL import Image, ImageOps

        try:
            image = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
        except Exception as err:  # any decode failure becomes the row's error
            return {"path": path, "height": None, "width": None, "detections": [], "error": f"{err}"}
        result = self.infer(self.model, path)  # mmdet reads the file itself, as GenEval does
        if isinstance(result, dict):
            result = result["ins_results"]
        bbox_results, segm_results = result if isinstance(result, tuple) else (result, None)
        dets = []
        for label in range(len(bbox_results)):
            boxes = np.asarray(bbox_results[label]).reshape(-1, 5)
            masks = segm_results[label] if segm_results is not None else [None] * len(boxes)
            for k in range(len(boxes)):
                score = float(boxes[k, 4])
                if score <= self.min_score:
                    continue
                mask = masks[k]
                if isinstance(mask, dict):  # pycocotools RLE from some configs
                    from pycocotools import mask as mask_utils

                    mask = mask_utils.decode(mask)
                mask = None if mask is None else np.asarray(mask, dtype=bool)
                box = [float(v) for v in boxes[k, :4]]
                name = self.names[label] if label < len(self.names) else str(label)
                color = None
                if mask is not None and score > self.color_min_score:
                    if self.colors is None:
                        self.colors = ColorClassifier(self.clip_model, self.device)
                    color = self.colors(image, mask, box, name)
                dets.append({"label": label, "class": self.mmdet_classes[label] if label < len(self.mmdet_classes)
                             else name, "score": score, "box": box,
                             "mask": None if mask is None else rle_encode(mask), "color": color})
        return {"path": path, "height": image.height, "width": image.width, "detections": dets, "error": None}

    def write(self, paths: list, out: str) -> int:
        tmp = out + ".tmp"
        with open(tmp, "w") as f:
            for path in paths:
                f.write(json.dumps(self.detect(str(path))) + "\n")
        os.replace(tmp, out)
        return len(paths)


def parse_args(argv: list | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--images", help="JSON list of image paths (batch mode; needs --out)")
    mode.add_argument("--serve", action="store_true", help="persistent worker: requests on stdin")
    p.add_argument("--out", help="batch mode: output JSONL")
    p.add_argument("--checkpoint", required=True, help="mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.pth (v2.0)")
    p.add_argument("--config", help="mmdet config (default: the Swin-S Mask2Former config of the installed mmdet)")
    p.add_argument("--class-names", help="object_names.txt: class names for the colour templates")
    p.add_argument("--device", default="cuda")
    p.add_argument("--min-score", type=float, default=0.0)
    p.add_argument("--color-min-score", type=float, default=0.3)
    p.add_argument("--clip-model", default="ViT-L-14")
    args = p.parse_args(argv)
    if args.images and not args.out:
        p.error("--images needs --out")
    return args


def main(argv: list | None = None) -> int:
    args = parse_args(argv)
    proto = sys.stdout
    sys.stdout = sys.stderr  # mmcv/mmdet print; keep the protocol channel clean
    try:
        runner = Runner(args)
    except ImportError as err:
        print(f"mmdet_runner: cannot import {err.name or err} in {sys.executable}: {SETUP_HINT}", file=sys.stderr)
        return EXIT_MISSING_DEPS
    if args.images:
        with open(args.images) as f:
            paths = json.load(f)
        if not isinstance(paths, list):
            print(f"mmdet_runner: {args.images} must hold a JSON list of paths", file=sys.stderr)
            return 2
        runner.write(paths, args.out)
        return 0
    proto.write(READY + "\n")
    proto.flush()
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        n = runner.write(list(request["images"]), request["out"])
        proto.write(f"{DONE} {n}\n")
        proto.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
