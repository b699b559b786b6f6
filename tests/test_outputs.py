"""The output contract (``evals.outputs``) that GenEval, DPG-Bench and GenAI-Bench share, and the combined command
``evals.all``: checked offline on shapes-world folders with the exact judges, against numbers recomputed from each
benchmark's own per-item files."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evals import outputs

ROOT = Path(__file__).resolve().parents[1]
OWN_FILES = {"geneval": {"results.jsonl"}, "dpg": {"judgments.jsonl"}, "genai": {"scores.jsonl"}}
ROW = re.compile(r"^\| (\**)(.+?)\1 \| (\S+) \| \[(\S+), (\S+)\] \| (\d+) \|$")


def _blank(path: Path) -> None:
    """Overwrite an image with a white one of its size: the exact judges find nothing there."""
    with Image.open(path) as im:
        size = im.size
    Image.new("RGB", size, "white").save(path, format="PNG")


@pytest.fixture(scope="module")
def scored(tmp_path_factory) -> tuple[Path, Path, dict]:
    """Shapes-world folders of the exact example generator, a few images blanked so that no score is 1, scored by
    ``evals.all --judge offline``. Returns (images root, out, the combined summary)."""
    from evals import all as evals_all
    from evals import generate

    sys.path.insert(0, str(ROOT))  # examples/ imports as from a checkout
    base = tmp_path_factory.mktemp("contract")
    root, out = base / "images", base / "out"
    for bench in ("geneval", "dpg", "genai"):
        generate.main(["--benchmark", bench, "--prompts", "shapes", "--callable", "examples.shapes_generator:generate",
                       "--generator-id", "example-exact", "--quiet", "--out", str(root / bench)])
    for k in (0, 1, 2):  # 3 of 4 samples of the first (single-object) prompt
        _blank(root / "geneval" / "00000" / "samples" / f"{k:05d}.png")
    _blank(root / "dpg" / "shapes0.png")  # every tile of one prompt
    _blank(root / "genai" / "00000.png")
    combined = evals_all.main(["--images-root", str(root), "--judge", "offline", "--n-resamples", "50",
                               "--out", str(out)])
    return root, out, combined


def _table_rows(text: str) -> dict[str, tuple[str, str, str, int]]:
    """The contract rows of a scorer's table.md: name -> (value, CI low, CI high, n) as printed."""
    rows = {}
    for line in text.splitlines():
        m = ROW.match(line)
        if m:
            rows[m.group(2)] = (m.group(3), m.group(4), m.group(5), int(m.group(6)))
    return rows


def _summary(out: Path, bench: str) -> dict:
    return json.loads((out / bench / "summary.json").read_text())


def _items(out: Path, bench: str) -> list[dict]:
    return [json.loads(line) for line in (out / bench / "items.jsonl").read_text().splitlines()]


def test_the_three_scorers_write_the_same_file_set(scored) -> None:
    _, out, _ = scored
    for bench, own in OWN_FILES.items():
        files = {p.name for p in (out / bench).iterdir()} - {".lock"}
        assert files == set(outputs.CONTRACT_FILES) | own, bench
        summary = _summary(out, bench)
        assert summary["benchmark"] == bench
        assert set(summary["counts"]) >= set(outputs.COUNT_KEYS)
        # judge.json holds the identity summary.json names
        assert json.loads((out / bench / "judge.json").read_text())["identity"] == summary["judge"]
    assert _summary(out, "geneval")["judge"] == {"judge": "shapes"}
    # what made the images, from each image folder's generation.json
    for bench in OWN_FILES:
        assert _summary(out, bench)["generator"] == {"generator": "callable:examples.shapes_generator:generate",
                                                    "id": "example-exact"}
        assert "generator: `example-exact`" in (out / bench / "table.md").read_text()
    assert _summary(out, "dpg")["judge"]["judge"] == _summary(out, "genai")["judge"]["judge"] == "oracle"


