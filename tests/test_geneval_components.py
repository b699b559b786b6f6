"""Where a GenEval sample fails: the component outcomes on hand-built detections, and their shares."""

from __future__ import annotations

import pytest

from evals.detectors import Detection
from evals.geneval import component_outcomes, component_shares, evaluate_image


def det(cls: str, box=(0, 0, 9, 9), color: str = "red", score: float = 1.0) -> Detection:
    return Detection(cls, tuple(float(v) for v in box), score, None, color)


def meta(tag: str, include: list[dict], exclude: list[dict] | None = None) -> dict:
    return {"tag": tag, "include": include, "exclude": exclude or [], "prompt": "p"}


TWO_BLUE = meta("counting", [{"class": "square", "count": 2, "color": "blue"}], [{"class": "square", "count": 3}])
RED_LEFT_OF_SQUARE = meta("color_attr", [{"class": "square", "count": 1},
                                         {"class": "circle", "count": 1, "color": "red", "position": ["left of", 0]}])
LEFT, RIGHT = (0, 10, 8, 18), (20, 10, 28, 18)


@pytest.mark.parametrize(("dets", "m", "want"), [
    # nothing kept (a low score is thresholded away): not drawn, the conditional parts do not apply
    ([det("square", score=0.1)], TWO_BLUE, {"drawn": False, "shape": None, "color": False, "count": None,
                                            "position": None}),
    # blue is there but on a circle, the square is missing: colour follows, shape does not
    ([det("circle", color="blue")], TWO_BLUE, {"drawn": True, "shape": False, "color": True, "count": None,
                                               "position": None}),
    # one blue square of two: shape and colour right, count wrong
    ([det("square", color="blue")], TWO_BLUE, {"drawn": True, "shape": True, "color": True, "count": False,
                                               "position": None}),
    # three squares: the exclude bound (fewer than 3) makes the count wrong
    ([det("square", color="blue")] * 3, TWO_BLUE, {"drawn": True, "shape": True, "color": True, "count": False,
                                                   "position": None}),
    ([det("square", color="blue")] * 2, TWO_BLUE, {"drawn": True, "shape": True, "color": True, "count": True,
                                                   "position": None}),
    # the red circle right of the square: everything but the relation
    ([det("square", LEFT, "green"), det("circle", RIGHT, "red")], RED_LEFT_OF_SQUARE,
     {"drawn": True, "shape": True, "color": True, "count": None, "position": False}),
    ([det("square", RIGHT, "green"), det("circle", LEFT, "green")], RED_LEFT_OF_SQUARE,
     {"drawn": True, "shape": True, "color": False, "count": None, "position": True}),
])
def test_component_outcomes_by_hand(dets, m, want) -> None:
    assert component_outcomes(dets, m) == want


def test_a_correct_image_passes_every_component_that_applies() -> None:
    dets = [det("square", RIGHT, "green"), det("circle", LEFT, "red")]
    assert evaluate_image(dets, RED_LEFT_OF_SQUARE)[0]
    comps = component_outcomes(dets, RED_LEFT_OF_SQUARE)
    assert all(v for v in comps.values() if v is not None)


def test_component_shares_count_only_the_images_where_a_component_applies() -> None:
    rows = [{"tag": "counting", "components": {"drawn": True, "shape": True, "color": True, "count": False,
                                               "position": None}},
            {"tag": "counting", "components": {"drawn": False, "shape": None, "color": False, "count": None,
                                               "position": None}},
            {"tag": "position", "components": {"drawn": True, "shape": True, "color": None, "count": None,
                                               "position": True}}]
    df = component_shares(rows).set_index(["task", "component"])
    assert df.loc[("all", "drawn"), "value"] == pytest.approx(2 / 3) and df.loc[("all", "drawn"), "n"] == 3
    assert df.loc[("all", "color"), "value"] == 0.5 and df.loc[("all", "color"), "n"] == 2
    assert df.loc[("counting", "count"), "value"] == 0.0 and df.loc[("counting", "count"), "n"] == 1
    assert df.loc[("position", "position"), "value"] == 1.0
    assert ("position", "color") not in df.index  # never applies there: left out, not a 0
    with pytest.raises(ValueError, match="no component outcomes"):
        component_shares([{"tag": "counting", "filename": "x.png"}])


def test_clean_renders_pass_every_component_and_another_prompts_render_fails_some(tmp_path) -> None:
    """Exact renders of the shapes world satisfy their prompts, so every component that applies passes (the detector
    is exact on clean renders); the same images under shuffled prompts fail components."""
    import json

    from evals.geneval import evaluate_folder
    from world.prompts import render_geneval_folder, write_geneval_metadata

    metadata = write_geneval_metadata(tmp_path / "meta.jsonl", n_per_task=4, seed=3)
    render_geneval_folder(metadata, tmp_path / "ok", n_samples=1)
    rows, summary = evaluate_folder(tmp_path / "ok", out_dir=tmp_path / "ok_scores")
    assert summary["overall"] == 1.0
    assert all(v["value"] == 1.0 for v in summary["components"].values()), summary["components"]
    lines = (tmp_path / "ok_scores" / "items.jsonl").read_text().splitlines()
    assert len(lines) == len(rows) and json.loads(lines[0])["filename"] == rows[0]["filename"]
    # the renders of the next prompt under each prompt: some components must now fail
    render_geneval_folder(metadata[1:] + metadata[:1], tmp_path / "shuffled", n_samples=1)
    for i, meta in enumerate(metadata):
        (tmp_path / "shuffled" / f"{i:05d}" / "metadata.jsonl").write_text(json.dumps(meta))
    _, mixed = evaluate_folder(tmp_path / "shuffled")
    assert mixed["components"]["drawn"]["value"] == 1.0  # something is drawn ...
    assert mixed["components"]["shape"]["value"] < 1.0 and mixed["components"]["color"]["value"] < 1.0  # ... wrong
