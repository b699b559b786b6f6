"""Held-out validation: a set disjoint from every training draw and the same for every run, a loss computed as
written down, reproducible across runs of one config, untouched training, resumable points and the curves."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import norm

from common.geneval_spec import TASKS
from experiments import validation
from experiments.config import config_hash, load_base, merge
from experiments.data import heldout, shapes
from experiments.data.datamodule import ShapesDataModule
from experiments.data.shapes import stream_item
from experiments.run_dir import RunDir
from world.holdout import HELD_OUT_ONE_IN, is_held_out
from world.prompts import satisfies
from world.scene import Scene, render, sample_scene

TASK_MIXES = [None, {"t2i": 1.0, "reconstruction": 1.0, "edit": 1.0}]


def shown_images(item: dict) -> list[np.ndarray]:
    """Every image a training item shows the model: its target (re-rendered from the scene, independently of the
    tensor) and the images its condition carries (reconstruction / edit sources)."""
    images = [render(Scene.from_json(item["scene"]))]
    images += [np.asarray(im) for im in getattr(item["caption"], "images", ())]
    return images


def test_the_split_is_a_real_one_in_64_sample_of_the_world() -> None:
    rng = np.random.default_rng(7)
    n = 20_000
    held = sum(is_held_out(render(sample_scene(rng, 32))) for _ in range(n))
    p = 1 / HELD_OUT_ONE_IN
    assert abs(held - n * p) < 4 * np.sqrt(n * p * (1 - p)), held  # binomial, 4 sigma
    image = render(sample_scene(rng, 32))
    assert is_held_out(image) == is_held_out(image.copy())  # the pixels decide, not the object identity


def test_training_streams_never_show_a_held_out_image(monkeypatch: pytest.MonkeyPatch) -> None:
    """The stream meets held-out draws (so the rule is exercised) and redraws every one of them."""
    met = []

    def counting(image: np.ndarray) -> bool:
        out = is_held_out(image)
        met.append(out)
        return out

    monkeypatch.setattr(shapes, "is_held_out", counting)
    val_bytes = {it["image"].numpy().tobytes() for it in heldout.held_out_items(32)}
    for seed in (0, 1, 2):
        for tasks in TASK_MIXES:
            for index in range(700):
                item = stream_item(seed, index, 32, long_caption_prob=0.3, tasks=tasks)
                assert not any(is_held_out(im) for im in shown_images(item)), (seed, tasks, index)
                assert item["image"].numpy().tobytes() not in val_bytes
    assert sum(met) > 20  # ~1/64 of ~5000 draws were held out and redrawn


def test_validation_set_is_held_out_fixed_and_the_same_for_every_run() -> None:
    items = heldout.held_out_items(32)
    assert len(items) == heldout.N_PER_TASK * len(TASKS)
    for i, it in enumerate(items):
        scene = Scene.from_json(it["scene"])
        assert is_held_out(render(scene)) and it["index"] == i
        assert torch.equal(it["image"], shapes.to_tensor(render(scene)))
    tags = [TASKS[i // heldout.N_PER_TASK] for i in range(len(items))]
    assert [it["caption"] for it in items].count(items[0]["caption"]) < heldout.N_PER_TASK  # not one prompt
    # the noise grid: midpoints of equal-probability bins of the logit-normal(0, 1) training density
    k = heldout.N_LEVELS
    want = 1 / (1 + np.exp(-norm.ppf((np.arange(k) + 0.5) / k)))
    np.testing.assert_allclose(items[0]["sigmas"].numpy()[:k], want, rtol=1e-6)
    # then the high-noise probe levels, outside the quadrature mean (weight 0), which sums to 1
    np.testing.assert_allclose(items[0]["sigmas"].numpy()[k:], [0.85, 0.9], rtol=1e-6)
    np.testing.assert_allclose(items[0]["level_weights"].numpy(), [1 / k] * k + [0, 0])
    seeds = torch.stack([it["noise_seeds"] for it in items])
    assert seeds.unique().numel() == seeds.numel()  # every (scene, level) has its own noise
    # rebuilt from scratch (no cache), and served to runs of different seeds and configs: the same batches
    heldout.held_out_items.cache_clear()
    again = heldout.held_out_items(32)
    assert all(torch.equal(a["image"], b["image"]) and a["caption"] == b["caption"] for a, b in zip(items, again,
                                                                                                 strict=True))
    batches = [next(iter(ShapesDataModule(seed=s, batch_size=8, long_caption_prob=p, val_batch_size=64)
                         .val_dataloader())) for s, p in ((0, 0.2), (5, 0.0))]
    for key in ("image", "sigmas", "noise_seeds", "index"):
        assert torch.equal(batches[0][key], batches[1][key]), key
    assert batches[0]["caption"] == batches[1]["caption"] == [it["caption"] for it in items]
    # every scene satisfies its prompt under GenEval's rule, tasks in equal numbers
    from world.prompts import sample_prompt

    for i, it in enumerate(items):
        rng = np.random.default_rng([heldout._SCENE_ENTROPY, 32, i])
        meta = sample_prompt(rng, tags[i])
        assert meta["prompt"] == it["caption"] and satisfies(meta, Scene.from_json(it["scene"]))


def small_config(**extra) -> dict:
    return merge(load_base(), merge({
        "dit": {"dim": 32, "depth": 4, "heads": 2, "patch": 8},
        "conditioner": {"heads": 2},
        "train": {"steps": 5, "batch_size": 4, "ckpt_every": 2, "log_every": 1},
        "optim": {"warmup_steps": 2},
        "ema": {"decay": 0.5},  # the EMA (what validation scores) moves visibly within a few steps
        "eval": {"val_every": 2},
    }, extra))


def test_validation_step_is_the_flow_matching_loss_item_by_item() -> None:
    """Batched (items x levels, cond and null) against a plain loop over items and levels, one forward each."""
    from models.module import UniFusionModule

    torch.manual_seed(0)
    module = UniFusionModule(small_config()).eval()
    with torch.no_grad():  # random EMA weights: the zero-initialised ones would make cond == uncond
        for p in module.ema.parameters():
            p.normal_(0, 0.2)
    items = heldout.held_out_items(32)[::7]
    from experiments.data.datamodule import collate

    module.on_validation_epoch_start()
    with torch.no_grad():
        module.validation_step(collate(list(items[:5])), 0)
        module.validation_step(collate(list(items[5:])), 1)  # batches are concatenated in item order
    module.log = lambda *a, **k: None  # no trainer to log to here
    module.on_validation_epoch_end()
    got = module.val_losses
    for n, it in enumerate(items):
        enc = module.encode([it["caption"]])
        for key, null in (("cond", False), ("uncond", True)):
            per_level = []
            for s, sd in zip(it["sigmas"].tolist(), it["noise_seeds"].tolist(), strict=True):
                x0 = it["image"][None]
                eps = torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(sd))[None]
                xs = (1 - s) * x0 + s * eps
                with torch.no_grad():
                    v = module.velocity(xs, torch.tensor([s]), enc.features, enc.mask, torch.tensor([null]), ema=True)
                per_level.append(float(((v - (eps - x0)) ** 2).mean()))
            w = it["level_weights"].numpy()
            assert got[key][n] == pytest.approx(float(np.dot(w, per_level)), rel=1e-5), (n, key)
            np.testing.assert_allclose(got[f"{key}_levels"][n], per_level, rtol=1e-5)
    assert got["index"].tolist() == [it["index"] for it in items]
    assert np.abs(got["uncond"] - got["cond"]).min() > 1e-3  # the null condition is really another input
    from experiments.data.heldout import GAIN_LEVELS

    rows = {r["metric"]: r for r in validation.summary_rows(7, got, gain_levels=GAIN_LEVELS)}
    j = list(items[0]["sigmas"].numpy().round(2)).index(0.9)
    gain = got["uncond_levels"][:, j] - got["cond_levels"][:, j]
    assert rows["val.cond_gain.s0.90"]["value"] == pytest.approx(gain.mean(), rel=1e-9)
    assert {"val.cond_gain.s0.76", "val.cond_gain.s0.85"} <= set(rows)


def val_rows(run_dir: Path) -> pd.DataFrame:
    rows = validation.read_rows(RunDir(run_dir).validation)
    return rows[rows.metric.isin(validation.VAL_METRICS)].reset_index(drop=True)


def test_validation_reproducible_resumable_and_leaves_training_alone(tmp_path: Path) -> None:
    from experiments.train import train, validation_metric_rows

    def weights(module) -> dict[str, torch.Tensor]:
        return {k: v for k, v in module.state_dict().items() if not k.startswith("encoder.")}

    cfg = small_config()
    a = weights(train(cfg, tmp_path / "a"))
    b = weights(train(cfg, tmp_path / "b"))
    ra, rb = val_rows(tmp_path / "a"), val_rows(tmp_path / "b")
    # every val_every steps and at the last step; three metrics each
    assert sorted(set(ra.step)) == [2, 4, 5] and len(ra) == 9
    pd.testing.assert_frame_equal(ra, rb)  # two runs of one config: identical validation, to the last bit
    gain = ra[ra.metric == "val.cond_gain"].value.to_numpy()
    cond, uncond = (ra[ra.metric == m].value.to_numpy() for m in ("val.loss", "val.loss_uncond"))
    np.testing.assert_allclose(gain, uncond - cond, rtol=1e-9, atol=1e-12)
    assert (ra.ci_low <= ra.value).all() and (ra.value <= ra.ci_high).all() and (ra.n == 60).all()
    assert ra[ra.metric == "val.loss"].value.nunique() == 3  # the weights moved between validations
    # other weights (another training seed): another validation loss
    train(merge(cfg, {"seed": 1}), tmp_path / "c")
    rc = val_rows(tmp_path / "c")
    assert not np.allclose(rc.value.to_numpy(), ra.value.to_numpy())
    # validation does not touch training: the same weights as a run without it
    plain = weights(train(merge(cfg, {"eval": {"val_every": None}}), tmp_path / "plain"))
    assert not RunDir(tmp_path / "plain").validation.exists()
    for k in a:
        assert torch.equal(a[k], b[k]) and torch.equal(a[k], plain[k]), k
    # preempted after step 3 (checkpoint at 2, validated at 2), resumed: the same points as the straight run
    train(cfg, tmp_path / "r", stop_at=3)
    assert sorted(set(val_rows(tmp_path / "r").step)) == [2]
    train(cfg, tmp_path / "r")
    pd.testing.assert_frame_equal(val_rows(tmp_path / "r"), ra)
    # the run's tidy metric rows carry every validated step
    rows = validation_metric_rows("exp", "lap", cfg, tmp_path / "a")
    assert sorted(set(rows[rows.metric == "val.loss"].step)) == [2, 4, 5]
    assert rows[rows.metric == "time.val_s"].n.tolist() == [3] and (rows.seed == 0).all()


def test_untrained_run_gets_its_step_zero_point(tmp_path: Path) -> None:
    from experiments.train import train

    train(small_config(train={"steps": 0}), tmp_path / "u")
    rows = val_rows(tmp_path / "u")
    assert rows.step.tolist() == [0, 0, 0]


def test_val_every_config_and_hash() -> None:
    base = load_base()
    assert base["eval"]["val_every"] is None  # off by default
    without = copy.deepcopy(base)
    del without["eval"]["val_every"]
    assert config_hash(base) == config_hash(without)  # runs made before the key keep their directories
    assert config_hash(merge(base, {"eval": {"val_every": 100}})) != config_hash(base)
    for bad in (0, -3, 2.5, True, "10"):
        with pytest.raises(ValueError, match="eval.val_every must be a positive number of steps or null"):
            validation.val_every(merge(base, {"eval": {"val_every": bad}}))
    with pytest.raises(ValueError, match="needs data.source: shapes"):
        validation.val_every(merge(base, {"eval": {"val_every": 5}, "data": {"source": "hf"}}))
    assert validation.trainer_options(base, 1) == {"limit_val_batches": 0}
    assert validation.trainer_options(merge(base, {"eval": {"val_every": 5}}), 4)["val_check_interval"] == 20


def test_learning_curves_average_over_seeds(tmp_path: Path) -> None:
    from analysis.figures import curve_table, learning_curves

    rng = np.random.default_rng(0)
    rows = []
    for run, seeds in (("lap", (0, 1, 2)), ("hsi", (0,))):
        for seed in seeds:
            for step in (100, 200):
                for metric in validation.VAL_METRICS:
                    v = float(rng.normal())
                    rows.append({"exp": "e", "run": run, "seed": seed, "step": step, "metric": metric, "value": v,
                                 "ci_low": v - 0.1, "ci_high": v + 0.2, "n": 60})
    rows.append({"exp": "e", "run": "lap", "seed": 0, "step": 200, "metric": "geneval.overall", "value": 0.5})
    df = pd.DataFrame(rows)
    table = curve_table(df).set_index(["run", "metric", "step"])
    for (run, metric, step), r in table.iterrows():
        vals = [x["value"] for x in rows if (x["run"], x["metric"], x["step"]) == (run, metric, step)]
        assert r["mean"] == pytest.approx(sum(vals) / len(vals)) and r.seeds == len(vals)
        if len(vals) > 1:
            sd = float(np.sqrt(sum((v - r["mean"]) ** 2 for v in vals) / (len(vals) - 1)))
            assert (r.lo, r.hi) == pytest.approx((r["mean"] - sd, r["mean"] + sd))
        else:  # one seed: no band (its training variance is not measured)
            assert np.isnan(r.lo) and np.isnan(r.hi)
    assert "geneval.overall" not in set(table.index.get_level_values("metric"))
    path = learning_curves(df, tmp_path)
    assert path.is_file() and path.with_suffix(".pdf").is_file()
    with pytest.raises(ValueError, match="no held-out validation rows"):
        learning_curves(df[df.metric == "geneval.overall"], tmp_path / "none")


def test_collect_rebuilds_validation_rows_from_each_runs_validation_file(tmp_path: Path) -> None:
    """A finished run whose metrics.csv predates the per-level gains: collect takes every validation row from the
    run's validation.csv (replacing the old ones, not adding twice) and leaves the other rows as they were."""

    from experiments.config import load_experiment
    from experiments.launch import collect
    from experiments.run_dir import RunDir

    run = next(r for r in load_experiment("conditioning_candidates")[1] if r.name == "lap")
    rd = RunDir(tmp_path / run.dirname)
    rd.path.mkdir(parents=True)
    base = {"exp": "conditioning_candidates", "run": "lap", "candidate": "lap", "seed": 0, "step": 8}
    old = pd.DataFrame([{**base, "metric": "geneval.overall", "value": 0.25},
                        {**base, "metric": "val.loss", "value": 9.0},  # stale: the validation file says 0.5
                        {**base, "metric": "time.val_s", "value": 1.0}])
    old.to_csv(rd.metrics, index=False)
    rows = [{"step": s, "metric": m, "value": v, "ci_low": v - 0.1, "ci_high": v + 0.1, "n": 60}
            for s in (4, 8) for m, v in (("val.loss", 0.5), ("val.loss_uncond", 0.6), ("val.cond_gain", 0.1),
                                         ("val.cond_gain.s0.85", 0.3))]
    rows += [{"step": s, "metric": "time.val_s", "value": 2.0, "ci_low": None, "ci_high": None, "n": 1}
             for s in (4, 8)]
    pd.DataFrame(rows).to_csv(rd.validation, index=False)
    rd.done.write_text("{}")
    df = collect("conditioning_candidates", [run], tmp_path, tmp_path / "results")
    got = df.set_index(["metric", "step"]).value
    assert got[("geneval.overall", 8)] == 0.25 and got[("val.loss", 8)] == 0.5
    assert got[("val.cond_gain.s0.85", 4)] == got[("val.cond_gain.s0.85", 8)] == 0.3
    assert got[("time.val_s", 8)] == 4.0 and (df.metric == "time.val_s").sum() == 1
    assert len(df) == 1 + 2 * 4 + 1 and list(df.columns) == list(old.columns)
