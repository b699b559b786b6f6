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
    assert out.returncode == 2 and out.stderr.startswith("error: unknown experiment")
    assert "conditioning_candidates" in out.stderr


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

    # final.ckpt of every run reloads into the model that drew the evaluation images (same seeds -> same pixels).
    import json

    import numpy as np
    from PIL import Image

    from models.checkpoints import load_module

    for r in runs:
        run_dir = tmp_path / "runs" / "conditioning_candidates-smoke" / r.dirname
        module = load_module(run_dir / "final.ckpt", "cpu")
        assert module.config == r.config
        folder = run_dir / "eval" / "images" / "00000"
        prompt = json.loads((folder / "metadata.jsonl").read_text())["prompt"]
        seed = r.config["eval"]["geneval"]["seed"]
        again = module.generate([prompt], [seed])[0]
        np.testing.assert_array_equal(again, np.asarray(Image.open(folder / "samples" / "00000.png")))
        # the DiT size in the results is the reloaded DiT's trainable parameter count
        params = df[(df.run == r.name) & (df.metric == "params.dit")]["value"]
        assert params.tolist() == [sum(p.numel() for p in module.dit.parameters() if p.requires_grad)]
    sizes = df[df.metric == "params.dit"].set_index("run")["value"]
    assert sizes["kv_fusion"] > 3 * sizes["last_layer"]  # the encoder-shaped DiT (192 wide) vs the 96-wide one
    assert "DiT params" in (results / "table.md").read_text()

    # A second sweep finds every run finished and redoes nothing.
    again = subprocess.run(["make", "sweep", "EXP=conditioning_candidates", "SMOKE=1"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("done, skipped") == len(runs)
    pd.testing.assert_frame_equal(pd.read_csv(results / "metrics.csv"), df)


@pytest.mark.slow
def test_config_error_in_one_grid_point_fails_that_run_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bad option in one run (caught when its model is built, inside its job) fails that run alone: the others
    finish and are collected, the sweep exits non-zero naming it, and `status` shows the error."""
    import shutil

    from experiments import config
    from experiments.status import format_status, status_table

    configs = tmp_path / "configs"
    configs.mkdir()
    shutil.copy(config.CONFIG_DIR / "base.yaml", configs / "base.yaml")
    (configs / "mixed.yaml").write_text(
        "description: one good and one broken grid point\nfigure: bars\n"
        "overrides: {candidate: lap, train: {steps: 0}, eval: {geneval: {n_per_task: 1, n_samples: 1}}}\n"
        "runs:\n  good: {}\n  broken: {conditioner: {lap_blocks: -1}}\n")
    monkeypatch.setattr(config, "CONFIG_DIR", configs)
    runs_dir = tmp_path / "runs"
    with pytest.raises(SystemExit, match=r"1 run\(s\) failed: broken"):
        run_sweep("mixed", cluster="local", runs_dir=runs_dir, results_dir=tmp_path / "results")
    df = pd.read_csv(tmp_path / "results" / "metrics.csv")
    assert set(df.run) == {"good"}
    table = status_table("mixed", runs_dir=runs_dir).set_index("run")
    assert table.loc["good", "state"] == "done"
    overall = df.loc[df.metric == "geneval.overall", "value"].item()  # the finished run's headline, from its CSV
    assert table.loc["good", "metric"] == f"geneval.overall={overall:.4g}"
    assert table.loc["broken", "state"] == "failed"
    assert "LAP blocks must be an int >= 0" in table.loc["broken", "detail"]
    assert "--- broken failed: ValueError: LAP blocks must be an int >= 0" in format_status(table.reset_index())


def test_make_passes_seeds_to_the_launcher() -> None:
    out = subprocess.run(["make", "-n", "sweep", "EXP=injection", "SMOKE=1", "SEEDS=0,1,2"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0 and "-m experiments.launch injection" in out.stdout
    assert "--set seeds=[0,1,2]" in out.stdout
    plain = subprocess.run(["make", "-n", "sweep", "EXP=injection"], cwd=ROOT, capture_output=True, text=True)
    assert "seeds" not in plain.stdout


@pytest.mark.slow
def test_seeded_smoke_sweep_pairs_replicates_and_logs_every_invocation(tmp_path: Path) -> None:
    """Two training seeds of two runs: four run folders carrying the seed, metric and per-prompt rows per seed on
    the same prompts, two-level paired tests with Holm, and one sweep_time.txt line per invocation."""
    runs_dir, results = tmp_path / "runs", tmp_path / "results"
    kw = dict(smoke=True, runs_dir=runs_dir, results_dir=results, only=["lap", "untrained"], sets=["seeds=[0,1]"])
    df = run_sweep("conditioning_candidates", **kw)
    _, runs = load_experiment("conditioning_candidates", smoke=True, sets=["seeds=[0,1]"])
    dirs = sorted(p.name for p in (runs_dir / "conditioning_candidates-smoke").iterdir() if (p / "DONE").exists())
    assert dirs == sorted(r.dirname for r in runs if r.name in ("lap", "untrained"))
    assert all("-seed0-" in d or "-seed1-" in d for d in dirs)
    overall = df[df.metric == "geneval.overall"]
    assert sorted(zip(overall.run, overall.seed, strict=True)) == [("lap", 0), ("lap", 1), ("untrained", 0),
                                                                    ("untrained", 1)]
    pp = pd.read_csv(results / "per_prompt.csv")
    prompts = {(run, seed): g.metadata.tolist() for (run, seed), g in pp.groupby(["run", "seed"])}
    assert len(prompts) == 4 and all(v == prompts[("lap", 0)] for v in prompts.values())
    # same prompts and sampling seeds, different training seeds: lap's two replicates drew different images
    by = {(r.name, r.seed): runs_dir / "conditioning_candidates-smoke" / r.dirname for r in runs}
    import numpy as np
    from PIL import Image

    img = [np.asarray(Image.open(by[("lap", s)] / "eval" / "images" / "00000" / "samples" / "00000.png"))
           for s in (0, 1)]
    assert not np.array_equal(*img)
    paired = pd.read_csv(results / "paired.csv")
    assert paired[["run_a", "run_b", "seeds"]].values.tolist() == [["untrained", "lap", 2]]
    assert paired.p_holm.between(paired.p_value, 1).all()
    assert "two-level bootstrap over 2 training seeds" in (results / "table.md").read_text()
    # a second invocation trains nothing and appends its own line
    run_sweep("conditioning_candidates", **kw)
    lines = (results / "sweep_time.txt").read_text().splitlines()
    assert len(lines) == 2 and "for 4 runs (local; 0 already done)" in lines[0]
    assert "for 0 runs (local; 4 already done)" in lines[1]


def test_local_sweeps_start_the_longest_runs_first() -> None:
    """kv_fusion's DiT is 192 wide (4x the FLOPs per token of the 96-wide others): it starts first, so that it
    does not run alone at the end; the untrained floor (0 steps) starts last; equal runs keep the YAML's order."""
    from experiments.launch import longest_first

    runs = load_experiment("conditioning_candidates")[1]
    assert [r.name for r in runs] == ["t5", "last_layer", "kv_fusion", "hsi", "lap", "untrained", "oracle"]
    assert [r.name for r in longest_first(runs)] == ["kv_fusion", "t5", "last_layer", "hsi", "lap", "oracle",
                                                     "untrained"]


def test_a_run_adopts_the_same_config_finished_in_another_sweep(tmp_path: Path) -> None:
    """refiner's t5 is conditioning_candidates' t5 (same config, same seed): a finished copy is adopted, relabelled,
    its values untouched; a folder with the same name but another config is not."""
    import json

    import yaml

    from experiments.run_dir import RunDir, adopt_identical

    cc = {r.name: r for r in load_experiment("conditioning_candidates", sets=["seeds=[0,1]"])[1] if r.seed == 1}
    ref = {r.name: r for r in load_experiment("refiner", sets=["seeds=[0,1]"])[1] if r.seed == 1}
    src_spec, dst_spec = cc["t5"], ref["t5"]
    assert src_spec.dirname == dst_spec.dirname  # the premise: same config -> same folder name in both sweeps
    src = RunDir(tmp_path / "conditioning_candidates" / src_spec.dirname)
    src.path.mkdir(parents=True)
    src.config.write_text(yaml.safe_dump({"exp": "conditioning_candidates", "run": "t5", "config": src_spec.config}))
    src.metrics.write_text("exp,run,seed,metric,value\nconditioning_candidates,t5,1,geneval.overall,0.1000000000000000055\n")
    (src.path / "checkpoints").mkdir()
    (src.path / "checkpoints" / "last.ckpt").write_bytes(b"resume state")
    src.final_ckpt.write_bytes(b"weights")
    src.done.write_text("{}")
    dst = tmp_path / "refiner" / dst_spec.dirname
    (dst / "checkpoints").mkdir(parents=True)  # an unfinished attempt is replaced
    assert adopt_identical(dst, "refiner", "t5", dst_spec.config) == src.path
    out = RunDir(dst)
    assert out.is_done() and out.final_ckpt.read_bytes() == b"weights" and not out.last_ckpt.exists()
    assert out.metrics.read_text() == "exp,run,seed,metric,value\nrefiner,t5,1,geneval.overall,0.1000000000000000055\n"
    assert yaml.safe_load(out.config.read_text())["exp"] == "refiner"
    assert json.loads(out.job_record.read_text())["from"] == str(src.path)
    assert src.metrics.read_text().startswith("exp,run,seed,metric,value\nconditioning_candidates,t5,")  # untouched

    # same folder name, other config recorded (a hash collision or a hand-edited folder): not adopted
    other = RunDir(tmp_path / "refiner" / ref["penultimate"].dirname)
    twin = RunDir(tmp_path / "layer_stride" / ref["penultimate"].dirname)
    twin.path.mkdir(parents=True)
    twin.config.write_text(yaml.safe_dump({"config": {**ref["penultimate"].config, "seed": 7}}))
    twin.metrics.write_text("exp,run\nx,y\n")
    twin.done.write_text("{}")
    assert adopt_identical(other.path, "refiner", "penultimate", ref["penultimate"].config) is None
    assert not other.path.exists()


def test_sweep_time_lines_round_trip_and_the_whole_sweep_is_the_last_full_one(tmp_path: Path) -> None:
    from experiments.sweep_time import full_sweep_time, log_sweep_time, read_sweep_times

    path = tmp_path / "sweep_time.txt"
    path.write_text("803.1 s for 6 runs (local)\n")  # written before lines had a date
    log_sweep_time(path, 850.04, 7, 0, 0, "local")
    log_sweep_time(path, 120.0, 2, 5, 1, "slurm")  # a partial re-run with a failure
    t = read_sweep_times(path)
    assert t[["wall", "ran", "skipped", "failed", "cluster"]].values.tolist() == [
        [803.1, 6, 0, 0, "local"], [850.0, 7, 0, 0, "local"], [120.0, 2, 5, 1, "slurm"]]
    assert t.date.isna().tolist() == [True, False, False]
    assert full_sweep_time(path) == (850.0, 7)  # not the partial re-run that came after it
    undated = tmp_path / "old.txt"
    undated.write_text("669.8 s for 3 runs (local)\n")  # may have been a partial re-run: it does not say
    assert full_sweep_time(undated) is None
    path.write_text(path.read_text() + "about 15 minutes\n")
    with pytest.raises(ValueError, match=r"sweep_time.txt:4: not a sweep-time line"):
        read_sweep_times(path)


def test_readme_quotes_the_recorded_time_of_the_whole_default_sweep() -> None:
    """README's quick start states the default sweep's wall time and run count: both must be a line of
    sweep_time.txt that trained every run itself, and the count the default sweep's."""
    import re

    from experiments.sweep_time import read_sweep_times

    readme = (ROOT / "README.md").read_text()
    m = re.search(r"the default sweep \((\d+) runs, one training seed each\) took ([\d.]+) s", readme)
    assert m, "README's quick start no longer states the default sweep's measured time"
    runs, wall = int(m[1]), float(m[2])
    assert runs == len(load_experiment("conditioning_candidates")[1])
    times = read_sweep_times(ROOT / "results" / "conditioning_candidates" / "sweep_time.txt")
    full = times[times.date.notna() & (times.skipped == 0) & (times.failed == 0) & (times.ran == runs)]
    assert wall in set(full.wall), f"{wall} s is not a recorded whole-sweep time: {full.wall.tolist()}"


def test_a_full_disk_still_lists_every_failed_run(tmp_path: Path, monkeypatch, capsys) -> None:
    """When the results cannot be written (no space left), the sweep still names each failed run first and ends
    non-zero naming the write problem, instead of a traceback that hides them."""
    import experiments.launch as launch

    def submit(todo, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003 - the real submit's signature
        return [(r, "RuntimeError: out of memory (log tail)") for r in todo if r.name == "lap"]

    def collect(*args, **kwargs):  # noqa: ANN002, ANN003
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(launch, "submit", submit)
    monkeypatch.setattr(launch, "collect", collect)
    with pytest.raises(SystemExit) as exit_:
        launch.run_sweep("conditioning_candidates", smoke=True, runs_dir=tmp_path / "runs",
                         results_dir=tmp_path / "results", only=["lap", "untrained"])
    err = capsys.readouterr().err
    assert "FAILED lap" in err and "out of memory" in err
    assert err.index("FAILED lap") < err.index("could not write the results")
    assert "1 run(s) failed: lap; could not write the results" in str(exit_.value)
