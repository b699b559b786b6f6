"""The committed LAP checkpoint is what the committed scores came from: sampled through the public command line
(``evals.generate --ckpt``) and scored with the exact detector (``evals.geneval --judge shapes``), it gives the
GenEval-shapes score that its run recorded in ``results/conditioning_candidates/metrics.csv``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results" / "conditioning_candidates"


def test_the_committed_lap_checkpoint_reproduces_its_recorded_score(tmp_path: Path) -> None:
    from world.prompts import write_geneval_metadata

    ckpt = RESULTS / "checkpoints" / "lap.ckpt"
    raw = torch.load(ckpt, map_location="cpu", weights_only=False)
    config, step = raw["hyper_parameters"]["config"], int(raw["global_step"])
    g = config["eval"]["geneval"]
    metrics = pd.read_csv(RESULTS / "metrics.csv")
    recorded = metrics[(metrics.run == "lap") & (metrics.seed == config["seed"]) & (metrics.step == step)
                       & (metrics.metric == "geneval.overall")]
    assert len(recorded) == 1, "metrics.csv has no score of the committed checkpoint's run, seed and step"
    meta = tmp_path / "evaluation_metadata.jsonl"
    write_geneval_metadata(meta, g["n_per_task"], g["seed"])  # the prompts the run was scored on
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    for args in (["evals.generate", "--benchmark", "geneval", "--ckpt", str(ckpt), "--prompt-file", str(meta),
                  "--n-samples", str(g["n_samples"]), "--seed", str(g["seed"]), "--quiet",
                  "--out", str(tmp_path / "images")],
                 ["evals.geneval", "--images", str(tmp_path / "images"), "--judge", "shapes",
                  "--out", str(tmp_path / "scores")]):
        out = subprocess.run([sys.executable, "-m", *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=900)
        assert out.returncode == 0, out.stderr[-3000:]
    overall = json.loads((tmp_path / "scores" / "summary.json").read_text())["overall"]
    row = recorded.iloc[0]
    assert row.ci_low <= overall <= row.ci_high  # within its CI (measured: equal, the CPU run is deterministic)
    assert overall == pytest.approx(row.value, abs=1e-9)
