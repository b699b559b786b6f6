"""SLURM: profile validation (fast, no cluster) and, on the real one-node SLURM of tests/slurm/start_cluster.sh,
submitit jobs, requeue with exact resume, a tiny sweep equal to the local executor's, and `status` of a killed run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import cloudpickle
import pandas as pd
import pytest
import submitit
import test_ddp  # tests/ is on sys.path under pytest
import torch

from experiments import launch, profiles
from experiments.config import merge
from experiments.launch import (
    check_profile_against_cluster,
    parse_partition_gpus,
    run_sweep,
    slurm_parameters,
)
from experiments.profiles import load_profile
from experiments.status import SLURM_TERMINAL, format_status, slurm_jobs, status_table

# The worker process cannot import this test module: ship its functions/classes by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- profiles (no cluster needed)


def test_unknown_profile_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown SLURM profile 'nope'; valid: .*h100-8gpu.*local-cpu"):
        slurm_parameters("nope")
    with pytest.raises(ValueError, match="needs --profile; valid profiles: .*local-cpu"):
        slurm_parameters(None)


def test_profiles_map_to_one_task_per_gpu() -> None:
    h100 = slurm_parameters("h100-8gpu")
    assert h100["tasks_per_node"] == h100["gpus_per_node"] == 8 and h100["nodes"] == 2
    assert h100["slurm_max_num_timeout"] == 30 and "slurm_account" not in h100  # null placeholder -> omitted
    cpu = slurm_parameters("local-cpu")
    assert cpu == {"slurm_partition": "debug", "timeout_min": 30, "nodes": 1, "tasks_per_node": 1,
                   "cpus_per_task": 1, "mem_gb": 4, "slurm_array_parallelism": 2, "slurm_signal_delay_s": 30,
                   "slurm_srun_args": ["--kill-on-bad-exit=1"]}


def test_bad_profile_keys_and_values_are_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(profiles, "SLURM_PROFILES", tmp_path)
    (tmp_path / "typo.yaml").write_text("partition: debug\ngpus: 1\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['gpus'\]; valid keys: .*gpus_per_node"):
        load_profile("typo")
    (tmp_path / "neg.yaml").write_text("nodes: 0\n")
    with pytest.raises(ValueError, match="nodes must be >= 1"):
        load_profile("neg")
    (tmp_path / "str.yaml").write_text("time_min: '30'\n")
    with pytest.raises(ValueError, match="time_min must be int"):
        load_profile("str")


def test_partition_and_gpu_checks_before_submitting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sinfo = "debug|(null)\ngpu|gpu:a100:4(S:0-1)\ngpu|gpu:8\nmixed|gpu:2,shard:8\n"
    parts = parse_partition_gpus(sinfo)
    assert parts == {"debug": 0, "gpu": 8, "mixed": 2}
    monkeypatch.setattr(profiles, "SLURM_PROFILES", tmp_path)
    (tmp_path / "cpu-gpus.yaml").write_text("partition: debug\ngpus_per_node: 1\n")
    (tmp_path / "nowhere.yaml").write_text("partition: h100\n")
    (tmp_path / "fits.yaml").write_text("partition: gpu\ngpus_per_node: 8\n")
    with pytest.raises(ValueError, match="asks for 1 GPU.*partition 'debug' has 0; partitions with GPUs: gpu, mixed"):
        check_profile_against_cluster("cpu-gpus", parts)
    with pytest.raises(ValueError, match="partition 'h100' not on this cluster; valid: debug, gpu, mixed"):
        check_profile_against_cluster("nowhere", parts)
    check_profile_against_cluster("fits", parts)
    # run_sweep checks before it loads or submits anything
    with pytest.raises(ValueError, match="asks for 1 GPU"):
        monkeypatch.setattr(launch, "partition_gpus", lambda: parts)
        run_sweep("conditioning_candidates", cluster="slurm", profile="cpu-gpus", runs_dir=tmp_path / "runs")
    assert not (tmp_path / "runs").exists()


def test_runs_whose_ranks_do_not_fit_the_profile_are_refused_before_submitting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The paper variants ask for 4 nodes x 8 GPUs; h100-8gpu starts 2 x 8 tasks: say so (with the accumulation
    that keeps the global batch of 1024) instead of letting Lightning stop each job once it has left the queue."""
    monkeypatch.setattr(launch, "partition_gpus", lambda: {"h100": 8, "debug": 0})
    with pytest.raises(ValueError, match=r"profile 'h100-8gpu' starts 8 task\(s\) per node on 2 node\(s\).*"
                                         r"lap \(devices=8, num_nodes=4, accumulate_grad_batches=2 keeps"):
        run_sweep("conditioning_candidates", cluster="slurm", profile="h100-8gpu", paper=True,
                  runs_dir=tmp_path / "runs")
    assert not (tmp_path / "runs").exists()
    fitted = ["trainer.num_nodes=2", "trainer.accumulate_grad_batches=2"]
    from experiments.config import load_experiment

    _, runs = load_experiment("conditioning_candidates", paper=True, sets=fitted)
    launch.check_runs_fit_profile(runs, "h100-8gpu")  # fits: 32 x 8 x 2 x 2 = 1024, as the paper's 32 x 32
    _, smoke = load_experiment("conditioning_candidates", smoke=True)
    launch.check_runs_fit_profile(smoke, "local-cpu")  # one task, one device
    with pytest.raises(ValueError, match="devices=1, num_nodes=1"):
        launch.check_runs_fit_profile(smoke, "a100-1node")


