"""FSDP for real: two ranks on CPU (gloo) through ``experiments.train`` on a paper-shaped config at tiny widths --
gradient clipping that bites, EMA, activation checkpointing, and in the paper's precision a frozen bf16 encoder
beside the trained parts.

The reference is one process accumulating two batches per step (``tests/test_ddp.py`` explains why both read the
same global batches with the same noise). In fp32 (``32-true``) sharded training takes exactly the same steps, so
the final weights (EMA included) are equal; a run preempted after a checkpoint resumes to the straight run's
weights. In ``bf16-mixed`` (the paper variants') the frozen encoder stays bf16 and outside every flat parameter.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_ddp import CFG, STEPS, launch

from experiments.config import merge

pytestmark = pytest.mark.slow
PAPER_SHAPED = merge(CFG, {"optim": {"grad_clip": 0.05},  # small enough to clip every step (checked below)
                           "trainer": {"activation_checkpointing": True}})
FSDP = merge(PAPER_SHAPED, {"trainer": {"strategy": "fsdp", "devices": 2}})
BF16 = "bfloat16"


def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    """The trained weights (raw and EMA) of a run's ``final.ckpt``, the file sampling and evaluation load."""
    ckpt = torch.load(run_dir / "final.ckpt", weights_only=False)
    assert ckpt["global_step"] == STEPS
    return {k: v for k, v in ckpt["state_dict"].items() if not k.startswith(("encoder.", "latent."))}


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fsdp")
    ranks = launch(FSDP, root / "run", root / "out", ranks=2)
    assert all(rec["world"] == 2 and rec["step"] == STEPS for rec in ranks.values())
    return root / "run"


def test_two_fsdp_ranks_equal_one_process_accumulating_two_batches(fsdp_run: Path, tmp_path: Path) -> None:
    ref_cfg = merge(PAPER_SHAPED, {"trainer": {"accumulate_grad_batches": 2}})
    launch(ref_cfg, tmp_path / "ref", tmp_path / "ref_out", ranks=1)
    sharded, ref = final_state(fsdp_run), final_state(tmp_path / "ref")
    assert sharded.keys() == ref.keys() and any(k.startswith("ema.") for k in ref)
    launch(merge(ref_cfg, {"train": {"steps": 0}}), tmp_path / "init", tmp_path / "init_out", 1)
    init = {k: v for k, v in torch.load(tmp_path / "init" / "final.ckpt", weights_only=False)["state_dict"].items()
            if k in ref}
    moved = [k for k in ref if k.startswith(("dit.", "ema.")) and not torch.equal(ref[k], init[k])]
    assert len(moved) > 20  # raw and EMA weights did train
    for k in ref:  # measured bit-identical on CPU: two ranks' reduce-scatter sums the same two numbers
        torch.testing.assert_close(sharded[k], ref[k], rtol=1e-6, atol=1e-8, msg=k)
    # the clipping bit: without it the same steps end elsewhere
    unclipped = merge(ref_cfg, {"optim": {"grad_clip": 0.0}})
    launch(unclipped, tmp_path / "noclip", tmp_path / "noclip_out", ranks=1)
    free = final_state(tmp_path / "noclip")
    assert max((free[k] - ref[k]).abs().max().item() for k in moved) > 1e-4


def test_a_preempted_fsdp_run_resumes_to_the_straight_runs_weights(fsdp_run: Path, tmp_path: Path) -> None:
    """Killed after its step-2 checkpoint and resumed, the sharded run ends with the straight run's weights: the
    checkpoint holds the AdamW moments of every parameter (on CPU ranks torch's offloading gather would return each
    flat parameter's last moment for all of them, ``fsdp_strategy``), the data order and the EMA."""
    launch(FSDP, tmp_path / "run", tmp_path / "first", ranks=2, stop_at=3)
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2
    launch(FSDP, tmp_path / "run", tmp_path / "second", ranks=2)
    straight, resumed = final_state(fsdp_run), final_state(tmp_path / "run")
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], rtol=1e-6, atol=1e-7, msg=k)


def test_in_the_papers_precision_the_bf16_encoder_stays_outside_fsdp(tmp_path: Path) -> None:
    """bf16-mixed with a bf16 frozen encoder (the paper variants): FSDP wraps (a flat parameter mixing the
    encoder's bf16 with the trained fp32 would refuse to), the encoder stays bf16 on every rank, and the weights move
    as one bf16-mixed process moves them (FSDP computes with bf16 copies of the parameters and reduces in bf16, so
    to bf16 tolerance: the updates point the same way)."""
    mixed = {"trainer": {"precision": "bf16-mixed"}}
    ranks = launch(merge(FSDP, mixed), tmp_path / "fsdp", tmp_path / "fo", ranks=2, encoder_dtype=BF16)
    assert {rec["encoder_dtype"] for rec in ranks.values()} == {"torch.bfloat16"}
    ref_cfg = merge(merge(PAPER_SHAPED, mixed), {"trainer": {"accumulate_grad_batches": 2}})
    ref = launch(ref_cfg, tmp_path / "ref", tmp_path / "ro", ranks=1, encoder_dtype=BF16)[0]
    assert ref["encoder_dtype"] == "torch.bfloat16"
    launch(merge(ref_cfg, {"train": {"steps": 0}}), tmp_path / "init", tmp_path / "io", ranks=1, encoder_dtype=BF16)
    init = torch.load(tmp_path / "init" / "final.ckpt", weights_only=False)["state_dict"]
    a, b = final_state(tmp_path / "fsdp"), final_state(tmp_path / "ref")
    trained = [k for k in b if k.startswith(("dit.", "conditioner.")) and b[k].is_floating_point()]
    da = torch.cat([(a[k].float() - init[k].float()).flatten() for k in trained])
    db = torch.cat([(b[k].float() - init[k].float()).flatten() for k in trained])
    assert db.norm() > 0 and torch.nn.functional.cosine_similarity(da, db, dim=0) > 0.95
