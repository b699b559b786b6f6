"""Data parallel training for real: two DDP ranks on CPU (torchrun, gloo), the path a multi-GPU SLURM job takes.

The reference is one process accumulating two batches per optimizer step: it reads the same global batches (rank r
of step s reads global batch 2s + r; the accumulating process reads 2s, then 2s + 1) with the same noise (drawn
from each batch's place in the stream), and DDP's averaged gradient is the accumulated mean, so both must end at
the same weights. Before the streams were sharded by rank, every rank trained on the same batch: this fails then.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from experiments.config import load_base, merge

pytestmark = pytest.mark.slow
HELPER = Path(__file__).with_name("ddp_rank.py")
STEPS, BS = 4, 2
CFG = merge(load_base(), {
    "encoder": {"preset": "tiny-llama", "stride": 3, "start": None},  # random, offline: nothing to pretrain
    "dit": {"dim": 32, "depth": 4, "heads": 2, "patch": 8},
    "conditioner": {"heads": 2, "refiner_blocks": 1, "lap_blocks": 1},
    "train": {"steps": STEPS, "batch_size": BS, "ckpt_every": 2, "log_every": 1},
    "optim": {"warmup_steps": 1},
    "data": {"long_caption_prob": 0.0},
})
DDP = merge(CFG, {"trainer": {"strategy": "ddp", "devices": 2}})


def launch(config: dict, run_dir: Path, out: Path, ranks: int, stop_at: int = 0, mode: str = "train",
           encoder_dtype: str = "") -> dict[int, dict]:
    """Train in ``ranks`` processes (torchrun when > 1); the per-rank records of tests/ddp_rank.py."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "LOCAL_RANK", "WORLD_SIZE"))}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", ENCODER_DTYPE=encoder_dtype)  # one thread per process
    args = [str(HELPER), json.dumps(config), str(run_dir), str(stop_at), str(out), mode]
    cmd = [sys.executable, *args] if ranks == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:  # the first traceback, not torchrun's summary of which rank died
        lines = proc.stderr.splitlines()
        first = next((i for i, line in enumerate(lines) if "Traceback" in line), max(0, len(lines) - 60))
        pytest.fail(f"{' '.join(cmd[:6])} failed ({proc.returncode}):\n" + "\n".join(lines[first: first + 60]))
    return {r: torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(ranks)}


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, dict]]:
    root = tmp_path_factory.mktemp("ddp")
    return root, launch(DDP, root / "run", root / "out", ranks=2)


def test_ranks_read_their_own_batches_and_stay_in_sync(ddp_run) -> None:
    root, ranks = ddp_run
    for r, rec in ranks.items():
        assert rec["world"] == 2 and rec["step"] == STEPS
        first = [(2 * s + r) * BS for s in range(STEPS)]  # global batch 2s + r
        assert rec["seen"] == [[s, [f, f + 1]] for s, f in zip(range(STEPS), first, strict=True)]
    a, b = ranks[0]["state"], ranks[1]["state"]
    assert a.keys() == b.keys()
    for k in a:  # DDP averaged the gradients: both ranks took the same steps
        assert torch.equal(a[k], b[k]), k
    final = torch.load(root / "run" / "final.ckpt", weights_only=False)  # written once, by rank 0
    assert final["global_step"] == STEPS
    for k in a:
        assert torch.equal(final["state_dict"][k], a[k]), k


def test_two_ranks_equal_one_process_accumulating_two_batches(ddp_run, tmp_path: Path) -> None:
    _, ranks = ddp_run
    acc = launch(merge(CFG, {"trainer": {"accumulate_grad_batches": 2}}), tmp_path / "run", tmp_path / "out", 1)[0]
    assert acc["step"] == STEPS and acc["world"] == 1
    assert acc["seen"] == [[s, [i, i + 1]] for s in range(STEPS) for i in (4 * s, 4 * s + 2)]
    ddp, ref = ranks[0]["state"], acc["state"]
    init = launch(merge(CFG, {"train": {"steps": 0}}), tmp_path / "init", tmp_path / "init_out", 1)[0]["state"]
    moved = [k for k in ref if k.startswith("dit.") and not torch.equal(ref[k], init[k])]
    assert len(moved) > 10  # the compared weights did train
    for k in ref:  # the same arithmetic: (g0 + g1) / 2 either way (measured bit-identical on this CPU)
        torch.testing.assert_close(ddp[k], ref[k], rtol=1e-6, atol=1e-8, msg=k)


