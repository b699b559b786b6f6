"""Two-stage runs (init.from_run) and the tiny-VLM sweeps (VERIFI, tiles, two-stage) end to end on smoke settings."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from experiments.config import RunSpec, load_experiment, merge, resolve_init
from experiments.launch import run_sweep
from experiments.train import init_from_run
from models.checkpoints import save_final
from models.module import UniFusionModule


def small(cfg: dict) -> dict:
    return merge(cfg, {"dit": {"dim": 32, "depth": 4, "heads": 2, "patch": 8}, "conditioner": {"heads": 2},
                       "encoder": {"preset": "tiny-llama", "stride": 3, "start": None}})


def test_init_from_run_copies_only_the_kept_parts(tmp_path: Path) -> None:
    _, runs = load_experiment("edit_finetune", smoke=True)
    base_cfg = small(runs[0].config)
    torch.manual_seed(0)
    src = UniFusionModule(base_cfg)
    with torch.no_grad():
        for p in src.parameters():
            p.add_(1.0)
    save_final(src, tmp_path / "base-x" / "final.ckpt")
    cfg = merge(base_cfg, {"init": {"from_run": "base", "keep": ["dit"], "from_dir": "base-x"}})
    torch.manual_seed(1)
    dst = UniFusionModule(cfg)
    cond_before = {k: v.clone() for k, v in dst.conditioner.state_dict().items()}
    init_from_run(dst, cfg, tmp_path / "child-y")
    for name in ("dit", "ema.module.dit"):
        a, b = src.get_submodule(name).state_dict(), dst.get_submodule(name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(cond_before[k], v) for k, v in dst.conditioner.state_dict().items())
    missing = merge(cfg, {"init": {"from_dir": "nowhere"}})
    with pytest.raises(FileNotFoundError, match="must finish first"):
        init_from_run(dst, missing, tmp_path / "child-y")


def test_init_references_are_checked_before_anything_runs() -> None:
    _, runs = load_experiment("continued_training", smoke=True)
    by = {r.name: r for r in runs}
    assert by["continued"].config["init"]["from_dir"] == by["t5_stage"].dirname
    assert by["scratch"].config["init"]["from_dir"] is None
    bad = [RunSpec("x", "a", merge(runs[0].config, {"init": {"from_run": "ghost"}}))]
    with pytest.raises(ValueError, match="not another run of x"):
        resolve_init(bad)
    keep = [runs[0], RunSpec("x", "b", merge(runs[0].config, {"init": {"from_run": "t5_stage", "keep": ["vae"]}}))]
    with pytest.raises(ValueError, match=r"must list some of \['dit', 'conditioner'\]"):
        resolve_init(keep)


@pytest.mark.slow
@pytest.mark.parametrize("exp, metric, runs", [
    ("verifi", "geneval.overall", {"plain", "verifi", "verifi_plain_inference"}),
    ("tiles", "reconstruction.psnr", {"tiles1", "tiles5", "tiles10"}),
    ("continued_training", "geneval.overall", {"t5_stage", "continued", "scratch"}),
    ("edit_finetune", "edit.correct", {"base", "t2i_continue", "edit_finetune"}),
    ("zero_shot_edit", "zero_shot_edit.correct@0.2", {"t2i_recon"}),
])
def test_staged_and_edit_sweeps_run_end_to_end_and_report_their_metric(
        tmp_path: Path, exp: str, metric: str, runs: set[str]) -> None:
    df = run_sweep(exp, cluster="debug", smoke=True, runs_dir=tmp_path / "runs", results_dir=tmp_path / "res")
    got = df[df.metric == metric]
    assert set(got.run) == runs
    assert got["value"].notna().all()
    if metric.endswith("psnr"):
        assert (got["value"] > 0).all()
        assert (tmp_path / "res" / "image_metrics.png").stat().st_size > 5_000
    else:
        assert got["value"].between(0, 1).all()
    table = (tmp_path / "res" / "table.md").read_text()
    assert all(f"| {r} |" in table for r in runs)
    if exp == "verifi":  # the VERIFI runs really sampled from rewrites: the eval prompts' rewrites were made
        assert (df[df.metric == "geneval.images"]["n"] > 0).all()
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "res" / "metrics.csv", dtype={"layers": str}), df,
                                  check_dtype=False)
