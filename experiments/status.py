"""Where every run of a sweep stands: pending / running / requeued / done / failed, step, last metric, log.

    python -m experiments.status EXP [--smoke] [--runs-dir DIR] [--tail N]      (or `make status EXP=...`)

The launcher writes ``job.json`` (cluster, job id, log paths) into each run directory when it submits; this
module joins that with the run directory (``DONE``, Lightning's CSV log) and, on SLURM, with ``scontrol``.
Why not submitit's ``job.state``: it asks ``sacct``, which needs slurmdbd; without accounting every state reads
``UNKNOWN`` (see slurm/README.md), so a killed job would look alive forever.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from common.cli import fail
from common.paths import RUNS_DIR
from experiments.config import RunSpec, load_experiment
from experiments.evaluation import headline_metrics
from experiments.run_dir import RunDir

# scontrol JobState values after which a job will not run again by itself
SLURM_TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                  "DEADLINE", "PREEMPTED", "SPECIAL_EXIT", "REVOKED"}
SLURM_REQUEUED = {"REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED"}


@dataclass
class RunStatus:
    """One row of the status table."""

    run: str
    seed: int  # training seed (runs expanded by ``seeds`` share the name)
    state: str  # pending | running | requeued | done | failed | unknown
    step: int | None
    metric: str
    job_id: str
    restarts: int
    detail: str  # SLURM state / reason, or the error
    log: str  # path of the job's stderr log ("" if none)


def experiment_root(exp: str, smoke: bool = False, runs_dir: Path = RUNS_DIR, paper: bool = False) -> Path:
    """``runs/<EXP>`` (``-paper`` / ``-smoke`` appended for those settings), as the launcher lays it out."""
    return Path(runs_dir) / (exp + ("-paper" if paper else "") + ("-smoke" if smoke else ""))


def slurm_jobs() -> dict[str, dict[str, str]]:
    """Every job slurmctld still remembers (``MinJobAge`` after it ends), keyed like submitit's job ids.

    Returns ``{"123": {...}, "124_0": {...}}`` with scontrol's fields (JobState, Restarts, Reason, StdErr, ...);
    an empty dict when ``scontrol`` is missing or fails (status then relies on the run directory alone).
    """
    if shutil.which("scontrol") is None:
        return {}
    try:
        out = subprocess.run(["scontrol", "-o", "show", "job"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    if out.returncode != 0:
        return {}
    jobs: dict[str, dict[str, str]] = {}
    for line in out.stdout.splitlines():
        # one job per line of `Key=Value` tokens; values holding spaces (Command=...) are not needed here
        fields = dict(tok.split("=", 1) for tok in line.split() if "=" in tok)
        if "JobId" not in fields:
            continue
        task = fields.get("ArrayTaskId")
        key = f"{fields['ArrayJobId']}_{task}" if task and task.isdigit() else fields["JobId"]
        jobs[key] = fields
    return jobs


def read_job_record(run_dir: Path) -> dict | None:
    """The launcher's ``job.json`` of a run directory (None before it was submitted)."""
    path = RunDir(run_dir).job_record
    return json.loads(path.read_text()) if path.is_file() else None


def last_logged_step(run_dir: Path) -> tuple[int | None, str]:
    """(last step, "name=value" of the last logged metric) from Lightning's ``logs/metrics.csv``."""
    path = RunDir(run_dir).train_log
    if not path.is_file():
        return None, ""
    try:
        df = pd.read_csv(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError):
        return None, ""
    if df.empty or "step" not in df:
        return None, ""
    last = df.iloc[-1]
    metrics = [c for c in df.columns if c not in ("epoch", "step") and pd.notna(last[c])]
    return int(last["step"]), (f"{metrics[-1]}={last[metrics[-1]]:.4g}" if metrics else "")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{s:02d}s"


class Progress:
    """Live progress of running runs, from their CSV training logs: ``name step/total (pct) ETA``.

    The rate of a run is measured between the first time this meter saw it logging and now, so start-up time
    (building the model, pretraining the encoder) does not count; ``ETA ?`` until two readings differ. A run past
    its last step that is not done yet is ``evaluating``.
    """

    def __init__(self) -> None:
        self.first: dict[str, tuple[float, int]] = {}

    def entry(self, spec: RunSpec, run_dir: Path, now: float) -> str:
        total = int(spec.config["train"]["steps"])
        if RunDir(run_dir).is_done():
            return f"{spec.name} done"
        step, _ = last_logged_step(run_dir)
        if step is None:
            return f"{spec.name} starting"
        step = step + 1  # the log's step is 0-based: after logging step s, s + 1 optimizer steps are done
        if step >= total:
            return f"{spec.name} {total}/{total} evaluating"
        t0, s0 = self.first.setdefault(spec.name, (now, step))
        rate = (step - s0) / (now - t0) if step > s0 and now > t0 else None
        eta = (total - step) / rate if rate else None
        return f"{spec.name} {step}/{total} ({100 * step // total}%) ETA {_duration(eta)}"

    def line(self, runs: list[tuple[RunSpec, Path]], now: float) -> str:
        return " | ".join(self.entry(spec, run_dir, now) for spec, run_dir in runs)


