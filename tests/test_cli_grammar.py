"""One CLI grammar for evals.generate / geneval / dpg_refined / genai_bench / audit: every bad input is ONE line
``error: ...`` with exit 2, found before any model loads; defaults in --help; old flag names still work."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evals import audit, dpg_refined, genai_bench, generate, geneval
from world.prompts import render_geneval_folder, write_geneval_metadata

ROOT = Path(__file__).resolve().parents[1]
MAINS = {"generate": generate.main, "geneval": geneval.main, "dpg": dpg_refined.main, "genai": genai_bench.main,
         "audit": audit.main}


@pytest.fixture()
def no_model_loads(monkeypatch):
    """Every way a judge or generator loads weights fails the test."""
    import evals.clip_flant5
    import evals.images
    import evals.runtime

    def loaded(*args, **kwargs):
        raise AssertionError(f"a model was loaded: {args[:2]}")

    for mod, name in ((evals.runtime, "from_pretrained"), (evals.runtime, "processor_from_pretrained"),
                      (evals.images, "load_module"), (evals.clip_flant5, "load_clip_flant5")):
        monkeypatch.setattr(mod, name, loaded)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A shapes GenEval folder, a flat folder of PNGs, a DPG questions CSV + grid folder, a genai folder."""
    from world.dpg_questions import make_dpg_prompt_set, write_dpg_questions_csv

    root = tmp_path_factory.mktemp("inputs")
    metadata = write_geneval_metadata(root / "meta.jsonl", n_per_task=1, seed=0)
    render_geneval_folder(metadata, root / "geneval", n_samples=1)
    (root / "flat").mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8)).save(root / "flat" / f"{i}.png")
    items = make_dpg_prompt_set(2, seed=0)
    write_dpg_questions_csv(root / "q.csv", items)
    (root / "dpg").mkdir()
    Image.new("RGB", (64, 48)).save(root / "dpg" / f"{items[0][0]}.png")  # not a square 2x2 grid
    (root / "genai").mkdir()
    Image.new("RGB", (8, 8)).save(root / "genai" / "00000.png")  # 1599 prompts without an image
    (root / "model.ckpt").write_bytes(b"not a checkpoint")
    (root / "a_file").write_text("x")
    (root / "empty").mkdir()
    for case in ("loop", "fifo", "jpeg"):  # GenEval folders with one odd entry each
        shutil.copytree(root / "geneval", root / f"geneval_{case}")
    os.symlink("00009", root / "geneval_loop" / "00009")  # a link to itself
    os.mkfifo(root / "geneval_fifo" / "00000" / "samples" / "00001.png")
    Image.new("RGB", (8, 8)).save(root / "geneval_jpeg" / "00000" / "samples" / "00001.png", format="JPEG")
    (root / "grids").mkdir()
    for item_id, _, _ in items:
        Image.new("RGB", (64, 64)).save(root / "grids" / f"{item_id}.png")
    (root / "out_dir_cache" / "judgments.jsonl").mkdir(parents=True)
    (root / "gens.py").write_text("def forgot_return(prompts, seeds):\n    images = [None] * len(prompts)\n")
    return {"root": root, "meta": root / "meta.jsonl", "geneval": root / "geneval", "flat": root / "flat",
            "q": root / "q.csv", "dpg": root / "dpg", "genai": root / "genai", "ckpt": root / "model.ckpt",
            "file": root / "a_file", "empty": root / "empty", "gens": root / "gens.py", "grids": root / "grids",
            "dir_cache": root / "out_dir_cache",
            **{f"geneval_{case}": root / f"geneval_{case}" for case in ("loop", "fifo", "jpeg")}}


