"""Expand an ablation sweep and run every grid point through submitit.

    python -m experiments.launch EXP [--cluster local|debug|slurm] [--profile NAME] [--smoke] [--parallel N]

- ``local`` (default): submitit's LocalExecutor, one subprocess per run, at most ``--parallel`` at a time
  (default: one per 1-2 cores), torch threads split between them.
- ``debug``: in-process, one after another (pdb-able).
- ``slurm``: a job array on the cluster (``slurm/profiles/<NAME>.yaml`` gives partition, GPUs, time, ...).

Runs live in ``runs/<EXP>/<run>-<confighash>/``: finished runs are skipped, unfinished ones resume from their
last checkpoint. When all runs end, their tidy rows are collected into ``results/<EXP>/metrics.csv`` and the
figure is redrawn; failed runs are listed with the tail of their log, never silently missing.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import pandas as pd
import submitit
import yaml

from experiments.config import RunSpec, load_experiment
from experiments.train import RUNS_DIR, RunJob, atomic_write_text

RESULTS_DIR = Path("results")
SLURM_PROFILES = Path(__file__).resolve().parents[1] / "slurm" / "profiles"


def slurm_parameters(profile: str | None) -> dict:
    """submitit parameters from a SLURM profile YAML; unknown profile -> error listing the valid ones."""
    valid = sorted(p.stem for p in SLURM_PROFILES.glob("*.yaml"))
    if profile is None:
        raise ValueError(f"--cluster slurm needs --profile; valid profiles: {', '.join(valid) or '(none)'}")
    path = SLURM_PROFILES / f"{profile}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown SLURM profile {profile!r}; valid: {', '.join(valid) or '(none)'}")
    prof = yaml.safe_load(path.read_text()) or {}
    gpus = int(prof.get("gpus_per_node", 0))
    params = {
        "slurm_partition": prof.get("partition"),
        "timeout_min": int(prof.get("time_min", 60)),
        "nodes": int(prof.get("nodes", 1)),
        # one task per GPU, as Lightning's SLURMEnvironment expects (notes/model_anchors.md §3)
        "tasks_per_node": max(1, gpus),
        "gpus_per_node": gpus,
        "cpus_per_task": int(prof.get("cpus_per_task", 2)),
        "mem_gb": prof.get("mem_gb"),
        "slurm_account": prof.get("account"),
        "slurm_constraint": prof.get("constraint"),
        "slurm_qos": prof.get("qos"),
        "slurm_array_parallelism": int(prof.get("array_parallelism", 64)),
        "slurm_signal_delay_s": int(prof.get("signal_delay_s", 120)),
    }
    return {k: v for k, v in params.items() if v is not None}


def default_parallel(n_runs: int) -> int:
    cores = os.cpu_count() or 1
    return max(1, min(n_runs, cores))


def run_sweep(
    exp: str,
    cluster: str = "local",
    profile: str | None = None,
    smoke: bool = False,
    parallel: int | None = None,
    runs_dir: Path = RUNS_DIR,
    results_dir: Path | None = None,
) -> pd.DataFrame:
    """Run (or resume) every run of ``exp``; collect results; return the tidy metrics table."""
    if cluster not in ("local", "debug", "slurm"):
        raise ValueError(f"unknown cluster {cluster!r}; valid: local, debug, slurm")
    spec, runs = load_experiment(exp, smoke=smoke)
    root = Path(runs_dir) / (f"{exp}-smoke" if smoke else exp)
    results_dir = Path(results_dir) if results_dir else (root / "results" if smoke else RESULTS_DIR / exp)
    todo = [r for r in runs if not (root / r.dirname / "DONE").exists()]
    for r in runs:
        if r not in todo:
            print(f"[sweep] {r.name}: done, skipped ({root / r.dirname})")
    t0 = time.time()
    failures: list[tuple[RunSpec, str]] = []
    if todo:
        failures = submit(todo, root, cluster, profile, parallel)
    wall = time.time() - t0
    df = collect(exp, runs, root, results_dir, figure=spec.get("figure"))
    if todo:
        atomic_write_text(results_dir / "sweep_time.txt", f"{wall:.1f} s for {len(todo)} runs ({cluster})\n")
    print(f"[sweep] {exp}: {len(runs) - len(failures)}/{len(runs)} runs done in {wall:.0f} s; "
          f"results in {results_dir}")
    if failures:
        for r, tail in failures:
            print(f"[sweep] FAILED {r.name} ({root / r.dirname}):\n{tail}", file=sys.stderr)
        raise SystemExit(f"{len(failures)} run(s) failed: {', '.join(r.name for r, _ in failures)}")
    return df


def submit(todo: list[RunSpec], root: Path, cluster: str, profile: str | None, parallel: int | None):
    executor = submitit.AutoExecutor(folder=root / ".submitit" / "%j", cluster=cluster)
    if cluster == "slurm":
        executor.update_parameters(**slurm_parameters(profile))
        threads = 0
    else:
        parallel = parallel or default_parallel(len(todo))
        threads = max(1, (os.cpu_count() or 1) // parallel)
        executor.update_parameters(timeout_min=24 * 60)
    jobs: list[tuple[RunSpec, submitit.Job]] = []

    def make(r: RunSpec) -> RunJob:
        return RunJob(r.exp, r.name, r.config, str(root / r.dirname), threads)

    if cluster == "slurm":
        with executor.batch():
            futures = [(r, executor.submit(make(r))) for r in todo]
        jobs = futures
        for r, j in jobs:
            print(f"[sweep] {r.name}: submitted as SLURM job {j.job_id}")
    else:
        queue = list(todo)
        running: list[tuple[RunSpec, submitit.Job]] = []
        while queue or running:
            while queue and len(running) < parallel:
                r = queue.pop(0)
                job = executor.submit(make(r))
                print(f"[sweep] {r.name}: started (job {job.job_id}, {threads} threads)")
                running.append((r, job))
                jobs.append((r, job))
            time.sleep(0.5 if cluster == "local" else 0)
            running = [(r, j) for r, j in running if not j.done()]
    failures = []
    for r, job in jobs:
        try:
            job.result()
            print(f"[sweep] {r.name}: done")
        except Exception as err:  # noqa: BLE001 - report every failure with its log, keep the others
            log = ""
            try:
                log = (job.stderr() or "")[-3000:]
            except Exception:  # noqa: BLE001
                pass
            failures.append((r, f"{type(err).__name__}: {str(err)[-2000:]}\n{log}"))
    return failures


def collect(exp: str, runs: list[RunSpec], root: Path, results_dir: Path, figure: str | None = None) -> pd.DataFrame:
    """Rebuild ``results_dir/metrics.csv`` from the run directories (idempotent) and redraw the figure."""
    done = [root / r.dirname for r in runs if (root / r.dirname / "DONE").exists()]
    frames = [pd.read_csv(d / "metrics.csv", dtype={"layers": str}) for d in done]
    if not frames:
        return pd.DataFrame()
    df = pd.concat(frames, ignore_index=True)
    results_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(results_dir / "metrics.csv", df.to_csv(index=False))
    if figure:
        from analysis.figures import draw

        draw(figure, df, results_dir)
    return df


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("exp")
    p.add_argument("--cluster", default="local")
    p.add_argument("--profile")
    p.add_argument("--smoke", action="store_true", help="tiny settings, results under runs/<EXP>-smoke/")
    p.add_argument("--parallel", type=int, help="local: runs at a time (default: one per core)")
    p.add_argument("--runs-dir", type=Path, default=RUNS_DIR)
    p.add_argument("--results-dir", type=Path)
    a = p.parse_args(argv)
    try:
        run_sweep(a.exp, a.cluster, a.profile, a.smoke, a.parallel, a.runs_dir, a.results_dir)
    except (ValueError, KeyError) as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
