"""GenAI-Bench: the official aggregation (hand-computed), the shipped data, resumable scoring, bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from evals import genai_bench as gb

SKILLS = {"basic": [0, 1, 2], "advanced": [3, 4], "attribute": [0, 1, 3], "scene": [2], "counting": [3, 4]}
SCORES = {0: 1.0, 1: 0.5, 2: 0.0, 3: 0.25, 4: 0.75, 5: 1.0}  # prompt 5 is untagged


def test_aggregation_by_hand() -> None:
    r = gb.aggregate(SCORES, SKILLS, n_resamples=200)
    assert r["basic"]["mean"] == pytest.approx(0.5)  # plain mean over its list, (1 + .5 + 0) / 3
    assert r["advanced"]["mean"] == pytest.approx(0.5)
    assert r["skills"]["attribute"]["mean"] == pytest.approx((1 + 0.5 + 0.25) / 3)
    assert r["all"]["mean"] == pytest.approx(2.5 / 5) and r["all"]["n"] == 5  # untagged prompt 5 excluded
    assert r["untagged"] == [5]
    lo, hi = r["all"]["ci95"]
    assert 0 <= lo <= r["all"]["mean"] <= hi <= 1
    with pytest.raises(ValueError, match="1 tagged prompts have no score, e.g. indices \\[4\\]"):
        gb.aggregate({k: v for k, v in SCORES.items() if k != 4}, SKILLS)


def test_shipped_benchmark_files() -> None:
    prompts, skills = gb.load_benchmark()
    assert len(prompts) == 1600 and sorted(prompts) == list(range(1600))
    assert {t: len(v) for t, v in skills.items()}["basic"] == 722 and len(skills["advanced"]) == 871
    assert set(skills) == {"basic", "advanced", *gb.BASIC_SKILLS, *gb.ADVANCED_SKILLS}
    untagged = [719, 721, 730, 733, 739, 743, 951]
    scores = {i: float(i in untagged) for i in prompts}  # only the untagged prompts score 1
    r = gb.aggregate(scores, skills, n_resamples=50)
    assert r["untagged"] == untagged and r["all"]["n"] == 1593 and r["all"]["mean"] == 0.0


class CountingScorer:
    """A fake VQAScore backend: score = mean pixel / 255; can crash after k images (a killed run)."""

    name = "fake"
    batch_size = 2

    def __init__(self, crash_after: int | None = None) -> None:
        self.calls, self.crash_after = [], crash_after

    def score(self, images, texts):
        if self.crash_after is not None and len(self.calls) >= self.crash_after:
            raise KeyboardInterrupt
        self.calls.extend(texts)
        return torch.tensor([float(np.asarray(im).mean() / 255) for im in images])


@pytest.fixture()
def bench(tmp_path: Path) -> tuple[Path, Path]:
    data, images = tmp_path / "data", tmp_path / "images"
    data.mkdir()
    images.mkdir()
    (data / "genai_image.json").write_text(json.dumps({f"{i:05d}": {"prompt": f"p{i}"} for i in range(6)}))
    (data / "genai_skills.json").write_text(json.dumps(SKILLS))
    for i in range(6):
        ext = ".jpeg" if i % 2 else ".png"
        Image.new("RGB", (8, 8), (int(SCORES[i] * 255),) * 3).save(images / f"{i:05d}{ext}")
    return data, images


def test_run_resumes_and_labels_the_judge(bench, tmp_path: Path) -> None:
    data, images = bench
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        gb.run(images, CountingScorer(crash_after=2), out, data, progress=False)
    assert len(gb.read_rows(out / "scores.jsonl")) == 2
    scorer = CountingScorer()
    r = gb.run(images, scorer, out, data, n_resamples=100, progress=False)
    assert scorer.calls == ["p2", "p3", "p4", "p5"]  # only what was missing
    assert r["all"]["mean"] == pytest.approx(2.5 / 5, abs=0.01) and r["judge"]["judge"] == "fake"
    saved = json.loads((out / "summary.json").read_text())
    assert saved["judge"]["judge"] == "fake" and "judge: `fake`" in (out / "table.md").read_text()
    assert len((out / "scores.jsonl").read_text().splitlines()) == 6
    other = CountingScorer()
    other.name = "hf:x"
    with pytest.raises(ValueError, match="holds the scores.jsonl of judge fake, not of hf:x"):
        gb.run(images, other, out, data, progress=False)
    assert other.calls == []


def test_bad_images_are_errors(bench, tmp_path: Path, capsys) -> None:
    data, images = bench
    (images / "00003.jpeg").unlink()
    with pytest.raises(FileNotFoundError, match="1 of 6 prompts have no image .* \\['00003'\\]"):
        gb.run(images, CountingScorer(), tmp_path / "a", data, progress=False)
    (images / "00003.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match="corrupt or unreadable image: .*00003.png"):
        gb.run(images, CountingScorer(), tmp_path / "b", data, progress=False)
    with pytest.raises(SystemExit) as exit_:
        gb.main(["--images", str(images), "--model", "oracle", "--out", str(tmp_path / "c")])
    assert exit_.value.code == 2 and "scores shapes-world prompts only" in capsys.readouterr().err


def test_generate_genai_folder_from_a_tiny_model(tmp_path: Path) -> None:
    from evals.images import generate_genai_folder
    from experiments.config import load_base, merge
    from models.module import UniFusionModule

    cfg = merge(load_base(), {"candidate": "lap", "dit": {"dim": 32, "depth": 2, "heads": 2, "patch": 8},
                              "sample": {"steps": 2}, "conditioner": {"heads": 2}})
    torch.manual_seed(0)
    module = UniFusionModule(cfg).eval()
    with torch.no_grad():  # adaLN-zero output: make samples depend on the seed
        for p in module.ema.module["dit"].parameters():
            p.add_(torch.randn_like(p) * 0.05)
    prompts = {0: "a photo of a red circle", 7: "a photo of two squares"}
    out = generate_genai_folder(module, prompts, tmp_path / "img", seed=42)
    assert sorted(p.name for p in out.iterdir()) == ["00000.png", "00007.png"]
    expect = module.generate([prompts[7]], [42 + 7])[0]
    np.testing.assert_array_equal(np.asarray(Image.open(out / "00007.png")), expect)
    mtime = (out / "00000.png").stat().st_mtime_ns
    generate_genai_folder(module, prompts, out, seed=42)  # resume: nothing regenerated
    assert (out / "00000.png").stat().st_mtime_ns == mtime
    assert gb.find_images(out, [0, 7]) == {0: out / "00000.png", 7: out / "00007.png"}


# ------------------------------------------------------------------------------------------------ human correlation
# 3 prompts x 2 generators; (M1, 2) has no image. Used items, hand-numbered 0..4:
#   human y = [1, 3, 3, 5, 2], judge x = [0.1, 0.5, 0.51, 0.4, 0.6]
# pairs: (0,1) (0,2) (0,3) (0,4) concordant; (1,2) human tie, judge gap 0.01; (1,3) (1,4) (2,3) (2,4) (3,4)
# discordant -> C=4, D=5, human-only ties 1, judge ties 0, P=10
RATINGS = {"00000": {"prompt": "p0", "models": {"M1": [1, 1, 1], "M2": [3, 3, 3]}},
           "00001": {"prompt": "p1", "models": {"M1": [2, 3, 4], "M2": [5, 5, 5]}},
           "00002": {"prompt": "p2", "models": {"M1": [4, 4, 4], "M2": [2, 2, 2]}}}
JUDGE = {("M1", 0): 0.1, ("M2", 0): 0.5, ("M1", 1): 0.51, ("M2", 1): 0.4, ("M2", 2): 0.6}


def test_agreement_by_hand() -> None:
    from scipy.stats import kendalltau

    human, judge = [1, 3, 3, 5, 2], [0.1, 0.5, 0.51, 0.4, 0.6]
    r = gb.agreement(human, judge)
    assert r["pair_counts"] == {"concordant": 4, "discordant": 5, "judge_tie_only": 0, "human_tie_only": 1,
                                "tie_both": 0}
    assert r["kendall_tau_b"] == pytest.approx(-1 / np.sqrt(10 * 9))  # (4 - 5) / sqrt((10 - 0) (10 - 1))
    assert r["kendall_tau_b"] == pytest.approx(kendalltau(human, judge, variant="b").statistic)
    assert r["pairwise_accuracy_eps0"] == pytest.approx(0.4)  # 4 concordant of 10
    # eps = 0.01 turns the human-tied pair (gap 0.01) right and no concordant pair (gaps >= 0.3) into a tie
    assert r["pairwise_accuracy"] == pytest.approx(0.5) and r["tie_epsilon"] == pytest.approx(0.01)
    with pytest.raises(ValueError, match=">= 2 items"):
        gb.agreement([1.0], [0.5])
    with pytest.raises(ValueError, match="NaN"):
        gb.agreement([1, 2], [0.5, float("nan")])


def naive_pairwise_accuracy(human: np.ndarray, judge: np.ndarray) -> float:
    """Deutsch et al.'s calibrated acc_23 by brute force: every candidate eps, every pair."""
    n = len(human)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    best = 0.0
    for eps in {0.0, *(abs(judge[i] - judge[j]) for i, j in pairs)}:
        right = 0
        for i, j in pairs:
            dj = 0.0 if abs(judge[i] - judge[j]) <= eps else judge[i] - judge[j]
            right += (dj == 0 and human[i] == human[j]) or dj * (human[i] - human[j]) > 0
        best = max(best, right / len(pairs))
    return best