BAD = [
    # evals.generate
    ("generate", ["--benchmark", "mmlu", "--callable", "m:f", "--out", "{out}"], "invalid choice: 'mmlu'"),
    ("generate", ["--benchmark", "geneval", "--out", "{out}"], "one of the arguments --callable --pipeline --ckpt"),
    ("generate", ["--benchmark", "geneval", "--callable", "no_such_module_xyz:f", "--out", "{out}"],
     "cannot import 'no_such_module_xyz'"),
    ("generate", ["--benchmark", "geneval", "--callable", "tests.shapes_generator:nope", "--out", "{out}"],
     "has no function 'nope'"),
    ("generate", ["--benchmark", "geneval", "--callable", "justaname", "--out", "{out}"], "must look like"),
    ("generate", ["--benchmark", "dpg", "--callable", "m:f", "--n-samples", "3", "--out", "{out}"], "2x2 grid"),
    ("generate", ["--benchmark", "genai", "--callable", "m:f", "--n-samples", "2", "--out", "{out}"],
     "one image per prompt"),
    ("generate", ["--benchmark", "genai", "--ckpt", "{ckpt}", "--gen-kwargs", "steps=2", "--out", "{out}"],
     "--gen-kwargs applies to --pipeline and --callable only"),
    ("generate", ["--benchmark", "genai", "--ckpt", "{root}/missing.ckpt", "--out", "{out}"], "checkpoint not found"),
    ("generate", ["--benchmark", "geneval", "--ckpt", "{ckpt}", "--prompt-file", "{root}/none.jsonl", "--out", "{out}"],
     "prompt file not found"),
    ("generate", ["--benchmark", "geneval", "--callable", "m:f", "--device-map", "auto", "--out", "{out}"],
     "--device-map applies to --pipeline only"),
    ("generate", ["--benchmark", "geneval", "--callable", "m:f", "--batch-size", "0", "--out", "{out}"],
     "must be >= 1"),
    # evals.geneval (default judge hf-mask2former: must not load for any of these)
    ("geneval", ["--images", "{root}/missing", "--out", "{out}"], "image folder not found"),
    ("geneval", ["--images", "{flat}", "--out", "{out}"], "no GenEval prompt folders"),
    ("geneval", ["--images", "{geneval}", "--out", "{out}"], "unknown to the detector; valid: ['person'"),
    ("geneval", ["--images", "{geneval}", "--judge", "yolo", "--out", "{out}"], "invalid choice: 'yolo'"),
    ("geneval", ["--images", "{geneval}", "--judge", "shapes", "--options", "thresh=1", "--out", "{out}"],
     "unknown GenEval option"),
    ("geneval", ["--ckpt", "{ckpt}", "--detector", "yolo", "--n-per-task", "1", "--out", "{out}"],
     "invalid choice: 'yolo'"),
    ("geneval", ["--ckpt", "{ckpt}", "--n-per-task", "1", "--out", "{out}"], "only --judge shapes knows"),
    ("geneval", ["--ckpt", "{root}/missing.ckpt", "--judge", "shapes", "--n-per-task", "1", "--out", "{out}"],
     "checkpoint not found"),
    ("geneval", ["--images", "{geneval}", "--device-map", "everywhere", "--out", "{out}"], "unknown --device-map"),
    # evals.dpg_refined (default judge gemma-3-27b-it)
    ("dpg", ["--images", "{root}/missing", "--prompt-file", "{q}", "--out", "{out}"], "images folder not found"),
    ("dpg", ["--images", "{dpg}", "--prompt-file", "{root}/none.csv", "--out", "{out}"], "questions CSV not found"),
    ("dpg", ["--images", "{dpg}", "--prompt-file", "{q}", "--out", "{out}"], "a DPG-Bench grid must be 2x2 tiles"),
    ("dpg", ["--images", "{dpg}", "--prompt-file", "{q}", "--judge", "openai", "--out", "{out}"],
     "--judge openai needs --judge-url"),
    ("dpg", ["--images", "{dpg}", "--prompt-file", "{q}", "--judge-url", "http://x/v1", "--out", "{out}"],
     "--judge-url only applies to --judge openai"),
    ("dpg", ["--images", "{dpg}", "--prompt-file", "{q}", "--judge", "gpt", "--out", "{out}"], "invalid choice"),
    ("dpg", ["aggregate", "--prompt-file", "{q}", "--judgments", "{root}/none.jsonl", "--out", "{out}"],
     "judgments file not found"),
    ("dpg", ["--ckpt", "{ckpt}", "--prompt-file", "{q}", "--n-images", "2", "--out", "{out}"],
     "--n-samples must be 4"),
    # evals.genai_bench (default judge clip-flant5-xxl)
    ("genai", ["--images", "{root}/missing", "--out", "{out}"], "image folder not found"),
    ("genai", ["--images", "{genai}", "--out", "{out}"], "1599 of 1600 prompts have no image"),
    ("genai", ["--images", "{genai}", "--judge", "openai", "--out", "{out}"], "--judge openai needs --judge-url"),
    ("genai", ["--images", "{genai}", "--judge", "openai", "--judge-url", "ftp://x", "--judge-model", "m",
               "--out", "{out}"], "must start with http"),
    ("genai", ["--scores", "{q}", "--out", "{out}"], "--scores only applies with --human-correlation"),
    ("genai", ["--human-correlation", "{root}/none.json", "--images", "{genai}", "--out", "{out}"],
     "human ratings file not found"),
    # evals.audit
    ("audit", ["--n", "0", "--out", "{out}"], "must be >= 1"),
    ("audit", ["--out", "{file}"], "is a file, not a folder"),
    ("audit", ["--device-map", "everywhere", "--dpg-hf", "x", "--out", "{out}"], "unknown --device-map"),
    ("audit", ["--judge-model", "served", "--out", "{out}"], "--judge-url and --judge-model go together"),
    # --out naming an existing file: refused before the run, not when the results are written at its end
    ("generate", ["--benchmark", "genai", "--callable", "m:f", "--out", "{file}"], "is a file, not a folder"),
    ("geneval", ["--images", "{geneval}", "--judge", "shapes", "--out", "{file}"], "is a file, not a folder"),
    ("dpg", ["--images", "{dpg}", "--prompt-file", "{q}", "--judge", "oracle", "--out", "{file}"],
     "is a file, not a folder"),
    ("dpg", ["aggregate", "--prompt-file", "{q}", "--judgments", "{q}", "--out", "{file}"], "is a file, not a folder"),
    ("genai", ["--images", "{genai}", "--out", "{file}"], "is a file, not a folder"),
    # --device: a GPU that is not there, or a name torch does not know, before any judge or generator loads
    ("generate", ["--benchmark", "genai", "--ckpt", "{ckpt}", "--device", "cuda", "--out", "{out}"],
     "device 'cuda': CUDA is not available"),
    ("geneval", ["--images", "{geneval}", "--device", "cuda", "--out", "{out}"], "device 'cuda': CUDA is not"),
    ("dpg", ["--images", "{dpg}", "--prompt-file", "{q}", "--device", "cuda:1", "--out", "{out}"],
     "device 'cuda:1': CUDA is not available"),
    ("genai", ["--images", "{genai}", "--device", "cuda", "--out", "{out}"], "device 'cuda': CUDA is not"),
    ("audit", ["--device", "cuda", "--out", "{out}"], "device 'cuda': CUDA is not available"),
    ("generate", ["--benchmark", "genai", "--callable", "m:f", "--device", "gpu", "--out", "{out}"],
     "unknown device 'gpu'; valid: auto, cpu, cuda, cuda:N, mps"),
    ("geneval", ["--images", "{geneval}", "--judge", "shapes", "--device", "gpu", "--out", "{out}"],
     "unknown device 'gpu'"),
    ("dpg", ["--images", "{dpg}", "--prompt-file", "{q}", "--judge", "oracle", "--device", "gpu", "--out", "{out}"],
     "unknown device 'gpu'"),
    ("genai", ["--images", "{genai}", "--device", "gpu", "--out", "{out}"], "unknown device 'gpu'"),
    ("audit", ["--device", "gpu", "--out", "{out}"], "unknown device 'gpu'"),
    ("geneval", ["--images", "{geneval}", "--judge", "shapes", "--device", "meta", "--out", "{out}"],
     "device 'meta' is not supported"),
    # DPG on a folder in another layout (or none): what was expected and what is there
    ("dpg", ["--images", "{empty}", "--prompt-file", "{q}", "--out", "{out}"],
     "no DPG-Bench images in {empty}: expected <item_id>.png 2x2 grids or <item_id>/<k>.png per-seed files "
     "for the 2 items of the questions"),
    ("dpg", ["--images", "{empty}", "--prompt-file", "{q}", "--out", "{out}"], "found an empty folder"),
    ("dpg", ["--images", "{geneval}", "--prompt-file", "{q}", "--out", "{out}"], "found 6 folders (00000/, 00001/"),
    # GenEval entries that cannot be scored as they are: refused by name before the judge loads
    ("geneval", ["--images", "{geneval_loop}", "--judge", "shapes", "--out", "{out}"],
     "geneval_loop/00009 is a symlink that loops or points nowhere"),
    ("geneval", ["--images", "{geneval_fifo}", "--judge", "shapes", "--out", "{out}"],
     "00000/samples/00001.png is not a regular file"),
    ("geneval", ["--images", "{geneval_jpeg}", "--judge", "shapes", "--out", "{out}"],
     "00000/samples/00001.png is named .png but its bytes are JPEG"),
    # a DPG cache that is a folder
    ("dpg", ["--images", "{grids}", "--prompt-file", "{q}", "--judge", "oracle", "--out", "{dir_cache}"],
     "judgments.jsonl is not a regular file"),
    ("dpg", ["aggregate", "--prompt-file", "{q}", "--judgments", "{dir_cache}/judgments.jsonl", "--out", "{out}"],
     "judgments.jsonl is not a regular file"),
    # a generator that returns nothing
    ("generate", ["--benchmark", "genai", "--callable", "{gens}:forgot_return", "--limit", "1", "--quiet",
                  "--out", "{out}"], "gens.py:forgot_return returned NoneType for 1 prompts; it must return a list"),
    # a typo'd flag by name, also when it leaves a required flag unset
    ("generate", ["--benchmark", "genai", "--callable", "m:f", "--limt", "2", "--out", "{out}"],
     "unrecognized argument --limt (did you mean --limit?)"),
    ("generate", ["--benchmark", "genai", "--callable", "m:f", "--limit", "2", "--ot", "{out}"],
     "unrecognized argument --ot (did you mean --out?)"),
    ("geneval", ["--imags", "{geneval}", "--out", "{out}"], "unrecognized argument --imags (did you mean --images?)"),
    ("dpg", ["--images", "{dpg}", "--prompt-file", "{q}", "--ot={out}"], "unrecognized argument --ot (did you mean "
                                                                          "--out?)"),
    ("genai", ["--images", "{genai}", "--out", "{out}", "--n-resample", "5", "--bogus"],
     "unrecognized argument --bogus"),
]


