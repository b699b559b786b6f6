"""GenEval correctness rules and aggregation on hand-built detections."""

from __future__ import annotations

import json

import numpy as np
import pytest

from evals.detectors import DETECTORS, Detection, get_detector
from evals.geneval import (
    GenevalOptions,
    compute_iou,
    evaluate_image,
    geneval_bootstrap,
    parse_options,
    per_prompt_scores,
    relative_position,
    select_detections,
    summarize,
)


def det(cls: str, box=(0, 0, 9, 9), score: float = 1.0, color: str | None = "red") -> Detection:
    return Detection(cls, tuple(float(v) for v in box), score, None, color)


def meta(tag: str, include: list[dict], exclude: list[dict] | None = None) -> dict:
    m = {"tag": tag, "include": include, "prompt": "p"}
    if exclude is not None:
        m["exclude"] = exclude
    return m


SINGLE = meta("single_object", [{"class": "circle", "count": 1}])
TWO = meta("two_object", [{"class": "circle", "count": 1}, {"class": "square", "count": 1}])
COUNT3 = meta("counting", [{"class": "circle", "count": 3}], [{"class": "circle", "count": 4}])
RED_CIRCLE = meta("colors", [{"class": "circle", "count": 1, "color": "red"}])
CIRCLE_LEFT_OF_SQUARE = meta("position", [{"class": "square", "count": 1},
                                          {"class": "circle", "count": 1, "position": ["left of", 0]}])


def boxes_in_a_row(n: int, y: int = 0) -> list[tuple[int, int, int, int]]:
    return [(12 * i, y, 12 * i + 9, y + 9) for i in range(n)]


# ------------------------------------------------------------------------------------------------ presence


def test_single_object_present_absent_and_extra_instances():
    assert evaluate_image([det("circle")], SINGLE)[:2] == (True, "")
    assert evaluate_image([det("square")], SINGLE)[:2] == (False, "expected circle>=1, found 0")
    # extra instances are fine outside counting prompts
    assert evaluate_image([det("circle", b) for b in boxes_in_a_row(3)], SINGLE)[0]


def test_two_object_needs_both_and_details_are_official_rows():
    ok, reason, details = evaluate_image([det("circle", (1, 2, 3, 4), 0.8), det("square")], TWO)
    assert ok and reason == ""
    assert details == {"circle": [[1.0, 2.0, 3.0, 4.0, 0.8]], "square": [[0.0, 0.0, 9.0, 9.0, 1.0]]}
    ok, reason, _ = evaluate_image([det("circle")], TWO)
    assert not ok and reason == "expected square>=1, found 0"


def test_counting_is_exact_through_the_exclude_clause():
    three = [det("circle", b, 0.95) for b in boxes_in_a_row(3)]
    assert evaluate_image(three, COUNT3)[0]
    ok, reason, _ = evaluate_image(three[:2], COUNT3)
    assert not ok and reason == "expected circle>=3, found 2"
    four = [det("circle", b, 0.95) for b in boxes_in_a_row(4)]
    ok, reason, _ = evaluate_image(four, COUNT3)
    assert not ok and reason == "expected circle<4, found 4"


def test_counting_uses_the_counting_threshold_and_others_the_plain_one():
    dets = [det("circle", b, 0.95) for b in boxes_in_a_row(3)] + [det("circle", (0, 20, 9, 29), 0.85)]
    assert evaluate_image(dets, COUNT3)[0]  # 0.85 < 0.9: not counted, count stays exact
    # the same 0.85 box counts for a non-counting tag (0.85 > 0.3): 4 circles fire a 4-exclude
    other = meta("single_object", [{"class": "circle", "count": 1}], [{"class": "circle", "count": 4}])
    assert not evaluate_image(dets, other)[0]


