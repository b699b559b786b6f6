"""Refined DPG-Bench judging: answer parsing and retry, the oracle on shapes-world grids (known answers), resume after
a crash, image-folder validation, the HF judge on a tiny offline Gemma3, an OpenAI-compatible endpoint served
locally, and generation from a tiny checkpoint."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from local_http import json_server, user_text
from PIL import Image

from evals.dpg_refined import judge_images, load_questions, main, read_judgments, run, scan_images
from evals.images import generate_dpg_folder, save_png
from evals.judges import (
    HFJudge,
    JudgeRequest,
    JudgeResult,
    OpenAIJudge,
    OracleJudge,
    RetryPolicy,
    TextJudge,
    parse_answer,
)
from world.dpg_questions import make_dpg_prompt_set, write_dpg_questions_csv
from world.scene import BACKGROUND, render


def grid_of(tiles: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.concatenate(tiles[:2], axis=1), np.concatenate(tiles[2:], axis=1)], axis=0)


def shapes_bench(tmp: Path, n: int = 3, blank_last: bool = False) -> tuple[Path, Path, list]:
    """Questions CSV + a folder of 2x2 grids of the scenes' own renders (tile 3 optionally an empty canvas)."""
    items = make_dpg_prompt_set(n, seed=0)
    csv_path = tmp / "questions.csv"
    write_dpg_questions_csv(csv_path, items)
    folder = tmp / "images"
    for item_id, scene, _ in items:
        tile = render(scene)
        blank = np.empty_like(tile)
        blank[:] = BACKGROUND
        save_png(grid_of([tile, tile, tile, blank if blank_last else tile]), folder / f"{item_id}.png")
    return csv_path, folder, items


# ------------------------------------------------------------------------------------------------ parsing / retry
@pytest.mark.parametrize(("text", "mode", "expect"), [
    ("The circle is red.\nAnswer: yes", "cot", "yes"),
    ("**Answer:** No.", "cot", "no"),
    ("I first checked... the format is 'Answer: yes' or 'Answer: no'.\n\nFinal answer: NO", "cot", "no"),
    ("Reasoning.\n`ANSWER: Yes!`", "cot", "yes"),
    ("There is a circle on the left.\nyes", "cot", "yes"),
    ("There is a circle. I think yes, probably.", "cot", None),
    ("", "cot", None),
    ("Yes, there is a red circle.", "direct", "yes"),
    ("no.", "direct", "no"),
    ("Maybe", "direct", None),
    ("answer - yes", "direct", "yes"),
    # a later "answer no" inside the reasoning is not a verdict; the explicit "Answer: yes" line stands
    ("Answer: yes\nThough I could answer no if I were strict.", "cot", "yes"),
    ("The answer is no: the circle is blue.", "cot", "no"),
])
def test_parse_answer(text: str, mode: str, expect: str | None) -> None:
    assert parse_answer(text, mode) == expect


def test_parse_answer_rejects_unknown_mode() -> None:
    with pytest.raises(ValueError, match=r"valid: \('cot', 'direct'\)"):
        parse_answer("yes", "logprob")


class ScriptedJudge(TextJudge):
    """Replies from a list per question, in call order; records every generate() call."""

    def __init__(self, script: dict[str, list[str]]):
        super().__init__("cot", batch_size=8)
        self.script, self.calls = {k: list(v) for k, v in script.items()}, []

    def generate(self, images, prompts):
        self.calls.append(len(prompts))
        return [self.script[next(k for k in self.script if k in p)].pop(0) for p in prompts]


def test_unparseable_answers_are_retried_once_then_null() -> None:
    judge = ScriptedJudge({"Q-a": ["Answer: yes"], "Q-b": ["hmm", "ok.\nAnswer: no"], "Q-c": ["?", "still ?"]})
    img = Image.new("RGB", (8, 8))
    reqs = [JudgeRequest("i", 0, p, f"Q-{c}?", img, {}) for p, c in enumerate("abc", start=1)]
    res = judge.judge(reqs)
    assert [r.answer for r in res] == ["yes", "no", None]
    assert judge.calls == [3, 2]  # one batched retry of the two unparseable answers
    assert res[1].raw == "hmm\n[retry]\nok.\nAnswer: no" and res[2].raw == "?\n[retry]\nstill ?"


