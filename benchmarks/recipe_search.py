"""One trial of the CPU recipe search: train + score one run of an experiment under ``--set`` overrides, one row.

    OMP_NUM_THREADS=1 python benchmarks/recipe_search.py --trial NAME [--run lap] [--radius LO,HI]
                                                         [--set KEY=VALUE ...] [--note TEXT]
    OMP_NUM_THREADS=1 python benchmarks/recipe_search.py --trial NAME --from-trial SRC --set sample.cfg_scale=5
    OMP_NUM_THREADS=1 python benchmarks/recipe_search.py --rerun NAME     # repeat a row of trials.csv

The run is ``conditioning_candidates``'s ``--run`` with the overrides applied last (as ``experiments.launch
--set``), trained and evaluated in this process with one torch thread, in ``--runs-dir/<trial>/``. One row per
trial is appended to ``results/recipe_search/trials.csv``: the overrides, GenEval-shapes overall and per task,
and the train / eval wall times. ``--radius LO,HI`` trains and evaluates in a world whose shapes have radii
LO..HI at 32 px instead of the default ``world.scene.radius_range``; ``--radius grid:R`` in one whose shapes have
radius R and sit on a grid of (2R + 2)-pixel cells (world-spec changes, tried here before they are made in code).
``--from-trial SRC`` trains nothing: it re-samples and re-scores SRC's final weights with SRC's config updated
by the ``sample.*`` / ``eval.*`` overrides (sampler and CFG settings cost no training); its ``train_s`` is SRC's.
"""

from __future__ import annotations

import argparse
import csv
import shlex
import sys
import time
from pathlib import Path

import pandas as pd
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.cli import fail  # noqa: E402
from common.geneval_spec import TASKS  # noqa: E402
from common.paths import RUNS_DIR  # noqa: E402
from experiments.config import load_experiment  # noqa: E402
from world import scene  # noqa: E402

CSV = ROOT / "results" / "recipe_search" / "trials.csv"
COLUMNS = ["trial", "from_trial", "exp", "run", "radius", "sets", "steps", "overall", *TASKS,
           "train_s", "eval_s", "total_s", "cpu_s", "threads", "note"]


def patch_radius(radius: str) -> None:
    """Make every scene of this process use integer radii LO..HI (the world's size range)."""
    lo, hi = (int(v) for v in radius.split(","))
    if not 1 <= lo <= hi:
        fail(f"--radius needs 1 <= LO <= HI, got {radius!r}")
    scene.radius_range = lambda size: (lo, hi)


