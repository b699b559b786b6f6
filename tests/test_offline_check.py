"""The offline check of a generator: shapes-world prompt sets in each benchmark's own format
(``evals.generate --prompts shapes``), GenAI-Bench's exact VQAScore on them, missing-weights messages that name the
offline judge, and the README's commands run verbatim from a folder outside the checkout."""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from evals import genai_bench, generate

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = "examples.shapes_generator:generate"
BLANK = "examples.shapes_generator:blank"


@pytest.fixture(autouse=True)
def _checkout_on_path(monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT))  # examples/ imports as from a checkout, whatever the working folder


def _gen(benchmark: str, out: Path, fn: str = EXAMPLE, *extra: str) -> None:
    generate.main(["--benchmark", benchmark, "--prompts", "shapes", "--callable", fn, "--quiet", "--out", str(out),
                   *extra])


def test_shapes_prompt_sets_are_read_back_by_each_benchmarks_own_readers(tmp_path: Path) -> None:
    from evals.dpg_refined import item_prompts, load_questions
    from evals.geneval import read_metadata_lines
    from evals.shapes_prompts import write_shapes_prompts
    from world.prompts import parse_prompt

    geneval = read_metadata_lines(write_shapes_prompts("geneval", tmp_path / "g"))
    assert len(geneval) == 18  # 3 prompts for each of GenEval's 6 tasks
    assert sorted({m["tag"] for m in geneval}) == sorted(
        ["single_object", "two_object", "counting", "colors", "position", "color_attr"])
    assert all(sum(m["tag"] == t for m in geneval) == 3 for t in {m["tag"] for m in geneval})

    dpg_csv = write_shapes_prompts("dpg", tmp_path / "d")
    assert dpg_csv.name == "dpg_bench.csv"
    assert dpg_csv.read_text().splitlines()[0] == ("item_id,text,keywords,proposition_id,dependency,category_broad,"
                                                   "category_detailed,tuple,question_natural_language")
    items = item_prompts(load_questions(dpg_csv))
    assert [i for i, _ in items] == [f"shapes{i}" for i in range(20)]

    write_shapes_prompts("genai", tmp_path / "a")
    prompts, skills = genai_bench.load_benchmark(tmp_path / "a")
    assert sorted(prompts) == list(range(18))
    # tags read off each prompt's own words: numbers -> counting (advanced), a colour word -> attribute, a relation
    # -> spatial relation; every prompt is basic or advanced, never both
    counting = {i for i, p in prompts.items() if re.search(r"\b(two|three|four)\b", p)}
    related = {i for i, p in prompts.items() if re.search(r"\b(left of|right of|above|below)\b", p)}
    assert set(skills["advanced"]) == set(skills["counting"]) == counting and len(counting) == 3
    assert set(skills["spatial relation"]) == related and len(related) == 3
    assert set(skills["basic"]) == set(prompts) - counting
    assert all(parse_prompt(p)["prompt"] == p for p in prompts.values())

    # fixed: a second write gives the same bytes; --limit writes the first N of the same set
    again = write_shapes_prompts("geneval", tmp_path / "g2")
    assert again.read_bytes() == (tmp_path / "g" / "evaluation_metadata.jsonl").read_bytes()
    assert read_metadata_lines(write_shapes_prompts("geneval", tmp_path / "g3", limit=4)) == geneval[:4]
    # GenAI-Bench reports basic and advanced prompts apart: the first 3 hold both, fewer are refused
    write_shapes_prompts("genai", tmp_path / "a3", limit=3)
    assert {k: len(v) for k, v in genai_bench.load_benchmark(tmp_path / "a3")[1].items()
            if k in ("basic", "advanced")} == {"basic": 2, "advanced": 1}
    with pytest.raises(ValueError, match="--limit 2 leaves .* without basic or advanced prompts"):
        write_shapes_prompts("genai", tmp_path / "a2", limit=2)
    assert not (tmp_path / "a2").exists()


def test_a_folder_of_other_prompts_is_refused(tmp_path: Path, capsys) -> None:
    out = tmp_path / "official"
    generate.main(["--benchmark", "genai", "--callable", BLANK, "--limit", "2", "--quiet", "--out", str(out)])
    with pytest.raises(SystemExit) as exit_:
        _gen("genai", out)
    assert exit_.value.code == 2 and "holds images of other prompts" in capsys.readouterr().err
    assert not (out / "genai_image.json").exists()  # refused before anything was written
    edited = tmp_path / "edited"
    edited.mkdir()
    (edited / "dpg_bench.csv").write_text("item_id,text\n")
    with pytest.raises(SystemExit) as exit_:
        _gen("dpg", edited)
    assert exit_.value.code == 2 and "holds another prompt set" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        _gen("dpg", tmp_path / "m", EXAMPLE, "--prompt-file", str(edited / "dpg_bench.csv"))
    assert exit_.value.code == 2 and "drop --prompt-file" in capsys.readouterr().err