@pytest.mark.parametrize("tool, argv, message", BAD, ids=[f"{t}-{m[:30]}" for t, _, m in BAD])
def test_bad_input_is_one_line_exit_2_before_any_model(tool, argv, message, files, tmp_path, capsys,
                                                       no_model_loads) -> None:
    paths = {k: str(v) for k, v in files.items()}
    argv = [a.format(out=tmp_path / "out", **paths) for a in argv]
    message = message.format(**paths)
    with pytest.raises(SystemExit) as exit_:
        MAINS[tool](argv)
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("note: ")]
    assert exit_.value.code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_dpg_without_prompt_file_and_hub_says_pass_prompt_file(files, tmp_path, capsys, monkeypatch,
                                                               no_model_loads) -> None:
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'Jialuo21/DPG-Bench' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(SystemExit) as exit_:
        dpg_refined.main(["--images", str(files["dpg"]), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and "pass --prompt-file" in err[0]


def test_missing_weights_are_one_clear_line(files, tmp_path) -> None:
    """A judge whose weights are not there: one line naming the model and how to fetch it (a real process)."""
    from world.dpg_questions import make_dpg_prompt_set

    grids = tmp_path / "grids"
    grids.mkdir()
    for item_id, _, _ in make_dpg_prompt_set(2, seed=0):
        Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(grids / f"{item_id}.png")
    for args in (["evals.dpg_refined", "--images", str(grids), "--prompt-file", str(files["q"]), "--judge", "hf",
                  "--judge-model", "/nonexistent/gemma"],
                 ["evals.generate", "--benchmark", "genai", "--pipeline", "./no/such/pipeline", "--limit", "1"]):
        out = subprocess.run([sys.executable, "-m", *args, "--out", str(tmp_path / "o")], cwd=ROOT,
                             capture_output=True, text=True, timeout=300, env={"PYTHONPATH": str(ROOT),
                                                                                "HF_HUB_OFFLINE": "1",
                                                                                "PATH": "/usr/bin:/bin"})
        err = [line for line in out.stderr.splitlines() if line.strip()]
        assert out.returncode == 2 and len(err) == 1, out.stderr
        assert "no such folder" in err[0] and "hf download" in err[0]


@pytest.mark.parametrize("tool, flag, default", [
    ("generate", "--batch-size", "16"), ("geneval", "--judge", "hf-mask2former"),
    ("dpg", "--judge", "gemma-3-27b-it"), ("genai", "--judge", "clip-flant5-xxl"), ("audit", "--n-resamples", "1000")])
def test_help_shows_defaults(tool, flag, default, capsys) -> None:
    argv = ["judge", "--help"] if tool == "dpg" else ["--help"]
    with pytest.raises(SystemExit) as exit_:
        MAINS[tool](argv)
    lines = capsys.readouterr().out.split("options:", 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(flag + " "))
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("  -")), len(lines))
    entry = " ".join(" ".join(lines[start:end]).split())  # the flag's help text, wrapped lines joined
    assert exit_.value.code == 0
    assert f"(default: {default})" in entry, entry