# ------------------------------------------------------------------------------------------------ oracle pipeline
def test_oracle_scores_clean_renders_one(tmp_path: Path) -> None:
    csv_path, folder, items = shapes_bench(tmp_path)
    (folder / "dpg_results.txt").write_text("stray file, ignored")
    out = tmp_path / "out"
    main(["--images", str(folder), "--prompt-file", str(csv_path), "--judge", "oracle", "--out", str(out),
          "--n-resamples", "50"])
    scores = json.loads((out / "summary.json").read_text())
    n_q = len(load_questions(csv_path))
    assert scores["counts"] == {"prompts": 3, "images": 12, "judgments": 4 * n_q, "unparsed": 0,
                                "missing_images": 0, "missing_judgments": 0, "scored": 12,
                                "failed": 0, "partial": 0, "rejudged_changed_images": 0,
                                "duplicate_judgments_dropped": 0}
    assert scores["judge"] == {"judge": "oracle", "size_hint": None}
    assert scores["fixed"]["micro_avg"] == 1.0 and scores["fixed"]["macro_avg"] == 1.0
    assert all(v == 1.0 for v in scores["fixed"]["categories"].values())
    assert scores["best_of_n"]["micro_avg"] == 1.0
    assert "| category | fixed | best_of_n |" in (out / "table.md").read_text()


def test_oracle_known_failures_on_an_empty_tile(tmp_path: Path) -> None:
    # tile 3 (bottom right) is an empty canvas: every question is "no" there -> s = 0 exactly
    csv_path, folder, _ = shapes_bench(tmp_path, blank_last=True)
    scores = run(folder, csv_path, "oracle", tmp_path / "out", n_resamples=50, progress=False)
    assert scores["fixed"]["micro_avg"] == 0.75
    assert scores["best_of_n"]["micro_avg"] == 1.0
    assert scores["legacy"]["categories"]["entity"] == 0.0  # official: the last tile's raw answers only
    rows = read_judgments(tmp_path / "out" / "judgments.jsonl")
    assert {r["answer"] for r in rows if r["image_index"] == 3} == {"no"}
    assert {r["answer"] for r in rows if r["image_index"] < 3} == {"yes"}


class CrashingJudge(OracleJudge):
    def __init__(self, crash_after: int | None):
        super().__init__(batch_size=5)
        self.crash_after, self.judged = crash_after, 0

    def judge(self, requests: list[JudgeRequest]) -> list[JudgeResult]:
        if self.crash_after is not None and self.judged >= self.crash_after:
            raise KeyboardInterrupt("killed")
        self.judged += len(requests)
        return super().judge(requests)


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path: Path) -> None:
    csv_path, folder, _ = shapes_bench(tmp_path, blank_last=True)
    questions = load_questions(csv_path)
    full = judge_images(folder, questions, CrashingJudge(None), tmp_path / "full", progress=False)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        judge_images(folder, questions, CrashingJudge(crash_after=10), out, progress=False)
    path = out / "judgments.jsonl"
    assert len(read_judgments(path)) == 10
    with open(path, "a") as fp:
        fp.write('{"item_id": "shapes1", "image_in')  # a kill in the middle of a write
    second = CrashingJudge(None)
    judge_images(folder, questions, second, out, progress=False)
    total = 4 * len(questions)
    assert second.judged == total - 10  # only what was missing
    key = lambda r: (r["item_id"], r["image_index"], r["proposition_id"])  # noqa: E731
    resumed, reference = sorted(read_judgments(path), key=key), sorted(read_judgments(full), key=key)
    assert resumed == reference and len({key(r) for r in resumed}) == total
    third = CrashingJudge(None)
    judge_images(folder, questions, third, out, progress=False)
    assert third.judged == 0 and len(read_judgments(path)) == total


# ------------------------------------------------------------------------------------------------ image folders
def test_per_seed_layout_with_a_missing_image(tmp_path: Path) -> None:
    csv_path, _, items = shapes_bench(tmp_path)
    folder = tmp_path / "seeds"
    for item_id, scene, _ in items:
        for k in (0, 1, 3) if item_id == "shapes0" else range(4):
            save_png(render(scene), folder / item_id / f"{k}.png")
    scores = run(folder, csv_path, OracleJudge(), tmp_path / "out", n_resamples=50, progress=False)
    assert scores["counts"]["missing_images"] == 1
    assert scores["fixed"]["micro_avg"] == pytest.approx((0.75 + 1 + 1) / 3)
    assert scores["legacy"]["overall"] == 1.0  # the official script never sees the incomplete prompt