# ---------------------------------------------------------------- the real local SLURM


def executor(folder: Path, partition: str, **extra) -> submitit.AutoExecutor:
    ex = submitit.AutoExecutor(folder=folder / "%j", cluster="slurm")
    ex.update_parameters(slurm_partition=partition, timeout_min=5, cpus_per_task=1, mem_gb=1, **extra)
    return ex


def scontrol_state(job_id: str) -> dict[str, str]:
    return slurm_jobs().get(str(job_id), {})


def wait_until(predicate, timeout: float, what: str, poll: float = 0.5) -> None:
    end = time.time() + timeout
    while not predicate():
        if time.time() > end:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(poll)


def where_am_i(x: int) -> tuple[int, str, str]:
    return x * x, os.environ.get("SLURM_JOB_PARTITION", ""), os.environ.get("SLURM_JOB_ID", "")


@pytest.mark.slow
@pytest.mark.slurm
def test_submitit_function_runs_on_slurm(slurm_cluster: str, tmp_path: Path) -> None:
    job = executor(tmp_path, slurm_cluster).submit(where_am_i, 7)
    wait_until(job.paths.result_pickle.exists, 120, "the job's result")
    value, partition, job_id = job.result()
    assert (value, partition, job_id) == (49, slurm_cluster, str(job.job_id))
    # the result pickle lands before the job ends; scontrol (no accounting needed) then reports COMPLETED
    wait_until(lambda: scontrol_state(job.job_id).get("JobState") == "COMPLETED", 30, "job completion")
    # No slurmdbd: submitit's sacct-based state cannot be read (documented in slurm/README.md).
    assert job.state in ("UNKNOWN", "COMPLETED")


class StepCounter(submitit.helpers.Checkpointable):
    """Counts ``n`` slow steps; all state is one atomically replaced JSON file, so a kill at any moment loses
    nothing and repeats nothing: a requeued job resumes after the last recorded step."""

    def __init__(self, state: str, n: int, step_s: float = 0.4) -> None:
        self.state, self.n, self.step_s = state, n, step_s

    def __call__(self) -> list[int]:
        path = Path(self.state)
        steps = json.loads(path.read_text())["steps"] if path.exists() else []
        with open(path.with_suffix(".starts"), "a") as f:  # one line per (re)start
            f.write(f"{os.environ.get('SLURM_RESTART_COUNT', '0')} {len(steps)}\n")
        for i in range(len(steps), self.n):
            time.sleep(self.step_s)
            steps.append(i)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"steps": steps}))
            os.replace(tmp, path)
        return steps


