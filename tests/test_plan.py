"""The paper-scale path without a GPU: shipped architecture configs, the training step on meta tensors (FLOPs
against hand counts, memory against torch's own tracker and a checkpointed step), config-load head checks, and
the plan of every paper variant."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from experiments.config import available_experiments, load_base, load_experiment, merge
from models import hub_configs
from models.meta_step import StepShape, checkpointed_peak, frozen_pass, measure_step, trained_pass

ROOT = Path(__file__).resolve().parents[1]
# Parameter counts the model authors publish (model cards), in billions; T5: the encoder half of the 11B model
PUBLISHED_B = {"llama-3.1-8b": 8.03, "internvl2.5-8b": 8.08, "internvl3-8b": 7.94, "gemma-3-12b-it": 12.19,
               "qwen2.5-vl-7b": 8.29, "t5-v1_1-xxl": 4.76}


# ------------------------------------------------------------------------------------------------ shipped configs


@pytest.mark.parametrize("name", sorted(PUBLISHED_B))
def test_shipped_encoder_configs_match_published_sizes_and_presets(name: str) -> None:
    import transformers

    from models.encoders.hub import HUB_SPECS

    config = hub_configs.encoder_config(name)
    with torch.device("meta"):
        model = getattr(transformers, HUB_SPECS[name].model_class)._from_config(config)
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(PUBLISHED_B[name], abs=0.015)
    assert hub_configs.text_layers(config) == HUB_SPECS[name].num_layers  # the preset's default taps assume it


@pytest.mark.parametrize("name", ["flux-vae", "sd3-vae", "sdxl-vae"])
def test_shipped_vae_configs_match_latent_presets(name: str) -> None:
    from diffusers import AutoencoderKL

    from models.latents import LATENT_PRESETS

    with torch.device("meta"):
        cfg = AutoencoderKL(**hub_configs.vae_config(name)).config
    p = LATENT_PRESETS[name]
    assert (cfg.latent_channels, 2 ** (len(cfg.block_out_channels) - 1)) == (p.channels, p.downsample)
    assert (cfg.scaling_factor, cfg.shift_factor) == (p.scaling_factor, p.shift_factor)


# ------------------------------------------------------------------------------------------------ config-load checks


def test_lap_heads_that_do_not_divide_the_encoder_width_fail_at_config_load_naming_the_key() -> None:
    # InternVL2.5-8B is 4096 wide: 24 heads (the old shared conditioner.heads) do not divide it
    with pytest.raises(ValueError, match=r"injection run 'input': conditioner\.lap_heads=24 does not divide the "
                                         r"encoder width 4096.*\[16, 32, 64, 128\]"):
        load_experiment("injection", paper=True, sets=["conditioner.lap_dim=null", "conditioner.lap_heads=24"])
    # InternVL3-8B is 3584 wide; the fallback conditioner.heads is named when lap_heads is unset
    with pytest.raises(ValueError, match=r"final run 'base': conditioner\.heads=24 \(the LAP's heads while "
                                         r"conditioner\.lap_heads is unset\) does not divide the encoder width 3584"):
        load_experiment("final", paper=True, sets=["conditioner.lap_dim=null", "conditioner.lap_heads=null",
                                                   "conditioner.heads=24"])
    # a narrower LAP is checked at its own width; the refiner and the DiT at the DiT's
    with pytest.raises(ValueError, match=r"conditioner\.lap_heads=3 does not divide conditioner\.lap_dim 512"):
        load_experiment("injection", paper=True, sets=["conditioner.lap_heads=3"])
    with pytest.raises(ValueError, match=r"conditioner\.refiner_heads=24 does not divide the DiT width dit\.dim 2944"):
        load_experiment("verifi", paper=True, sets=["conditioner.refiner_heads=24"])
    with pytest.raises(ValueError, match=r"dit\.heads=24 does not divide dit\.dim=2944"):
        load_experiment("verifi", paper=True, sets=["dit.heads=24"])
    # tiny presets are checked too (their width from the architecture, no weights): the tiny VLM is 192 wide
    with pytest.raises(ValueError, match=r"conditioner\.lap_heads=5 does not divide the encoder width 192"):
        load_experiment("verifi", sets=["conditioner.lap_heads=5"])
    with pytest.raises(ValueError, match=r"conditioner option\(s\) \['lap_dim'\] unknown to candidate 'last_layer'"):
        load_experiment("refiner", sets=["conditioner.lap_dim=64"])


# ------------------------------------------------------------------------------------------------ the meta step


def _analytic_dit_forward(dim: int, depth: int, tokens: int, image: int, channels: int, patch: int,
                          batch: int) -> float:
    """Matmul + attention FLOPs (multiply-add = 2) of one DiT forward, counted by hand from models/dit.py."""
    per_block = 2 * tokens * dim * (3 * dim + dim + 2 * 4 * dim)  # qkv, proj, MLP up + down
    per_block += 2 * 2 * tokens * tokens * dim  # q k^T and (attention) v
    per_block += 2 * dim * 6 * dim  # adaLN on the timestep embedding, once per sample
    embed = 2 * image * channels * patch * patch * dim + 2 * (256 * dim + dim * dim)  # patches; timestep MLP
    final = 2 * dim * 2 * dim + 2 * image * dim * patch * patch * channels
    return batch * (depth * per_block + embed + final)


@pytest.mark.parametrize(("exp", "run", "task"), [("conditioning_candidates", "lap", "t2i"),
                                                  ("final", "base", "edit")])
def test_plan_dit_forward_flops_match_a_hand_count(exp: str, run: str, task: str) -> None:
    """The 5B ablation DiT at 256 px with a caption, and the 8B final DiT at 1024 px with 10 tiles + a rewrite."""
    from experiments.plan import task_shapes

    cfg = {r.name: r for r in load_experiment(exp, paper=True)[1]}[run].config
    shape = task_shapes(cfg, 256)[task][1]
    cost = measure_step(cfg, shape)
    d = cfg["dit"]
    image = (cfg["data"]["size"] // 8 // d["patch"]) ** 2
    hand = _analytic_dit_forward(d["dim"], d["depth"], cost.tokens["condition"] + image, image, 16, d["patch"],
                                 shape.batch)
    assert cost.tokens["image"] == image
    assert cost.flops_dit_forward == pytest.approx(hand, rel=0.05)
    assert cost.flops["dit"] == pytest.approx(3 * hand, rel=0.05)  # backward: grads of inputs and of weights


def _small_config(depth: int, precision: str = "bf16-mixed") -> dict:
    return merge(load_base(), {
        "latent": "pixel", "candidate": "lap",
        "encoder": {"preset": "llama-3.1-8b", "layers": [4, 8, 12], "stride": None, "start": None},
        "dit": {"dim": 256, "depth": depth, "heads": 4, "patch": 4},
        "conditioner": {"lap_dim": 64, "lap_heads": 2, "refiner_blocks": 1, "refiner_heads": 4},
        "data": {"size": 64}, "train": {"batch_size": 4}, "trainer": {"precision": precision}})


@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true"])
def test_checkpointed_peak_matches_a_checkpointed_step(precision: str) -> None:
    """The derived peak within 10% (exact in fp32; at the ablations' 5B DiT, bf16, within 2%)."""
    cfg, shape = _small_config(6, precision), StepShape(batch=4, text_tokens=24)
    fake = FakeTensorMode()
    frozen = frozen_pass(cfg, shape, fake)
    plain = trained_pass(cfg, frozen, shape, fake, checkpointing=False)
    ac = trained_pass(cfg, frozen, shape, fake, checkpointing=True)
    assert ac["act_bytes"] < 0.7 * plain["act_bytes"]
    assert checkpointed_peak(plain) == pytest.approx(ac["act_bytes"], rel=0.1)
    assert ac["flops"]["dit"] - plain["flops"]["dit"] == plain["block_flops"]  # the blocks' forward, once more


def test_step_meter_peak_agrees_with_torch_mem_tracker() -> None:
    """The activation peak of a small fp32 LAP + DiT step against torch.distributed._tools.MemTracker (which
    categorises every tensor itself: its activations + temporaries, without weights and gradients)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    from models.conditioning import LayerwiseAttentionPooling
    from models.flow import flow_matching_loss
    from models.meta_step import StepMeter
    from models.parts import build_parts

    cfg = _small_config(3, "32-true")
    fake = FakeTensorMode()
    with fake:
        cond, dit = build_parts(cfg, enc_dim=128, num_layers=3, latent_channels=3, latent_size=64)
    for m in cond.modules():
        if isinstance(m, LayerwiseAttentionPooling):
            m.dense = True

    def step() -> None:
        feats, mask = torch.zeros(4, 24, 3, 128), torch.ones(4, 24, dtype=torch.bool)
        x0 = torch.zeros(4, 3, 64, 64)
        loss = flow_matching_loss(lambda xs, ss: dit(xs, ss, cond(feats, mask)), x0, torch.zeros_like(x0),
                                  torch.full((4,), 0.5))
        loss.backward()

    meter = StepMeter([cond, dit])
    with fake, meter:
        step()
    for p in (*cond.parameters(), *dit.parameters()):
        p.grad = None
    tracker = MemTracker()
    tracker.track_external(cond, dit)
    with fake, tracker:
        step()
    peak = next(iter(tracker.get_tracker_snapshot("peak").values()))
    theirs = sum(v for k, v in peak.items() if getattr(k, "name", "") in ("ACT", "TEMP"))
    assert meter.peak == pytest.approx(theirs, rel=0.1)


def test_lap_dense_mode_equals_the_gathered_real_tokens() -> None:
    """The plan runs LAP densely (padding through the blocks too): real tokens get exactly the gathered values."""
    from models.conditioning import build_conditioner

    torch.manual_seed(0)
    cond = build_conditioner("lap", enc_dim=32, num_layers=4, dit_dim=48, dit_depth=2, heads=4, lap_dim=16,
                             lap_heads=2, refiner_blocks=1)
    feats = torch.randn(3, 7, 4, 32)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[0, 5:] = mask[2, 2:] = False
    gathered = cond.lap(feats, mask)
    cond.lap.dense = True
    dense = cond.lap(feats, mask)
    assert gathered.shape == (3, 7, 16)
    torch.testing.assert_close(dense, gathered, rtol=1e-5, atol=1e-6)
    assert (dense[~mask] == 0).all()


# ------------------------------------------------------------------------------------------------ the plan


def test_memory_model_by_hand() -> None:
    """DDP replicates the trained state with buckets; FSDP shards it and gathers the root unit and two blocks."""
    from types import SimpleNamespace

    from experiments.plan import memory_bytes

    cost = SimpleNamespace(params={"encoder": 8e9, "latent": 1e8, "conditioner": 2e8, "dit": 5e9,
                                   "dit_blocks": 4.8e9}, act_bytes=30e9, act_bytes_ac=20e9, frozen_bytes=4e9,
                           dit_depth=32)
    trained = 5.2e9
    ddp = memory_bytes(cost, "ddp", False, 32)
    assert ddp == {"weights": 16e9 + 0.4e9 + 4 * trained, "grads": 8 * trained, "optimizer": 8 * trained,
                   "ema": 4 * trained, "activations": 30e9}
    fsdp = memory_bytes(cost, "fsdp", True, 32)
    root, block = 0.4e9, 4.8e9 / 32
    assert fsdp["weights"] == pytest.approx(16.4e9 + 4 * trained / 32 + 2 * (root + 2 * block))
    assert fsdp["optimizer"] == pytest.approx(8 * trained / 32)
    assert fsdp["activations"] == pytest.approx(20e9 - 2 * trained)  # no autocast weight copies under FSDP
    assert memory_bytes(cost, "single", False, 1)["grads"] == 4 * trained  # no buckets on one GPU


@pytest.mark.slow
def test_every_paper_variant_steps_on_meta_tensors_and_matches_the_paper() -> None:
    """Every run of every paper variant builds, takes a step on meta tensors and fits an H100 (the plan); the DiT
    has the paper's size; Fig. 21's two runs cost the same."""
    from experiments.plan import plan_experiment
    from models.conditioning import encoder_features

    tables = {exp: plan_experiment(exp) for exp in available_experiments()}
    assert set(tables) >= {"conditioning_candidates", "final", "kv_fusion_source"}
    for exp, df in tables.items():
        assert (df.status == "ok").all(), df[df.status != "ok"][["run", "status", "error"]].to_string()
        target = 8.0e9 if exp in ("final", "edit_finetune") else 5.0e9
        # KV fusion on the encoder's own keys and values copies the encoder's shape (test_paper_variants)
        own_kv = {r.name for r in load_experiment(exp, paper=True)[1]
                  if encoder_features(r.config["candidate"], r.config["conditioner"]) == "kv"}
        sized = df[~df.run.isin(own_kv)]
        assert ((sized.params_dit - target).abs() <= 0.05 * target).all(), (exp, df.params_dit.tolist())
    inj = tables["injection"].set_index("run")
    assert inj.flops_step["per_layer"] == pytest.approx(inj.flops_step["input"], rel=0.05)
    assert inj.flops_conditioner["per_layer"] == pytest.approx(inj.flops_conditioner["input"], rel=0.05)


def test_plan_cli_bad_input() -> None:
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "experiments.plan", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=300)

    out = run("no_such_sweep", "--paper")
    assert out.returncode == 2 and "error: unknown experiment 'no_such_sweep'" in out.stderr
    out = run("tiles")
    assert out.returncode == 2 and "error: the plan costs a sweep's paper variant" in out.stderr
    out = run("tiles", "--paper", "--gpu", "v100")
    assert out.returncode == 2 and "error: unknown GPU 'v100'" in out.stderr
    out = run("tiles", "--paper", "--decode-ms", "35-15")
    assert out.returncode == 2 and "error: --decode-ms needs 0 < LO <= HI, got '35-15'" in out.stderr


def test_paper_sweep_refuses_with_the_plans_message(tmp_path: Path) -> None:
    """A run that cannot fit is refused before anything is submitted (nothing is written under the runs dir)."""
    from experiments.launch import run_sweep

    with pytest.raises(ValueError, match=r"the plan of tiles \(paper\) refuses 1 run\(s\): tiles10: oom: needs "
                                         r"\d+\.\d GiB per GPU .* but h100-80gb leaves 67\.6 GiB"):
        run_sweep("tiles", cluster="debug", paper=True, runs_dir=tmp_path, only=["tiles10"],
                  sets=["data.hf.path=parquet", "data.hf.data_files=/data/x.parquet", "train.batch_size=256"])
    assert not any(tmp_path.iterdir())


def test_summary_counts_a_run_shared_by_two_sweeps_once(tmp_path) -> None:
    """final's base and edit_finetune's base are one configuration (same seed and config hash): the summary adds
    both sweeps' hours as configured, but the base once in the unique total, and names who shares it."""
    import pandas as pd

    from experiments.plan import summary

    pd.DataFrame({"run": ["base", "instruct"], "status": "ok", "gpu_hours": [1000.0, 10.0], "gpus": 256,
                  "gpu": "h100-80gb"}).to_csv(tmp_path / "final.csv", index=False)
    pd.DataFrame({"run": ["base", "t2i_continue", "edit_finetune"], "status": "ok", "gpu_hours": [1000.0, 20.0, 5.0],
                  "gpus": 256, "gpu": "h100-80gb"}).to_csv(tmp_path / "edit_finetune.csv", index=False)
    text = summary(tmp_path)
    assert "| all, as configured | | | | | 2,035 | 2,035 |" in text  # no VERIFI decode columns: no range
    assert "| all, unique runs | | | | | 1,035 | 1,035 |" in text  # 1000 + 10 + 20 + 5
    assert "- `edit_finetune/base` = `final/base`: 1,000 GPU-hours\n" in text
    for name in ("final", "edit_finetune"):  # the base's rewrite priced at the decode latencies: 1500 - 2500
        df = pd.read_csv(tmp_path / f"{name}.csv")
        df["gpu_hours_decode_lo"] = df.gpu_hours.where(df.run != "base", 1500.0)
        df["gpu_hours_decode_hi"] = df.gpu_hours.where(df.run != "base", 2500.0)
        df["decode_ms"] = "15-35"
        df.to_csv(tmp_path / f"{name}.csv", index=False)
    text = summary(tmp_path)
    assert "| all, as configured | | | | | 2,035 | 3,035 - 5,035 |" in text
    assert "| all, unique runs | | | | | 1,035 | 1,535 - 2,535 |" in text
    assert "`final/base`: 1,000 GPU-hours (1,500 - 2,500 with VERIFI decoded at 15-35 ms/token)" in text
    assert "GPU-hours, VERIFI decoded at 15-35 ms/token |" in text


def test_committed_plans_price_the_verifi_rewrite_at_the_assumed_decode_latencies() -> None:
    """Each VERIFI run's GPU-hour range: the rewrite's `max_new_tokens` decoded one token per step at 15 and 35 ms
    (the plan's assumption), so hi - lo = steps x GPUs x accumulation x tokens x 20 ms exactly (both above the
    bandwidth floor); runs without a rewrite have one number. The final base spans ~300k-480k GPU-hours."""
    import pandas as pd

    from models.encoders import ENCODER_PRESETS

    rows = pd.concat([pd.read_csv(p) for p in sorted((ROOT / "results" / "plan").glob("*.csv"))
                      if p.stem != "lap_overhead"])
    rows = rows[rows.status == "ok"]
    plain = rows[rows.rewrite_tokens == 0]
    assert len(plain) > 20 and (plain.gpu_hours_decode_lo == plain.gpu_hours).all()
    assert (plain.gpu_hours_decode_hi == plain.gpu_hours).all()
    verifi = rows[rows.rewrite_tokens > 0]
    assert len(verifi) >= 4 and (verifi.decode_ms == "15-35").all()
    for r in verifi.itertuples():
        assert r.rewrite_tokens == ENCODER_PRESETS[r.encoder].verifi.max_new_tokens
        spread = r.steps * r.gpus * r.accumulate * r.rewrite_tokens * 0.020 / 3600
        assert abs((r.gpu_hours_decode_hi - r.gpu_hours_decode_lo) - spread) <= 1.0, r.run
        assert r.gpu_hours <= r.gpu_hours_decode_lo <= r.gpu_hours_decode_hi
        assert r.steps == 0 or r.gpu_hours_decode_lo < r.gpu_hours_decode_hi  # an untrained run costs nothing
    base = rows[(rows.run == "base") & (rows.rewrite_tokens > 0)].iloc[0]
    assert 290_000 < base.gpu_hours_decode_lo < 310_000 and 470_000 < base.gpu_hours_decode_hi < 490_000


def test_committed_plans_flag_thin_headroom_and_state_the_mfu_they_imply() -> None:
    """Every committed plan row: headroom recomputed by hand from its GiB/GPU against an H100's 79.6 GiB less 4 GiB
    and 10% fragmentation; below 10% it may not say `yes`; at 40% hardware FLOPs utilisation the MFU is
    0.4 x model / (model + recompute) wherever no VERIFI decode bounds the step."""
    import pandas as pd

    usable = 79.6 * 0.90 - 4.0
    rows = pd.concat([pd.read_csv(p) for p in sorted((ROOT / "results" / "plan").glob("*.csv"))
                      if p.stem != "lap_overhead"])
    rows = rows[rows.status != "error"]
    assert len(rows) > 30
    headroom = (usable - rows.mem_gib_per_gpu) / usable
    assert (rows.headroom_pct - 100 * headroom).abs().max() < 0.2
    expect = ["no" if h < 0 else "tight" if h < 0.10 else "yes" for h in headroom]
    assert rows.fits.tolist() == expect
    assert (rows.status == "oom").tolist() == [f == "no" for f in expect]
    plain = rows[rows.rewrite_decode_s == 0]
    implied = 40 * plain.flops_step / (plain.flops_step + plain.flops_recompute)
    assert (plain.mfu_pct - implied).abs().max() < 0.1
    assert (plain[plain.checkpointing].mfu_pct < 40).all()
