"""Scale settings: activation checkpointing is exact, torch.compile keeps outputs, bf16-mixed computes in bf16 on
fp32 weights, trainer options are validated.

DDP runs for real on two CPU processes in tests/test_ddp.py; FSDP needs GPUs (Lightning has no CPU path), so only
how it is configured is checked here.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from experiments.config import load_base, merge
from experiments.schema import PRECISIONS, STRATEGIES
from experiments.train import apply_model_settings, train, trainer_kwargs
from models.conditioning.base import Conditioning
from models.dit import DiT, DiTBlock


def _dit(kv_context: bool = False) -> DiT:
    torch.manual_seed(0)
    dit = DiT(in_channels=3, image_size=16, patch=2, dim=32, depth=3, heads=4, kv_context=kv_context)
    for p in dit.parameters():  # zero-init output layers would make every gradient trivially equal
        torch.nn.init.normal_(p, std=0.2)
    return dit


def _cond(kv: bool) -> Conditioning:
    g = torch.Generator().manual_seed(1)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    if kv:
        return Conditioning(mask=mask, kv=[torch.randn(2, 5, 32, generator=g) for _ in range(3)])
    tokens = torch.randn(2, 5, 32, generator=g)
    return Conditioning(mask=mask, tokens=tokens, inject=[torch.randn(2, 5, 32, generator=g), None, None])


def _loss_and_grads(dit: DiT, cond: Conditioning) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(2)
    x, s = torch.randn(2, 3, 16, 16, generator=g), torch.rand(2, generator=g)
    target = torch.randn(2, 3, 16, 16, generator=g)
    dit.zero_grad()
    loss = ((dit(x, s, cond) - target) ** 2).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in dit.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kv", [False, True], ids=["tokens+inject", "kv_fusion"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(kv: bool) -> None:
    dit = _dit(kv_context=kv).train()
    runs: list[int] = []
    for block in dit.blocks:  # count forward calls (torch runs no module hooks while recomputing)
        block.forward = (lambda f: lambda *a, **k: runs.append(1) or f(*a, **k))(block.forward)
    loss, grads = _loss_and_grads(dit, _cond(kv))
    assert len(runs) == 3
    runs.clear()
    dit.activation_checkpointing = True
    loss_ckpt, grads_ckpt = _loss_and_grads(dit, _cond(kv))
    assert len(runs) == 6  # each block ran again in backward: checkpointing really is on
    torch.testing.assert_close(loss_ckpt, loss, rtol=1e-6, atol=0)
    assert grads.keys() == grads_ckpt.keys() and len(grads) > 20
    for n in grads:
        torch.testing.assert_close(grads_ckpt[n], grads[n], rtol=1e-5, atol=1e-7, msg=n)
    runs.clear()
    with torch.no_grad():  # sampling never recomputes
        dit(torch.randn(2, 3, 16, 16), torch.rand(2), _cond(kv))
    assert len(runs) == 3


SMALL = {"dit": {"dim": 32, "depth": 4, "heads": 2, "patch": 8}, "conditioner": {"heads": 2},
         "train": {"steps": 2, "batch_size": 4, "ckpt_every": 2, "log_every": 1}, "optim": {"warmup_steps": 1}}


def _small(**over) -> dict:
    return merge(merge(load_base(), SMALL), over)


def test_training_with_activation_checkpointing_matches_training_without(tmp_path: Path) -> None:
    """Through the config: train.py switches it on, and two steps end at the same weights."""
    plain = train(_small(), tmp_path / "plain")
    ckpt = train(_small(trainer={"activation_checkpointing": True}), tmp_path / "ckpt")
    assert ckpt.dit.activation_checkpointing and not plain.dit.activation_checkpointing
    assert plain.global_step == ckpt.global_step == 2
    a, b = plain.state_dict(), ckpt.state_dict()
    for k in a:
        if not k.startswith("encoder."):
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)


def test_bf16_mixed_training_runs_the_model_in_bf16_and_keeps_fp32_weights(tmp_path: Path, monkeypatch) -> None:
    """``precision: bf16-mixed`` (the GPU default) through train(), here under CPU autocast: the DiT computes in
    bf16, the optimizer keeps fp32 weights, and the first loss matches fp32 training to bf16 precision."""
    import pandas as pd

    from models.module import UniFusionModule

    dtypes: list[tuple[torch.dtype, torch.dtype]] = []
    velocity = UniFusionModule.velocity

    def recording(self, x, s, features, mask, drop=None, ema=False):
        v = velocity(self, x, s, features, mask, drop, ema)
        dtypes.append((x.dtype, v.dtype))
        return v

    monkeypatch.setattr(UniFusionModule, "velocity", recording)
    plain = train(_small(), tmp_path / "fp32")
    assert set(dtypes) == {(torch.float32, torch.float32)}
    dtypes.clear()
    bf16 = train(_small(trainer={"precision": "bf16-mixed"}), tmp_path / "bf16")
    assert set(dtypes) == {(torch.float32, torch.bfloat16)}  # fp32 inputs, matmuls in bf16
    trained = {k: v for k, v in bf16.state_dict().items() if not k.startswith("encoder.")}
    assert all(v.dtype == torch.float32 for v in trained.values() if v.is_floating_point())
    losses = [pd.read_csv(tmp_path / run / "logs" / "metrics.csv").dropna(subset=["train/loss"])["train/loss"]
              for run in ("fp32", "bf16")]
    assert losses[0].tolist() != losses[1].tolist()  # autocast really changed the arithmetic
    assert losses[1].iloc[0] == pytest.approx(losses[0].iloc[0], rel=2e-2)  # same init and batch: bf16 rounding
    a = {k: v for k, v in plain.state_dict().items() if k.startswith("dit.")}
    assert any(not torch.equal(trained[k], a[k]) for k in a)


@pytest.fixture
def no_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside any SLURM job, even when the tests themselves run inside an allocation."""
    for var in ("SLURM_NTASKS", "SLURM_NTASKS_PER_NODE", "SLURM_JOB_NAME"):
        monkeypatch.delenv(var, raising=False)