@pytest.mark.parametrize(("name", "content", "kwargs", "message"), [
    ("shapes0.png", "grid66", {}, r"must be 2x2 tiles.*got 64x66"),
    ("shapes0.png", "grid64", {"resolution": 16}, r"32x32; got 64x64"),
    ("shapes0.png", b"\x89PNG\r\n\x1a\nnot really a png", {}, "corrupt or unreadable image"),
    ("shapes9.png", "grid64", {}, "unknown item_id 'shapes9'"),
    ("shapes0/x.png", "tile", {}, r"named <k>.png with k in 0..3"),
])
def test_bad_image_folders_are_reported(tmp_path: Path, name: str, content, kwargs: dict, message: str) -> None:
    csv_path, _, _ = shapes_bench(tmp_path)
    folder = tmp_path / "bad"
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        shape = {"grid66": (66, 64), "grid64": (64, 64), "tile": (32, 32)}[content]
        save_png(np.zeros((*shape, 3), np.uint8), path)
    ids = [q.item_id for q in load_questions(csv_path)]
    with pytest.raises(ValueError, match=message):
        scan_images(folder, ids, **kwargs)


# ------------------------------------------------------------------------------------------------ HF judge
@pytest.fixture(scope="module")
def tiny_gemma():
    from evals.tiny_models import tiny_gemma3

    return tiny_gemma3()


def test_hf_judge_end_to_end_on_tiny_gemma3(tmp_path: Path, tiny_gemma) -> None:
    model, proc = tiny_gemma
    csv_path, folder, _ = shapes_bench(tmp_path, n=1)
    questions = load_questions(csv_path)
    judge = HFJudge(mode="direct", batch_size=3, max_new_tokens=3, model=model, processor=proc, device="cpu")
    path = judge_images(folder, questions, judge, tmp_path / "out", progress=False)
    rows = read_judgments(path)
    assert len(rows) == 4 * len(questions)
    for r in rows:  # each recorded answer is the parse of the last attempt's text
        assert r["answer"] == parse_answer(r["raw"].split("\n[retry]\n")[-1], "direct")
    # batching with left padding changes nothing: a batch of prompts of different lengths == one by one
    tiles = scan_images(folder, ["shapes0"]).load("shapes0")
    prompts = ["is there a circle ?", "is the red circle left of the blue square exactly ?"]
    batched = judge.generate([tiles[0], tiles[1]], prompts)
    single = [judge.generate([tiles[0]], prompts[:1])[0], judge.generate([tiles[1]], prompts[1:])[0]]
    assert batched == single and all(isinstance(t, str) for t in batched)


# ------------------------------------------------------------------------------------------------ OpenAI endpoint
def chat_reply(tries: dict[str, int]):
    """/v1/chat/completions: "yes" for circles, "no" otherwise, an unparseable first reply for triangles, HTTP 500
    for model "broken"."""

    def reply(body: dict) -> tuple[int, object]:
        if body.get("model") == "broken":
            return 500, b"boom"
        text = user_text(body)
        n = tries[text] = tries.get(text, 0) + 1
        if "triangle" in text and n == 1:
            content = "I cannot tell."
        else:
            content = "The shape is clearly visible.\n**Answer:** " + ("Yes" if "circle" in text else "no")
        return 200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}

    return reply


@pytest.fixture
def chat_server():
    with json_server(chat_reply({})) as server:
        yield server


def test_openai_judge_against_local_server(tmp_path: Path, chat_server) -> None:
    img = Image.new("RGB", (32, 32), (10, 20, 30))
    judge = OpenAIJudge(chat_server.url, model="served-gemma", api_key="k123", batch_size=2)
    reqs = [JudgeRequest("i", 0, p, f"Is there a {s}?", img, {}) for p, s in enumerate(
        ("circle", "square", "triangle"), start=1)]
    res = judge.judge(reqs)
    assert [r.answer for r in res] == ["yes", "no", "no"]
    assert res[2].raw.startswith("I cannot tell.\n[retry]\n")
    assert len(chat_server.seen) == 4  # three requests + one retry
    first = chat_server.seen[0]
    assert first["path"] == "/v1/chat/completions" and first["auth"] == "Bearer k123"
    assert first["body"]["model"] == "served-gemma" and first["body"]["temperature"] == 0.0
    content = first["body"]["messages"][0]["content"]
    url = next(c["image_url"]["url"] for c in content if c["type"] == "image_url")
    assert url.startswith("data:image/png;base64,")
    sent = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert sent.size == (32, 32) and sent.convert("RGB").getpixel((0, 0)) == (10, 20, 30)
    assert "Answer: yes" in next(c["text"] for c in content if c["type"] == "text")
    fast = RetryPolicy(attempts=2, initial=0.01, max_wait=0.02)
    with pytest.raises(RuntimeError, match="HTTP 500.*gave up after 2 attempts"):
        OpenAIJudge(chat_server.url, model="broken", retry=fast).judge(reqs[:1])
    with pytest.raises(ValueError, match="http://"):
        OpenAIJudge("localhost:8000")


