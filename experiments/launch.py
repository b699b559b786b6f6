"""Expand an ablation sweep and run every grid point through submitit.

    python -m experiments.launch EXP [--cluster local|debug|slurm] [--profile NAME] [--smoke] [--parallel N]
                                     [--paper] [--set KEY=VALUE ...]
                                     [--runs a,b] [--collect]

- ``local`` (default): submitit's LocalExecutor, one subprocess per run, at most ``--parallel`` at a time
  (default: one per 1-2 cores), torch threads split between them; the longest runs (steps x DiT size) start first.
- ``debug``: in-process, one after another (pdb-able).
- ``slurm``: a job array on the cluster (``slurm/profiles/<NAME>.yaml`` gives partition, GPUs, time, ...).

Runs live in ``runs/<EXP>/<run>-<confighash>/`` (``experiments.run_dir``): finished runs are skipped, unfinished
ones resume from their last checkpoint, and a run whose exact config (and training seed) finished in another sweep
of the same runs folder adopts those results instead of training again. When all runs end, their tidy rows are
collected into ``results/<EXP>/metrics.csv`` and the figure is redrawn; failed runs are listed with the tail of
their log, never silently missing.
``--collect`` only rebuilds the results (`make collect`); `make status` is ``experiments.status``.

On SLURM every input is checked before submitting: profile keys and types, the partition (``sinfo``), GPUs asked
of a partition that has none. A paper sweep (``--paper``) is planned first (``experiments/plan.py``: every run
built and stepped on meta tensors, costed and fitted to the profile's GPU) and refused with the plan's message
unless every run is ok. Job states come from ``scontrol`` (submitit's come from sacct, which needs slurmdbd).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import submitit

from common.cli import fail
from common.files import atomic_write_text
from common.paths import RESULTS_DIR, RUNS_DIR
from experiments.config import RunSpec, load_experiment
from experiments.evaluation import BENCHMARKS
from experiments.profiles import load_profile
from experiments.run_dir import RunDir, adopt_identical
from experiments.status import SLURM_TERMINAL, Progress, experiment_root, format_status, slurm_jobs, status_table
from experiments.sweep_time import log_sweep_time
from experiments.train import RunJob

PROGRESS_EVERY_S = float(os.environ.get("UNIFUSION_PROGRESS_EVERY", 10))  # local sweeps: seconds between lines


def slurm_parameters(profile: str | None) -> dict[str, Any]:
    """submitit parameters from a SLURM profile YAML; unknown profile -> error listing the valid ones."""
    prof = load_profile(profile)
    gpus = int(prof.get("gpus_per_node") or 0)
    params = {
        "slurm_partition": prof.get("partition"),
        "timeout_min": int(prof.get("time_min") or 60),
        "nodes": int(prof.get("nodes") or 1),
        # one task per GPU, as Lightning's SLURMEnvironment expects (it takes each rank from its SLURM task)
        "tasks_per_node": max(1, gpus),
        "gpus_per_node": gpus or None,  # no --gpus-per-node line at all on CPU partitions
        "cpus_per_task": int(prof.get("cpus_per_task") or 2),
        "mem_gb": prof.get("mem_gb"),
        "slurm_account": prof.get("account"),
        "slurm_constraint": prof.get("constraint"),
        "slurm_qos": prof.get("qos"),
        "slurm_array_parallelism": int(prof.get("array_parallelism") or 64),
        "slurm_signal_delay_s": int(prof.get("signal_delay_s") or 120),
        "slurm_max_num_timeout": prof.get("max_requeue"),
        # A rank that dies (an exception, a NaN loss, OOM) ends the whole step: without this srun lets the other
        # ranks wait in their next collective until the process-group timeout (30 min of every GPU). submitit's
        # other ranks never exit non-zero on a preemption signal, so its requeue is unaffected.
        "slurm_srun_args": ["--kill-on-bad-exit=1"],
    }
    return {k: v for k, v in params.items() if v is not None}


def parse_partition_gpus(sinfo_out: str) -> dict[str, int]:
    """``sinfo -h -o "%R|%G"`` lines -> {partition: most GPUs on one of its nodes}.

    GRES strings look like ``gpu:8``, ``gpu:a100:4(S:0-1)``, ``gpu:4,shard:8`` or ``(null)``.
    """
    gpus: dict[str, int] = {}
    for line in sinfo_out.splitlines():
        name, _, gres = line.strip().partition("|")
        if not name:
            continue
        count = 0
        for item in gres.split(","):
            parts = item.split("(")[0].split(":")
            if parts[0] == "gpu":
                count = max(count, int(parts[-1]) if parts[-1].isdigit() else 1)
        gpus[name] = max(gpus.get(name, 0), count)
    return gpus


def partition_gpus() -> dict[str, int] | None:
    """GPUs per node of each partition the cluster has (``sinfo``); None where sinfo is unavailable."""
    if shutil.which("sinfo") is None:
        return None
    out = subprocess.run(["sinfo", "-h", "-o", "%R|%G"], capture_output=True, text=True, timeout=30)
    return parse_partition_gpus(out.stdout) if out.returncode == 0 else None


def check_profile_against_cluster(profile: str, partitions: dict[str, int] | None = None) -> None:
    """Before submitting: the profile's partition exists and has the GPUs it asks for (checked via ``sinfo``).

    ``partitions`` maps partition -> GPUs per node (default: ``partition_gpus()``); skipped without sinfo.
    """
    prof = load_profile(profile)
    partitions = partition_gpus() if partitions is None else partitions
    if partitions is None:
        return
    part = prof.get("partition")
    if part is not None and part not in partitions:
        raise ValueError(f"profile {profile!r}: partition {part!r} not on this cluster; valid: "
                         f"{', '.join(sorted(partitions))}")
    want = int(prof.get("gpus_per_node") or 0)
    have = partitions.get(part, 0) if part is not None else max(partitions.values(), default=0)
    if want > have:
        with_gpus = ", ".join(p for p, g in sorted(partitions.items()) if g) or "(none)"
        raise ValueError(f"profile {profile!r} asks for {want} GPU(s) per node but partition {part!r} has {have}; "
                         f"partitions with GPUs: {with_gpus}")


def check_runs_fit_profile(runs: list[RunSpec], profile: str) -> None:
    """Before submitting: every run's ``trainer.devices`` x ``num_nodes`` is the profile's tasks per node x nodes.

    srun starts one task per GPU and Lightning stops a job whose ranks do not add up to its devices x nodes, but
    only once the job has waited in the queue and started; here the mismatch is an error at once, with the
    settings that fit the profile and keep each run's global batch (through ``accumulate_grad_batches``).
    """
    from experiments.schema import trainer_settings

    prof = load_profile(profile)
    tasks, nodes = max(1, int(prof.get("gpus_per_node") or 0)), int(prof.get("nodes") or 1)
    bad = []
    for r in runs:
        t = trainer_settings(r.config)
        if t["devices"] in ("auto", tasks) and t["num_nodes"] == nodes:
            continue
        devices = tasks if t["devices"] == "auto" else t["devices"]
        acc = t["accumulate_grad_batches"] or 1
        ranks, fit = devices * t["num_nodes"] * acc, tasks * nodes
        hint = f", accumulate_grad_batches={ranks // fit} keeps its global batch" if ranks % fit == 0 else ""
        bad.append(f"{r.label} (devices={t['devices']}, num_nodes={t['num_nodes']}{hint})")
    if bad:
        raise ValueError(
            f"profile {profile!r} starts {tasks} task(s) per node on {nodes} node(s), but these runs ask Lightning for "
            f"other numbers: {'; '.join(bad)}. Match them, e.g. SET=\"trainer.devices={tasks} "
            f"trainer.num_nodes={nodes} trainer.accumulate_grad_batches=K\", or use a profile that fits.")


def default_parallel(n_runs: int) -> int:
    cores = os.cpu_count() or 1
    return max(1, min(n_runs, cores))


def training_cost(config: dict[str, Any]) -> float:
    """A run's relative training cost for scheduling: optimizer steps x DiT depth x width^2 (a DiT block's matmul
    FLOPs per token grow with width^2; the encoder and the data cost the same for every run of a sweep)."""
    dit = config["dit"]
    return float(config["train"]["steps"]) * int(dit["depth"]) * int(dit["dim"]) ** 2


def longest_first(runs: list[RunSpec]) -> list[RunSpec]:
    """Local runs in decreasing ``training_cost`` (ties keep the YAML's order): with a few cores, starting the
    longest runs first keeps a long one from running alone at the end of the sweep."""
    return sorted(runs, key=lambda r: -training_cost(r.config))


def select_runs(runs: list[RunSpec], only: list[str] | None) -> list[RunSpec]:
    """The runs named in ``only`` (all when None); an unknown name raises ValueError listing the valid ones."""
    if only is None:
        return runs
    names = [r.name for r in runs]
    unknown = [n for n in only if n not in names]
    if unknown:
        raise ValueError(f"unknown run(s) {unknown}; valid: {', '.join(names)}")
    return [r for r in runs if r.name in only]


def run_sweep(
    exp: str,
    cluster: str = "local",
    profile: str | None = None,
    smoke: bool = False,
    parallel: int | None = None,
    runs_dir: Path = RUNS_DIR,
    results_dir: Path | None = None,
    only: list[str] | None = None,
    paper: bool = False,
    sets: list[str] | None = None,
) -> pd.DataFrame:
    """Run (or resume) every run of ``exp`` (or those named in ``only``); collect results; return the tidy table.

    Every input error (experiment, run name, config key, cluster, profile, partition, GPUs) is raised as
    ValueError/KeyError before anything is submitted.
    """
    if cluster not in ("local", "debug", "slurm"):
        raise ValueError(f"unknown cluster {cluster!r}; valid: local, debug, slurm")
    if cluster == "slurm":
        check_profile_against_cluster(profile)  # raises on unknown profile/partition, missing GPUs
    spec, runs = load_experiment(exp, smoke=smoke, paper=paper, sets=sets)
    runs = select_runs(runs, only)
    if cluster == "slurm":
        check_runs_fit_profile(runs, profile)
    if paper:  # every run builds, steps on meta tensors and fits its GPUs, or nothing is submitted
        from experiments.plan import check_plan

        check_plan(exp, runs, profile if cluster == "slurm" else None)
    root = experiment_root(exp, smoke, runs_dir, paper)
    results_dir = Path(results_dir) if results_dir else (root / "results" if smoke else RESULTS_DIR / root.name)
    todo = [r for r in runs if not RunDir(root / r.dirname).is_done()]
    for r in runs:
        if r not in todo:
            print(f"[sweep] {r.label}: done, skipped ({root / r.dirname})")
    for r in list(todo):  # the same config finished in another sweep (a shared baseline): its results, not a rerun
        src = adopt_identical(root / r.dirname, r.exp, r.name, r.config)
        if src is not None:
            todo.remove(r)
            print(f"[sweep] {r.label}: the same config finished in {src}: adopted, not trained again")
    t0 = time.time()
    failures: list[tuple[RunSpec, str]] = []
    if any(r.config["encoder"]["preset"] == "tiny-vlm" for r in todo):
        # Pretrain the default encoder once here (or read its cache), not in every parallel job at once.
        from models.tiny_vlm import pretrained_tiny_vlm

        pretrained_tiny_vlm()
    # Runs that start from another run's weights (init.from_run) go in a second wave, after their source.
    pending = {r.dirname for r in todo}
    first = [r for r in todo if r.config.get("init", {}).get("from_dir") not in pending]
    second = [r for r in todo if r not in first]
    if first:
        failures = submit(first, root, cluster, profile, parallel)
    if second:
        failed = {r.dirname for r, _ in failures}
        blocked = [r for r in second if r.config["init"]["from_dir"] in failed]
        failures += [(r, f"not started: its init.from_run {r.config['init']['from_run']!r} failed") for r in blocked]
        ready = [r for r in second if r not in blocked]
        if ready:
            failures += submit(ready, root, cluster, profile, parallel)
    wall = time.time() - t0
    n_done = len(runs) - len(failures)
    for r, tail in failures:  # first: a full disk must not hide which runs failed
        print(f"[sweep] FAILED {r.label} ({root / r.dirname}):\n{tail}", file=sys.stderr)
    df = pd.DataFrame()
    try:
        df = collect(exp, runs, root, results_dir, figure=spec.get("figure"))
        log_sweep_time(results_dir / "sweep_time.txt", wall, len(todo), len(runs) - len(todo), len(failures),
                       cluster)
    except OSError as err:  # e.g. no space left: the runs' own folders still hold everything that finished
        failures.append((None, f"could not write the results to {results_dir}: {err}"))
        print(f"[sweep] could not write the results to {results_dir} ({err}); `make collect` rebuilds them",
              file=sys.stderr)
    print(f"[sweep] {exp}: {n_done}/{len(runs)} runs done in {wall:.0f} s; results in {results_dir}")
    failed_runs = [r.label for r, _ in failures if r is not None]
    problems = ([f"{len(failed_runs)} run(s) failed: {', '.join(failed_runs)}"] if failed_runs else []) + [
        why for r, why in failures if r is None]
    if problems:
        raise SystemExit("; ".join(problems))
    return df


def record_job(run_dir: Path, cluster: str, job: submitit.Job) -> None:
    """``job.json`` in the run directory: what `make status` needs to find the job and its log."""
    atomic_write_text(RunDir(run_dir).job_record, json.dumps({
        "cluster": cluster, "job_id": str(job.job_id), "submitted": time.time(),
        "stdout": str(job.paths.stdout), "stderr": str(job.paths.stderr), "result": str(job.paths.result_pickle),
    }, indent=1))


def wait_slurm(jobs: list[tuple[RunSpec, submitit.Job]], poll_s: float = 2.0) -> dict[str, str]:
    """Block until every SLURM job has a result or has ended; returns {job_id: final scontrol state}.

    submitit's own ``job.done()`` asks sacct, which fails without slurmdbd (state stays UNKNOWN), so a job killed
    before it wrote its result would be waited on forever; scontrol answers without accounting.
    """
    pending = {str(j.job_id): j for _, j in jobs}
    final: dict[str, str] = {}
    missing_since: dict[str, float] = {}
    while pending:
        states = slurm_jobs()
        for job_id, job in list(pending.items()):
            info = states.get(job_id)
            state = info.get("JobState", "") if info else ""
            if job.paths.result_pickle.exists() or state in SLURM_TERMINAL:
                final[job_id] = state or "COMPLETED"
                del pending[job_id]
            elif info is None:
                # not listed: just submitted (array tasks appear late) or aged out after MinJobAge
                if time.time() - missing_since.setdefault(job_id, time.time()) > 60:
                    final[job_id] = "GONE"
                    del pending[job_id]
            else:
                missing_since.pop(job_id, None)
        if pending:
            time.sleep(poll_s)
    return final


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
    final: dict[str, str] = {}

    def make(r: RunSpec) -> RunJob:
        return RunJob(r.exp, r.name, r.config, str(root / r.dirname), threads)

    if cluster == "slurm":
        with executor.batch():
            futures = [(r, executor.submit(make(r))) for r in todo]
        jobs = futures
        for r, j in jobs:
            record_job(root / r.dirname, cluster, j)
            print(f"[sweep] {r.label}: submitted as SLURM job {j.job_id}")
        final = wait_slurm(jobs)
    else:
        queue = longest_first(todo)
        running: list[tuple[RunSpec, submitit.Job]] = []
        meter, shown, last_shown = Progress(), "", 0.0
        while queue or running:
            while queue and len(running) < parallel:
                r = queue.pop(0)
                job = executor.submit(make(r))
                if cluster == "local":
                    record_job(root / r.dirname, cluster, job)
                print(f"[sweep] {r.label}: started (job {job.job_id}, {threads} threads)")
                running.append((r, job))
                jobs.append((r, job))
            time.sleep(0.5 if cluster == "local" else 0)
            running = [(r, j) for r, j in running if not j.done()]
            now = time.time()
            if running and now - last_shown >= PROGRESS_EVERY_S:
                line = meter.line([(r, root / r.dirname) for r, _ in running], now)
                if line != shown:  # a line when something moved, at most every PROGRESS_EVERY_S
                    print(f"[sweep] {len(todo) - len(queue) - len(running)}/{len(todo)} finished | {line}",
                          flush=True)
                    shown, last_shown = line, now
    failures = []
    for r, job in jobs:
        try:
            if cluster == "slurm" and not job.paths.result_pickle.exists():
                raise RuntimeError(f"SLURM job {job.job_id} ended ({final.get(str(job.job_id))}) without a result")
            job.result()
            print(f"[sweep] {r.label}: done")
        except Exception as err:  # noqa: BLE001 - report every failure with its log, keep the others
            log = ""
            try:
                log = (job.stderr() or "")[-3000:]
            except Exception:  # noqa: BLE001
                pass
            failures.append((r, f"{type(err).__name__}: {str(err)[-2000:]}\n{log}"))
    return failures


def with_validation(metrics: pd.DataFrame, exp: str, run: RunSpec, root: Path) -> pd.DataFrame:
    """A finished run's metric rows with its validation rows rebuilt from its ``validation.csv`` (the record the
    recorder keeps): metrics added to validation later reach the sweep's table without retraining."""
    from experiments.train import validation_metric_rows

    val = validation_metric_rows(exp, run.name, run.config, root / run.dirname)
    if val.empty:
        return metrics
    keep = metrics[~metrics.metric.str.startswith("val.") & (metrics.metric != "time.val_s")]
    return pd.concat([keep, val], ignore_index=True)[list(metrics.columns)]