def test_preempted_ddp_run_resumes_exactly(ddp_run, tmp_path: Path) -> None:
    """Stopped at step 3 (last checkpoint: step 2), relaunched: each rank resumes at its own batch of step 2."""
    _, straight = ddp_run
    launch(DDP, tmp_path / "run", tmp_path / "first", ranks=2, stop_at=3)
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2
    resumed = launch(DDP, tmp_path / "run", tmp_path / "second", ranks=2)
    for r, rec in resumed.items():
        assert rec["seen"] == [[s, [(2 * s + r) * BS, (2 * s + r) * BS + 1]] for s in (2, 3)]
        for k, v in straight[r]["state"].items():  # bit-identical, as single-process resume is
            assert torch.equal(rec["state"][k], v), k
    # rank 0 alone rewrote the log on resume (every rank did once, racing on the file): each step once
    log = pd.read_csv(tmp_path / "run" / "logs" / "metrics.csv")
    assert log.dropna(subset=["train/loss"])["step"].tolist() == list(range(STEPS))


def test_a_sweep_run_under_ddp_trains_on_every_rank_and_evaluates_once(tmp_path: Path) -> None:
    """``experiments.train.run``, what each SLURM task of a multi-GPU job runs: every rank trains, rank 0 alone
    writes the config, ``final.ckpt``, the evaluation and ``DONE``."""
    cfg = merge(DDP, {"train": {"steps": 2}, "sample": {"steps": 2},
                      "eval": {"geneval": {"n_per_task": 1, "n_samples": 1}, "val_every": 1}})
    ranks = launch(cfg, tmp_path / "run", tmp_path / "out", ranks=2, mode="run")
    assert [rec["seen"] for rec in ranks.values()] == [[[0, [0, 1]], [1, [4, 5]]], [[0, [2, 3]], [1, [6, 7]]]]
    done = json.loads((tmp_path / "run" / "DONE").read_text())
    assert done["step"] == 2 and 0 <= done["geneval.overall"] <= 1
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert metrics["metric"].value_counts()["geneval.overall"] == 1  # evaluated once, not once per rank
    images = list((tmp_path / "run" / "eval" / "images").rglob("*.png"))
    assert len(images) == metrics.set_index("metric").loc["geneval.images", "n"] > 0  # every prompt sampled once
    assert torch.load(tmp_path / "run" / "final.ckpt", weights_only=False)["global_step"] == 2
    # held-out validation: every rank scored the whole set, one row per metric and step was written, and the last
    # one is what one process gets from the final weights
    val = metrics[metrics.metric.str.startswith("val.")]
    from experiments.data.heldout import GAIN_LEVELS

    per_step = 3 + len(GAIN_LEVELS)  # loss, uncond, gain, and the gain at each high noise level
    assert sorted(val.groupby("step").size().items()) == [(1, per_step), (2, per_step)]
    import lightning as L

    from experiments.data.datamodule import ShapesDataModule
    from models.checkpoints import load_module

    module = load_module(tmp_path / "run" / "final.ckpt")
    L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False).validate(
        module, datamodule=ShapesDataModule(seed=0, batch_size=BS), verbose=False)
    last = val[val.step == 2].set_index("metric").value
    assert last["val.loss"] == pytest.approx(module.val_losses["cond"].mean(), rel=1e-5)
    assert last["val.loss_uncond"] == pytest.approx(module.val_losses["uncond"].mean(), rel=1e-5)