def test_threshold_is_strict_and_overridable():
    assert not evaluate_image([det("circle", score=0.3)], SINGLE)[0]  # official: score > threshold
    assert evaluate_image([det("circle", score=0.3001)], SINGLE)[0]
    assert not evaluate_image([det("circle", score=0.5)], SINGLE, GenevalOptions(threshold=0.5))[0]


def official_keep(scores: list[float], threshold: float) -> np.ndarray:
    """GenEval's cut, ``bbox[index][ordering, 4] > confidence_threshold``, on mmdet's float32 score column."""
    return np.asarray(scores, dtype=np.float32) > threshold


def test_score_threshold_is_compared_in_float32_as_the_mmdet_path_does():
    at = float(np.float32(0.3))  # 0.30000001192092896: above 0.3 as a double, equal to it in float32
    above = float(np.nextafter(np.float32(0.3), np.float32(1)))
    assert at > 0.3 and official_keep([at, above], 0.3).tolist() == [False, True]
    assert not evaluate_image([det("circle", score=at)], SINGLE)[0]  # dropped, as officially
    assert evaluate_image([det("circle", score=above)], SINGLE)[0]
    # counting: three circles at exactly float32(0.9) are not counted; just above they are
    boxes = boxes_in_a_row(3)
    at9, above9 = float(np.float32(0.9)), float(np.nextafter(np.float32(0.9), np.float32(1)))
    assert official_keep([at9, above9], 0.9).tolist() == [False, True]
    assert not evaluate_image([det("circle", b, at9) for b in boxes], COUNT3)[0]
    assert evaluate_image([det("circle", b, above9) for b in boxes], COUNT3)[0]


def test_top16_cut_after_threshold_keeps_the_best_scores():
    scores = np.linspace(0.31, 0.99, 20)
    rng = np.random.default_rng(0)
    dets = [det("circle", (i, 0, i + 5, 5), float(s)) for i, s in zip(range(20), rng.permutation(scores), strict=True)]
    dets += [det("circle", (0, 30, 5, 35), 0.1)] * 5  # below threshold: never counted
    kept = select_detections(dets, "single_object", GenevalOptions())
    assert [d.score for d in kept] == sorted(scores, reverse=True)[:16]
    # 20 found, but only 16 survive the cut, so an exclude of 17 never fires
    m = meta("single_object", [{"class": "circle", "count": 1}], [{"class": "circle", "count": 17}])
    ok, _, details = evaluate_image(dets, m)
    assert ok and len(details["circle"]) == 16
    assert len(select_detections(dets, "single_object", GenevalOptions(max_objects=3))) == 3


# ------------------------------------------------------------------------------------------------ NMS / IoU


def test_iou_uses_the_plus_one_pixel_convention():
    # inclusive 10x10 boxes overlapping in 5 columns: 50 / (100 + 100 - 50)
    assert compute_iou((0, 0, 9, 9), (5, 0, 14, 9)) == pytest.approx(1 / 3)
    assert compute_iou((0, 0, 0, 0), (0, 0, 0, 0)) == 1.0  # single pixel: area 1, not 0
    assert compute_iou((0, 0, 4, 4), (10, 10, 14, 14)) == 0.0


def test_nms_is_off_by_default_and_greedy_when_enabled():
    a, b, c = det("circle", (0, 0, 9, 9), 0.99), det("circle", (5, 0, 14, 9), 0.98), det("circle", (30, 0, 39, 9), 0.97)
    two = meta("counting", [{"class": "circle", "count": 3}], [{"class": "circle", "count": 4}])
    assert evaluate_image([a, b, c], two)[0]  # max_overlap=1.0: overlapping duplicates kept
    kept = select_detections([a, b, c], "counting", GenevalOptions(max_overlap=0.3))  # IoU(a, b) = 1/3 >= 0.3
    assert kept == [a, c]
    assert select_detections([a, b, c], "counting", GenevalOptions(max_overlap=0.34)) == [a, b, c]
    assert not evaluate_image([a, b, c], two, GenevalOptions(max_overlap=0.3))[0]


