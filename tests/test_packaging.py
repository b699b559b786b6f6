"""Packaging: a built wheel carries the benchmark data, the configs and the hub presets' architecture configs;
scoring runs without the training stack."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "world", "models", "evals", "experiments", "analysis")
TRAIN_ONLY = ("lightning", "pytorch_lightning", "submitit", "matplotlib", "seaborn", "torchmetrics", "filelock")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the sources (the build never writes into the checkout)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(out)], cwd=src, capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-2000:]
    (path,) = out.glob("*.whl")
    return path


def test_wheel_holds_benchmark_data_and_configs(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    data = {str(p.relative_to(ROOT)) for p in (ROOT / "evals" / "data").rglob("*") if p.is_file()}
    configs = {str(p.relative_to(ROOT)) for p in (ROOT / "experiments" / "configs").glob("*.yaml")}
    assert len(data) > 1000 and "evals/data/geneval/evaluation_metadata.jsonl" in data
    assert data <= names, sorted(data - names)[:5]
    assert configs and configs <= names, sorted(configs - names)
    hub = {str(p.relative_to(ROOT)) for p in (ROOT / "models" / "hub_configs").rglob("*")
           if p.suffix in (".json", ".md")}
    assert len(hub) >= 10 and hub <= names, sorted(hub - names)  # the plan builds every hub model from these
    weights = {str(p.relative_to(ROOT)) for p in (ROOT / "models" / "weights").glob("*.safetensors")}
    assert weights and weights <= names, sorted(weights - names)  # the default encoder's shipped weights
    with zipfile.ZipFile(wheel) as z:  # the shipped prompt files are the checkout's, byte for byte
        for rel in ("evals/data/geneval/evaluation_metadata.jsonl", "evals/data/genai_bench/genai_skills.json"):
            assert z.read(rel) == (ROOT / rel).read_bytes()


def test_wheel_extras(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    requires = [line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    core = [r for r in requires if "extra ==" not in r]
    extra = {r.split(";")[0].split(">")[0].strip(): r.split('extra == "')[1].rstrip('"')
             for r in requires if "extra ==" in r and 'extra == "eval"' in r}
    assert not any(r.startswith(TRAIN_ONLY) for r in core), core
    assert {"accelerate", "diffusers", "tenacity", "datasets"} <= set(extra)
    assert not any(name.startswith(TRAIN_ONLY) for name in extra)


BLOCKER = """
import importlib.abc, runpy, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError(f"{{name}} is not installed (blocked by the test)")
sys.meta_path.insert(0, Block())
sys.argv = {argv!r}
runpy.run_module({module!r}, run_name="__main__", alter_sys=True)
"""


def run_without_training_stack(module: str, *args: str) -> subprocess.CompletedProcess:
    code = BLOCKER.format(blocked=set(TRAIN_ONLY), argv=[module, *args], module=module)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                               "PATH": "/usr/bin:/bin"})


def test_scoring_needs_no_training_stack(tmp_path: Path) -> None:
    from world.dpg_questions import make_dpg_prompt_set, write_dpg_questions_csv
    from world.prompts import write_geneval_metadata

    write_geneval_metadata(tmp_path / "m.jsonl", n_per_task=1, seed=0)
    steps = [
        ("evals.generate", "--benchmark", "geneval", "--callable", "tests.shapes_generator:generate", "--prompt-file",
         str(tmp_path / "m.jsonl"), "--n-samples", "1", "--quiet", "--out", str(tmp_path / "g")),
        ("evals.geneval", "--images", str(tmp_path / "g"), "--judge", "shapes", "--n-resamples", "10", "--out",
         str(tmp_path / "gs")),
    ]
    items = make_dpg_prompt_set(2, seed=0)
    write_dpg_questions_csv(tmp_path / "q.csv", items)
    steps.append(("evals.generate", "--benchmark", "dpg", "--callable", "tests/shapes_generator.py:seed_colour",
                  "--prompt-file", str(tmp_path / "q.csv"), "--quiet", "--out", str(tmp_path / "d")))
    steps.append(("evals.dpg_refined", "--images", str(tmp_path / "d"), "--prompt-file", str(tmp_path / "q.csv"),
                  "--judge", "oracle", "--n-resamples", "10", "--out", str(tmp_path / "ds")))
    for module, *args in steps:
        out = run_without_training_stack(module, *args)
        assert out.returncode == 0, f"{module}: {out.stderr[-2000:]}"
    assert json.loads((tmp_path / "gs" / "summary.json").read_text())["overall"] == 1.0
    assert json.loads((tmp_path / "ds" / "summary.json").read_text())["counts"]["judgments"] > 0
    # and the blocker does block: the training entry point cannot start without Lightning
    out = run_without_training_stack("experiments.train", "--help")
    assert out.returncode != 0 and "blocked by the test" in out.stderr


def test_console_commands_run_the_tools_with_their_exit_codes(tmp_path: Path) -> None:
    """Every console command the installed package declares is beside this Python and is its `python -m
    evals.<tool>`: its help names that module, a bad flag exits 2 with an error, and a real offline run exits 0 with
    the outputs the module writes."""
    import os
    from importlib.metadata import entry_points

    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts") if ep.value.startswith("evals.")}
    assert "[project.scripts]" in (ROOT / "pyproject.toml").read_text()
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # examples/ is a checkout folder, not part of the package
    from evals.scripts import TOOLS

    assert set(scripts.values()) == {f"evals.scripts:{k}" for k in TOOLS}, "pip install -e . again (make venv)"
    for name, target in scripts.items():
        module = TOOLS[target.split(":")[1]].removesuffix(".__main__")
        exe = bin_dir / name
        assert exe.is_file(), f"{name} is not installed: run `make venv` (pip install -e .)"
        out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120, env=env)
        assert out.returncode == 0 and f"python -m {module}" in out.stdout, (name, out.stderr[-300:])
        bad = subprocess.run([str(exe), "--no-such-flag"], capture_output=True, text=True, timeout=120, env=env)
        assert bad.returncode == 2 and "error" in bad.stderr, (name, bad.stderr[-300:])
    run = [str(bin_dir / "unifusion-generate"), "--benchmark", "geneval", "--prompts", "shapes", "--callable",
           "examples.shapes_generator:generate", "--out", str(tmp_path / "images"), "--quiet"]
    assert subprocess.run(run, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300).returncode == 0
    score = subprocess.run([str(bin_dir / "unifusion-geneval"), "--images", str(tmp_path / "images"), "--judge",
                            "shapes", "--out", str(tmp_path / "scores")], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=300)
    assert score.returncode == 0, score.stderr[-500:]
    assert json.loads((tmp_path / "scores" / "summary.json").read_text())["benchmark"] == "geneval"