def test_agreement_matches_scipy_and_brute_force_on_tied_data() -> None:
    from scipy.stats import kendalltau

    rng = np.random.default_rng(0)
    human = rng.integers(3, 16, 60) / 3  # means of three 1-5 ratings: many ties
    judge = np.round(human / 5 + np.random.default_rng(1).normal(0, 0.05, 60), 2)  # coarse judge: ties too
    r = gb.agreement(human, judge)
    assert r["kendall_tau_b"] == pytest.approx(kendalltau(human, judge, variant="b").statistic, rel=1e-12)
    assert r["pearson"] == pytest.approx(np.corrcoef(human, judge)[0, 1])
    assert r["pairwise_accuracy"] == pytest.approx(naive_pairwise_accuracy(human, judge))
    assert r["pairwise_accuracy"] > r["pairwise_accuracy_eps0"]  # calibration found a better eps here
    assert r["n_pairs"] == 60 * 59 // 2 == sum(r["pair_counts"].values())
    assert r["pair_counts"]["tie_both"] > 0 and r["pair_counts"]["judge_tie_only"] > 0  # ties on both sides


class LookupScorer:
    """A fake judge: the JUDGE value of the image's generator/prompt, read from the pixel it was drawn with."""

    name = "lookup"
    batch_size = 2

    def score(self, images, texts):
        return torch.tensor([np.asarray(im)[0, 0, 0] / 100 for im in images], dtype=torch.float32)