# ------------------------------------------------------------------------------------------------ colour


def test_colour_checks_only_the_top_count_objects():
    blue_first = [det("circle", (0, 0, 9, 9), 0.9, "blue"), det("circle", (20, 0, 29, 9), 0.8, "red")]
    ok, reason, _ = evaluate_image(blue_first, RED_CIRCLE)
    assert not ok and reason == "expected red circle>=1, found 0 red; and 1 blue"
    red_first = [det("circle", (0, 0, 9, 9), 0.9, "red"), det("circle", (20, 0, 29, 9), 0.8, "blue")]
    assert evaluate_image(red_first, RED_CIRCLE)[0]


def test_colour_classifier_runs_only_after_presence_and_on_top_count():
    calls = []

    def classify(found, cls):
        calls.append((cls, [d.score for d in found]))
        return ["red"] * len(found)

    assert not evaluate_image([det("square")], RED_CIRCLE, classify_colors=classify)[0]
    assert calls == []  # presence failed: no colour classification
    evaluate_image([det("circle", score=s) for s in (0.5, 0.9, 0.7)], RED_CIRCLE, classify_colors=classify)
    assert calls == [("circle", [0.9])]


def test_color_attr_needs_both_colours():
    m = meta("color_attr", [{"class": "circle", "count": 1, "color": "red"},
                            {"class": "square", "count": 1, "color": "blue"}])
    assert evaluate_image([det("circle", color="red"), det("square", color="blue")], m)[0]
    ok, reason, _ = evaluate_image([det("circle", color="red"), det("square", color="red")], m)
    assert not ok and reason == "expected blue square>=1, found 0 blue; and 1 red"


# ------------------------------------------------------------------------------------------------ position


def naive_relative_position(a, b, t=0.1):
    """Scalar re-derivation of GenEval's relative_position, for cross-checking."""
    cax, cay, cbx, cby = (a[0] + a[2]) / 2, (a[1] + a[3]) / 2, (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
    ox, oy = cax - cbx, cay - cby
    rx = max(abs(ox) - t * (abs(a[2] - a[0]) + abs(b[2] - b[0])), 0) * np.sign(ox)
    ry = max(abs(oy) - t * (abs(a[3] - a[1]) + abs(b[3] - b[1])), 0) * np.sign(oy)
    if abs(rx) < 1e-3 and abs(ry) < 1e-3:
        return set()
    n = (ox * ox + oy * oy) ** 0.5
    out = set()
    out |= {"left of"} if rx / n < -0.5 else set()
    out |= {"right of"} if rx / n > 0.5 else set()
    out |= {"above"} if ry / n < -0.5 else set()
    out |= {"below"} if ry / n > 0.5 else set()
    return out


def test_relative_position_hand_computed_cases():
    assert relative_position((0, 0, 10, 10), (20, 0, 30, 10)) == {"left of"}  # dx = -18/20
    assert relative_position((20, 0, 30, 10), (0, 0, 10, 10)) == {"right of"}
    assert relative_position((0, 0, 10, 10), (0, 20, 10, 30)) == {"above"}
    assert relative_position((0, 20, 10, 30), (0, 0, 10, 10)) == {"below"}
    assert relative_position((0, 0, 10, 10), (20, 20, 30, 30)) == {"left of", "above"}  # -18/28.28 = -0.64 each
    assert relative_position((0, 0, 10, 10), (1, 1, 11, 11)) == set()  # offset 1 < 0.1 * 20: too close
    # margin: offset 3 vs 0.1 * 20 = 2 -> revised 1, dx = -1/3 > -0.5: no relation; with threshold 0 -> left
    assert relative_position((0, 0, 10, 10), (3, 0, 13, 10)) == set()
    assert relative_position((0, 0, 10, 10), (3, 0, 13, 10), threshold=0.0) == {"left of"}


def test_relative_position_matches_naive_on_random_boxes():
    rng = np.random.default_rng(1)
    for _ in range(300):
        a = np.sort(rng.integers(0, 64, (2, 2)), axis=0).T.ravel()[[0, 2, 1, 3]]
        b = np.sort(rng.integers(0, 64, (2, 2)), axis=0).T.ravel()[[0, 2, 1, 3]]
        assert relative_position(a, b) == naive_relative_position(a, b)


def official_relative_position(box_a, box_b, threshold: float = 0.1) -> set[str]:
    """GenEval's ``relative_position`` line by line, on mmdet-style float32 box rows."""
    boxes = np.array([np.asarray(box_a, np.float32), np.asarray(box_b, np.float32)])[:, :4].reshape(2, 2, 2)
    center_a, center_b = boxes.mean(axis=-2)
    dim_a, dim_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
    offset = center_a - center_b
    revised_offset = np.maximum(np.abs(offset) - threshold * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised_offset) < 1e-3):
        return set()
    dx, dy = revised_offset / np.linalg.norm(offset)
    return ({"left of"} if dx < -0.5 else set()) | ({"right of"} if dx > 0.5 else set()) | \
        ({"above"} if dy < -0.5 else set()) | ({"below"} if dy > 0.5 else set())