def result_error(record: dict) -> str | None:
    """The traceback submitit pickled for a job that raised, else None."""
    path = record.get("result")
    if not path or not Path(path).is_file():
        return None
    try:
        with open(path, "rb") as f:
            outcome, payload = pickle.load(f)
    except Exception:  # noqa: BLE001 - a half-written pickle is not an error of the run
        return None
    return str(payload) if outcome == "error" else None


def tail(path: str | Path | None, n: int = 20) -> str:
    """Last ``n`` lines of a log file ("" when it does not exist)."""
    if not path or not Path(path).is_file():
        return ""
    return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run_status(spec: RunSpec, root: Path, jobs: dict[str, dict[str, str]] | None = None) -> RunStatus:
    """Status of one run directory; ``jobs`` is ``slurm_jobs()`` (queried once per table, not per run)."""
    run_dir = root / spec.dirname
    step, metric = last_logged_step(run_dir)
    record = read_job_record(run_dir) or {}
    job_id, log = str(record.get("job_id", "")), record.get("stderr", "")
    row = RunStatus(spec.name, spec.seed, "pending", step, metric, job_id, 0, "", log)
    done = RunDir(run_dir).done
    if done.is_file():
        info = json.loads(done.read_text() or "{}")
        row.state, row.step = "done", info.get("step", step)
        shown = [f"{m}={info[m]:.4g}" for m in headline_metrics() if m in info]
        row.metric = ", ".join(shown) if shown else metric
        return row
    if not record:
        # never submitted by this launcher (or before job records existed)
        row.state = "unknown" if run_dir.exists() else "pending"
        row.detail = "no job record" if run_dir.exists() else "not submitted"
        return row
    error = result_error(record)
    if record.get("cluster") == "slurm":
        job = (jobs if jobs is not None else slurm_jobs()).get(job_id)
        if job is not None:
            state = job.get("JobState", "UNKNOWN")
            row.restarts = int(job.get("Restarts", "0") or 0)
            row.detail = f"{state} ({job.get('Reason', 'None')})"
            if state in SLURM_REQUEUED or (state == "PENDING" and row.restarts > 0):
                row.state = "requeued"
            elif state in ("PENDING", "CONFIGURING"):
                row.state = "pending"
            elif state in ("RUNNING", "COMPLETING", "SUSPENDED", "RESIZING", "STAGE_OUT", "SIGNALING"):
                row.state = "running"
            else:
                row.state = "failed"
                if state not in SLURM_TERMINAL:
                    row.detail = f"unexpected SLURM state {state}"
            if row.state == "failed" and error:
                row.detail = f"{state}: {error.strip().splitlines()[-1]}"
            return row
        row.detail = "job no longer known to slurmctld"
    elif record.get("cluster") == "local":
        if pid_alive(int(job_id)) and not error:
            row.state = "running"
            return row
        row.detail = "process ended"
    row.state = "failed"
    if error:
        row.detail = error.strip().splitlines()[-1]
    elif not row.detail:
        row.detail = "ended without DONE"
    return row


def status_table(exp: str, smoke: bool = False, runs_dir: Path = RUNS_DIR, paper: bool = False,
                 sets: list[str] | None = None) -> pd.DataFrame:
    """One row per run of ``exp``: run, seed, state, step, metric, job_id, restarts, detail, log."""
    _, runs = load_experiment(exp, smoke=smoke, paper=paper, sets=sets)
    root = experiment_root(exp, smoke, runs_dir, paper)
    jobs = slurm_jobs()
    return pd.DataFrame([vars(run_status(r, root, jobs)) for r in runs])


def format_status(df: pd.DataFrame, tail_lines: int = 20) -> str:
    """The table, then the log tail of every failed run."""
    shown = df.copy()
    shown["step"] = ["" if pd.isna(v) else str(int(v)) for v in df["step"]]
    out = [shown.to_string(index=False)]
    for _, row in df[df.state == "failed"].iterrows():
        out.append(f"\n--- {row.run} failed: {row.detail}\n    log: {row.log or '(none)'}")
        text = tail(row.log, tail_lines)
        if text:
            out.append(text)
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("exp")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--paper", action="store_true")
    p.add_argument("--set", action="append", dest="sets", default=[], metavar="KEY=VALUE")
    p.add_argument("--runs-dir", type=Path, default=RUNS_DIR)
    p.add_argument("--tail", type=int, default=20, help="log lines shown per failed run")
    a = p.parse_args(argv)
    try:
        df = status_table(a.exp, a.smoke, a.runs_dir, a.paper, a.sets)
    except (ValueError, KeyError) as err:
        fail(err)
    print(format_status(df, a.tail))


if __name__ == "__main__":
    main()
