"""The ``mmdet`` GenEval backend without mmdet: the absent-env error, RLE + JSONL parsing feeding the real GenEval
rules, the runner's own error when mmdet is missing, and the subprocess protocol end to end against a stub
``mmdet`` package that returns mmdet 2.x's ``(bbox_results, segm_results)``."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evals.detectors import (
    MMDET_RUNNER,
    MMDetDetector,
    coco_object_names,
    get_detector,
    parse_mmdet_row,
    read_mmdet_jsonl,
    rle_decode,
)
from evals.geneval import evaluate_folder, evaluate_image


def runner_module():
    spec = importlib.util.spec_from_file_location("mmdet_runner", MMDET_RUNNER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_absent_env_says_how_to_create_it(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv("GENEVAL_MMDET_PYTHON", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no conda
    with pytest.raises(FileNotFoundError, match="(?s)conda is not on PATH.*conda env create -f "
                                                "environment-geneval-mmdet.yml"):
        get_detector("mmdet")
    monkeypatch.setenv("GENEVAL_MMDET_PYTHON", str(tmp_path / "envs/geneval-mmdet/bin/python"))
    with pytest.raises(FileNotFoundError, match="GENEVAL_MMDET_PYTHON=.*does not exist"):
        get_detector("mmdet")
    monkeypatch.setenv("GENEVAL_MMDET_PYTHON", sys.executable)
    monkeypatch.delenv("GENEVAL_MMDET_CHECKPOINT", raising=False)
    with pytest.raises(FileNotFoundError, match="GENEVAL_MMDET_CHECKPOINT unset"):
        get_detector("mmdet")
    assert (Path(MMDET_RUNNER).parents[1] / "environment-geneval-mmdet.yml").is_file()


def test_rle_round_trip_against_the_runner_encoder() -> None:
    enc = runner_module().rle_encode
    rng = np.random.default_rng(0)
    for mask in (rng.random((7, 5)) > 0.5, np.ones((3, 4), bool), np.zeros((2, 2), bool)):
        rle = enc(mask)
        np.testing.assert_array_equal(rle_decode(rle), mask)
    # column-major runs starting with 0s, by hand: column 0 = [1, 0], column 1 = [1, 1]
    assert enc(np.array([[1, 1], [0, 1]], bool)) == {"size": [2, 2], "counts": [0, 1, 1, 2]}
    with pytest.raises(ValueError, match="sum to 3, expected 2 x 2 = 4"):
        rle_decode({"size": [2, 2], "counts": [1, 2]})


def box_mask(h: int, w: int, box: tuple[int, int, int, int]) -> dict:
    m = np.zeros((h, w), bool)
    m[box[1]: box[3], box[0]: box[2]] = True
    return runner_module().rle_encode(m)


def test_handwritten_jsonl_flows_through_the_geneval_rules(tmp_path: Path) -> None:
    names = coco_object_names()
    dog, cat = names.index("dog"), names.index("cat")
    rows = [{"path": "a.png", "height": 40, "width": 60, "error": None, "detections": [
        {"label": dog, "class": "dog", "score": 0.95, "box": [2, 10, 20, 30], "mask": box_mask(40, 60, (2, 10, 20, 30)),
         "color": "brown"},
        {"label": cat, "class": "cat", "score": 0.8, "box": [40, 10, 58, 30],
         "mask": box_mask(40, 60, (40, 10, 58, 30)), "color": "black"},
        {"label": cat, "class": "cat", "score": 0.25, "box": [0, 0, 5, 5], "mask": None, "color": None}]}]
    path = tmp_path / "dets.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    [(where, dets)] = read_mmdet_jsonl(path, names)
    assert where == "a.png" and [d.cls for d in dets] == ["dog", "cat", "cat"]
    assert dets[0].mask.shape == (40, 60) and dets[0].mask.sum() == 18 * 20 and dets[2].mask is None

    def colors(found, cls):
        return MMDetDetector.classify_colors(backend, None, found, cls)

    backend = MMDetDetector.__new__(MMDetDetector)  # only classify_colors: no env needed
    backend.color_min_score = 0.3
    position = {"tag": "position", "prompt": "a photo of a dog left of a cat",
                "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1, "position": ["left of", 0]}]}
    assert evaluate_image(dets, position, classify_colors=colors)[0] is True
    right = {**position, "include": [position["include"][0], {"class": "dog", "count": 1,
                                                              "position": ["right of", 0]}]}
    assert evaluate_image(dets, right, classify_colors=colors)[0] is False
    color = {"tag": "colors", "prompt": "a photo of a black cat", "include": [{"class": "cat", "count": 1,
                                                                              "color": "black"}]}
    assert evaluate_image(dets, color, classify_colors=colors)[0] is True
    counting = {"tag": "counting", "prompt": "a photo of two cats", "include": [{"class": "cat", "count": 2}],
                "exclude": [{"class": "cat", "count": 3}]}
    assert evaluate_image(dets, counting, classify_colors=colors)[0] is False  # 0.25 is under every threshold
    low = {"tag": "colors", "prompt": "p", "include": [{"class": "cat", "count": 2, "color": "black"}]}
    with pytest.raises(ValueError, match="has no colour: .*color_min_score=0.3"):
        from evals.geneval import GenevalOptions

        evaluate_image(dets, low, GenevalOptions(threshold=0.2), classify_colors=colors)
    for bad, msg in (({"error": "cannot identify image file"}, "could not read a.png: cannot identify"),
                     ({"detections": [{"label": 80, "score": 0.5, "box": [0, 0, 1, 1]}]}, "outside the 80 classes"),
                     ({"detections": [{"label": 0, "score": 0.5, "box": [0, 0, 1, 1], "color": "teal"}]},
                      "colour 'teal'")):
        with pytest.raises(ValueError, match=msg):
            parse_mmdet_row({"path": "a.png", **bad}, names)


def test_runner_without_mmdet_exits_with_the_setup_hint(tmp_path: Path) -> None:
    (tmp_path / "list.json").write_text(json.dumps([str(tmp_path / "x.png")]))
    out = subprocess.run([sys.executable, str(MMDET_RUNNER), "--images", str(tmp_path / "list.json"), "--out",
                          str(tmp_path / "d.jsonl"), "--checkpoint", str(tmp_path / "c.pth"), "--device", "cpu"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 3 and out.stdout == ""
    assert "cannot import mmdet" in out.stderr and "environment-geneval-mmdet.yml" in out.stderr
    ckpt = tmp_path / "c.pth"
    ckpt.write_bytes(b"")
    backend = MMDetDetector(python=sys.executable, checkpoint=str(ckpt), device="cpu")
    with pytest.raises(RuntimeError, match="(?s)did not start \\(exit 3\\).*cannot import mmdet.*conda env create"):
        backend.detect(Image.new("RGB", (8, 8)))
    backend.close()


STUB_APIS = '''
import numpy as np
from PIL import Image

def init_detector(config, checkpoint, device="cuda"):
    class Model:
        CLASSES = tuple("class%d" % i for i in range(80))
        seen = (config, checkpoint, device)
    return Model()

def inference_detector(model, path):
    """mmdet 2.x instance result: per class an (N, 5) array and a list of N bool masks. Red pixels -> one
    'person' (label 0) at 0.95; always a 'bicycle' (label 1) at 0.2."""
    img = np.asarray(Image.open(path).convert("RGB")).astype(int)
    red = (img[..., 0] > 200) & (img[..., 1] < 50)
    bbox = [np.zeros((0, 5), np.float32) for _ in range(80)]
    segm = [[] for _ in range(80)]
    if red.any():
        ys, xs = np.nonzero(red)
        bbox[0] = np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1, 0.95]], np.float32)
        segm[0] = [red]
    bbox[1] = np.array([[0, 0, 4, 4, 0.2]], np.float32)
    segm[1] = [np.zeros(red.shape, bool)]
    return bbox, segm
'''


def test_subprocess_protocol_end_to_end_with_a_stub_mmdet(tmp_path: Path, monkeypatch) -> None:
    stub = tmp_path / "stub"
    (stub / "mmdet").mkdir(parents=True)
    (stub / "mmdet" / "__init__.py").write_text("")
    (stub / "mmdet" / "apis.py").write_text(STUB_APIS)
    config = stub / "configs" / "mask2former" / "mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.py"
    config.parent.mkdir(parents=True)
    config.write_text("# the default config path, resolved beside the mmdet package as GenEval does\n")
    monkeypatch.setenv("PYTHONPATH", str(stub))
    ckpt = tmp_path / "m.pth"
    ckpt.write_bytes(b"")
    metas = [{"tag": "single_object", "prompt": "a photo of a person", "include": [{"class": "person", "count": 1}]},
             {"tag": "single_object", "prompt": "a photo of a bicycle", "include": [{"class": "bicycle", "count": 1}]}]
    for i, meta in enumerate(metas):
        folder = tmp_path / "imgs" / f"{i:05d}" / "samples"
        folder.mkdir(parents=True)
        (folder.parent / "metadata.jsonl").write_text(json.dumps(meta))
        for k, red in enumerate((True, False)):
            im = Image.new("RGB", (32, 24), (0, 0, 255))
            if red:
                im.paste((255, 0, 0), (5, 6, 15, 20))
            im.save(folder / f"{k:05d}.png")
    backend = MMDetDetector(python=sys.executable, checkpoint=str(ckpt), device="cpu", color_min_score=1.0)
    try:
        rows, summary = evaluate_folder(tmp_path / "imgs", backend, ci_resamples=10)
        dets = backend.detect_paths([tmp_path / "imgs/00000/samples/00000.png",
                                     tmp_path / "imgs/00000/samples/00001.png"])
        assert backend._proc.poll() is None  # one runner served every request
    finally:
        backend.close()
    # person: found in the red image only; bicycle: 0.2 is under the 0.3 threshold everywhere
    assert [r["correct"] for r in rows] == [True, False, False, False]
    assert summary["judge"]["judge"] == "mmdet" and summary["overall"] == pytest.approx(0.25)
    person = [d for d in dets[0] if d.cls == "person"][0]
    assert person.box == (5.0, 6.0, 15.0, 20.0) and person.score == pytest.approx(0.95)
    assert person.mask.sum() == 10 * 14 and person.color is None
    assert [d.cls for d in dets[1]] == ["bicycle"]
