"""Training visibility: train.logger (csv | tensorboard | wandb) out of the run hash, a sample grid per evaluation
written to the run folder and logged, the local sweep's live progress line."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from experiments.config import load_experiment
from experiments.loggers import logger_kind, sample_grid
from experiments.status import Progress


def test_logger_is_not_part_of_a_runs_identity() -> None:
    names = {}
    for sets in ([], ["train.logger=csv"], ["train.logger=tensorboard"], ["train.logger=wandb"]):
        names[tuple(sets)] = [r.dirname for r in load_experiment("conditioning_candidates", sets=sets)[1]]
    assert len({tuple(v) for v in names.values()}) == 1  # same run folders whatever the logger
    cfg = load_experiment("conditioning_candidates")[1][0].config
    assert cfg["train"]["logger"] == "csv" and logger_kind(cfg) == "csv"
    with pytest.raises(ValueError, match="unknown train.logger 'mlflow'; valid: csv, tensorboard, wandb"):
        logger_kind({"train": {"logger": "mlflow"}})


def test_sample_grid_rows_are_prompts_columns_samples(tmp_path: Path) -> None:
    from world.prompts import render_geneval_folder, write_geneval_metadata

    metadata = write_geneval_metadata(tmp_path / "m.jsonl", n_per_task=2, seed=0)  # 12 prompts
    render_geneval_folder(metadata, tmp_path / "images", n_samples=3)
    out = sample_grid(tmp_path / "images", tmp_path / "samples.png", max_prompts=4, scale=2)
    grid = np.asarray(Image.open(out))
    tile, pad = 32 * 2, 2
    assert grid.shape == (4 * tile + 3 * pad, 3 * tile + 2 * pad, 3)
    for r, folder in enumerate(["00000", "00003", "00006", "00009"]):  # every 12 // 4 = 3rd prompt
        for c in range(3):
            sample = np.asarray(Image.open(tmp_path / "images" / folder / "samples" / f"{c:05d}.png"))
            y, x = r * (tile + pad), c * (tile + pad)
            np.testing.assert_array_equal(grid[y: y + tile, x: x + tile], sample.repeat(2, 0).repeat(2, 1))


def write_log(run_dir: Path, steps: list[int]) -> None:
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    (run_dir / "logs" / "metrics.csv").write_text("epoch,step,train/loss\n" +
                                                  "".join(f"0,{s},1.0\n" for s in steps))


def test_progress_line_step_total_and_eta(tmp_path: Path) -> None:
    runs = load_experiment("conditioning_candidates")[1][:3]
    total = runs[0].config["train"]["steps"]
    dirs = [tmp_path / r.dirname for r in runs]
    meter = Progress()
    write_log(dirs[0], [24, 49, 99])  # 100 steps done
    assert meter.line([(runs[0], dirs[0]), (runs[1], dirs[1])], now=1000.0) == (
        f"{runs[0].name} 100/{total} ({100 * 100 // total}%) ETA ? | {runs[1].name} starting")
    write_log(dirs[0], [24, 49, 99, 149, 199, 249, 299])  # 300 steps done 40 s later: 5 steps/s
    write_log(dirs[1], [total - 1])  # trained, now evaluating
    (dirs[2] / "logs").mkdir(parents=True)
    (dirs[2] / "DONE").write_text("{}")
    eta_s = (total - 300) / 5
    assert meter.line([(r, d) for r, d in zip(runs, dirs, strict=True)], now=1040.0) == (
        f"{runs[0].name} 300/{total} ({100 * 300 // total}%) ETA {int(eta_s) // 60}m{int(eta_s) % 60:02d}s | "
        f"{runs[1].name} {total}/{total} evaluating | {runs[2].name} done")


@pytest.mark.slow
def test_a_tensorboard_run_logs_loss_and_its_sample_grid(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from experiments.run_dir import RunDir
    from experiments.train import run

    spec = next(r for r in load_experiment("conditioning_candidates", smoke=True,
                                           sets=["train.logger=tensorboard"])[1] if r.name == "lap")
    t0 = time.time()
    run_dir = run(spec.exp, spec.name, spec.config, tmp_path / spec.dirname, threads=1)
    rd = RunDir(run_dir)
    assert rd.is_done() and rd.sample_grid.is_file() and rd.train_log.is_file()  # the CSV log is kept too
    scalars, images = set(), {}
    for events in (rd.path / "logs" / "tensorboard").glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events), size_guidance={"images": 0})
        acc.Reload()
        scalars |= set(acc.Tags()["scalars"])
        for tag in acc.Tags()["images"]:
            images[tag] = acc.Images(tag)
    assert "train/loss" in scalars
    (logged,) = images["samples"]
    assert logged.step == spec.config["train"]["steps"] and logged.wall_time >= t0
    grid = Image.open(rd.sample_grid)
    assert (logged.width, logged.height) == grid.size


@pytest.mark.slow
def test_a_wandb_run_is_offline_by_default_and_logs_loss_and_its_sample_grid(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No login and no WANDB_MODE (a compute node): the run trains and keeps an offline W&B run under
    <run>/wandb/ (an online run without a login would stop at its first step), with the loss in its transaction
    log and the sample grid among its media, pixel for pixel."""
    import numpy as np

    from experiments.run_dir import RunDir
    from experiments.train import run

    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc login either
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "home" / ".config" / "wandb"))
    spec = next(r for r in load_experiment("conditioning_candidates", smoke=True,
                                           sets=["train.logger=wandb"])[1] if r.name == "lap")
    rd = RunDir(run(spec.exp, spec.name, spec.config, tmp_path / spec.dirname, threads=1))
    assert rd.is_done() and rd.train_log.is_file()
    (offline,) = (rd.path / "wandb").glob(f"offline-run-*-{spec.dirname}")  # the run directory's name is its id
    log = (offline / f"run-{spec.dirname}.wandb").read_bytes()
    assert b"train/loss" in log  # history keys are stored verbatim in the protobuf records
    (media,) = (offline / "files" / "media" / "images").glob("samples_*.png")
    assert np.array_equal(np.asarray(Image.open(media).convert("RGB")),
                          np.asarray(Image.open(rd.sample_grid).convert("RGB")))