def test_table_md_prints_the_numbers_of_summary_json(scored) -> None:
    _, out, _ = scored
    for bench in OWN_FILES:
        summary = _summary(out, bench)
        table = _table_rows((out / bench / "table.md").read_text())
        expected = {summary["headline"]["name"]: summary["headline"], **summary["breakdown"]}
        assert list(table) == list(expected), bench  # same names, same order
        for name, s in expected.items():
            assert table[name] == (outputs.fmt(s["value"]), outputs.fmt(s["ci95"][0]), outputs.fmt(s["ci95"][1]),
                                   s["n"]), (bench, name)
        c = summary["counts"]
        assert f"counts: {c['scored']} scored, {c['failed']} failed, {c['partial']} partial" in (
            out / bench / "table.md").read_text()


def test_headlines_equal_the_per_item_files_recomputed_by_hand(scored) -> None:
    _, out, _ = scored
    # GenEval: the mean over tasks of each task's share of correct images, from the official results.jsonl
    rows = [json.loads(line) for line in (out / "geneval" / "results.jsonl").read_text().splitlines()]
    tasks = {r["tag"] for r in rows}
    overall = np.mean([np.mean([r["correct"] for r in rows if r["tag"] == t]) for t in tasks])
    geneval = _summary(out, "geneval")
    assert geneval["headline"]["value"] == pytest.approx(overall) and overall < 1.0
    # 3 blanked images of one of the 3 single-object prompts: 9 images, 6 correct
    assert geneval["breakdown"]["single_object"]["value"] == pytest.approx(9 / 12)
    assert geneval["breakdown"]["single_object"]["n"] == 3 and geneval["headline"]["n"] == 18
    assert len(_items(out, "geneval")) == len(rows) == geneval["counts"]["scored"] == 72
    # DPG: fixed.micro_avg = the mean of the prompts' mean image scores; one prompt of 20 drawn blank
    dpg, items = _summary(out, "dpg"), _items(out, "dpg")
    assert dpg["headline"]["name"] == "fixed.micro_avg" and dpg["headline"]["value"] == pytest.approx(
        np.mean([r["avg"] for r in items]))
    assert len(items) == 20 and dpg["headline"]["value"] < 1.0 and dpg["counts"]["scored"] == 80
    # GenAI-Bench: all = the mean over the tagged prompts; the blanked image shows nothing of its prompt
    genai, items = _summary(out, "genai"), _items(out, "genai")
    assert genai["headline"]["value"] == pytest.approx(np.mean([r["score"] for r in items if r["skills"]]))
    assert genai["headline"]["value"] == pytest.approx(17 / 18) and genai["counts"]["scored"] == 18


def test_combined_table_has_one_row_per_benchmark_with_its_own_headline(scored) -> None:
    _, out, combined = scored
    assert json.loads((out / "summary.json").read_text()) == combined
    assert [r["benchmark"] for r in combined["rows"]] == ["geneval", "dpg", "genai"] and combined["absent"] == []
    lines = [line for line in (out / "table.md").read_text().splitlines() if line.startswith("| ")][1:]
    assert len(lines) == 3
    for row, line in zip(combined["rows"], lines, strict=True):
        own = _summary(out, row["benchmark"])["headline"]
        assert (row["score"], row["value"], row["ci95"], row["n"]) == (own["name"], own["value"], own["ci95"],
                                                                      own["n"])
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[:5] == [row["benchmark"], own["name"], outputs.fmt(own["value"]),
                             f"[{outputs.fmt(own['ci95'][0])}, {outputs.fmt(own['ci95'][1])}]", str(own["n"])]
        assert cells[6] == "example-exact" and row["generator"]["id"] == "example-exact"


def test_combined_scores_what_is_there_and_refuses_bad_input_first(scored, tmp_path: Path, capsys) -> None:
    from evals import all as evals_all

    root, _, _ = scored
    only = tmp_path / "only"
    shutil.copytree(root / "genai", only / "genai")
    combined = evals_all.main(["--images-root", str(only), "--judge", "offline", "--n-resamples", "20",
                               "--out", str(tmp_path / "o")])
    assert [r["benchmark"] for r in combined["rows"]] == ["genai"] and combined["absent"] == ["geneval", "dpg"]
    assert "not scored (no image folder): geneval, dpg" in (tmp_path / "o" / "table.md").read_text()
    capsys.readouterr()
    (tmp_path / "empty").mkdir()
    for argv, says in ((["--images-root", str(tmp_path / "empty")], "holds none of the benchmark folders"),
                       (["--images-root", str(only), "--genai-judge", "shapes"], "'shapes' is not a genai judge")):
        with pytest.raises(SystemExit) as exit_:
            evals_all.main([*argv, "--out", str(tmp_path / "bad")])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and says in err[0], err
        assert not (tmp_path / "bad").exists()  # refused before anything is scored or written


