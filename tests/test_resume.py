"""Exact resume: a run preempted between checkpoints and resumed ends with the same weights as an uninterrupted one,
and its log holds every step exactly once."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from experiments.config import load_base, merge
from experiments.data.datamodule import ShapesDataModule
from experiments.train import train


def small_config() -> dict:
    return merge(load_base(), {
        "dit": {"dim": 32, "depth": 4, "heads": 2, "patch": 8},
        "conditioner": {"heads": 2},
        "train": {"steps": 6, "batch_size": 4, "ckpt_every": 3, "log_every": 1},
        "optim": {"warmup_steps": 2},
    })


def trainable_state(module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in module.state_dict().items() if not k.startswith("encoder.")}


def test_preempted_run_resumes_exactly(tmp_path: Path) -> None:
    cfg = small_config()
    straight = trainable_state(train(cfg, tmp_path / "straight"))
    # Preempted after 5 steps; the last checkpoint is at step 3, so steps 3 and 4 are done again after resume.
    first = train(cfg, tmp_path / "resumed", stop_at=5)
    assert first.global_step == 5
    assert torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 3
    resumed_module = train(cfg, tmp_path / "resumed")
    assert resumed_module.global_step == 6
    resumed = trainable_state(resumed_module)
    assert straight.keys() == resumed.keys()
    for k in straight:  # measured: bit-identical on CPU (same seed, per-step RNG, data position from the step)
        assert torch.equal(resumed[k], straight[k]), k
    # and training did move the weights (the comparison is not between two untouched models)
    fresh = trainable_state(train(merge(cfg, {"train": {"steps": 0}}), tmp_path / "fresh"))
    assert any(not torch.equal(fresh[k], straight[k]) for k in straight if k.startswith("dit."))

    # The log: every step once (none lost to the stock CSVLogger's wipe, none repeated), same losses.
    log_straight = pd.read_csv(tmp_path / "straight" / "logs" / "metrics.csv")
    log_resumed = pd.read_csv(tmp_path / "resumed" / "logs" / "metrics.csv")
    assert log_resumed["step"].tolist() == list(range(6)) == log_straight["step"].tolist()
    assert log_resumed["train/loss"].tolist() == log_straight["train/loss"].tolist()


def test_datamodule_starts_where_training_stopped() -> None:
    class FakeTrainer:
        global_step, global_rank, world_size, accumulate_grad_batches = 5, 0, 1, 1

    dm = ShapesDataModule(seed=3, batch_size=4)
    dm.trainer = FakeTrainer()
    first = next(iter(dm.train_dataloader()))
    assert first["index"].tolist() == [20, 21, 22, 23]
    # under DDP the position counts every rank's batches: step 5 of 3 ranks starts at global batch 15, and rank 2
    # reads the third batch of that step
    FakeTrainer.global_rank, FakeTrainer.world_size = 2, 3
    loader = iter(dm.train_dataloader())
    assert next(loader)["index"].tolist() == [68, 69, 70, 71]  # global batch 5 * 3 + 2 = 17
    assert next(loader)["index"].tolist() == [80, 81, 82, 83]  # its next step: global batch 20
    # accumulating 2 batches per step: step 5 of 3 ranks starts at global batch 30; rank 2 reads 32, then 35
    FakeTrainer.accumulate_grad_batches = 2
    loader = iter(dm.train_dataloader())
    assert [next(loader)["index"].tolist()[0] for _ in range(2)] == [128, 140]


def test_a_truncated_last_checkpoint_resumes_from_the_intact_step_checkpoint(tmp_path: Path, capsys) -> None:
    """A full disk or a preemption while last.ckpt was copied into place leaves it truncated: the run resumes from
    the step checkpoint beside it (and says so) and ends with the uninterrupted run's weights."""
    cfg = small_config()
    straight = trainable_state(train(cfg, tmp_path / "straight"))
    train(cfg, tmp_path / "resumed", stop_at=5)
    ckpts = tmp_path / "resumed" / "checkpoints"
    last = ckpts / "last.ckpt"
    step = [p for p in ckpts.glob("*.ckpt") if p != last]
    assert [p.name for p in step] == ["epoch=0-step=3.ckpt"]
    last.write_bytes(last.read_bytes()[: last.stat().st_size * 3 // 4])
    resumed = trainable_state(train(cfg, tmp_path / "resumed"))
    err = capsys.readouterr().err
    assert "last.ckpt is damaged" in err and "resuming from epoch=0-step=3.ckpt (step 3)" in err, err
    for k in straight:
        assert torch.equal(resumed[k], straight[k]), k


def test_checkpoint_writes_are_all_or_nothing(tmp_path: Path, monkeypatch) -> None:
    """A write that dies half-way leaves the previous checkpoint in place and no temporary file behind."""
    import pytest

    from models import checkpoints

    path = tmp_path / "last.ckpt"
    checkpoints.write_atomic({"global_step": 1, "w": torch.arange(1000)}, path)

    def dies_half_way(obj, f) -> None:
        with open(f, "wb") as out:
            out.write(b"PK\x03\x04 partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoints.torch, "save", dies_half_way)
    with pytest.raises(OSError, match="No space left"):
        checkpoints.write_atomic({"global_step": 2}, path)
    assert torch.load(path, weights_only=False)["global_step"] == 1 and checkpoints.damage(path) is None
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    path.write_bytes(path.read_bytes()[:-100])
    assert checkpoints.damage(path) is not None
    with pytest.raises(RuntimeError, match="no intact checkpoint"):
        checkpoints.resume_checkpoint(tmp_path)