def test_old_flag_names_still_work(files, tmp_path, capsys) -> None:
    # geneval: --detector / --ci-resamples
    assert geneval.main(["--images", str(files["geneval"]), "--detector", "shapes", "--ci-resamples", "7",
                         "--out", str(tmp_path / "g")]) == 0
    err = capsys.readouterr().err
    assert "note: --detector is an old name of --judge" in err and "--ci-resamples" in err
    assert json.loads((tmp_path / "g" / "summary.json").read_text())["judge"]["judge"] == "shapes"
    # genai_bench: --model / --model-id / --url / --api-key-env land on the judge flags
    a = genai_bench.parser().parse_args(["--images", "d", "--model", "openai", "--model-id", "m", "--url",
                                         "http://h/v1", "--api-key-env", "K", "--out", "o"])
    assert (a.judge, a.judge_model, a.judge_url, a.judge_api_key_env) == ("openai", "m", "http://h/v1", "K")
    # dpg_refined: --gen-seed / --n-images
    a = dpg_refined._parser().parse_args(["judge", "--images", "d", "--gen-seed", "5", "--n-images", "4",
                                          "--out", "o"])
    assert (a.seed, a.n_samples, a.judge) == (5, 4, "gemma-3-27b-it")


def test_errors_from_your_generator_keep_their_traceback_and_debug_keeps_ours(files, tmp_path) -> None:
    """Only the harness's own input checks become one ``error:`` line: a KeyError inside the user's sampler and a
    RuntimeError like a CUDA OOM keep their traceback (a real process each); ``--debug`` keeps ours too."""
    gen = tmp_path / "mygen.py"
    gen.write_text("def broken(prompts, seeds):\n    settings = {}\n    return settings['num_steps']\n\n"
                   "def oom(prompts, seeds):\n    raise RuntimeError('CUDA out of memory. Tried to allocate 2 GiB')\n")
    env = {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}

    def run(*argv: str) -> subprocess.CompletedProcess:
        out = tmp_path / f"o{len(list(tmp_path.glob('o*')))}"
        return subprocess.run([sys.executable, "-m", "evals.generate", "--benchmark", "genai", "--limit", "1",
                               "--out", str(out), *argv], cwd=ROOT, capture_output=True, text=True,
                              timeout=300, env=env)

    for fn, last in (("broken", "KeyError: 'num_steps'"), ("oom", "RuntimeError: CUDA out of memory")):
        out = run("--callable", f"{gen}:{fn}")
        assert out.returncode == 1 and "Traceback (most recent call last)" in out.stderr, out.stderr
        assert f"mygen.py\", line {3 if fn == 'broken' else 6}" in out.stderr
        assert out.stderr.strip().splitlines()[-1].startswith(last), out.stderr
    ours = ["--ckpt", str(files["ckpt"]), "--prompt-file", str(tmp_path / "none.jsonl")]
    plain = run(*ours)
    assert plain.returncode == 2 and plain.stderr.strip().splitlines() == [
        line for line in plain.stderr.strip().splitlines() if line.startswith("error: ")] != []
    debug = run(*ours, "--debug")
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
    assert "prompt file not found" in debug.stderr.strip().splitlines()[-1]


def test_pipeline_without_diffusers_says_how_to_install_it(tmp_path, capsys, monkeypatch, no_model_loads) -> None:
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` now raises ImportError
    with pytest.raises(SystemExit) as exit_:
        generate.main(["--benchmark", "genai", "--pipeline", "stabilityai/sdxl-turbo", "--limit", "1",
                       "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1, err
    assert "--pipeline needs the diffusers package" in err[0] and "pip install 'diffusers" in err[0]
    assert not (tmp_path / "o").exists()