def test_under_srun_lightning_leaves_the_requeue_to_submitit(monkeypatch: pytest.MonkeyPatch, no_slurm) -> None:
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    assert "plugins" not in trainer_kwargs(load_base(), gpu=False)
    monkeypatch.setenv("SLURM_NTASKS", "8")  # what srun sets for submitit's tasks_per_node=8
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "8")
    monkeypatch.setenv("SLURM_JOB_NAME", "unifusion")
    plugins = trainer_kwargs(load_base(), gpu=True)["plugins"]
    assert len(plugins) == 1 and isinstance(plugins[0], SLURMEnvironment) and plugins[0].auto_requeue is False
    monkeypatch.setenv("SLURM_JOB_NAME", "interactive")  # Lightning's opt-out: launched by hand in an allocation
    assert "plugins" not in trainer_kwargs(load_base(), gpu=False)


def test_default_trainer_settings_are_the_old_single_device_ones(no_slurm) -> None:
    cfg = load_base()
    common = {"devices": 1, "num_nodes": 1, "strategy": "auto", "accumulate_grad_batches": 1}
    assert trainer_kwargs(cfg, gpu=False) == {"accelerator": "cpu", "precision": "32-true", **common}
    assert trainer_kwargs(cfg, gpu=True) == {"accelerator": "gpu", "precision": "bf16-mixed", **common}
    old = {k: v for k, v in cfg.items() if k != "trainer"}  # a config saved before the section existed
    assert trainer_kwargs(old, gpu=False) == trainer_kwargs(cfg, gpu=False)
    explicit = merge(cfg, {"trainer": {"precision": "bf16-mixed", "devices": "auto", "num_nodes": 2,
                                       "accumulate_grad_batches": 4}})
    kw = trainer_kwargs(explicit, gpu=False)
    assert (kw["precision"], kw["devices"], kw["num_nodes"]) == ("bf16-mixed", "auto", 2)
    assert kw["accumulate_grad_batches"] == 4
    # null (the default) keeps run folders' names: the key is left out of the run hash until it is set
    from experiments.config import config_hash

    before = {**cfg, "trainer": {k: v for k, v in cfg["trainer"].items() if k != "accumulate_grad_batches"}}
    assert config_hash(cfg) == config_hash(before)
    assert config_hash(cfg) != config_hash(merge(cfg, {"trainer": {"accumulate_grad_batches": 2}}))


