"""GenAI-Bench: the official aggregation (hand-computed), the shipped data, resumable scoring, bad input."""

from __future__ import annotations

import json
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


def test_run_resumes_and_labels_the_backend(bench, tmp_path: Path) -> None:
    data, images = bench
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        gb.run(images, CountingScorer(crash_after=2), out, data, progress=False)
    assert len(gb.read_cache(out / "scores.jsonl", "fake")) == 2
    scorer = CountingScorer()
    r = gb.run(images, scorer, out, data, n_resamples=100, progress=False)
    assert scorer.calls == ["p2", "p3", "p4", "p5"]  # only what was missing
    assert r["all"]["mean"] == pytest.approx(2.5 / 5, abs=0.01) and r["backend"] == "fake"
    saved = json.loads((out / "results.json").read_text())
    assert saved["backend"] == "fake" and "backend `fake`" in (out / "table.md").read_text()
    assert len((out / "scores.jsonl").read_text().splitlines()) == 6
    with pytest.raises(ValueError, match="holds scores of backend 'fake', not 'hf:x'"):
        gb.read_cache(out / "scores.jsonl", "hf:x")


def test_bad_images_are_errors(bench, tmp_path: Path) -> None:
    data, images = bench
    (images / "00003.jpeg").unlink()
    with pytest.raises(FileNotFoundError, match="1 of 6 prompts have no image .* \\['00003'\\]"):
        gb.run(images, CountingScorer(), tmp_path / "a", data, progress=False)
    (images / "00003.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match="corrupt or unreadable image: .*00003.png"):
        gb.run(images, CountingScorer(), tmp_path / "b", data, progress=False)
    with pytest.raises(ValueError, match="cannot judge GenAI-Bench"):
        gb.main(["--images", str(images), "--model", "oracle", "--out", str(tmp_path / "c")])


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