def test_human_correlation_cli_counts_missing_images(tmp_path: Path) -> None:
    ratings = tmp_path / "genai_image.json"
    ratings.write_text(json.dumps(RATINGS))
    for (model, i), v in JUDGE.items():
        (tmp_path / "imgs" / model).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (round(v * 100), 0, 0)).save(tmp_path / "imgs" / model / f"{i:05d}.png")
    r = gb.human_correlation_run(ratings, tmp_path / "out", tmp_path / "imgs", LookupScorer(), progress=False)
    assert r["backend"] == "lookup" and r["n_items"] == 5
    assert r["counts"] == {"rated": 6, "scored": 5, "missing": 1} and r["missing_examples"] == ["M1/00002"]
    assert r["generators"]["M1"]["missing"] == 1 and r["generators"]["M2"]["n"] == 3
    assert r["kendall_tau_b"] == pytest.approx(-1 / np.sqrt(90), rel=1e-6)
    assert r["pairwise_accuracy"] == pytest.approx(0.5)
    md = (tmp_path / "out" / "human_correlation.md").read_text()
    assert "backend `lookup`" in md and "1 of 6 rated images missing" in md
    saved = json.loads((tmp_path / "out" / "human_correlation.json").read_text())
    assert saved["backend"] == "lookup" and saved["ratings_outside_1_5"] == []
    # the same through --scores: the cache the first run wrote is a valid score file
    cli = gb.main(["--human-correlation", str(ratings), "--scores", str(tmp_path / "out" / gb.HUMAN_CACHE),
                   "--out", str(tmp_path / "out2")])
    assert cli["backend"] == "lookup" and cli["kendall_tau_b"] == pytest.approx(r["kendall_tau_b"])