@pytest.mark.slow
@pytest.mark.slurm
@pytest.mark.parametrize("how", ["scontrol_requeue", "submitit_interrupt"])
def test_requeued_checkpointable_resumes_without_lost_or_repeated_steps(
    slurm_cluster: str, tmp_path: Path, how: str
) -> None:
    # n * step_s - 5 steps must outlast KillWait (3 s in start_cluster.sh): submitit ignores the SIGTERM of
    # `scontrol requeue`, so the first run goes on until SIGKILL and must not be able to finish by then.
    state, n = tmp_path / "state.json", 40
    job = executor(tmp_path, slurm_cluster, slurm_signal_delay_s=5).submit(StepCounter(str(state), n, step_s=0.5))

    def progressed() -> bool:
        return state.exists() and len(json.loads(state.read_text())["steps"]) >= 5

    wait_until(progressed, 60, "5 steps before the interruption")
    if how == "scontrol_requeue":
        subprocess.run(["scontrol", "requeue", str(job.job_id)], check=True)
    else:
        job._interrupt()  # SIGTERM + USR2, as a preemption: submitit checkpoints and requeues itself
    # slurmctld holds a requeued batch job ~2 min (BeginTime); start it now to keep the test short
    def requeued() -> bool:
        info = scontrol_state(job.job_id)
        return info.get("JobState") == "PENDING" and int(info.get("Restarts", "0")) >= 1

    wait_until(requeued, 60, "the job to be requeued")
    # No StartTime=now: a job restarted before its credential expires (AuthInfo=cred_expire, 10 s in
    # start_cluster.sh) is killed by slurmd ("Job credential revoked"). Bounded wait, never job.result() alone:
    # without accounting submitit cannot see a failed job and would wait forever.
    wait_until(lambda: job.paths.result_pickle.exists()
               or scontrol_state(job.job_id).get("JobState") in ("FAILED", "CANCELLED", "NODE_FAIL"),
               200, "the requeued job to finish")
    steps = job.result()
    assert steps == list(range(n))
    assert json.loads(state.read_text())["steps"] == list(range(n))
    starts = state.with_suffix(".starts").read_text().split("\n")[:-1]
    assert len(starts) >= 2, f"job was not requeued: {starts}"
    resumed_at = int(starts[1].split()[1])
    assert 5 <= resumed_at < n  # it resumed mid-run, not from scratch
    assert int(scontrol_state(job.job_id).get("Restarts", "0")) >= 1


