"""Caches that cannot mix: a resume under another judge is refused (before that judge loads), a changed image is
judged again, rows of an unrecorded judge are refused; DPG judgments and GenAI-Bench scores alike."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from evals import cache, dpg_refined, genai_bench
from evals.dpg_refined import load_questions, read_judgments
from evals.images import grid_2x2, save_png
from evals.judges import OracleJudge
from world.dpg_questions import make_dpg_prompt_set, write_dpg_questions_csv
from world.scene import render


@pytest.fixture()
def dpg_bench(tmp_path: Path) -> tuple[Path, Path, list]:
    items = make_dpg_prompt_set(3, seed=2)
    csv_path = tmp_path / "q.csv"
    write_dpg_questions_csv(csv_path, items)
    folder = tmp_path / "images"
    for item_id, scene, _ in items:
        save_png(grid_2x2([render(scene)] * 4), folder / f"{item_id}.png")
    return csv_path, folder, items


class CountingOracle(OracleJudge):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.asked: list[str] = []

    def judge(self, requests):
        self.asked += [r.item_id for r in requests]
        return super().judge(requests)


def test_dpg_changed_image_is_judged_again(dpg_bench, tmp_path: Path, capsys) -> None:
    csv_path, folder, items = dpg_bench
    questions = load_questions(csv_path)
    out = tmp_path / "out"
    first = dpg_refined.run(folder, questions, CountingOracle(), out, n_resamples=20, progress=False)
    assert first["fixed"]["micro_avg"] == 1.0  # clean renders: every answer right
    rows = read_judgments(out / "judgments.jsonl")
    fp = cache.fingerprint({"judge": "oracle", "size_hint": None})
    assert {r["judge"] for r in rows} == {fp}
    assert {r["image"] for r in rows if r["item_id"] == items[0][0]} == {cache.file_digest(folder /
                                                                                        f"{items[0][0]}.png")}
    # regenerate one item's images (blank canvases) into the same folder
    changed = items[1][0]
    save_png(np.full((64, 64, 3), 128, np.uint8), folder / f"{changed}.png")
    judge = CountingOracle()
    second = dpg_refined.run(folder, questions, judge, out, n_resamples=20, progress=False)
    n_changed = 4 * sum(q.item_id == changed for q in questions)
    assert judge.asked == [changed] * n_changed  # only the changed item, all its tiles and questions
    assert second["counts"]["rejudged_changed_images"] == n_changed
    assert second["counts"]["judgments"] == first["counts"]["judgments"]  # replaced, not duplicated
    assert second["fixed"]["micro_avg"] < 1.0  # the new, blank images are what got scored
    assert "judging them again" in capsys.readouterr().err


def test_dpg_resume_under_another_judge_is_refused_before_it_loads(dpg_bench, tmp_path: Path, capsys,
                                                                   monkeypatch) -> None:
    csv_path, folder, _ = dpg_bench
    out = tmp_path / "out"
    base = ["--images", str(folder), "--prompt-file", str(csv_path), "--out", str(out), "--n-resamples", "10"]
    dpg_refined.main([*base, "--judge", "oracle"])
    before = (out / "judgments.jsonl").read_bytes()
    capsys.readouterr()
    import evals.runtime

    def loaded(*args, **kwargs):
        raise AssertionError("the judge loaded before the cache was checked")

    monkeypatch.setattr(evals.runtime, "from_pretrained", loaded)
    monkeypatch.setattr(evals.runtime, "processor_from_pretrained", loaded)
    for other in (["--judge", "oracle", "--size-hint", "64"], ["--judge", "gemma-3-12b-it"],
                  ["--judge", "hf", "--judge-model", "google/gemma-3-27b-it", "--judge-mode", "direct"]):
        with pytest.raises(SystemExit) as exit_:
            dpg_refined.main([*base, *other])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code == 2 and len(err) == 1
        assert "holds the judgments.jsonl of judge oracle" in err[0] and "use another --out" in err[0]
    assert (out / "judgments.jsonl").read_bytes() == before  # nothing appended, nothing dropped
    # the preset name and its hub id are the same judge
    assert cache.fingerprint(dpg_refined._judge_spec(dpg_refined._parser().parse_args(
        ["judge", *base, "--judge", "gemma-3-27b-it"]))[2]) == cache.fingerprint(dpg_refined._judge_spec(
            dpg_refined._parser().parse_args(["judge", *base, "--judge", "hf", "--judge-model",
                                              "google/gemma-3-27b-it"]))[2])


def test_rows_of_an_unrecorded_judge_are_refused(dpg_bench, tmp_path: Path) -> None:
    csv_path, folder, _ = dpg_bench
    out = tmp_path / "out"
    out.mkdir()
    legacy = {"item_id": "shapes0", "image_index": 0, "proposition_id": 1, "answer": "yes", "raw": "yes"}
    (out / "judgments.jsonl").write_text(json.dumps(legacy) + "\n")
    with pytest.raises(ValueError, match="rows of an unrecorded judge"):
        dpg_refined.run(folder, load_questions(csv_path), OracleJudge(), out, progress=False)


def test_the_instance_identity_is_the_one_checked_before_loading(tmp_path: Path) -> None:
    """The CLI checks the identity it derives from the flags; the built judge must write the same fingerprint."""
    from evals.tiny_models import tiny_gemma3
    from evals.vqascore import HFVQAScore

    args = dpg_refined._parser().parse_args(["judge", "--images", "d", "--judge", "hf", "--judge-model", "tiny",
                                             "--judge-mode", "direct", "--out", "o"])
    _, kwargs, identity = dpg_refined._judge_spec(args)
    model, proc = tiny_gemma3()
    from evals.judges import HFJudge

    built = HFJudge(model_id="tiny", mode="direct", model=model, processor=proc)
    assert cache.fingerprint(built.identity) == cache.fingerprint(identity)
    a = genai_bench.parser().parse_args(["--images", "d", "--judge", "hf", "--judge-model", "tiny", "--out", "o"])
    scorer = HFVQAScore(model_id="tiny", model=model, processor=proc)
    assert cache.fingerprint(scorer.identity) == cache.fingerprint(genai_bench.scorer_spec(a)[2])
    a = genai_bench.parser().parse_args(["--images", "d", "--out", "o"])
    assert genai_bench.scorer_spec(a)[2]["model"] == "zhiqiulin/clip-flant5-xxl"


class PixelScorer:
    """score = mean pixel / 255, so a re-score of a changed image shows in the number."""

    name = "pixels"
    batch_size = 4

    def __init__(self) -> None:
        self.seen: list[str] = []

    def score(self, images, texts):
        self.seen += list(texts)
        return torch.tensor([float(np.asarray(im).mean() / 255) for im in images])


def test_genai_changed_image_is_rescored_and_other_judge_refused(tmp_path: Path, capsys, monkeypatch) -> None:
    data, images, out = tmp_path / "data", tmp_path / "images", tmp_path / "out"
    data.mkdir()
    (data / "genai_image.json").write_text(json.dumps({f"{i:05d}": {"prompt": f"p{i}"} for i in range(4)}))
    (data / "genai_skills.json").write_text(json.dumps({"basic": [0, 1], "advanced": [2, 3]}))
    for i in range(4):
        save_png(np.full((8, 8, 3), 40 * i, np.uint8), images / f"{i:05d}.png")
    first = genai_bench.run(images, PixelScorer(), out, data, n_resamples=10, progress=False)
    save_png(np.full((8, 8, 3), 255, np.uint8), images / "00002.png")  # regenerated
    scorer = PixelScorer()
    second = genai_bench.run(images, scorer, out, data, n_resamples=10, progress=False)
    assert scorer.seen == ["p2"] and second["counts"]["rescored_changed_images"] == 1
    assert second["advanced"]["mean"] == pytest.approx((1.0 + 120 / 255) / 2)
    assert first["basic"]["mean"] == second["basic"]["mean"]
    rows = genai_bench.read_rows(out / "scores.jsonl")
    assert len(rows) == 4 and {r["image"] for r in rows if r["index"] == 2} == {
        cache.file_digest(images / "00002.png")}
    assert "scoring them again" in capsys.readouterr().err
    # the CLI refuses another judge on this cache before loading it (the weights do not even exist)
    with pytest.raises(SystemExit) as exit_:
        genai_bench.main(["--images", str(images), "--prompt-file", str(data), "--judge", "hf", "--judge-model",
                          str(tmp_path / "no-such-model"), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and "holds the scores.jsonl of judge pixels" in err[0]


def test_revision_change_is_refused(tmp_path: Path) -> None:
    identity = {"judge": "hf", "model": "org/m", "mode": "cot", "template": "t", "revision": "aaa"}
    cache.check_judge(tmp_path, identity)
    cache.confirm_revision(tmp_path, identity)
    assert json.loads((tmp_path / cache.JUDGE_FILE).read_text())["identity"]["revision"] == "aaa"
    with pytest.raises(ValueError, match="at revision aaa, now revision bbb"):
        cache.confirm_revision(tmp_path, {**identity, "revision": "bbb"})
    assert cache.fingerprint(identity) == cache.fingerprint({**identity, "revision": "bbb"})
    assert cache.fingerprint(identity) != cache.fingerprint({**identity, "mode": "direct"})


def test_image_digest_is_of_the_file_content(tmp_path: Path) -> None:
    import hashlib

    Image.new("RGB", (4, 4), "red").save(tmp_path / "a.png")
    assert cache.file_digest(tmp_path / "a.png") == hashlib.sha256((tmp_path / "a.png").read_bytes()).hexdigest()[:16]
