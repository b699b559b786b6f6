"""GenEval folder scoring and CLI end to end on shapes-world renders, plus every bad-input path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evals import geneval
from evals.geneval import ROW_FIELDS, TASKS, evaluate_folder, main
from world.prompts import render_geneval_folder, write_geneval_metadata


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("geneval")
    metadata = write_geneval_metadata(root / "evaluation_metadata.jsonl", n_per_task=3, seed=0)
    render_geneval_folder(metadata, root / "images", n_samples=2, seed=0)
    return root / "images", metadata


def copy_tree(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_clean_renders_score_one(clean):
    images, metadata = clean
    rows, summary = evaluate_folder(images, "shapes")
    assert summary["overall"] == 1.0 and summary["images"] == 1.0 and summary["prompts"] == 1.0
    assert set(summary["tasks"]) == set(TASKS) and all(v == 1.0 for v in summary["tasks"].values())
    assert summary["ci95"]["overall"] == [1.0, 1.0]
    assert summary["counts"]["images"] == 2 * len(metadata) == len(rows)
    assert summary["counts"]["prompts"] == len(metadata)
    assert all(r["reason"] == "" for r in rows)


def test_cli_images_end_to_end(clean, tmp_path, capsys):
    images, metadata = clean
    assert main(["--images", str(images), "--detector", "shapes", "--out", str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "overall" in printed and "1.000" in printed
    # a progress bar on stderr, over every sample of the folder
    n_samples = len(list(images.glob("*/samples/*.png")))
    assert "GenEval (shapes)" in captured.err and f"{n_samples}/{n_samples}" in captured.err
    lines = (tmp_path / "out" / "results.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert len(rows) == 2 * len(metadata)
    assert all(tuple(r) == ROW_FIELDS for r in rows)
    first = rows[0]
    assert json.loads(first["metadata"]) == metadata[0] and first["correct"] is True
    assert first["filename"].endswith("00000/samples/00000.png")
    details = json.loads(first["details"])  # class -> [[x1, y1, x2, y2, score]]
    assert all(len(box) == 5 and box[4] == 1.0 for boxes in details.values() for box in boxes)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["overall"] == 1.0 and summary["judge"]["judge"] == "shapes"
    assert not list((tmp_path / "out").glob("*.tmp"))  # atomic writes leave no temp files


def test_cli_options_override_and_reject_unknown(clean, tmp_path, capsys):
    images, _ = clean
    # shapes scores clean objects exactly 1.0; the rule is score > threshold, so threshold=1 keeps nothing
    main(["--images", str(images), "--judge", "shapes", "--out", str(tmp_path), "--options", "threshold=1.0",
          "counting_threshold=1.0"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["overall"] == 0.0 and summary["options"]["threshold"] == 1.0
    with pytest.raises(SystemExit):
        main(["--images", str(images), "--judge", "shapes", "--out", str(tmp_path), "--options", "thresh=1"])
    assert "valid:" in capsys.readouterr().err


def test_wrong_images_are_scored_as_wrong(clean, tmp_path):
    images = copy_tree(clean[0], tmp_path / "images")
    blank = np.full((32, 32, 3), 128, dtype=np.uint8)
    Image.fromarray(blank).save(images / "00000" / "samples" / "00000.png")  # single_object: nothing drawn
    rows, summary = evaluate_folder(images)
    bad = [r for r in rows if not r["correct"]]
    assert len(bad) == 1 and bad[0]["reason"].startswith("expected ") and "found 0" in bad[0]["reason"]
    assert summary["tasks"]["single_object"] == pytest.approx(5 / 6)
    assert summary["prompts"] == 1.0  # any() over the prompt's two images


def test_problems_are_counted_and_reported(clean, tmp_path, capsys):
    images = copy_tree(clean[0], tmp_path / "images")
    Image.new("RGB", (32, 32)).save(images / "00000" / "samples" / "00002.jpg")
    (images / "00001" / "samples" / "grid.png").write_bytes(b"")
    (images / "notes").mkdir()
    for p in (images / "00002" / "samples").iterdir():
        p.unlink()
    rows, summary = evaluate_folder(images)
    counts = summary["counts"]
    assert counts["non_png_samples"] == 1 and counts["misnamed_samples"] == 1
    assert counts["non_digit_folders"] == 1 and counts["prompts_without_samples"] == 1
    assert counts["images"] == len(rows) == summary["counts"]["prompt_folders"] * 2 - 2
    err = capsys.readouterr().err
    assert "00002.jpg" in err and "notes" in err and "00002" in err


def test_metadata_errors_name_the_path(clean, tmp_path):
    images = copy_tree(clean[0], tmp_path / "images")
    meta_path = images / "00003" / "metadata.jsonl"
    original = meta_path.read_text()
    meta_path.unlink()
    with pytest.raises(FileNotFoundError, match="00003/metadata.jsonl"):
        evaluate_folder(images)
    meta_path.write_text(original + "\n" + original)  # two objects: GenEval json.load fails too
    with pytest.raises(ValueError, match="00003/metadata.jsonl: not one JSON object"):
        evaluate_folder(images)
    meta_path.write_text(json.dumps({"tag": "counting", "include": []}))
    with pytest.raises(ValueError, match=r"00003/metadata.jsonl: metadata lacks key\(s\) \['prompt'\]"):
        evaluate_folder(images)
    meta_path.write_text(json.dumps({"tag": "counts", "prompt": "p", "include": [{"class": "circle", "count": 1}]}))
    with pytest.raises(ValueError, match="unknown tag 'counts'; valid:.*'counting'"):
        evaluate_folder(images)
    meta_path.write_text(json.dumps({"tag": "colors", "prompt": "p",
                                     "include": [{"class": "bench", "count": 1}]}))
    with pytest.raises(ValueError, match="class 'bench' unknown to the detector; valid:.*'circle'"):
        evaluate_folder(images)


def test_corrupt_png_raises_naming_the_file(clean, tmp_path):
    images = copy_tree(clean[0], tmp_path / "images")
    (images / "00004" / "samples" / "00001.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(ValueError, match="corrupt or unreadable PNG: .*00004/samples/00001.png"):
        evaluate_folder(images)


def test_empty_folder_raises(tmp_path):
    with pytest.raises(ValueError, match="no PNG samples"):
        evaluate_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        evaluate_folder(tmp_path / "missing")


class ShapesModule:
    """Stands in for a trained module: renders each prompt exactly (tests/shapes_generator.py)."""

    calls: list[int] = []

    def generate(self, prompts, seeds, **kwargs):
        import shapes_generator

        self.calls.append(len(prompts))
        return [np.asarray(im) for im in shapes_generator.generate(prompts, seeds)]


def test_cli_ckpt_generates_then_scores(tmp_path, monkeypatch, capsys):
    import sys

    import evals.images

    sys.path.insert(0, str(Path(__file__).parent))
    loaded = []
    monkeypatch.setattr(evals.images, "load_module", lambda ckpt, device=None: loaded.append(ckpt) or ShapesModule())
    (tmp_path / "model.ckpt").write_bytes(b"")
    out = tmp_path / "run"
    main(["--ckpt", str(tmp_path / "model.ckpt"), "--judge", "shapes", "--n-per-task", "2", "--n-samples", "1",
          "--seed", "5", "--out", str(out)])
    written = (out / "evaluation_metadata.jsonl").read_text().splitlines()
    assert len(written) == 12 and sum(ShapesModule.calls) == 12 and loaded == [tmp_path / "model.ckpt"]
    assert sorted(p.name for p in (out / "images").iterdir() if p.is_dir()) == [f"{i:05d}" for i in range(12)]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["overall"] == 1.0 and summary["counts"]["images"] == 12
    # --prompt-file reads the prompt list instead of sampling one
    main(["--ckpt", str(tmp_path / "model.ckpt"), "--judge", "shapes", "--prompt-file",
          str(out / "evaluation_metadata.jsonl"), "--n-samples", "1", "--out", str(tmp_path / "run2")])
    assert sum(ShapesModule.calls) == 24 and len(list((tmp_path / "run2" / "images").iterdir())) == 13
    with pytest.raises(SystemExit):
        main(["--ckpt", str(tmp_path / "model.ckpt"), "--judge", "shapes", "--out", str(tmp_path / "run3")])
    assert "--prompt-file FILE or --n-per-task K" in capsys.readouterr().err
    assert geneval.read_metadata_lines(out / "evaluation_metadata.jsonl")[0]["tag"] == TASKS[0]


def test_partly_generated_folder_fails_naming_what_is_missing(clean, tmp_path, capsys):
    import shutil

    images, metadata = clean
    part = copy_tree(images, tmp_path / "images")
    shutil.rmtree(part / "00003")  # a whole prompt folder
    (part / "00005" / "samples" / "00001.png").unlink()  # one of a prompt's two samples
    with pytest.raises(SystemExit) as stop:
        main(["--images", str(part), "--judge", "shapes", "--out", str(tmp_path / "out")])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "partly generated" in err and "--allow-partial" in err
    assert "missing: 00003/, 00005/samples/00001.png." in err
    assert not (tmp_path / "out" / "summary.json").exists()  # nothing scored
    assert main(["--images", str(part), "--judge", "shapes", "--out", str(tmp_path / "out"), "--allow-partial"]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["counts"]["images"] == 2 * len(metadata) - 3
    # expected counts from the caller: prompts past the last folder and samples past the fullest prompt
    assert geneval.missing_samples(images) == []
    assert geneval.missing_samples(images, n_prompts=len(metadata) + 1, n_samples=3)[:2] == [
        "00000/samples/00002.png", "00001/samples/00002.png"]
    assert geneval.missing_samples(images, n_prompts=len(metadata) + 1)[-1] == f"{len(metadata):05d}/"


def test_cli_ckpt_fails_when_generation_left_samples_missing(tmp_path, monkeypatch, capsys):
    import evals.images

    def short_generate(benchmark, generate, metadata, out_dir, n_samples=4, seed=0, *args, **kwargs):
        return render_geneval_folder(metadata, out_dir, n_samples=n_samples - 1, seed=seed)  # one short each

    monkeypatch.setattr(evals.images, "checkpoint_generator", lambda ckpt, device=None: None)
    monkeypatch.setattr(evals.images, "write_folder", short_generate)
    (tmp_path / "m.ckpt").write_bytes(b"")
    with pytest.raises(SystemExit) as stop:
        main(["--ckpt", str(tmp_path / "m.ckpt"), "--judge", "shapes", "--n-per-task", "1", "--n-samples", "2",
              "--out", str(tmp_path / "run")])
    assert stop.value.code == 2
    assert "missing: 00000/samples/00001.png, 00001/samples/00001.png" in capsys.readouterr().err