def test_human_correlation_bad_input(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        gb.main(["--human-correlation", str(tmp_path / "nope.json"), "--scores", str(tmp_path / "s.jsonl"),
                 "--out", str(tmp_path / "o")])
    assert re.search("error: human ratings file not found: .*nope.json", capsys.readouterr().err)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"00000": {"prompt": "p", "models": {"M1": [3, "x"]}}}))
    with pytest.raises(ValueError, match="prompt '00000', model 'M1': ratings must be a non-empty list of numbers"):
        gb.load_human_ratings(bad)
    bad.write_text(json.dumps({"00000": {"prompt": "p", "models": {"M1": []}}}))
    with pytest.raises(ValueError, match="non-empty list"):
        gb.load_human_ratings(bad)
    bad.write_text(json.dumps({"00000": {"prompt": "p"}}))
    with pytest.raises(ValueError, match="has no 'models' mapping"):
        gb.load_human_ratings(bad)
    ratings = tmp_path / "genai_image.json"
    ratings.write_text(json.dumps(RATINGS))
    scores = tmp_path / "s.jsonl"
    scores.write_text(json.dumps({"model": "M1", "index": 0, "score": 0.3}) + "\n")
    with pytest.raises(ValueError, match="only 1 of 6 rated images have a judge score"):
        gb.human_correlation_run(ratings, tmp_path / "o", scores_path=scores)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="only 0 of 6"):
        gb.human_correlation_run(ratings, tmp_path / "o", tmp_path / "empty", LookupScorer(), progress=False)
    with pytest.raises(SystemExit):
        gb.main(["--scores", str(scores), "--out", str(tmp_path / "o")])  # --scores without --human-correlation


def test_shipped_ratings_file_loads() -> None:
    ratings, odd = gb.load_human_ratings(gb.DATA / "genai_image.json")
    assert len(ratings) == 1600 * 6 and ratings[("DALLE_3", 0)] == pytest.approx(5.0)
    assert ratings[("SDXL_Turbo", 0)] == pytest.approx(3.0)  # mean of [2, 4, 3]
    # two typos in the released file stay in the means (as t2v_metrics) and are reported
    assert odd == ["00231/DALLE_3 [5, 41, 4]", "00252/DeepFloyd_I_XL_v1 [3, 3, 33]"]
    assert ratings[("DALLE_3", 231)] == pytest.approx(50 / 3)


class SwappingScorer(CountingScorer):
    """Replaces image 00001 (grey) with a white one while its batch is being scored (a regeneration mid-run)."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path

    def score(self, images, texts):
        if not self.calls:
            Image.new("RGB", (8, 8), (255, 255, 255)).save(self.path)
        return super().score(images, texts)


def test_an_image_replaced_while_it_is_scored_is_scored_again(bench, tmp_path: Path) -> None:
    """The cached hash is of the bytes that were scored: the next run sees the replaced file and scores it again
    (with the new pixels: white scores 1, the old grey one 0.5)."""
    data, images = bench
    out = tmp_path / "out"
    gb.run(images, SwappingScorer(images / "00001.jpeg"), out, data, n_resamples=10, progress=False)
    again = CountingScorer()
    r = gb.run(images, again, out, data, n_resamples=10, progress=False)
    assert again.calls == ["p1"] and r["counts"]["rescored_changed_images"] == 1
    rows = {row["index"]: row["score"] for row in gb.read_rows(out / "scores.jsonl")}
    assert rows[1] == pytest.approx(1.0, abs=0.01)