def test_openai_judge_through_the_cli(tmp_path: Path, chat_server) -> None:
    csv_path, folder, _ = shapes_bench(tmp_path, n=1)
    out = tmp_path / "out"
    scores = main(["--images", str(folder), "--prompt-file", str(csv_path), "--judge", "openai", "--judge-url",
                   chat_server.url, "--out", str(out), "--n-resamples", "20"])
    rows = read_judgments(out / "judgments.jsonl")
    questions = {(q.item_id, q.proposition_id): q.question for q in load_questions(csv_path)}
    for r in rows:
        assert r["answer"] == ("yes" if "circle" in questions[(r["item_id"], r["proposition_id"])] else "no")
    assert scores["counts"]["judgments"] == len(rows) == 4 * len(questions)
    # the endpoint answers the first ask of each triangle question unparseably: one retry per such question text
    triangles = {q for q in questions.values() if "triangle" in q}
    assert scores["counts"]["judge_retries"] == len(triangles)


# ------------------------------------------------------------------------------------------------ --ckpt path
@pytest.mark.filterwarnings("ignore:Found keys that are in the model state dict")  # the encoder is rebuilt, not saved
def test_generate_dpg_folder_from_tiny_checkpoint_then_oracle(tmp_path: Path) -> None:
    import lightning as L
    import torch

    from experiments.config import load_base, merge
    from models.module import UniFusionModule

    cfg = merge(load_base(), {"candidate": "lap", "dit": {"dim": 32, "depth": 2, "heads": 2, "patch": 8},
                              "sample": {"steps": 2}, "conditioner": {"heads": 2}})
    torch.manual_seed(0)
    module = UniFusionModule(cfg)
    with torch.no_grad():  # adaLN-zero output layer: make samples depend on seeds
        for p in module.ema.module["dit"].parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ckpt = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
            "pytorch-lightning_version": L.__version__}
    module.on_save_checkpoint(ckpt)
    torch.save(ckpt, tmp_path / "tiny.ckpt")
    items = make_dpg_prompt_set(2, seed=1)
    csv_path = tmp_path / "q.csv"
    write_dpg_questions_csv(csv_path, items)
    folder = generate_dpg_folder(tmp_path / "tiny.ckpt", [(i, t) for i, _, t in items], tmp_path / "imgs",
                                 seed=5, batch_size=4)
    grid = np.asarray(Image.open(folder / "shapes1.png"))
    size = cfg["data"]["size"]
    assert grid.shape == (2 * size, 2 * size, 3)
    expect = module.generate([items[1][2]] * 4, [5 + 1000 + k for k in range(4)])
    np.testing.assert_array_equal(grid[size:, :size], expect[2])  # bottom-left tile = image 2
    mtime = (folder / "shapes1.png").stat().st_mtime_ns
    generate_dpg_folder(module, [(i, t) for i, _, t in items], folder, seed=5)  # resume: nothing regenerated
    assert (folder / "shapes1.png").stat().st_mtime_ns == mtime
    scores = run(folder, csv_path, "oracle", tmp_path / "out", n_resamples=20, progress=False)
    assert scores["counts"]["missing_images"] == 0
    assert scores["counts"]["judgments"] == 4 * len(load_questions(csv_path))
    assert 0.0 <= scores["fixed"]["micro_avg"] <= scores["best_of_n"]["micro_avg"] <= 1.0

    # The same through the CLI: --ckpt generates OUT/images (same seeds -> same grids), then judges them.
    cli = main(["--ckpt", str(tmp_path / "tiny.ckpt"), "--prompt-file", str(csv_path), "--gen-seed", "5",
                "--judge", "oracle", "--out", str(tmp_path / "cli"), "--n-resamples", "20"])
    for item_id, _, _ in items:
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "cli" / "images" / f"{item_id}.png")),
                                      np.asarray(Image.open(folder / f"{item_id}.png")))
    assert cli["fixed"] == scores["fixed"] and cli["counts"] == scores["counts"]