@pytest.mark.slow
@pytest.mark.slurm
def test_tiny_sweep_on_slurm_equals_local_and_is_not_resubmitted(
    slurm_cluster: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kw = {"exp": "conditioning_candidates", "smoke": True, "only": ["untrained"]}
    on_slurm = run_sweep(cluster="slurm", profile="local-cpu", runs_dir=tmp_path / "slurm", **kw)
    out = capsys.readouterr().out
    assert "submitted as SLURM job" in out
    local = run_sweep(cluster="debug", runs_dir=tmp_path / "local", **kw)

    def scores(df: pd.DataFrame) -> pd.DataFrame:
        return df[~df.metric.str.startswith("time.")].reset_index(drop=True)

    assert len(scores(on_slurm)) > 3
    pd.testing.assert_frame_equal(scores(on_slurm), scores(local))
    table = status_table("conditioning_candidates", smoke=True, runs_dir=tmp_path / "slurm")
    assert table.set_index("run").loc["untrained", "state"] == "done"

    n_jobs = len(slurm_jobs())
    again = run_sweep(cluster="slurm", profile="local-cpu", runs_dir=tmp_path / "slurm", **kw)
    out = capsys.readouterr().out
    assert "untrained: done, skipped" in out and "submitted" not in out
    assert len(slurm_jobs()) == n_jobs
    pd.testing.assert_frame_equal(again, on_slurm)


@pytest.mark.slow
@pytest.mark.slurm
def test_status_shows_a_killed_run_as_failed_with_its_log_tail(slurm_cluster: str, tmp_path: Path) -> None:
    runs_dir = tmp_path / "runs"
    outcome: list[BaseException] = []

    def sweep() -> None:
        try:
            run_sweep("conditioning_candidates", cluster="slurm", profile="local-cpu", smoke=True,
                      runs_dir=runs_dir, only=["lap"])
        except BaseException as err:  # noqa: BLE001 - the thread hands the SystemExit to the test
            outcome.append(err)

    thread = threading.Thread(target=sweep)
    thread.start()
    records = list(runs_dir.glob("conditioning_candidates-smoke/lap-*/job.json"))

    def submitted() -> bool:
        records[:] = list(runs_dir.glob("conditioning_candidates-smoke/lap-*/job.json"))
        return bool(records)

    wait_until(submitted, 60, "the job record")
    job_id = json.loads(records[0].read_text())["job_id"]
    wait_until(lambda: scontrol_state(job_id).get("JobState") == "RUNNING", 60, f"job {job_id} to run")
    subprocess.run(["scancel", job_id], check=True)
    thread.join(timeout=90)
    assert not thread.is_alive(), "the launcher kept waiting for a cancelled job"
    assert outcome and isinstance(outcome[0], SystemExit) and "lap" in str(outcome[0])

    table = status_table("conditioning_candidates", smoke=True, runs_dir=runs_dir)
    row = table.set_index("run").loc["lap"]
    assert row.state == "failed" and "CANCELLED" in row.detail and row.job_id == job_id
    assert set(table[table.run != "lap"].state) == {"pending"}
    text = format_status(table)
    assert "--- lap failed: CANCELLED" in text and f"JOB {job_id}" in text  # slurmstepd's line in the log tail
    cli = subprocess.run([sys.executable, "-m", "experiments.status", "conditioning_candidates", "--smoke",
                          "--runs-dir", str(runs_dir)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0 and "failed" in cli.stdout and "CANCELLED" in cli.stdout


# ---------------------------------------------------------------- multi-task jobs (one task per GPU on a cluster)


def two_task_executor(folder: Path) -> submitit.AutoExecutor:
    """The local-cpu profile's parameters with two tasks on the node, as a 2-GPU profile would ask for."""
    ex = submitit.AutoExecutor(folder=folder / "%j", cluster="slurm")
    ex.update_parameters(**{**slurm_parameters("local-cpu"), "tasks_per_node": 2, "timeout_min": 10})
    return ex


def rank1_fails(seconds: float) -> str:
    if os.environ["SLURM_PROCID"] == "1":
        raise RuntimeError("rank 1 fails")
    time.sleep(seconds)  # as rank 0 of a DDP job would wait in its next collective for the dead rank
    return "rank 0 outlived rank 1"


@pytest.mark.slow
@pytest.mark.slurm
def test_a_failing_rank_ends_the_whole_job(slurm_cluster: str, tmp_path: Path) -> None:
    job = two_task_executor(tmp_path).submit(rank1_fails, 300)
    t0 = time.time()
    wait_until(lambda: scontrol_state(job.job_id).get("JobState") in SLURM_TERMINAL, 90, "the job to end")
    assert time.time() - t0 < 90 and scontrol_state(job.job_id)["JobState"] == "FAILED"
    assert "rank 1 fails" in (job.paths.folder / f"{job.job_id}_1_log.err").read_text()
    srun = job.paths.stderr.read_text()  # task 0's log holds srun's account: it killed rank 0 for rank 1
    # srun signals the surviving rank (SIGTERM, then SIGKILL after KillWait): it ends by one or the other
    assert "task 1: Exited with exit code 1" in srun and ("task 0: Killed" in srun or "task 0: Terminated" in srun)


@pytest.mark.slow
@pytest.mark.slurm
def test_ddp_run_as_a_two_task_slurm_job(slurm_cluster: str, tmp_path: Path) -> None:
    """A sweep run (RunJob) with trainer.strategy ddp on 2 SLURM tasks: Lightning takes the ranks from srun, each
    rank reads its own batches, rank 0 evaluates: the same numbers as the torchrun job of tests/test_ddp.py."""
    from experiments.train import RunJob

    cfg = merge(test_ddp.DDP, {"train": {"steps": 2}, "sample": {"steps": 2},
                      "eval": {"geneval": {"n_per_task": 1, "n_samples": 1}}})
    run_dir = tmp_path / "run"
    job = two_task_executor(tmp_path).submit(RunJob("ddp", "run", cfg, str(run_dir)))
    wait_until(lambda: (run_dir / "DONE").exists()
               or scontrol_state(job.job_id).get("JobState") in ("FAILED", "CANCELLED", "NODE_FAIL"), 300,
               "the DDP job to finish")
    assert (run_dir / "DONE").exists(), job.paths.stderr.read_text()[-3000:]
    final = torch.load(run_dir / "final.ckpt", weights_only=False)
    assert final["global_step"] == 2
    # the same two steps through torchrun (tests/test_ddp.py): the same weights, whoever handed out the ranks
    two_steps = merge(test_ddp.DDP, {"train": {"steps": 2}})
    ref = test_ddp.launch(two_steps, tmp_path / "torchrun", tmp_path / "out", ranks=2)[0]["state"]
    for k, v in ref.items():
        assert torch.equal(final["state_dict"][k], v), k
