"""The sweep end to end (smoke settings): train -> sample -> score -> tidy CSV -> figure, then resume."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from experiments.config import load_experiment
from experiments.launch import run_sweep, slurm_parameters

ROOT = Path(__file__).resolve().parents[1]


def test_unknown_experiment_lists_valid_choices() -> None:
    with pytest.raises(ValueError, match="conditioning_candidates"):
        load_experiment("no_such_exp")
    out = subprocess.run([sys.executable, "-m", "experiments.launch", "no_such_exp"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode != 0 and "valid: " in out.stderr and "conditioning_candidates" in out.stderr


def test_unknown_cluster_and_profile_are_errors() -> None:
    with pytest.raises(ValueError, match="valid: local, debug, slurm"):
        run_sweep("conditioning_candidates", cluster="kubernetes")
    with pytest.raises(ValueError, match="valid: .*local-cpu"):
        slurm_parameters("no-such-profile")


@pytest.mark.slow
def test_smoke_sweep_end_to_end_and_resume(tmp_path: Path) -> None:
    env = {**os.environ, "UNIFUSION_RUNS": str(tmp_path / "runs")}
    t0 = time.time()
    out = subprocess.run(["make", "sweep", "EXP=conditioning_candidates", "SMOKE=1"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    wall = time.time() - t0
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    results = tmp_path / "runs" / "conditioning_candidates-smoke" / "results"
    df = pd.read_csv(results / "metrics.csv")
    _, runs = load_experiment("conditioning_candidates", smoke=True)
    overall = df[df.metric == "geneval.overall"].set_index("run")
    assert set(overall.index) == {r.name for r in runs}
    assert overall["value"].between(0, 1).all()
    assert (overall["ci_low"] <= overall["value"]).all() and (overall["value"] <= overall["ci_high"]).all()
    # every run trained to its configured step count (the untrained baseline stays at 0)
    steps = {r.name: r.config["train"]["steps"] for r in runs}
    assert overall["step"].to_dict() == steps
    assert (results / "fig4.png").stat().st_size > 10_000
    # each run scored n_per_task prompts x n_samples images per task it could fill
    images = df[df.metric == "geneval.images"].set_index("run")["n"]
    assert (images > 0).all()
    print(f"smoke sweep wall time: {wall:.0f} s")

    # A second sweep finds every run finished and redoes nothing.
    again = subprocess.run(["make", "sweep", "EXP=conditioning_candidates", "SMOKE=1"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("done, skipped") == len(runs)
    pd.testing.assert_frame_equal(pd.read_csv(results / "metrics.csv"), df)