# ------------------------------------------------------------------------------------------------ one run per --out
def _hold_lock(out: str, ready, release) -> None:
    from evals.cache import lock_folder

    with lock_folder(out):
        ready.set()
        release.wait(60)


def test_a_second_run_into_a_busy_out_exits_2_naming_the_holder(tmp_path: Path, capsys, monkeypatch) -> None:
    """A run in another process holds --out: this one exits 2 before its judge is built, naming that process; once
    the other run has ended, the same command runs."""
    import multiprocessing
    import socket

    import evals.dpg_refined as dpg

    csv_path, folder, _ = shapes_bench(tmp_path, n=2)
    out = tmp_path / "out"
    argv = ["--images", str(folder), "--prompt-file", str(csv_path), "--judge", "oracle", "--n-resamples", "5",
            "--out", str(out)]
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(out), ready, release))
    holder.start()
    try:
        assert ready.wait(30)
        built = []
        monkeypatch.setattr(dpg, "make_judge", lambda *a, **k: built.append(a) or OracleJudge())
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code == 2 and len(err) == 1, err
        assert f"pid {holder.pid} on {socket.gethostname()}" in err[0] and "in use by another run" in err[0]
        assert built == [] and not (out / "judgments.jsonl").exists()
    finally:
        release.set()
        holder.join(30)
    assert main(argv)["counts"]["judgments"] == len(read_judgments(out / "judgments.jsonl")) > 0


def test_duplicated_judgments_resume_with_one_judgment_per_item(tmp_path: Path) -> None:
    """A folder that two simultaneous runs both judged (every row written twice) resumes: nothing is judged
    again, one row per (item, image, question) is kept, and the scores say how many copies were dropped."""
    csv_path, folder, _ = shapes_bench(tmp_path, n=2, blank_last=True)
    questions = load_questions(csv_path)
    reference = run(folder, questions, OracleJudge(), tmp_path / "ref", n_resamples=5, progress=False)
    out = tmp_path / "out"
    path = judge_images(folder, questions, OracleJudge(), out, progress=False)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines + lines))  # the second run appended the same judgments
    again = CrashingJudge(None)
    scores = run(folder, questions, again, out, n_resamples=5, progress=False)
    assert again.judged == 0
    key = lambda r: (r["item_id"], r["image_index"], r["proposition_id"])  # noqa: E731
    rows = read_judgments(path)
    assert len(rows) == len(lines) == len({key(r) for r in rows}) == 4 * len(questions)
    assert scores["counts"]["duplicate_judgments_dropped"] == len(lines)
    assert scores["fixed"] == reference["fixed"] and scores["legacy"] == reference["legacy"]


class SwappingJudge(OracleJudge):
    """Replaces one grid file with an empty canvas while its first batch is being judged (a regeneration into
    the folder during the run)."""

    def __init__(self, path: Path):
        super().__init__(batch_size=4)
        self.path, self.swapped = path, False

    def judge(self, requests: list[JudgeRequest]) -> list[JudgeResult]:
        if not self.swapped:
            blank = np.empty((64, 64, 3), np.uint8)
            blank[:] = BACKGROUND
            save_png(blank, self.path)
            self.swapped = True
        return super().judge(requests)


def test_an_image_replaced_while_it_is_judged_is_judged_again(tmp_path: Path) -> None:
    """Each judgment records the hash of the bytes its tile was decoded from: the old pixels' answers carry the
    old file's hash, so the next run sees the replaced file and judges it again, and the result equals a fresh
    run on the final folder."""
    csv_path, folder, items = shapes_bench(tmp_path, n=2)
    questions = load_questions(csv_path)
    swapped = folder / f"{items[0][0]}.png"
    out = tmp_path / "out"
    judge_images(folder, questions, SwappingJudge(swapped), out, progress=False)
    resume = CrashingJudge(None)
    stats: dict[str, int] = {}
    judge_images(folder, questions, resume, out, progress=False, stats=stats)
    n_item = 4 * sum(q.item_id == items[0][0] for q in questions)
    assert resume.judged == stats["rejudged"] == n_item
    fresh = judge_images(folder, questions, OracleJudge(), tmp_path / "fresh", progress=False)
    key = lambda r: (r["item_id"], r["image_index"], r["proposition_id"])  # noqa: E731
    answers = lambda p: {key(r): (r["answer"], r["image"]) for r in read_judgments(p)}  # noqa: E731
    assert answers(out / "judgments.jsonl") == answers(fresh)
