"""Exact shapes detector: accuracy on clean renders, score behaviour, minimum area, input handling."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from world.detector import COLOR_CUTOFF, MIN_AREA_FRAC, classify_component, detect_shapes, quantize
from world.scene import BACKGROUND, PALETTE, Obj, Scene, render, sample_scene


@pytest.mark.parametrize("size", [32, 64])
def test_clean_scenes_detected_exactly(size: int) -> None:
    rng = np.random.default_rng(size)
    n_obj = n_ok = n_extra = 0
    for _ in range(500):
        scene = sample_scene(rng, size)
        dets = detect_shapes(render(scene))
        got = [(d.cls, d.color, d.box) for d in dets]
        for o in scene.objects:
            n_obj += 1
            n_ok += (o.cls, o.color, tuple(float(v) for v in o.box)) in got
        n_extra += max(0, len(dets) - len(scene.objects))
        assert all(d.score >= 0.95 for d in dets)
        for d in dets:  # the mask is the object's own pixels
            o = next(o for o in scene.objects if tuple(float(v) for v in o.box) == d.box)
            assert d.mask.sum() == (render(Scene((o,), size)) != BACKGROUND).any(-1).sum()
    assert n_ok / n_obj >= 0.99, f"{n_ok}/{n_obj} objects right"
    assert n_extra == 0


def test_quantize_cutoff_hand_values() -> None:
    px = np.array([[[230, 25, 25], [128, 128, 128], [200, 200, 60], [230, 25, 100], [245, 245, 245]]], np.uint8)
    # (200,200,60) is 54 from yellow; (230,25,100) is 75 from red, beyond the 60 cut-off
    assert quantize(px).tolist() == [[0, -1, 3, -1, 7]]
    assert quantize(px, color_cutoff=100.0).tolist() == [[0, -1, 3, 0, 7]]
    assert COLOR_CUTOFF == 60.0


def test_classify_hand_shapes() -> None:
    rect = np.zeros((20, 20), bool)
    rect[2:8, 3:13] = True  # 6 x 10 rectangle: a (non-square) square fills its box
    assert classify_component(rect) == ("square", 1.0, (3, 2, 12, 7))
    tri = render(Scene((Obj("triangle", "red", 10, 10, 5),), 32))
    cls, score, box = classify_component((tri == PALETTE["red"]).all(-1))
    assert (cls, score, box) == ("triangle", 1.0, (5, 5, 15, 15))
    disc = render(Scene((Obj("circle", "red", 10, 10, 4),), 32))
    m = (disc == PALETTE["red"]).all(-1)
    assert classify_component(m)[:2] == ("circle", 1.0)
    # an upside-down triangle fits nothing well
    cls, score, _ = classify_component((tri == PALETTE["red"]).all(-1)[::-1])
    assert score < 0.7


def test_min_area_components_ignored() -> None:
    img = np.full((32, 32, 3), BACKGROUND, np.uint8)
    min_area = int(np.ceil(MIN_AREA_FRAC * 32 * 32))
    assert min_area == 11
    img[2:5, 2:5] = PALETTE["red"]  # 9 px < 11: ignored
    img[20:24, 20:24] = PALETTE["blue"]  # 16 px >= 11: kept (a square)
    dets = detect_shapes(img)
    assert [(d.cls, d.color, d.box) for d in dets] == [("square", "blue", (20.0, 20.0, 23.0, 23.0))]
    assert len(detect_shapes(img, min_area_frac=0.005)) == 2


def test_degraded_images_score_lower() -> None:
    rng = np.random.default_rng(0)
    for size in (32, 64):
        scene = sample_scene(rng, size, n_objects=4)
        img = render(scene).astype(np.float64)
        clean = detect_shapes(img.astype(np.uint8))
        blurred = np.stack([ndimage.gaussian_filter(img[..., c], 1.0) for c in range(3)], -1)
        noisy = np.clip(img + rng.normal(0, 35, img.shape), 0, 255)
        for degraded in (blurred, noisy):
            dets = detect_shapes(np.rint(degraded).astype(np.uint8))
            assert dets and max(d.score for d in dets) <= 1.0
            assert np.mean([d.score for d in dets]) < np.mean([d.score for d in clean]) - 0.05


def test_input_formats_agree() -> None:
    scene = sample_scene(np.random.default_rng(5), 64, n_objects=3)
    img = render(scene)
    ref = [(d.cls, d.color, d.box, d.score) for d in detect_shapes(img)]
    assert len(ref) == 3
    for variant in (img / 255.0, (img / 255.0).astype(np.float32), Image.fromarray(img), img.transpose(2, 0, 1)):
        assert [(d.cls, d.color, d.box, d.score) for d in detect_shapes(variant)] == ref
    # a 4x nearest-upsampled render analysed at its world size gives the same boxes
    big = np.kron(img, np.ones((4, 4, 1), np.uint8))
    assert [(d.cls, d.color, d.box, d.score) for d in detect_shapes(big, size_hint=64)] == ref


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        detect_shapes(np.zeros((32, 32), np.uint8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        detect_shapes(np.full((32, 32, 3), 2.0))