def test_relative_position_is_computed_in_float32_as_the_mmdet_path_does():
    # b sits where dx is -0.5 to within float32 rounding: a double says "left of" too, mmdet's float32 does not
    a, b = (0.0, 0.0, 10.0, 10.0), (11.0, 14.247806549072266, 21.0, 24.247806549072266)
    assert naive_relative_position(np.array(a), np.array(b)) == {"above", "left of"}
    assert official_relative_position(a, b) == {"above"} == relative_position(a, b)
    circle_left_of_square = [det("square", b), det("circle", a)]
    assert not evaluate_image(circle_left_of_square, CIRCLE_LEFT_OF_SQUARE)[0]
    rng = np.random.default_rng(2)  # and on random float boxes
    for _ in range(300):
        x, y = np.sort(rng.uniform(0, 64, (2, 2)), axis=0), np.sort(rng.uniform(0, 64, (2, 2)), axis=0)
        box_a, box_b = (x[0, 0], y[0, 0], x[1, 0], y[1, 0]), (x[0, 1], y[0, 1], x[1, 1], y[1, 1])
        assert relative_position(box_a, box_b) == official_relative_position(box_a, box_b)


def test_position_pass_fail_overlap_and_no_target():
    square = det("square", (20, 10, 28, 18))
    assert evaluate_image([square, det("circle", (2, 10, 10, 18))], CIRCLE_LEFT_OF_SQUARE)[0]
    ok, reason, _ = evaluate_image([square, det("circle", (40, 10, 48, 18))], CIRCLE_LEFT_OF_SQUARE)
    assert not ok and reason == "expected circle left of target, found right of target"
    ok, reason, _ = evaluate_image([square, det("circle", (21, 11, 29, 19))], CIRCLE_LEFT_OF_SQUARE)
    assert not ok and reason == "expected circle left of target, found  target"  # overlapping: empty relation
    ok, reason, _ = evaluate_image([det("circle", (2, 10, 10, 18))], CIRCLE_LEFT_OF_SQUARE)
    assert not ok and reason == "expected square>=1, found 0\nno target for circle to be left of"


def test_position_no_target_when_target_fails_its_colour():
    m = meta("position", [{"class": "square", "count": 1, "color": "blue"},
                          {"class": "circle", "count": 1, "position": ["left of", 0]}])
    ok, reason, _ = evaluate_image([det("square", (20, 10, 28, 18), color="red"), det("circle", (2, 10, 10, 18))], m)
    assert not ok and reason.endswith("no target for circle to be left of")