def test_genai_oracle_scores_the_pairing_of_image_and_prompt(tmp_path: Path) -> None:
    images = tmp_path / "images"
    _gen("genai", images)
    # two images swapped: a counting prompt's (N objects of class A) and a single-object prompt's of another
    # class B: neither image shows the other's prompt, every other image still shows its own
    from world.prompts import parse_prompt

    prompts, skills = genai_bench.load_benchmark(images)
    meta = {i: parse_prompt(p) for i, p in prompts.items()}
    a = skills["counting"][0]
    b = next(i for i, m in meta.items() if m["tag"] == "single_object"
             and m["include"][0]["class"] != meta[a]["include"][0]["class"])
    pa, pb = images / f"{a:05d}.png", images / f"{b:05d}.png"
    pa_bytes = pa.read_bytes()
    pa.write_bytes(pb.read_bytes())
    pb.write_bytes(pa_bytes)
    r = genai_bench.main(["--images", str(images), "--prompt-file", str(images), "--judge", "oracle",
                          "--n-resamples", "20", "--out", str(tmp_path / "s")])
    assert r["judge"] == {"judge": "oracle"} and r["prompts"] == 18
    assert r["all"]["mean"] == pytest.approx(16 / 18)  # exactly the two swapped prompts fail
    assert r["skills"]["counting"]["mean"] == pytest.approx(2 / 3)
    saved = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert saved["all"]["mean"] == pytest.approx(16 / 18)
    # labelled as what it is, in summary.json and in the table the console prints
    assert "not a GenAI-Bench score" in saved["note"]
    assert "not a GenAI-Bench score" in (tmp_path / "s" / "table.md").read_text()


def test_genai_oracle_refuses_prompts_outside_the_shapes_world(tmp_path: Path, capsys) -> None:
    images = tmp_path / "images"
    generate.main(["--benchmark", "genai", "--callable", BLANK, "--quiet", "--out", str(images)])
    with pytest.raises(SystemExit) as exit_:
        genai_bench.main(["--images", str(images), "--judge", "oracle", "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1
    assert "scores shapes-world prompts only" in err[0] and "prompt 00000 is not one: 'A baker" in err[0]
    assert not (tmp_path / "s" / "scores.jsonl").exists()


@pytest.mark.parametrize(("module", "benchmark", "args", "offline"), [
    ("evals.geneval", "geneval", ["--judge-model", "./no-such-detector"], "--judge shapes"),
    ("evals.dpg_refined", "dpg", ["--judge", "hf", "--judge-model", "./no-such-vlm"], "--judge oracle"),
    ("evals.genai_bench", "genai", ["--judge", "hf", "--judge-model", "./no-such-vlm"], "--judge oracle"),
])
def test_missing_weights_name_the_offline_judge(tmp_path: Path, capsys, module: str, benchmark: str,
                                                args: list[str], offline: str) -> None:
    images = tmp_path / "images"
    if benchmark == "geneval":  # the COCO detector refuses shapes-world classes: one official prompt
        generate.main(["--benchmark", "geneval", "--callable", BLANK, "--limit", "1", "--quiet", "--out", str(images)])
    else:
        _gen(benchmark, images, BLANK)
    data = {"geneval": [], "dpg": ["--prompt-file", str(images / "dpg_bench.csv")],
            "genai": ["--prompt-file", str(images)]}
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(module).main(["--images", str(images), *data[benchmark], *args, "--out",
                                              str(tmp_path / "s")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1, err
    assert "no such folder" in err[0] and f"`{offline}` checks the pipeline offline" in err[0]
    assert "--prompts shapes" in err[0]


# ------------------------------------------------------------------------------------------------ README
README_SECTION = "## Check your generator offline in one minute"


def readme_commands() -> list[str]:
    """The commands of the README section's bash block, continuation lines joined, verbatim otherwise."""
    text = (ROOT / "README.md").read_text()
    section = text.split(README_SECTION, 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [c.strip() for c in block.replace("\\\n", " ").splitlines() if c.strip()]


@pytest.mark.slow
def test_readme_offline_commands_run_outside_the_checkout(tmp_path: Path) -> None:
    """Each command of the README section, as written, in a folder outside the checkout (the checkout on
    PYTHONPATH stands in for an installed package beside its examples/); then the same commands with the example's
    ``blank`` generator. Every command exits 0 and writes its summary; the exact generator scores 1, blank 0."""
    commands = readme_commands()
    assert len(commands) == 7 and all(c.startswith("python -m evals.") for c in commands)
    assert not tmp_path.resolve().is_relative_to(ROOT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    assert shutil.which("python", path=env["PATH"]) == str(Path(sys.executable).parent / "python")

    def run_all(cwd: Path, cmds: list[str]) -> None:
        cwd.mkdir()
        for cmd in cmds:
            out = subprocess.run(["bash", "-c", cmd], cwd=cwd, env=env, capture_output=True, text=True)
            assert out.returncode == 0, f"{cmd}\n{out.stderr[-3000:]}"

    def scores(cwd: Path) -> tuple[dict, dict, dict]:
        own = [json.loads((cwd / f"scores/{b}/summary.json").read_text()) for b in ("geneval", "dpg", "genai")]
        # the combined command's rows are each benchmark's own headline, re-scored from the same folders
        combined = json.loads((cwd / "scores/all/summary.json").read_text())
        assert [(r["benchmark"], r["value"]) for r in combined["rows"]] == [
            (s["benchmark"], s["headline"]["value"]) for s in own]
        return tuple(own)

    run_all(tmp_path / "exact", commands)
    geneval, dpg, genai = scores(tmp_path / "exact")
    # the example draws every prompt correctly: every image passes every check of every judge
    assert geneval["counts"]["prompts"] == 18 and geneval["counts"]["images"] == 72 and geneval["overall"] == 1.0
    assert dpg["counts"]["prompts"] == 20 and dpg["counts"]["images"] == 80 and dpg["fixed"]["micro_avg"] == 1.0
    assert genai["prompts"] == 18 and genai["judge"]["judge"] == "oracle" and genai["all"]["mean"] == 1.0

    run_all(tmp_path / "blank", [c.replace(EXAMPLE, BLANK) for c in commands])
    geneval, dpg, genai = scores(tmp_path / "blank")
    assert geneval["overall"] == 0.0 and dpg["fixed"]["micro_avg"] == 0.0 and genai["all"]["mean"] == 0.0