def test_multi_device_strategies_are_configured_for_this_model() -> None:
    """What train.py hands Lightning for a GPU job (tests/test_ddp.py and tests/test_fsdp.py run both on CPU
    ranks): FSDP units for the DiT, its blocks and the conditioner; the frozen encoder outside."""
    from lightning.pytorch.strategies import FSDPStrategy

    from experiments.train import fsdp_strategy
    from models.dit import DiT
    from models.module import UniFusionModule

    cfg = load_base()
    ddp = trainer_kwargs(merge(cfg, {"trainer": {"strategy": "ddp", "devices": 8}}), gpu=True)
    assert ddp["strategy"] == "ddp_find_unused_parameters_true" and ddp["devices"] == 8  # null condition
    fsdp = trainer_kwargs(merge(cfg, {"trainer": {"strategy": "fsdp"}}), gpu=True)["strategy"]
    assert type(fsdp) is FSDPStrategy and fsdp.kwargs["use_orig_params"] is True  # frozen + trainable mixed
    tiny = merge(cfg, {"encoder": {"preset": "tiny-llama", "stride": 3, "start": None}})
    module = UniFusionModule(tiny)
    wrapped = fsdp_strategy(module, gpu=True)
    assert wrapped.kwargs["auto_wrap_policy"]._module_classes == {DiTBlock, DiT, type(module.conditioner)}
    assert wrapped.kwargs["ignored_modules"] == [module.encoder]  # the pixel latent space has no weights
    assert type(fsdp_strategy(module, gpu=False)) is not FSDPStrategy  # CPU ranks: past Lightning's type check


@pytest.mark.parametrize(("key", "value", "match"), [
    ("strategy", "deepspeed", "unknown trainer.strategy 'deepspeed'; valid: auto, ddp, fsdp"),
    ("precision", "bf16", "unknown trainer.precision 'bf16'; valid: auto, 32-true, bf16-mixed, 16-mixed"),
    ("devices", 0, "positive int or 'auto'"),
    ("num_nodes", "2", "positive int"),
    ("compile", "yes", "trainer.compile must be true or false"),
    ("activation_checkpointing", 1, "must be true or false"),
    ("accumulate_grad_batches", 0, "accumulate_grad_batches must be a positive int or null, got 0"),
])
def test_bad_trainer_values_are_rejected_with_the_choices(key: str, value, match: str, tmp_path: Path) -> None:
    cfg = merge(load_base(), {"trainer": {key: value}})
    with pytest.raises(ValueError, match=match):
        trainer_kwargs(cfg, gpu=False)
    with pytest.raises(ValueError, match=match):  # train() checks before building or writing anything
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    assert set(STRATEGIES) == {"auto", "ddp", "fsdp"} and "32-true" in PRECISIONS
    with pytest.raises(KeyError, match="unknown config key 'trainer.stratgy'"):  # typos in YAML, via config.py
        merge(load_base(), {"trainer": {"stratgy": "ddp"}})


def _compiled_matches_eager(backend: str) -> None:
    dit = _dit()
    cond = _cond(False)
    x, s = torch.randn(2, 3, 16, 16), torch.rand(2)
    ref = dit(x, s, cond)
    dit.compile(backend=backend)
    torch.testing.assert_close(dit(x, s, cond), ref, rtol=1e-4, atol=1e-5)
    assert list(dit.state_dict()) == list(_dit().state_dict())  # in-place compile: checkpoint keys unchanged


def test_compiled_dit_graph_matches_eager() -> None:
    """Dynamo capture of the DiT (Conditioning dataclass, per-block branches) with the cheap aot_eager backend."""
    _compiled_matches_eager("aot_eager")


def test_compile_flag_compiles_only_the_trained_dit() -> None:
    from models.module import UniFusionModule

    module = UniFusionModule(_small(trainer={"compile": True}))
    apply_model_settings(module, module.config)
    assert module.dit._compiled_call_impl is not None
    assert module.ema.module["dit"]._compiled_call_impl is None  # the EMA copy samples eagerly


@pytest.mark.skipif(not os.environ.get("UNIFUSION_SLOW_TESTS"),
                    reason="a cold inductor compile of the DiT takes ~70 s on 2 CPU cores (measured); "
                           "set UNIFUSION_SLOW_TESTS=1 to run it (then ~5 s with a warm cache)")
def test_inductor_compiled_dit_matches_eager() -> None:
    _compiled_matches_eager("inductor")
