"""The analyses of analysis/: layer similarity, pooling weights, layer dropout, QK norms, figures/tables/paired
tests, each asserted on the CSV it writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from analysis import figures, layer_dropout, layer_similarity, pooling_weights, qk_norms
from experiments.config import load_base, merge
from models.checkpoints import save_final
from models.module import UniFusionModule

PROMPTS = ["a photo of a red circle", "a photo of two blue squares left of a green triangle"]


def tiny_module(candidate: str = "lap", **conditioner) -> UniFusionModule:
    # the random 12-layer tiny Llama (taps 2, 5, 8, 11): the geometry these analyses' expectations are written for
    cfg = merge(load_base(), {"candidate": candidate, "dit": {"dim": 32, "depth": 4, "heads": 2, "patch": 8},
                              "encoder": {"preset": "tiny-llama", "stride": 3, "start": None},
                              "sample": {"steps": 2}, "conditioner": {"heads": 2, **conditioner}})
    torch.manual_seed(0)
    module = UniFusionModule(cfg)
    with torch.no_grad():  # adaLN-zero starts as the zero map: make the EMA model's samples depend on the condition
        for p in module.ema.module.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return module.eval()


@pytest.fixture(scope="module")
def lap_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_final(tiny_module("lap", lap_blocks=2, refiner_blocks=1),
                      tmp_path_factory.mktemp("ckpt") / "lap.ckpt")


# ---------------------------------------------------------------- layer similarity (Fig. 6)
def test_layer_similarity_matches_a_naive_loop_and_is_a_similarity(tmp_path: Path) -> None:
    df = layer_similarity.compute("tiny-llama", PROMPTS)
    mat = df.pivot(index="layer_i", columns="layer_j", values="cosine").to_numpy()
    assert mat.shape == (13, 13)  # hidden states 0..12 of the 12-layer tiny Llama
    np.testing.assert_allclose(mat, mat.T, atol=1e-12)
    np.testing.assert_allclose(np.diag(mat), 1.0, atol=1e-12)
    assert (mat <= 1 + 1e-12).all()
    # naive reference: one token at a time, torch.nn.functional.cosine_similarity
    enc = layer_similarity.all_layers_encoder("tiny-llama")
    out = enc(PROMPTS)
    sims = [torch.nn.functional.cosine_similarity(out.features[b, t, 3], out.features[b, t, 7], dim=0).item()
            for b in range(2) for t in range(out.mask.shape[1]) if out.mask[b, t]]
    assert mat[3, 7] == pytest.approx(np.mean(sims), abs=1e-6)
    assert df.tokens.iloc[0] == int(out.mask.sum())
    assert layer_similarity.draw(df, tmp_path).stat().st_size > 5_000


# ---------------------------------------------------------------- pooling weights (Fig. 7 / 20)
def test_pooling_weights_read_back_the_parameters(lap_ckpt: Path, tmp_path: Path) -> None:
    assert pooling_weights.main(["--ckpt", str(lap_ckpt), "--out", str(tmp_path)]).is_file()
    df = pd.read_csv(tmp_path / "pooling_weights.csv")
    module = layer_dropout.load_checkpoint(lap_ckpt)
    ema_w = module.ema.module["conditioner"].lap.pool.weight.detach()[0].double().numpy()
    np.testing.assert_allclose(df.weight.to_numpy(), ema_w, rtol=0, atol=1e-7)
    assert df.layer_id.tolist() == list(module.encoder.layer_ids) == [2, 5, 8, 11]
    assert df.share.sum() == pytest.approx(1.0)
    raw = pooling_weights.compute(module, ema=False)
    np.testing.assert_allclose(raw.weight, module.conditioner.lap.pool.weight.detach()[0].double(), atol=1e-7)


def test_pooling_weights_per_layer_injection_has_one_lap_per_dit_block(tmp_path: Path) -> None:
    module = tiny_module("lap", injection="per_layer", lap_blocks=1)
    df = pooling_weights.compute(module)
    assert sorted(df.dit_block.unique()) == [0, 1, 2, 3]  # input LAP feeds block 0, inject_i feeds block i+1
    cond = module.ema.module["conditioner"]
    got = df[df.lap == "inject_2"].weight.to_numpy()
    np.testing.assert_allclose(got, cond.inject_laps[2].pool.weight.detach()[0].double(), atol=1e-7)
    assert pooling_weights.draw(df, tmp_path).is_file()


@pytest.mark.parametrize("analysis", ["pooling_weights", "layer_dropout", "qk_norms"])
def test_lap_analyses_reject_a_checkpoint_without_lap(analysis: str, tmp_path: Path) -> None:
    ckpt = save_final(tiny_module("hsi"), tmp_path / "hsi.ckpt")
    mod = {"pooling_weights": pooling_weights, "layer_dropout": layer_dropout, "qk_norms": qk_norms}[analysis]
    with pytest.raises(ValueError, match=f"{analysis} needs a checkpoint with a LAP.*candidate is 'hsi'"):
        mod.main(["--ckpt", str(ckpt), "--out", str(tmp_path / "out")])


# ---------------------------------------------------------------- layer dropout (Fig. 8)
def test_named_groups_are_thirds() -> None:
    assert layer_dropout.named_groups(4) == {"first": (0, 1), "middle": (2,), "last": (3,)}
    assert layer_dropout.named_groups(13, ("last",)) == {"last": (9, 10, 11, 12)}
    with pytest.raises(ValueError, match="valid: first, middle, last"):
        layer_dropout.named_groups(4, ("top",))


def test_layer_dropout_semantics(lap_ckpt: Path, tmp_path: Path) -> None:
    module = layer_dropout.load_checkpoint(lap_ckpt)
    meta = [{"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": PROMPTS[0]},
            {"tag": "single_object", "include": [{"class": "square", "count": 1}], "prompt": "a photo of a square"}]
    # a position whose pooling weight is exactly 0 contributes nothing: dropping it must change nothing
    for lap in (module.ema.module["conditioner"].lap,):
        with torch.no_grad():
            lap.pool.weight[0, 1] = 0.0
    groups = {"nothing": (), "zero weight": (1,), "all": (0, 1, 2, 3), "first": (0,)}
    df, images = layer_dropout.compute(module, meta, groups, tmp_path, n_samples=2, seed=7)
    by = df.set_index("group")
    assert list(by.index) == ["none", "nothing", "zero weight", "all", "first"]
    full = module.generate([m["prompt"] for m in meta for _ in range(2)], [7 + 1000 * i + k for i in range(2)
                                                                            for k in range(2)])
    np.testing.assert_array_equal(images["none"].reshape(full.shape), full)  # the plain model, exactly
    np.testing.assert_array_equal(images["nothing"], images["none"])
    np.testing.assert_array_equal(images["zero weight"], images["none"])
    assert by.loc["nothing", "pixel_mad"] == 0 and by.loc["zero weight", "changed_frac"] == 0
    assert by.loc["all", "pixel_mad"] > 0 and by.loc["first", "changed_frac"] > 0
    assert by.loc["all", "positions"] == "0 1 2 3" and by.loc["first", "layer_ids"] == "2"
    assert (by.images == 4).all() and by.geneval_overall.between(0, 1).all()
    assert (tmp_path / "images" / "first" / "00001" / "samples" / "00001.png").is_file()
    assert module.ema.module["conditioner"].layer_dropout == ()  # restored after every group
    with pytest.raises(ValueError, match="out of range for N=4"):
        layer_dropout.compute(module, meta, {"bad": (4,)}, tmp_path)
    assert layer_dropout.draw(df, images, tmp_path).is_file()


def test_layer_dropout_cli(lap_ckpt: Path, tmp_path: Path) -> None:
    layer_dropout.main(["--ckpt", str(lap_ckpt), "--out", str(tmp_path), "--groups", "last", "--drop", "0,2",
                        "--n-per-task", "1", "--n-samples", "1"])
    df = pd.read_csv(tmp_path / "layer_dropout.csv")
    assert df.group.tolist() == ["none", "last", "drop 0,2"]
    assert (tmp_path / "layer_dropout.pdf").is_file()


# ---------------------------------------------------------------- QK norms (Fig. 18)
def test_word_groups_average_sub_tokens() -> None:
    assert qk_norms.word_groups(["a", "red", "circle"]) == [("a", [0]), ("red", [1]), ("circle", [2])]
    assert qk_norms.word_groups(["Ġa", "Ġdr", "inking", "Ġcat"]) == [("a", [0]), ("drinking", [1, 2]), ("cat", [3])]
    assert qk_norms.word_groups(["▁un", "believ", "able"]) == [("unbelievable", [0, 1, 2])]


def test_qk_norms_equal_the_recorded_norms(lap_ckpt: Path, tmp_path: Path) -> None:
    module = layer_dropout.load_checkpoint(lap_ckpt)
    df = qk_norms.compute(module, PROMPTS)
    lap = module.ema.module["conditioner"].lap
    out = module.encoder(PROMPTS)
    lap.record = True
    lap(out.features, out.mask)
    rec = lap.recorded
    lap.record = False
    row = df[(df.prompt_index == 1) & (df.word == "blue") & (df.block == 1) & (df.position == 2)].iloc[0]
    t = int(row.word_index)  # word-level tokenizer: word index = token index
    assert row.qk_norm == pytest.approx(float(rec["qk_norm"][1, t, 1, 2]), rel=1e-6)
    assert row.qk_norm == pytest.approx(row.q_norm * row.k_norm, rel=1e-6)
    words = df[(df.prompt_index == 0) & (df.block == 0) & (df.position == 0)].word.tolist()
    assert words[:5] == ["a", "photo", "of", "a", "red"]
    assert len(df) == (int(out.mask[0].sum()) + int(out.mask[1].sum())) * 2 * 4  # tokens x blocks x layers
    assert qk_norms.draw(df, tmp_path, block=1).is_file()
    with pytest.raises(ValueError, match="block 5 not recorded"):
        qk_norms.draw(df, tmp_path, block=5)


# ---------------------------------------------------------------- figures, tables, paired tests
def per_prompt_fixture() -> pd.DataFrame:
    rows = []
    tasks = ["single_object", "colors", "position"]
    for run, correct in (("lap", [2, 2, 1, 2, 2, 1]), ("last_layer", [0, 1, 0, 1, 0, 0]), ("hsi", [0, 1, 0, 1, 0, 0])):
        for i, c in enumerate(correct):
            rows.append({"exp": "x", "run": run, "metadata": f"m{i}", "tag": tasks[i % 3], "prompt": f"p{i}",
                         "n_images": 2, "n_correct": c, "correct": c / 2})
    return pd.DataFrame(rows)


def test_paired_comparisons() -> None:
    paired = figures.paired_comparisons(per_prompt_fixture(), n_resamples=500).set_index(["run_a", "run_b"])
    same = paired.loc[("last_layer", "hsi")]
    assert same["diff"] == 0 and same.p_value == 1.0 and same.ci_low == same.ci_high == 0
    better = paired.loc[("last_layer", "lap")]  # order follows the figure: last_layer before lap
    # hand-computed: lap per task (single, colors, position) = (4/4, 4/4, 2/4) -> 5/6;
    # last_layer (prompts 0+3, 1+4, 2+5) = (1/4, 1/4, 0/4) -> 1/6
    assert better["diff"] == pytest.approx(1 / 6 - 5 / 6)
    assert better.ci_high < 0 and better.p_value < 0.05 and better.prompts == 6


def test_render_experiment_from_files_alone(tmp_path: Path) -> None:
    exp = tmp_path / "conditioning_candidates"
    exp.mkdir()
    pp = per_prompt_fixture()
    pp.to_csv(exp / "per_prompt.csv", index=False)
    rows = []
    for run, g in pp.groupby("run"):
        for metric, value in (("geneval.overall", g.correct.mean()), ("geneval.colors", 0.5)):
            rows.append({"exp": "x", "run": run, "candidate": run, "seed": 0, "step": 10, "metric": metric,
                         "value": value, "ci_low": value - 0.1, "ci_high": value + 0.1, "n": 6})
    pd.DataFrame(rows).to_csv(exp / "metrics.csv", index=False)
    made = figures.render_all(tmp_path, analyses=False)
    assert {p.name for p in made} == {"fig4.png", "table.md"}  # the YAML of this EXP names fig4
    table = (exp / "table.md").read_text()
    assert "| lap | 10 | 0.833 [0.73, 0.93] |" in table and "lap - last_layer: +0.667" in table
    assert len(pd.read_csv(exp / "paired.csv")) == 3


def test_table_shows_each_runs_dit_parameters_beside_its_scores() -> None:
    base = {"exp": "x", "seed": 0, "step": 10, "ci_low": None, "ci_high": None, "n": 1}
    rows = [{**base, "run": "lap", "candidate": "lap", "metric": "geneval.overall", "value": 0.5},
            {**base, "run": "lap", "candidate": "lap", "metric": "params.dit", "value": 731_568},
            {**base, "run": "kv_fusion", "candidate": "kv_fusion", "metric": "geneval.overall", "value": 0.25},
            {**base, "run": "kv_fusion", "candidate": "kv_fusion", "metric": "params.dit", "value": 2_647_728}]
    table = figures.table_markdown(pd.DataFrame(rows))
    assert table.splitlines()[0] == "| run | step | DiT params | overall |"
    assert "| kv_fusion | 10 | 2.65M | 0.250 |" in table and "| lap | 10 | 0.73M | 0.500 |" in table
    # results made before the metric existed keep their table unchanged
    old = figures.table_markdown(pd.DataFrame([r for r in rows if r["metric"] != "params.dit"]))
    assert old.splitlines()[0] == "| run | step | overall |" and "| lap | 10 | 0.500 |" in old