def test_a_folder_of_the_earlier_layout_resumes_and_loses_its_old_summaries(scored, tmp_path: Path, capsys) -> None:
    from evals import dpg_refined, genai_bench

    root, out, _ = scored
    old = tmp_path / "dpg"
    shutil.copytree(out / "dpg", old)
    (old / "scores.json").write_text('{"fixed": {"micro_avg": 0.5}}\n')
    (old / "per_prompt.csv").write_text("item_id\n")
    judged = (old / "judgments.jsonl").read_bytes()
    dpg_refined.main(["--images", str(root / "dpg"), "--prompt-file", str(root / "dpg" / "dpg_bench.csv"),
                      "--judge", "oracle", "--n-resamples", "50", "--out", str(old)])
    assert (old / "judgments.jsonl").read_bytes() == judged  # the cache was read: nothing judged again
    assert not (old / "scores.json").exists() and not (old / "per_prompt.csv").exists()
    assert _summary(tmp_path, "dpg")["headline"] == _summary(out, "dpg")["headline"]
    assert "outputs of an earlier layout (scores.json, per_prompt.csv)" in capsys.readouterr().err
    # a reader of summaries refuses a folder that only holds an earlier summary, saying what to do
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "results.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="results.json, an earlier layout: re-score into a new --out"):
        outputs.read_summary(legacy)
    assert genai_bench.SCORES == "scores.jsonl"  # the GenAI-Bench cache keeps its name, so its folders resume too


def test_the_old_prompt_flag_names_are_aliases_of_prompt_file(capsys) -> None:
    from evals import dpg_refined, genai_bench, generate, geneval

    cases = [(geneval.parser(), ["--images", "i", "--out", "o", "--metadata", "m.jsonl"], Path("m.jsonl")),
             (dpg_refined._parser(), ["judge", "--images", "i", "--out", "o", "--questions", "q.csv"], "q.csv"),
             (dpg_refined._parser(), ["aggregate", "--judgments", "j", "--out", "o", "--questions", "q.csv"], "q.csv"),
             (genai_bench.parser(), ["--images", "i", "--out", "o", "--data", "d"], Path("d")),
             (generate.parser(), ["--benchmark", "dpg", "--ckpt", "c", "--out", "o", "--metadata", "q.csv"], "q.csv")]
    for p, argv, expected in cases:
        assert p.parse_args(argv).prompt_file == expected
        new = [cli_arg if cli_arg not in ("--metadata", "--questions", "--data") else "--prompt-file"
               for cli_arg in argv]
        assert p.parse_args(new).prompt_file == expected
    notes = capsys.readouterr().err.splitlines()
    assert len(notes) == 5 and all(n.endswith("is an old name of --prompt-file") for n in notes)


def test_combined_prompt_files_an_explicit_flag_then_the_folders_own(tmp_path: Path) -> None:
    from evals import all as evals_all

    root = tmp_path / "images"
    for bench in ("dpg", "genai"):
        (root / bench).mkdir(parents=True)
    (root / "dpg" / "dpg_bench.csv").write_text("item_id\n")

    def prompt_files(*extra: str) -> dict[str, str | None]:
        args = evals_all.parser().parse_args(["--images-root", str(root), "--out", str(tmp_path / "o"), *extra])
        runs = dict(evals_all.plan(args))
        return {b: argv[argv.index("--prompt-file") + 1] if "--prompt-file" in argv else None
                for b, argv in runs.items()}

    assert prompt_files() == {"dpg": str(root / "dpg" / "dpg_bench.csv"), "genai": None}  # genai: the shipped set
    assert prompt_files("--dpg-prompt-file", "q.csv", "--genai-prompt-file", "g") == {"dpg": "q.csv", "genai": "g"}
