"""evals.generate: any generator's images in each benchmark's official layout; seeds, resume, sharding, mixing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evals import generate
from world.prompts import write_geneval_metadata

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
SHAPES = "tests.shapes_generator:generate"
COLOUR = "tests/shapes_generator.py:seed_colour"


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def cli(*args: str, runner: tuple[str, ...] = (PY, "-m")) -> subprocess.CompletedProcess:
    return subprocess.run([*runner, *args], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def seed_of(path: Path) -> int:
    r, g, _ = np.asarray(Image.open(path))[0, 0].astype(int)
    return int(r + 256 * g)


@pytest.fixture(scope="module")
def metadata(tmp_path_factory) -> tuple[Path, list[dict]]:
    path = tmp_path_factory.mktemp("meta") / "evaluation_metadata.jsonl"
    return path, write_geneval_metadata(path, n_per_task=2, seed=3)


def test_callable_folder_scores_one_with_the_shapes_judge(metadata, tmp_path: Path) -> None:
    meta_path, metas = metadata
    images, scores = tmp_path / "D", tmp_path / "O"
    gen = cli("evals.generate", "--benchmark", "geneval", "--callable", SHAPES, "--prompt-file", str(meta_path),
              "--n-samples", "4", "--out", str(images), "--quiet")
    assert gen.returncode == 0, gen.stderr
    # GenEval's layout: one digit folder per metadata line, holding that line's object and samples/<k:05d>.png
    assert sorted(p.name for p in images.iterdir() if p.is_dir()) == [f"{i:05d}" for i in range(len(metas))]
    for i, meta in enumerate(metas):
        assert json.loads((images / f"{i:05d}" / "metadata.jsonl").read_text()) == meta
        assert sorted(p.name for p in (images / f"{i:05d}" / "samples").iterdir()) == [f"{k:05d}.png"
                                                                                      for k in range(4)]
    judged = cli("evals.geneval", "--images", str(images), "--detector", "shapes", "--out", str(scores))
    assert judged.returncode == 0, judged.stderr
    summary = json.loads((scores / "summary.json").read_text())
    assert summary["overall"] == 1.0 and summary["counts"]["images"] == 4 * len(metas)


def test_two_torchrun_processes_write_the_files_of_one(metadata, tmp_path: Path) -> None:
    meta_path, metas = metadata
    args = ("--benchmark", "geneval", "--callable", SHAPES, "--prompt-file", str(meta_path), "--n-samples", "3",
            "--batch-size", "5", "--quiet")
    one = cli("evals.generate", *args, "--out", str(tmp_path / "one"))
    two = cli("-m", "evals.generate", *args, "--out", str(tmp_path / "two"),
              runner=(str(Path(PY).with_name("torchrun")), "--nproc_per_node", "2"))
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    assert tree(tmp_path / "one") == tree(tmp_path / "two")  # byte-identical, generation.json included
    # each rank generated its own share: every other prompt, together all of them
    shares = sorted(line for line in two.stdout.splitlines() if "rank" in line)
    assert [s.split(" images generated")[0].split()[-1] for s in shares] == [str(3 * len(metas[0::2])),
                                                                           str(3 * len(metas[1::2]))]


def test_seeds_batching_and_resume(metadata, tmp_path: Path) -> None:
    meta_path, metas = metadata
    out = tmp_path / "D"
    base = ["--benchmark", "geneval", "--callable", COLOUR, "--prompt-file", str(meta_path), "--n-samples", "2",
            "--seed", "7", "--quiet", "--out", str(out)]
    first = generate.main([*base, "--batch-size", "3"])
    assert first["generated"] == 2 * len(metas) and first["kept"] == 0
    for i in range(len(metas)):  # image k of prompt i: seed + 1000 i + k
        for k in range(2):
            assert seed_of(out / f"{i:05d}" / "samples" / f"{k:05d}.png") == 7 + 1000 * i + k
    before = tree(out)
    # any batch size gives the same folder
    generate.main([*base[:-1], str(tmp_path / "b1"), "--batch-size", "1"])
    assert tree(tmp_path / "b1") == before
    # resume: delete two samples and a metadata file; only they are rewritten, the rest is kept untouched
    kept = out / "00001" / "samples" / "00000.png"
    mtime = kept.stat().st_mtime_ns
    (out / "00000" / "samples" / "00001.png").unlink()
    (out / "00003" / "samples" / "00000.png").unlink()
    (out / "00002" / "metadata.jsonl").unlink()
    again = generate.main([*base, "--batch-size", "3"])
    assert again["generated"] == 2 and again["kept"] == 2 * len(metas) - 2
    assert tree(out) == before and kept.stat().st_mtime_ns == mtime
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_dpg_grids_and_genai_files(tmp_path: Path) -> None:
    from evals.dpg_refined import scan_images
    from evals.genai_bench import find_images, load_benchmark

    dpg = generate.main(["--benchmark", "dpg", "--callable", COLOUR, "--limit", "3", "--quiet",
                         "--out", str(tmp_path / "dpg")])
    items = generate.load_prompts("dpg", limit=3)
    shipped = [json.loads(line) for line in generate.DEFAULT_PROMPTS["dpg"].read_text().splitlines()[:3]]
    assert dpg["generated"] == 12 and items == [(r["item_id"], r["prompt"]) for r in shipped]
    found = scan_images(tmp_path / "dpg", [i for i, _ in items])  # the DPG scorer's own reader
    assert sorted(found.grids) == sorted(i for i, _ in items) and not found.seeds
    for n, (item_id, text) in enumerate(items):
        tiles = found.load(item_id)  # cropped back TL, TR, BL, BR
        for k in range(4):
            single = tmp_path / "dpg" / "samples" / item_id / f"{k}.png"
            assert seed_of(single) == 1000 * n + k
            np.testing.assert_array_equal(np.asarray(tiles[k]), np.asarray(Image.open(single)))
            assert np.asarray(tiles[k])[0, 0, 2] == len(text) % 256  # the item's own prompt
    genai = generate.main(["--benchmark", "genai", "--callable", COLOUR, "--limit", "4", "--quiet",
                           "--out", str(tmp_path / "genai")])
    assert genai["generated"] == 4
    paths = find_images(tmp_path / "genai", [0, 1, 2, 3])  # the GenAI-Bench scorer's own reader
    prompts = load_benchmark()[0]
    for i, path in paths.items():
        assert path.name == f"{i:05d}.png" and seed_of(path) == 42 + i
        assert np.asarray(Image.open(path))[0, 0, 2] == len(prompts[i]) % 256


def test_shipped_prompt_sets() -> None:
    assert len(generate.load_prompts("geneval")) == 553
    assert len(generate.load_prompts("dpg")) == 1065
    assert sorted(generate.load_prompts("genai")) == list(range(1600))


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory) -> str:
    pytest.importorskip("diffusers")
    from evals.tiny_models import tiny_sd_pipeline

    return tiny_sd_pipeline(str(tmp_path_factory.mktemp("pipe") / "tiny-sd"))


def test_diffusers_pipeline(tiny_pipeline: str, tmp_path: Path) -> None:
    import torch
    from diffusers import DiffusionPipeline

    call = ["num_inference_steps=2", "height=16", "width=16"]
    out = generate.main(["--benchmark", "genai", "--pipeline", tiny_pipeline, "--limit", "3", "--batch-size", "2",
                         "--device", "cpu", "--quiet", "--out", str(tmp_path / "g"), "--gen-kwargs", *call])
    assert out["generated"] == 3
    pipe = DiffusionPipeline.from_pretrained(tiny_pipeline)
    pipe.set_progress_bar_config(disable=True)
    prompts = generate.load_prompts("genai", limit=3)
    for i in range(3):  # each image alone, from a CPU generator seeded 42 + index
        alone = pipe(prompt=[prompts[i]], generator=torch.Generator().manual_seed(42 + i), num_inference_steps=2,
                     height=16, width=16).images[0]
        written = np.asarray(Image.open(tmp_path / "g" / f"{i:05d}.png")).astype(int)
        assert np.abs(written - np.asarray(alone).astype(int)).max() <= 1  # batched vs alone: float round-off only
    manifest = json.loads((tmp_path / "g" / "generation.json").read_text())
    assert manifest["generator"].startswith(f"pipeline:{tiny_pipeline}") and manifest["seed"] == 42


def test_mixing_another_run_into_a_folder_is_refused(metadata, tmp_path: Path, capsys) -> None:
    meta_path, metas = metadata
    base = ["--benchmark", "geneval", "--callable", COLOUR, "--prompt-file", str(meta_path), "--n-samples", "1",
            "--quiet", "--out", str(tmp_path / "D")]
    generate.main(base)
    for extra, word in ((["--seed", "1"], "seed"), (["--limit", "2"], "prompts")):
        with pytest.raises(SystemExit) as exit_:
            generate.main([*base, *extra])
        err = capsys.readouterr().err.strip()
        assert exit_.value.code == 2 and len(err.splitlines()) == 1
        assert err.startswith("error: ") and word in err and "new --out" in err
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps(m) + "\n" for m in reversed(metas)))
    (tmp_path / "D" / "generation.json").unlink()  # even without the record, a prompt folder knows its prompt
    with pytest.raises(SystemExit):
        generate.main([*base[:5], str(other), *base[6:]])
    assert "holds another prompt" in capsys.readouterr().err


def test_generator_id_is_recorded_and_a_resume_under_another_is_refused(tmp_path: Path, capsys) -> None:
    out = tmp_path / "g"
    base = ["--benchmark", "genai", "--prompts", "shapes", "--callable", SHAPES, "--limit", "3", "--quiet",
            "--out", str(out)]
    generate.main([*base, "--generator-id", "model-a@step10"])
    assert json.loads((out / "generation.json").read_text())["generator_id"] == "model-a@step10"
    assert generate.main([*base, "--generator-id", "model-a@step10"])["kept"] == 3  # same id: resumes
    capsys.readouterr()
    for other in (["--generator-id", "model-b"], []):  # another id, or none where one was recorded
        with pytest.raises(SystemExit) as exit_:
            generate.main([*base, *other])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code == 2 and len(err) == 1 and "generator_id: 'model-a@step10'" in err[0], err


def test_gen_kwargs_reach_a_callable_and_belong_to_its_folder(metadata, tmp_path: Path, monkeypatch) -> None:
    """`--gen-kwargs` go to the callable as keyword arguments (YAML-typed); a resume with other ones is refused
    (they are part of what made the images), the same ones resume."""
    meta_path, _ = metadata
    gen = tmp_path / "gen.py"
    gen.write_text(
        "import json, os\n"
        "import numpy as np\n"
        "def sample(prompts, seeds, **kw):\n"
        "    with open(os.environ['KW_LOG'], 'a') as f:\n"
        "        f.write(json.dumps(kw, sort_keys=True) + '\\n')\n"
        "    return [np.full((8, 8, 3), 128, np.uint8) for _ in prompts]\n")
    log = tmp_path / "kw.jsonl"
    args = ("--benchmark", "geneval", "--callable", f"{gen}:sample", "--prompt-file", str(meta_path),
            "--n-samples", "1", "--out", str(tmp_path / "img"), "--quiet")
    monkeypatch.setenv("KW_LOG", str(log))
    first = cli("evals.generate", *args, "--gen-kwargs", "steps=3", "scale=1.5", "name=fast")
    assert first.returncode == 0, first.stderr
    seen = set(log.read_text().splitlines())
    assert seen == {json.dumps({"name": "fast", "scale": 1.5, "steps": 3}, sort_keys=True)}
    other = cli("evals.generate", *args, "--gen-kwargs", "steps=4")
    assert other.returncode == 2 and "was generated with other settings" in other.stderr
    again = cli("evals.generate", *args, "--gen-kwargs", "steps=3", "scale=1.5", "name=fast")
    assert again.returncode == 0, again.stderr