def test_position_checks_every_found_object_against_the_target():
    m = meta("position", [{"class": "square", "count": 1},
                          {"class": "circle", "count": 2, "position": ["left of", 0]}])
    square = det("square", (30, 10, 38, 18))
    left = [det("circle", (2, 10, 10, 18), 0.9), det("circle", (30, 30, 38, 38), 0.8)]  # 2nd: below
    ok, reason, _ = evaluate_image([square, *left], m)
    assert not ok and reason == "expected circle left of target, found below target"
    above = meta("position", [{"class": "square", "count": 1},
                              {"class": "circle", "count": 1, "position": ["above", 0]}])
    ok, reason, _ = evaluate_image([square, det("circle", (2, 30, 10, 38))], above)
    assert not ok and reason == "expected circle above target, found left of and below target"
    # a third, lower-scored circle is not among the top-2 and is ignored
    left[1] = det("circle", (2, 12, 10, 20), 0.8)
    assert evaluate_image([square, *left, det("circle", (50, 50, 58, 58), 0.5)], m)[0]


# ------------------------------------------------------------------------------------------------ aggregation


def rows_from(spec: list[tuple[str, str, list[bool]]]) -> list[dict]:
    rows = []
    for tag, prompt, results in spec:
        m = json.dumps({"tag": tag, "prompt": prompt})
        rows += [{"tag": tag, "prompt": prompt, "metadata": m, "correct": c} for c in results]
    return rows


def test_summary_is_an_unweighted_task_mean_and_prompts_use_any():
    rows = rows_from([("single_object", "a", [True, True]), ("single_object", "b", [True, True]),
                      ("counting", "c", [True, False, False, False]), ("counting", "d", [False, True, False, False])])
    s = summarize(rows)
    assert s["tasks"] == {"single_object": 1.0, "counting": 0.25}
    assert s["overall"] == pytest.approx(0.625)  # image-weighted would be 6/12 = 0.5
    assert s["images"] == pytest.approx(0.5)
    assert s["prompts"] == 1.0  # every prompt has at least one correct image
    table = per_prompt_scores(rows)
    assert table["prompt"].tolist() == ["a", "b", "c", "d"]
    assert table["correct"].tolist() == [1.0, 1.0, 0.25, 0.25]
    assert table["n_images"].tolist() == [2, 2, 4, 4]


def test_bootstrap_resamples_prompts_within_tasks():
    # one prompt per task: a stratified prompt bootstrap can only redraw the same prompts -> zero-width CI
    rows = rows_from([("single_object", "a", [True, False]), ("counting", "c", [True, False, False, False])])
    lo, hi = geneval_bootstrap(rows, n_resamples=200)
    assert lo == hi == pytest.approx((0.5 + 0.25) / 2)
    rows = rows_from([("single_object", f"p{i}", [i % 3 == 0, True]) for i in range(30)]
                     + [("counting", f"q{i}", [i % 2 == 0]) for i in range(30)])
    point = summarize(rows)["overall"]
    lo, hi = geneval_bootstrap(rows, n_resamples=500, seed=3)
    assert lo < point < hi and hi - lo < 0.3
    assert geneval_bootstrap(rows, n_resamples=500, seed=3) == (lo, hi)


# ------------------------------------------------------------------------------------------------ options / registry


def test_options_parse_and_reject_unknown_keys():
    opts = GenevalOptions.from_mapping(parse_options(["threshold=0.5", "max_objects=4"]))
    assert opts.threshold == 0.5 and opts.max_objects == 4 and opts.counting_threshold == 0.9
    with pytest.raises(ValueError, match="valid:.*counting_threshold"):
        GenevalOptions.from_mapping({"treshold": "0.5"})
    with pytest.raises(ValueError, match="key=value"):
        parse_options(["threshold"])
    with pytest.raises(ValueError, match="max_overlap"):
        GenevalOptions(max_overlap=0.0)


def test_detector_registry():
    assert "shapes" in DETECTORS
    with pytest.raises(ValueError, match=r"unknown detector 'mmdet2'; valid: \['hf-mask2former', 'mmdet', 'shapes'\]"):
        get_detector("mmdet2")