def collect(exp: str, runs: list[RunSpec], root: Path, results_dir: Path, figure: str | None = None) -> pd.DataFrame:
    """Rebuild ``results_dir/metrics.csv`` from the run directories (idempotent) and redraw the figure."""
    done = [r for r in runs if RunDir(root / r.dirname).is_done()]
    frames = [with_validation(pd.read_csv(RunDir(root / r.dirname).metrics, dtype={"layers": str}), exp, r, root)
              for r in done]
    if not frames:
        return pd.DataFrame()
    df = pd.concat(frames, ignore_index=True)
    results_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(results_dir / "metrics.csv", df.to_csv(index=False))
    prompts = per_prompt_table(exp, done, root)
    if len(prompts):
        atomic_write_text(results_dir / "per_prompt.csv", prompts.to_csv(index=False))
    if figure:
        from analysis.figures import render_experiment

        render_experiment(results_dir, figure)
    return df


def per_prompt_table(exp: str, runs: list[RunSpec], root: Path) -> pd.DataFrame:
    """Per-prompt outcomes of every run, from each benchmark that has them (``Benchmark.per_prompt``: GenEval's
    ``eval/geneval/results.jsonl``): what paired tests need.

    Columns: ``exp, run, seed, metadata, tag, prompt, n_images, n_correct, correct`` (``seed``: the training
    seed; the prompts and sampling seeds are the same for every run and seed).
    """
    frames = []
    for r in runs:
        for bench in BENCHMARKS.values():
            table = bench.per_prompt(root / r.dirname) if bench.per_prompt is not None else None
            if table is not None:
                frames.append(table.assign(exp=exp, run=r.name, seed=r.seed))
    if not frames:
        return pd.DataFrame()
    df = pd.concat(frames, ignore_index=True)
    return df[["exp", "run", "seed", *[c for c in df.columns if c not in ("exp", "run", "seed")]]]


