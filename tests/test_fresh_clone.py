"""The repo as a newcomer gets it: nothing tracked points into one build machine, `make help` documents every
target, and a clone on a machine without caches runs the quick start and scores its checkpoint."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Absolute folders that only exist on some build machine: home folders, CI workspaces, pytest/mktemp folders.
MACHINE_PATH = re.compile(
    r"(?<![\w.~$-])(/home/[A-Za-z_][\w.-]*|/root/|/Users/[A-Za-z_]|/work/|/workspace\b|/tmp/pytest-of-"
    r"|/tmp/tmp\w|/private/var/|/var/folders/)"
)
TMP = re.compile(r"(?<![\w.~$-])/tmp/")  # any temporary folder: only test fixtures may name one


def tracked_files() -> list[str]:
    out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], check=True, capture_output=True).stdout
    return [f for f in out.decode().split("\0") if f]


def machine_paths(rel: str, text: str) -> list[str]:
    """``file:line: match`` for every build-machine path in one tracked text file."""
    found = []
    for n, line in enumerate(text.splitlines(), 1):
        for m in MACHINE_PATH.finditer(line):
            found.append(f"{rel}:{n}: {m.group(0)}")
        if not rel.startswith(("tests/", ".ci/")):  # tests and CI scripts run on a machine, they may use /tmp
            found += [f"{rel}:{n}: {m.group(0)}" for m in TMP.finditer(line)]
    return found


def test_the_path_patterns_catch_machine_paths_and_spare_the_rest() -> None:
    bad = ["see /home/alice/x", "cd /root/.cache", "/Users/bob/data", "ln -s /work/main/.cache",
           "/workspace/repo", "/tmp/pytest-of-root/p0", "/tmp/tmpab12/run", "/private/var/x", "out to /tmp/rs"]
    good = ["$HOME/.cache/huggingface", "~/data", "runs/recipe_search", "https://github.com/user/home/x",
            "<repo>/.cache", "$TMPDIR/x", "http://example.org/work/x"]
    assert all(machine_paths("README.md", b) for b in bad), [b for b in bad if not machine_paths("README.md", b)]
    assert not any(machine_paths("README.md", g) for g in good), [g for g in good if machine_paths("README.md", g)]
    assert machine_paths("tests/x.py", "out to /tmp/rs") == []  # a test may write to /tmp ...
    assert machine_paths("tests/x.py", "/home/alice/x")  # ... but never names someone's home


def test_no_tracked_file_is_a_link_out_of_the_repo_or_names_a_build_machine_folder() -> None:
    links, paths = [], []
    for rel in tracked_files():
        p = ROOT / rel
        if p.is_symlink():
            target = (p.parent / os.readlink(p)).resolve()
            if os.path.isabs(os.readlink(p)) or ROOT not in target.parents:
                links.append(f"{rel} -> {os.readlink(p)}")
            continue
        # fixtures are data; this file spells the patterns and their examples
        if not p.is_file() or rel.startswith("tests/fixtures/") or rel == "tests/test_fresh_clone.py":
            continue
        data = p.read_bytes()
        if b"\0" in data[:8192]:  # binary (images, checkpoints, weights)
            continue
        paths += machine_paths(rel, data.decode("utf-8", errors="replace"))
    assert links == [], f"tracked links leave the repo (they dangle in every other clone): {links}"
    assert paths == [], f"tracked files name folders of one build machine: {paths}"


def test_make_help_lists_every_target_with_one_line() -> None:
    makefile = (ROOT / "Makefile").read_text()
    phony = re.search(r"^\.PHONY:(.*)$", makefile, re.M).group(1).split()
    out = subprocess.run(["make", "-s", "-C", str(ROOT), "help"], check=True, capture_output=True, text=True).stdout
    lines = out.splitlines()
    listed = [re.match(r"\s+make ([a-z-]+)", ln).group(1) for ln in lines]
    assert sorted(listed) == sorted(phony), (listed, phony)
    for ln in lines:
        text = ln.split(":", 1)[1].strip() if ":" in ln else ""
        assert text and "(undocumented)" not in ln, f"no description: {ln!r}"


@pytest.mark.slow
def test_a_fresh_clone_runs_the_quick_start_and_scores_its_checkpoint(tmp_path: Path) -> None:
    """``git clone`` into an empty folder, HOME and every cache empty, the default cache and runs locations:
    ``make sweep EXP=conditioning_candidates SMOKE=1``, then from outside the clone ``evals.generate --ckpt`` of one
    of its runs on two GenEval prompts and ``evals.geneval`` with the offline shapes judge. The built virtualenv
    is reused (``VENV=``; ``-o`` keeps make from reinstalling it against the clone)."""
    clone, home, outside = tmp_path / "clone", tmp_path / "home", tmp_path / "elsewhere"
    home.mkdir(), outside.mkdir()
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    venv = Path(sys.executable).parent.parent
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("UNIFUSION_", "HF_", "TRANSFORMERS_", "TORCH_", "XDG_", "PYTEST_", "COV_"))}
    env.update(HOME=str(home), HF_HOME=str(home / "hf"), XDG_CACHE_HOME=str(home / "cache"),
               TORCH_HOME=str(home / "torch"), PYTHONPATH="")

    def run(cmd: list[str], cwd: Path, **extra: str) -> str:
        r = subprocess.run(cmd, cwd=cwd, env={**env, **extra}, capture_output=True, text=True)
        log = r.stdout[-4000:] + r.stderr[-4000:]
        assert r.returncode == 0 and "Traceback" not in r.stderr, f"{' '.join(cmd)} failed ({r.returncode}):\n{log}"
        return log

    stamp = venv / ".installed"
    run(["make", "-C", str(clone), "sweep", "EXP=conditioning_candidates", "SMOKE=1", f"VENV={venv}", "-o", str(stamp)],
        cwd=clone)
    ckpts = sorted((clone / "runs").rglob("final.ckpt"))
    assert ckpts, f"the sweep left no final.ckpt under {clone / 'runs'}"
    py = str(venv / "bin" / "python")
    meta = outside / "geneval_metadata.jsonl"
    write = "import sys; from world.prompts import write_geneval_metadata as w; w(sys.argv[1], n_per_task=1, seed=0)"
    run([py, "-c", write, str(meta)], cwd=outside, PYTHONPATH=str(clone))
    run([py, "-m", "evals.generate", "--benchmark", "geneval", "--ckpt", str(ckpts[0]), "--prompt-file", str(meta),
         "--limit", "2", "--n-samples", "1", "--out", str(outside / "images")], cwd=outside, PYTHONPATH=str(clone))
    run([py, "-m", "evals.geneval", "--images", str(outside / "images"), "--judge", "shapes",
         "--out", str(outside / "scores")], cwd=outside, PYTHONPATH=str(clone))
    assert any((outside / "scores").iterdir()), "the scoring wrote nothing"