def patch_grid(r: int) -> None:
    """A world whose shapes all have radius ``r`` and sit on a grid: cells of 2r + 2 px, one object per cell.

    Centres are ``(pitch * i + r, pitch * j + r)``, so every box keeps the world's one-pixel gap and, when the
    pitch is a multiple of the DiT's patch, every shape covers whole patches. Placement is the only change:
    prompts, captions, colours and the detector are the world's own.
    """
    pitch = 2 * r + 2

    def place_on_grid(rng, size: int, specs: list[tuple[str, str]]):
        n = size // pitch
        if len(specs) > n * n:
            return None
        cells = rng.permutation(n * n)[: len(specs)]
        return tuple(scene.Obj(cls, color, int(c % n) * pitch + r, int(c // n) * pitch + r, r)
                     for (cls, color), c in zip(specs, cells, strict=True))

    import world.edits
    import world.prompts
    scene.radius_range = lambda size: (r, r)
    for module in (scene, world.prompts, world.edits):
        module.place = place_on_grid


def patch_world(radius: str) -> None:
    """``--radius``: ``LO,HI`` radii at random places, or ``grid:R`` (``patch_grid``)."""
    if radius.startswith("grid:"):
        patch_grid(int(radius.removeprefix("grid:")))
    else:
        patch_radius(radius)


def trial(name: str, exp: str, run_name: str, sets: list[str], radius: str, runs_dir: Path, note: str) -> dict:
    from experiments.train import run

    if radius:
        patch_world(radius)
    _, runs = load_experiment(exp, sets=sets)
    by_name = {r.name: r for r in runs}
    if run_name not in by_name:
        fail(f"unknown run {run_name!r} of {exp}; valid: {', '.join(by_name)}")
    spec = by_name[run_name]
    torch.manual_seed(0)
    c0, t0 = time.process_time(), time.time()
    run_dir = run(spec.exp, spec.name, spec.config, runs_dir / name / spec.dirname, threads=1)
    total, cpu = time.time() - t0, time.process_time() - c0
    df = pd.read_csv(run_dir / "metrics.csv")
    val = dict(zip(df["metric"], df["value"], strict=True))
    row = {"trial": name, "from_trial": "", "exp": exp, "run": run_name, "radius": radius, "sets": shlex.join(sets),
           "steps": int(df["step"].iloc[0]), "overall": round(val["geneval.overall"], 4),
           **{t: round(val[f"geneval.{t}"], 4) for t in TASKS},
           "train_s": round(val["time.train_s"], 1), "eval_s": round(val["time.eval_s"], 1),
           "total_s": round(total, 1), "cpu_s": round(cpu, 1), "threads": torch.get_num_threads(), "note": note}
    return row


def resample(name: str, src: str, sets: list[str], runs_dir: Path, note: str) -> dict:
    """Re-sample and score trial ``src``'s final weights with ``sample.*`` / ``eval.*`` overrides."""
    from evals.images import load_module
    from experiments.config import merge, set_dotted
    from experiments.train import evaluate_all

    rows = [r for r in csv.DictReader(open(CSV)) if r["trial"] == src]
    if not rows:
        fail(f"no trial {src!r} in {CSV}")
    base = rows[-1]
    if base["radius"]:
        patch_world(base["radius"])
    (ckpt,) = (runs_dir / src).glob("*/final.ckpt")
    module = load_module(ckpt)
    config = module.config
    for item in sets:
        key, _, value = item.partition("=")
        if not key.startswith(("sample.", "eval.")):
            fail(f"--from-trial takes only sample.* / eval.* overrides, got {item!r}")
        config = merge(config, set_dotted(key, yaml.safe_load(value)))
    module.config = config
    module.eval()
    out = runs_dir / name
    c0, t0 = time.process_time(), time.time()
    df = evaluate_all(module, config, out, "recipe_search", name, int(base["steps"]))
    t_eval, cpu = time.time() - t0, time.process_time() - c0
    val = dict(zip(df["metric"], df["value"], strict=True))
    return {"trial": name, "from_trial": src, "exp": base["exp"], "run": base["run"], "radius": base["radius"],
            "sets": shlex.join(shlex.split(base["sets"]) + sets), "steps": base["steps"],
            "overall": round(val["geneval.overall"], 4), **{t: round(val[f"geneval.{t}"], 4) for t in TASKS},
            "train_s": base["train_s"], "eval_s": round(t_eval, 1),
            "total_s": round(float(base["train_s"]) + t_eval, 1), "cpu_s": round(cpu, 1),
            "threads": torch.get_num_threads(), "note": note}


def append(row: dict) -> None:
    CSV.parent.mkdir(parents=True, exist_ok=True)
    new = not CSV.exists()
    with open(CSV, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            w.writeheader()
        w.writerow(row)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trial", help="name of the trial (its row and run folder)")
    p.add_argument("--rerun", help="repeat the trial of this name from trials.csv (a new row, suffixed '-rerun')")
    p.add_argument("--exp", default="conditioning_candidates")
    p.add_argument("--run", default="lap")
    p.add_argument("--set", action="append", dest="sets", default=[], metavar="KEY=VALUE")
    p.add_argument("--radius", default="", help="LO,HI shape radii at 32 px, or grid:R (radius R on a grid "
                   "of 2R + 2 px cells); default: the world's own")
    p.add_argument("--from-trial", default="", help="re-sample this trial's weights; train nothing")
    p.add_argument("--runs-dir", type=Path, default=RUNS_DIR / "recipe_search",
                   help="where the trial runs go (default: $UNIFUSION_RUNS/recipe_search, or runs/recipe_search)")
    p.add_argument("--note", default="")
    a = p.parse_args(argv)
    if a.rerun:
        rows = [r for r in csv.DictReader(open(CSV)) if r["trial"] == a.rerun]
        if not rows:
            fail(f"no trial {a.rerun!r} in {CSV}")
        r = rows[-1]
        a.trial, a.exp, a.run, a.radius = f"{a.rerun}-rerun", r["exp"], r["run"], r["radius"]
        a.sets, a.note, a.from_trial = shlex.split(r["sets"]), r["note"], r["from_trial"]
        if a.from_trial:  # only the sampling overrides are new; the source's own come from its checkpoint
            src = [s for s in csv.DictReader(open(CSV)) if s["trial"] == a.from_trial][-1]
            a.sets = a.sets[len(shlex.split(src["sets"])):]
    if not a.trial:
        raise SystemExit("error: give --trial NAME or --rerun NAME")
    torch.set_num_threads(1)
    if a.from_trial:
        row = resample(a.trial, a.from_trial, a.sets, a.runs_dir, a.note)
    else:
        row = trial(a.trial, a.exp, a.run, a.sets, a.radius, a.runs_dir, a.note)
    append(row)
    print(row)


if __name__ == "__main__":
    main()