def collect_experiment(exp: str, smoke: bool = False, runs_dir: Path = RUNS_DIR,
                       results_dir: Path | None = None, paper: bool = False,
                       sets: list[str] | None = None) -> pd.DataFrame:
    """`make collect`: rebuild the CSV + figure from whatever runs are done; list every run that is not.

    Submits nothing. Runs that are not done are printed with their status (failed ones with the log tail).
    """
    spec, runs = load_experiment(exp, smoke=smoke, paper=paper, sets=sets)
    root = experiment_root(exp, smoke, runs_dir, paper)
    results_dir = Path(results_dir) if results_dir else (root / "results" if smoke else RESULTS_DIR / root.name)
    df = collect(exp, runs, root, results_dir, figure=spec.get("figure"))
    table = status_table(exp, smoke, runs_dir, paper, sets)
    print(f"[collect] {exp}: {int((table.state == 'done').sum())}/{len(runs)} runs in {results_dir / 'metrics.csv'}")
    missing = table[table.state != "done"]
    if len(missing):
        print(f"[collect] not in the CSV ({len(missing)} run(s)):\n{format_status(missing)}", file=sys.stderr)
    return df


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("exp")
    p.add_argument("--cluster", default="local")
    p.add_argument("--profile")
    p.add_argument("--smoke", action="store_true", help="tiny settings, results under runs/<EXP>-smoke/")
    p.add_argument("--paper", action="store_true",
                   help="the YAML's paper variant (real encoder + data; clusters), results under <EXP>-paper")
    p.add_argument("--set", action="append", dest="sets", default=[], metavar="KEY=VALUE",
                   help="override a config key for every run, e.g. data.hf.data_files=/data/*.parquet")
    p.add_argument("--parallel", type=int, help="local: runs at a time (default: one per core)")
    p.add_argument("--runs", help="comma-separated run names: only these grid points")
    p.add_argument("--collect", action="store_true", help="only rebuild results from run directories")
    p.add_argument("--runs-dir", type=Path, default=RUNS_DIR)
    p.add_argument("--results-dir", type=Path)
    a = p.parse_args(argv)
    try:
        if a.collect:
            collect_experiment(a.exp, a.smoke, a.runs_dir, a.results_dir, a.paper, a.sets)
            return
        only = [n for n in a.runs.split(",") if n] if a.runs else None
        run_sweep(a.exp, a.cluster, a.profile, a.smoke, a.parallel, a.runs_dir, a.results_dir, only, a.paper, a.sets)
    except (ValueError, KeyError) as err:
        fail(err)


if __name__ == "__main__":
    main()
