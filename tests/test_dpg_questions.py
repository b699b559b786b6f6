"""DPG-style questions from scene graphs: exact rows, CSV format, and oracle answers on clean and edited renders."""

from __future__ import annotations

import csv
import dataclasses
import re

import numpy as np
import pytest

from world.descriptions import describe
from world.detector import detect_shapes
from world.dpg_questions import (
    CSV_COLUMNS,
    answer_question,
    make_dpg_prompt_set,
    questions_for_scene,
    write_dpg_questions_csv,
)
from world.scene import Obj, Scene, render, sample_scene
from world.vocab import ALL_TOKENS

# red circle top left, blue square top right, green triangle bottom left (relations hand-derived below)
SCENE = Scene((Obj("circle", "red", 6, 6, 4), Obj("square", "blue", 25, 6, 4), Obj("triangle", "green", 6, 25, 4)),
              32)


def test_rows_hand_example() -> None:
    rows = questions_for_scene("shapes7", SCENE, "txt")
    assert [tuple(r) for r in rows] == [CSV_COLUMNS] * len(rows)
    got = [(r["proposition_id"], r["dependency"], r["tuple"], r["question_natural_language"]) for r in rows]
    # square centre (25,6) vs circle (6,6): offset 19 -> right; triangle (6,25) straight below circle;
    # square vs triangle: offset (19,-19), revised (18.2,-18.2)/26.9 = (0.68,-0.68) -> right of AND above
    assert got == [
        (1, "0", "entity - whole (circle)", "Is there a circle?"),
        (2, "0", "entity - whole (square)", "Is there a square?"),
        (3, "0", "entity - whole (triangle)", "Is there a triangle?"),
        (4, "1", "attribute - color (circle, red)", "Is the circle red?"),
        (5, "2", "attribute - color (square, blue)", "Is the square blue?"),
        (6, "3", "attribute - color (triangle, green)", "Is the triangle green?"),
        (7, "0", "other - count (object, ==3)", "Are there exactly three objects?"),
        (8, "1,2", "relation - spatial (red circle, blue square, left of)",
         "Is the red circle left of the blue square?"),
        (9, "1,3", "relation - spatial (red circle, green triangle, above)",
         "Is the red circle above the green triangle?"),
        (10, "2,3", "relation - spatial (blue square, green triangle, right of)",
         "Is the blue square right of the green triangle?"),
        (11, "2,3", "relation - spatial (blue square, green triangle, above)",
         "Is the blue square above the green triangle?"),
    ]
    assert {r["category_broad"] + " - " + r["category_detailed"] for r in rows} == {
        "entity - whole", "attribute - color", "other - count", "relation - spatial"}
    assert all(r["tuple"].startswith(r["category_broad"] + " - " + r["category_detailed"] + " (") for r in rows)


def test_duplicate_groups_get_counts_and_no_ambiguous_relations() -> None:
    scene = Scene((Obj("circle", "red", 5, 5, 4), Obj("circle", "red", 26, 5, 4), Obj("circle", "blue", 5, 26, 4),
                   Obj("square", "white", 26, 26, 4)), 32)
    rows = questions_for_scene("dup", scene, describe(scene))
    by_tuple = {r["tuple"]: r for r in rows}
    assert by_tuple["attribute - color (circle, red)"]["question_natural_language"] == "Is one of the circles red?"
    assert by_tuple["other - count (circle, ==3)"]["dependency"] == "1"
    red2 = by_tuple["other - count (red circle, ==2)"]
    assert red2["question_natural_language"] == "Are there exactly two red circles?"
    assert red2["dependency"] == f"1,{by_tuple['attribute - color (circle, red)']['proposition_id']}"
    rel = [r["tuple"] for r in rows if r["category_broad"] == "relation"]
    assert rel and all("red circle" not in t for t in rel)  # two red circles: never named as "the red circle"
    assert "relation - spatial (blue circle, white square, left of)" in rel


