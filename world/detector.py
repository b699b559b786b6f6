"""The exact ``shapes`` detector: palette quantisation + connected components + shape fitting.

It stands in for GenEval's Mask2Former on shapes-world images (and feeds the DPG oracle judge):

1. **Quantise** every pixel to the nearest of the 8 palette colours or the gray background by RGB distance.
   Pixels farther than ``COLOR_CUTOFF`` (60, two thirds of the closest palette pair, yellow–orange at 90.7) from
   every colour count as background, so blurry in-between pixels of generated images make no objects.
2. **Components**: ``scipy.ndimage.label`` per colour with 8-connectivity (world objects have >= 1 gray pixel
   between their boxes, so two same-coloured objects never merge). Components with fewer than
   ``MIN_AREA_FRAC`` = 1% of the canvas pixels are ignored (10 px at 32², 40 px at 64²; the smallest clean shape,
   a triangle of the minimal radius, has 41 px at 32² and 113 px at 64²).
3. **Class and score**: the ideal circle (inscribed ellipse), square (the box) and upright triangle (apex at the
   top middle, base along the bottom) are fitted to the component's box; the class is the one whose ideal mask
   has the highest IoU with the component, and ``score`` is that IoU. This encodes the fill ratio (≈ π/4, 1, 1/2
   of the box) and the triangle's linearly growing row widths at once. Clean renders score exactly 1.0; ragged,
   holed or blurred blobs score lower.

Boxes are ``(x1, y1, x2, y2)`` inclusive pixel bounds, the same convention as ``world.scene.Obj.box``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from world.scene import BACKGROUND, CLASSES, COLORS, PALETTE, shape_mask

COLOR_CUTOFF = 60.0
MIN_AREA_FRAC = 0.01

_REFS = np.array([PALETTE[c] for c in COLORS] + [BACKGROUND], dtype=np.float32)  # (9, 3); index 8 = background
_BG = len(COLORS)


@dataclass
class ShapeDetection:
    """One detected object. ``box`` = (x1, y1, x2, y2) inclusive pixel bounds; ``mask`` bool (H, W)."""

    cls: str
    color: str
    box: tuple[float, float, float, float]
    score: float
    mask: np.ndarray


def to_uint8_rgb(image: np.ndarray | Image.Image) -> np.ndarray:
    """uint8 (H, W, 3) from a PIL image, a uint8 array or a float array in [0, 1]; (3, H, W) arrays are
    transposed. Raises ValueError on other layouts or on floats outside [0, 1]."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] == 3 and arr.shape[-1] != 3:
        arr = arr.transpose(1, 2, 0)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"expected an RGB image of shape (H, W, 3) or (3, H, W), got {arr.shape}")
    if arr.dtype == np.uint8:
        return arr
    if np.issubdtype(arr.dtype, np.floating):
        if arr.min() < -1e-3 or arr.max() > 1 + 1e-3:
            raise ValueError(f"float images must lie in [0, 1], got range [{arr.min():.3f}, {arr.max():.3f}]")
        return np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)
    raise ValueError(f"expected uint8 or float image, got dtype {arr.dtype}")


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    """Resize to size×size: box filter when shrinking (exact for integer nearest-upsampled renders), else nearest."""
    h, w = img.shape[:2]
    if (h, w) == (size, size):
        return img
    method = Image.BOX if size < min(h, w) else Image.NEAREST
    return np.asarray(Image.fromarray(img).resize((size, size), method))


def quantize(image: np.ndarray, color_cutoff: float = COLOR_CUTOFF) -> np.ndarray:
    """Palette index per pixel: int (H, W), 0..7 = COLORS order, -1 = background or farther than the cutoff."""
    dist = np.linalg.norm(image.astype(np.float32)[:, :, None, :] - _REFS[None, None], axis=-1)  # (H, W, 9)
    idx = dist.argmin(-1)
    idx[(idx == _BG) | (dist.min(-1) > color_cutoff)] = -1
    return idx


def classify_component(mask: np.ndarray) -> tuple[str, float, tuple[int, int, int, int]]:
    """(class, IoU score, inclusive box) of one component mask (bool (H, W)) by best ideal-shape IoU in its box."""
    ys, xs = np.nonzero(mask)
    x1, y1, x2, y2 = int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())
    crop = mask[y1: y2 + 1, x1: x2 + 1]
    h, w = crop.shape
    cx, cy, rx, ry = (w - 1) / 2, (h - 1) / 2, (w - 1) / 2, (h - 1) / 2
    best_cls, best_iou = CLASSES[0], -1.0
    for cls in CLASSES:
        ideal = shape_mask(cls, cx, cy, rx, ry, h, w)
        iou = float((crop & ideal).sum() / (crop | ideal).sum())
        if iou > best_iou:
            best_cls, best_iou = cls, iou
    return best_cls, best_iou, (x1, y1, x2, y2)


def detect_shapes(image: np.ndarray | Image.Image, size_hint: int | None = None, *,
                  color_cutoff: float = COLOR_CUTOFF, min_area_frac: float = MIN_AREA_FRAC) -> list[ShapeDetection]:
    """Detect the world's objects in an RGB image (see module docstring), highest score first.

    ``image``: PIL image, uint8 (H, W, 3) or float (H, W, 3) in [0, 1] ((3, H, W) accepted). ``size_hint``: the
    world canvas size the image depicts; a differently sized image is first resized to size_hint² so boxes and
    the minimum area are in world pixels. Masks are (S, S) for the analysed canvas.
    """
    img = to_uint8_rgb(image)
    if size_hint is not None:
        if size_hint < 8:
            raise ValueError(f"size_hint must be >= 8 pixels, got {size_hint}")
        img = _resize(img, size_hint)
    h, w = img.shape[:2]
    min_area = max(1, int(np.ceil(min_area_frac * h * w)))
    q = quantize(img, color_cutoff)
    eight = np.ones((3, 3), dtype=bool)
    dets: list[ShapeDetection] = []
    for ci, color in enumerate(COLORS):
        labels, n = ndimage.label(q == ci, structure=eight)
        if n == 0:
            continue
        areas = np.bincount(labels.ravel(), minlength=n + 1)
        for lab in range(1, n + 1):
            if areas[lab] < min_area:
                continue  # specks: noise, blur fringes, or objects too small for this world
            mask = labels == lab
            cls, score, box = classify_component(mask)
            dets.append(ShapeDetection(cls, color, tuple(float(v) for v in box), score, mask))
    dets.sort(key=lambda d: (-d.score, d.box[1], d.box[0]))
    return dets
