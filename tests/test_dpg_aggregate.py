"""Refined DPG-Bench aggregation against hand-computed values: a worked example (prompts 226 and vrd19), the
official script's bugs (last-tile categories, first CSV row, one-pass dependencies), best-of-n ties, missing images,
null answers, bootstrap CIs, report files and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from common.stats import bootstrap_ci
from evals.dpg_refined import (
    Question,
    aggregate,
    dependency_order,
    legacy_scores,
    load_questions,
    main,
    post_dependency,
    questions_from_rows,
    read_judgments,
)

FIXTURE = Path(__file__).parent / "fixtures" / "dpg" / "worked_example.csv"
# the worked example: the questions answered "no" per (item, tile); every other answer is "yes"
NOES = {("226", 0): {6}, ("226", 1): {1, 6}, ("226", 2): set(), ("226", 3): {3, 10},
        ("vrd19", 0): {9}, ("vrd19", 1): {9}, ("vrd19", 2): {3, 9}, ("vrd19", 3): set()}


def worked_judgments() -> list[dict]:
    return [{"item_id": item, "image_index": k, "proposition_id": pid, "answer": "no" if pid in no else "yes",
             "raw": ""} for (item, k), no in NOES.items() for pid in range(1, 11)]


def q(item: str, pid: int, dep: str = "0", cat: str = "entity - whole", text: str = "?") -> dict:
    broad, detailed = (s.strip() for s in cat.split("-"))
    return {"item_id": item, "text": "t", "keywords": "", "proposition_id": pid, "dependency": dep,
            "category_broad": broad, "category_detailed": detailed, "tuple": f"{cat} (x)",
            "question_natural_language": text}


def judged(answers: dict[tuple[str, int, int], str | None]) -> list[dict]:
    return [{"item_id": i, "image_index": k, "proposition_id": p, "answer": a, "raw": str(a)}
            for (i, k, p), a in answers.items()]


SENTINEL = q("first", 1)  # a first CSV row whose loss (official bug) touches nothing else


def test_worked_example_fixed_matches_notes() -> None:
    scores, rows = aggregate(load_questions(FIXTURE), worked_judgments(), n_resamples=200)
    fixed = scores["fixed"]
    assert fixed["micro_avg"] == pytest.approx(0.7875)  # (0.75 + 0.825) / 2
    assert [r["avg"] for r in rows] == pytest.approx([0.75, 0.825])
    tiles = [r[f"image_{k}"] for r in rows for k in range(4)]
    assert tiles == pytest.approx([.9, .5, 1., .6, .9, .9, .5, 1.])
    expect = {"entity": 33 / 40, "attribute": 25 / 32, "relation": 5 / 8, "entity - whole": 25 / 28,
              "entity - state": 8 / 12, "attribute - color": 6 / 8, "attribute - texture": 12 / 16,
              "attribute - shape": 3 / 4, "attribute - other": 4 / 4, "relation - spatial": 5 / 8}
    assert fixed["categories"] == pytest.approx(expect)
    assert list(fixed["categories"])[:3] == ["entity", "attribute", "relation"]
    assert fixed["macro_avg"] == pytest.approx((33 / 40 + 25 / 32 + 5 / 8) / 3)
    # best of 4: 226 -> tile 2 (1.0), vrd19 -> tile 3 (1.0); every question passes there
    assert [r["best_index"] for r in rows] == [2, 3]
    assert scores["best_of_n"]["micro_avg"] == 1.0
    assert all(v == 1.0 for v in scores["best_of_n"]["categories"].values())
    assert scores["counts"] == {"prompts": 2, "images": 8, "judgments": 80, "unparsed": 0, "missing_images": 0,
                                "missing_judgments": 0, "scored": 8, "failed": 0, "partial": 0}


def test_worked_example_official_numbers() -> None:
    """With some other row first in the CSV, legacy = the official 78.75 and its last-tile raw categories."""
    questions = questions_from_rows([SENTINEL]) + load_questions(FIXTURE)
    answers = {(j["item_id"], j["image_index"], j["proposition_id"]): j["answer"] for j in worked_judgments()}
    legacy, per_item = legacy_scores(questions, answers, 4, {"226", "vrd19"})
    assert legacy["overall"] == pytest.approx(0.7875)
    assert per_item == pytest.approx({"226": 0.75, "vrd19": 0.825})
    expect = {"entity": 9 / 10, "attribute": 8 / 8, "relation": 1 / 2, "entity - whole": 6 / 7,
              "entity - state": 1.0, "attribute - color": 1.0, "attribute - texture": 1.0, "attribute - shape": 1.0,
              "attribute - other": 1.0, "relation - spatial": 1 / 2}
    assert legacy["categories"] == pytest.approx(expect)


def test_first_row_bug_drops_the_item_when_a_question_depends_on_it() -> None:
    # In the fixture itself 226/q1 is the first row and q4, q6, q8, q10 depend on it: the official KeyError drops 226
    scores, rows = aggregate(load_questions(FIXTURE), worked_judgments(), n_resamples=50)
    assert scores["legacy"]["overall"] == pytest.approx(0.825)
    assert [r["legacy_included"] for r in rows] == [False, True]
    assert all(v == 1.0 for v in scores["legacy"]["categories"].values())  # vrd19's last tile is all yes
    assert scores["fixed"]["micro_avg"] == pytest.approx(0.7875)  # fixed mode scores every prompt


def test_first_row_without_dependents_is_just_skipped() -> None:
    # first item: q1 (answered no) is lost; q2 (yes) remains -> legacy 1.0, fixed 0.5
    questions = questions_from_rows([q("p97", 1), q("p97", 2, cat="attribute - color")])
    scores, rows = aggregate(questions, judged({("p97", 0, 1): "no", ("p97", 0, 2): "yes"}), n_resamples=50)
    assert scores["fixed"]["micro_avg"] == 0.5
    assert scores["legacy"]["overall"] == 1.0
    assert scores["legacy"]["categories"] == {"attribute": 1.0, "attribute - color": 1.0}


def test_category_names_from_tuple() -> None:
    rows = [q("g", 1, cat="global - x"), q("g", 2)]
    rows[0]["tuple"], rows[1]["tuple"] = "global - (sunny scene)", "global (no dash)"
    scores, _ = aggregate(questions_from_rows([SENTINEL] + rows),
                          judged({("first", 0, 1): "yes", ("g", 0, 1): "yes", ("g", 0, 2): "no"}), n_resamples=20)
    assert scores["fixed"]["categories"] == {"entity": 1.0, "global": 0.5, "entity - whole": 1.0, "global -": 1.0}
    assert scores["fixed"]["macro_avg"] == 0.75


def test_official_parent_loop_stops_at_first_zero_parent() -> None:
    # q3 depends on "2,1" where 1 is the dropped first row; q2 = no -> the loop breaks before the KeyError
    questions = questions_from_rows([q("a", 1), q("a", 2), q("a", 3, "2,1")])
    ans = {("a", 0, 1): "yes", ("a", 0, 2): "no", ("a", 0, 3): "yes"}
    scores, rows = aggregate(questions, judged(ans), n_resamples=20)
    assert rows[0]["legacy_included"] and scores["legacy"]["overall"] == 0.0
    ans[("a", 0, 2)] = "yes"  # now the loop reaches parent 1 -> KeyError -> item dropped
    scores, rows = aggregate(questions, judged(ans), n_resamples=20)
    assert not rows[0]["legacy_included"] and scores["legacy"]["overall"] is None


def test_child_listed_before_parent_fixed_vs_legacy() -> None:
    # chain 1 -> 2 -> 3, CSV order 3, 2, 1; q1 = no. Fixed zeroes the whole chain; the official one pass in CSV
    # order checks q3's parent q2 before q2 is zeroed, so q3 survives: 1/3.
    questions = questions_from_rows([SENTINEL, q("x", 3, "2", "attribute - color"), q("x", 2, "1", "entity - part"),
                                     q("x", 1)])
    ans = {("first", 0, 1): "yes", ("x", 0, 1): "no", ("x", 0, 2): "yes", ("x", 0, 3): "yes"}
    scores, rows = aggregate(questions, judged(ans), n_resamples=50)
    assert [r["avg"] for r in rows] == [1.0, 0.0]
    assert scores["fixed"]["micro_avg"] == 0.5
    assert scores["legacy"]["overall"] == pytest.approx(1 / 3)  # "first" lost its only row: not scored
    assert scores["fixed"]["categories"]["attribute"] == 0.0
    assert scores["legacy"]["categories"]["attribute"] == 1.0  # raw answer, no dependency rule


def test_post_dependency_is_transitive_and_order_free() -> None:
    qs = questions_from_rows([q("x", 4, "3"), q("x", 3, "2"), q("x", 1), q("x", 2, "1")])
    order = dependency_order(qs)
    assert [x.proposition_id for x in order] == [1, 2, 3, 4]
    assert post_dependency({1: 0.0, 2: 1.0, 3: 1.0, 4: 1.0}, order) == {1: 0, 2: 0, 3: 0, 4: 0}
    assert post_dependency({1: 1.0, 2: 1.0, 3: 0.0, 4: 1.0}, order) == {1: 1, 2: 1, 3: 0, 4: 0}
    with pytest.raises(ValueError, match="cycle"):
        dependency_order(questions_from_rows([q("x", 1, "2"), q("x", 2, "1")]))


def test_last_image_category_bug() -> None:
    # image 0 perfect, image 1: entity no, attribute (child) yes
    questions = questions_from_rows([SENTINEL, q("x", 1), q("x", 2, "1", "attribute - color")])
    ans = {("first", 0, 1): "yes", ("first", 1, 1): "yes", ("x", 0, 1): "yes", ("x", 0, 2): "yes",
           ("x", 1, 1): "no", ("x", 1, 2): "yes"}
    scores, _ = aggregate(questions, judged(ans), n_resamples=50)
    assert scores["fixed"]["categories"]["entity"] == pytest.approx(3 / 4)  # first x2 + x (1, 0)
    assert scores["fixed"]["categories"]["attribute"] == 0.5
    assert scores["legacy"]["categories"]["entity"] == 0.0  # last tile, raw
    assert scores["legacy"]["categories"]["attribute"] == 1.0
    # swap the images: the official categories flip to perfect although nothing else changed
    swapped = {(i, 1 - k, p): a for (i, k, p), a in ans.items()}
    s2, _ = aggregate(questions, judged(swapped), n_resamples=50)
    assert s2["legacy"]["categories"]["entity"] == 1.0 and s2["legacy"]["categories"]["attribute"] == 1.0
    assert s2["fixed"]["categories"] == scores["fixed"]["categories"]


def test_best_of_n_ties_take_lowest_index() -> None:
    questions = questions_from_rows([q("x", 1), q("x", 2, cat="attribute - color")])
    pattern = {0: ("no", "no"), 1: ("yes", "no"), 2: ("no", "yes"), 3: ("no", "no")}
    ans = {("x", k, p): pattern[k][p - 1] for k in range(4) for p in (1, 2)}
    scores, rows = aggregate(questions, judged(ans), n_resamples=20)
    assert rows[0]["best_index"] == 1 and rows[0]["best"] == 0.5
    assert scores["best_of_n"]["categories"]["entity"] == 1.0
    assert scores["best_of_n"]["categories"]["attribute"] == 0.0
    assert scores["best_of_n"]["macro_avg"] == 0.5
    assert scores["fixed"]["micro_avg"] == 0.25


def test_missing_images_score_zero_and_are_counted() -> None:
    questions = questions_from_rows([SENTINEL, q("x", 1), q("x", 2)])
    ans = {("first", k, 1): "yes" for k in range(4)}
    ans.update({("x", k, p): "yes" for k in (0, 1, 3) for p in (1, 2)})  # image 2 of x missing
    ans.pop(("x", 3, 2))  # and one judgment of a judged image
    scores, rows = aggregate(questions, judged(ans), n_resamples=20)
    assert rows[1]["missing_images"] == 1
    assert [rows[1][f"image_{k}"] for k in range(4)] == [1.0, 1.0, 0.0, 0.5]
    assert scores["fixed"]["micro_avg"] == pytest.approx((1.0 + 2.5 / 4) / 2)
    assert scores["counts"]["missing_images"] == 1 and scores["counts"]["missing_judgments"] == 1
    assert scores["counts"]["images"] == 8 and scores["counts"]["prompts"] == 2
    # over the 8 images: x's image 2 is missing (failed), x's image 3 lacks a judgment (partial), 7 were judged
    assert (scores["counts"]["scored"], scores["counts"]["failed"], scores["counts"]["partial"]) == (7, 1, 1)
    assert not rows[1]["legacy_included"]  # the official script only sees files that exist
    # a prompt with no images at all is still a prompt of the benchmark (scored 0), never dropped
    s2, _ = aggregate(questions, judged({("first", 0, 1): "yes"}), n_images=1, n_resamples=20)
    assert s2["fixed"]["micro_avg"] == 0.5 and s2["counts"]["missing_images"] == 1


def test_null_answers_count_zero_and_block_children() -> None:
    questions = questions_from_rows([SENTINEL, q("x", 1), q("x", 2, "1"), q("x", 3)])
    ans = {("first", 0, 1): None, ("x", 0, 1): None, ("x", 0, 2): "yes", ("x", 0, 3): "yes"}
    scores, rows = aggregate(questions, judged(ans), n_resamples=20)
    assert [r["avg"] for r in rows] == pytest.approx([0.0, 1 / 3])
    assert scores["counts"]["unparsed"] == 2 and [r["unparsed"] for r in rows] == [1, 1]
    # one image per prompt (the most any prompt has), each holding an unparsed answer: both scored, both partly
    assert (scores["counts"]["scored"], scores["counts"]["failed"], scores["counts"]["partial"]) == (2, 0, 2)


def test_non_contiguous_rows_group_by_item_but_legacy_keeps_last_run() -> None:
    questions = questions_from_rows([SENTINEL, q("a", 1), q("b", 1), q("a", 2)])
    ans = {("first", 0, 1): "yes", ("a", 0, 1): "no", ("a", 0, 2): "yes", ("b", 0, 1): "yes"}
    scores, rows = aggregate(questions, judged(ans), n_resamples=20)
    assert {r["item_id"]: r["avg"] for r in rows} == {"first": 1.0, "a": 0.5, "b": 1.0}
    assert {r["item_id"]: r["legacy_score"] for r in rows}["a"] == 1.0  # official: run "a: 2" replaced "a: 1"


def test_ci95_is_a_seeded_bootstrap_over_prompts() -> None:
    rows = [q(f"p{i}", 1) for i in range(6)] + [q(f"p{i}", 2, "1", "relation - spatial") for i in range(6)]
    rng = np.random.default_rng(0)
    ans = {(f"p{i}", k, p): ("yes" if rng.random() < 0.6 else "no") for i in range(6) for k in range(2)
           for p in (1, 2)}
    scores, per = aggregate(questions_from_rows([SENTINEL] + rows), judged(ans), n_images=2, n_resamples=300,
                            seed=3)
    ci = scores["ci95"]
    avgs = np.array([r["avg"] for r in per])
    assert ci["fixed.micro_avg"] == pytest.approx(list(bootstrap_ci(avgs, np.mean, 300, 3)))
    for key in ("fixed.micro_avg", "fixed.macro_avg", "best_of_n.micro_avg", "fixed.categories.relation"):
        lo, hi = ci[key]
        point = scores[key.split(".")[0]]
        for part in key.split(".")[1:]:
            point = point[part]
        assert lo <= point <= hi
    again, _ = aggregate(questions_from_rows([SENTINEL] + rows), judged(ans), n_images=2, n_resamples=300, seed=3)
    assert again["ci95"] == ci


def test_aggregate_cli_writes_reports(tmp_path: Path) -> None:
    jpath = tmp_path / "judgments.jsonl"
    jpath.write_text("".join(json.dumps(r) + "\n" for r in worked_judgments()) + '{"item_id": "22')  # torn line
    main(["aggregate", "--prompt-file", str(FIXTURE), "--judgments", str(jpath), "--out", str(tmp_path / "o"),
          "--n-resamples", "100"])
    scores = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert scores["fixed"]["micro_avg"] == pytest.approx(0.7875)
    assert set(scores) >= {"fixed", "best_of_n", "legacy", "counts", "ci95"}
    table = (tmp_path / "o" / "table.md").read_text()
    assert "| entity | .825 | 1.000 |" in table and "| relation | .625 | 1.000 |" in table
    assert "| global | – | – |" in table
    # no judge.json beside the judgments: the aggregate does not invent one
    assert scores["judge"] == {"judge": "unrecorded"} and not (tmp_path / "o" / "judge.json").exists()
    per = [json.loads(line) for line in (tmp_path / "o" / "items.jsonl").read_text().splitlines()]
    assert [p["item_id"] for p in per] == ["226", "vrd19"] and float(per[0]["image_1"]) == 0.5
    assert not list((tmp_path / "o").glob("*.tmp"))


def test_bad_input_is_reported_clearly(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    with open(FIXTURE) as src:
        text = src.read().replace(",tuple,", ",tuple_x,", 1)
    bad.write_text(text)
    with pytest.raises(ValueError, match=r"missing column\(s\) \['tuple'\]"):
        load_questions(bad)
    questions = load_questions(FIXTURE)
    with pytest.raises(ValueError, match="unknown item_id 'nope'"):
        aggregate(questions, judged({("nope", 0, 1): "yes"}))
    with pytest.raises(ValueError, match="duplicate judgment"):
        aggregate(questions, judged({("226", 0, 1): "yes"}) * 2)
    with pytest.raises(ValueError, match="not propositions of the item"):
        aggregate(questions_from_rows([q("x", 1, "5")]), [])
    torn_middle = tmp_path / "j.jsonl"
    torn_middle.write_text('{"item_id": "2\n' + json.dumps(judged({("226", 0, 1): "yes"})[0]) + "\n")
    with pytest.raises(ValueError, match=r"j.jsonl:1: not valid JSON"):
        read_judgments(torn_middle)
    with pytest.raises(ValueError, match="answer in"):
        aggregate(questions, [{"item_id": "226", "image_index": 0, "proposition_id": 1, "answer": "Yes"}])
    assert isinstance(questions[0], Question)