@pytest.mark.parametrize("size", [32, 64])
def test_clean_renders_answer_every_question_true(size: int) -> None:
    items = make_dpg_prompt_set(150, seed=size, size=size)
    n_q = 0
    for item_id, scene, text in items:
        dets = detect_shapes(render(scene))
        rows = questions_for_scene(item_id, scene, text)
        for r in rows:
            n_q += 1
            assert answer_question(r, dets), (r["tuple"], scene)
            parents = [int(p) for p in r["dependency"].split(",")]
            assert all(0 <= p < r["proposition_id"] for p in parents)  # parents precede children
    assert n_q > 1000


def test_edited_renders_break_the_right_questions() -> None:
    rows = questions_for_scene("e", SCENE, describe(SCENE))
    recoloured = Scene((dataclasses.replace(SCENE.objects[0], color="yellow"),) + SCENE.objects[1:], 32)
    answers = {r["tuple"]: answer_question(r, detect_shapes(render(recoloured))) for r in rows}
    false = {t for t, a in answers.items() if not a}
    assert false == {"attribute - color (circle, red)", "relation - spatial (red circle, blue square, left of)",
                     "relation - spatial (red circle, green triangle, above)"}
    removed = Scene((SCENE.objects[0], SCENE.objects[2]), 32)  # the blue square is gone
    answers = {r["tuple"]: answer_question(r, detect_shapes(render(removed))) for r in rows}
    false = {t for t, a in answers.items() if not a}
    assert false == {"entity - whole (square)", "attribute - color (square, blue)", "other - count (object, ==3)",
                     "relation - spatial (red circle, blue square, left of)",
                     "relation - spatial (blue square, green triangle, right of)",
                     "relation - spatial (blue square, green triangle, above)"}
    moved = Scene((SCENE.objects[0], dataclasses.replace(SCENE.objects[1], cx=6, cy=15), SCENE.objects[2]), 32)
    # square now below the circle, between it and the triangle: "left of" must fail
    rel = next(r for r in rows if r["tuple"] == "relation - spatial (red circle, blue square, left of)")
    assert not answer_question(rel, detect_shapes(render(moved)))
    # min_score drops low-confidence detections
    entity = rows[0]
    assert not answer_question(entity, detect_shapes(render(SCENE)), min_score=1.01)


def test_csv_format(tmp_path) -> None:
    items = make_dpg_prompt_set(5, seed=0)
    assert [i for i, _, _ in items] == [f"shapes{k}" for k in range(5)]
    assert all(2 <= len(s.objects) <= 4 and t == describe(s) for _, s, t in items)
    rows = write_dpg_questions_csv(tmp_path / "q.csv", items)
    with open(tmp_path / "q.csv", newline="") as fp:
        reader = csv.reader(fp)
        header = next(reader)
        body = list(reader)
    assert tuple(header) == CSV_COLUMNS
    assert len(body) == len(rows)
    assert [b[0] for b in body] == sorted((b[0] for b in body), key=lambda s: int(s[6:]))  # contiguous items
    for b, r in zip(body, rows, strict=True):
        assert b == [str(r[c]) for c in CSV_COLUMNS]
        assert re.fullmatch(r"\d+(,\d+)*", b[4])
    with pytest.raises(ValueError, match="unique"):
        write_dpg_questions_csv(tmp_path / "x.csv", items[:1] * 2)


def test_questions_in_vocab_and_bad_rows_raise() -> None:
    vocab = set(ALL_TOKENS)
    rng = np.random.default_rng(1)
    words = set()
    for i in range(200):
        scene = sample_scene(rng, 32)
        for r in questions_for_scene(f"s{i}", scene, describe(scene)):
            words |= set(re.findall(r"[A-Za-z0-9]+|[^\sA-Za-z0-9]", r["question_natural_language"].lower()))
    assert not words - vocab, sorted(words - vocab)
    with pytest.raises(ValueError, match="supported"):
        answer_question({"tuple": "attribute - texture (circle, rough)"}, [])
    with pytest.raises(ValueError, match="parse"):
        answer_question({"tuple": "Is there a circle?"}, [])
    with pytest.raises(ValueError, match="'.'"):
        questions_for_scene("a.png", SCENE, "")
