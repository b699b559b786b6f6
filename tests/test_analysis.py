"""The analyses of analysis/: layer similarity, pooling weights, layer dropout, QK norms, figures/tables/paired
tests, each asserted on the CSV it writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from analysis import comparisons, figures, layer_dropout, layer_similarity, pooling_weights, qk_norms
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
def per_prompt_fixture(seed: int = 0, shift: int = 0) -> pd.DataFrame:
    """Three runs x 6 prompts (2 images each) of three tasks; ``shift`` moves lap's first prompt (another seed)."""
    rows = []
    tasks = ["single_object", "colors", "position"]
    for run, correct in (("lap", [2 - shift, 2, 1, 2, 2, 1]), ("last_layer", [0, 1, 0, 1, 0, 0]),
                         ("hsi", [0, 1, 0, 1, 0, 0])):
        for i, c in enumerate(correct):
            rows.append({"exp": "x", "run": run, "seed": seed, "metadata": f"m{i}", "tag": tasks[i % 3],
                         "prompt": f"p{i}", "n_images": 2, "n_correct": c, "correct": c / 2})
    return pd.DataFrame(rows)


def metrics_for(pp: pd.DataFrame) -> pd.DataFrame:
    """metrics.csv rows matching a per-prompt fixture: each task's accuracy and overall (their unweighted mean) per
    run and seed, with a made-up CI."""
    rows = []
    for (run, seed), g in pp.groupby(["run", "seed"]):
        tasks = {f"geneval.{tag}": t.n_correct.sum() / t.n_images.sum() for tag, t in g.groupby("tag")}
        for metric, v in {"geneval.overall": float(np.mean(list(tasks.values()))), **tasks}.items():
            rows.append({"exp": "x", "run": run, "candidate": run, "seed": seed, "step": 10, "metric": metric,
                         "value": v, "ci_low": v - 0.1, "ci_high": v + 0.1, "n": 6})
    return pd.DataFrame(rows)


def test_paired_comparisons() -> None:
    paired = comparisons.paired_comparisons(per_prompt_fixture(), n_resamples=500).set_index(["run_a", "run_b"])
    same = paired.loc[("last_layer", "hsi")]
    assert same["diff"] == 0 and same.p_value == 1.0 and same.ci_low == same.ci_high == 0
    better = paired.loc[("last_layer", "lap")]  # order follows the figure: last_layer before lap
    # hand-computed: lap per task (single, colors, position) = (4/4, 4/4, 2/4) -> 5/6;
    # last_layer (prompts 0+3, 1+4, 2+5) = (1/4, 1/4, 0/4) -> 1/6
    assert better["diff"] == pytest.approx(1 / 6 - 5 / 6)
    assert better.ci_high < 0 and better.p_value < 0.05 and better.prompts == 6 and better.seeds == 1
    # Holm over the 3 pairs of this table, by hand: sorted p times 3, 2, 1, running max, capped at 1
    p = paired.p_value.sort_values()
    expected = np.minimum(1, np.maximum.accumulate(p.to_numpy() * [3, 2, 1]))
    np.testing.assert_allclose(paired.loc[p.index, "p_holm"], expected)
    # the detectable difference: (z_{1 - 0.05/6} + z_0.8) bootstrap SEs
    from scipy.stats import norm

    varied = paired.se > 0
    np.testing.assert_allclose(paired.mde80[varied], (norm.ppf(1 - 0.05 / 6) + norm.ppf(0.8)) * paired.se[varied])
    assert paired.loc[("last_layer", "hsi"), "mde80"] != paired.loc[("last_layer", "hsi"), "mde80"]  # NaN: SE 0


def test_paired_comparisons_pair_training_seeds_and_average_them() -> None:
    pp = pd.concat([per_prompt_fixture(0), per_prompt_fixture(1, shift=2)], ignore_index=True)
    paired = comparisons.paired_comparisons(pp, n_resamples=300).set_index(["run_a", "run_b"])
    row = paired.loc[("last_layer", "lap")]
    # seed 1: lap's single_object = 2/4 -> lap 4/6; the run score is the mean over seeds: (5/6 + 4/6) / 2
    assert row["diff"] == pytest.approx(1 / 6 - (5 / 6 + 4 / 6) / 2) and row.seeds == 2
    # a seed only one run has is left out of that pair (as a prompt only one scored would be)
    extra = pd.concat([pp, per_prompt_fixture(2).query("run == 'lap'")], ignore_index=True)
    again = comparisons.paired_comparisons(extra, n_resamples=300).set_index(["run_a", "run_b"])
    assert again.loc[("last_layer", "lap"), "seeds"] == 2
    assert again.loc[("last_layer", "lap"), "diff"] == pytest.approx(row["diff"])


def test_summary_is_the_mean_over_seeds_with_the_seed_sd() -> None:
    pp = pd.concat([per_prompt_fixture(0), per_prompt_fixture(1, shift=2)], ignore_index=True)
    summary = comparisons.summarize(metrics_for(pp), pp, n_resamples=200).set_index(["run", "metric"])
    lap = summary.loc[("lap", "geneval.overall")]
    assert lap.value == pytest.approx((5 / 6 + 4 / 6) / 2) and lap.seeds == 2
    assert lap.sd == pytest.approx(np.std([5 / 6, 4 / 6], ddof=1))
    assert lap.ci_low <= lap.value <= lap.ci_high
    assert summary.loc[("lap", "geneval.single_object"), "value"] == pytest.approx((4 / 4 + 2 / 4) / 2)
    # one seed: the per-seed value and no SD
    one = comparisons.summarize(metrics_for(per_prompt_fixture()), per_prompt_fixture()).set_index(["run", "metric"])
    assert one.loc[("lap", "geneval.overall"), "value"] == pytest.approx(5 / 6)
    assert np.isnan(one.loc[("lap", "geneval.overall"), "sd"])
    # a seed that scored other prompts than the run's first seed is refused, not silently mixed
    broken = pp[~((pp.run == "lap") & (pp.seed == 1) & (pp.metadata == "m0"))]
    with pytest.raises(ValueError, match="run 'lap' seed 1 has no per-prompt row for 'm0'"):
        comparisons.summarize(metrics_for(broken), broken)


def write_experiment(root: Path, pp: pd.DataFrame, name: str = "conditioning_candidates",
                     seed_column: bool = True) -> Path:
    exp = root / name
    exp.mkdir(parents=True)
    (pp if seed_column else pp.drop(columns="seed")).to_csv(exp / "per_prompt.csv", index=False)
    metrics_for(pp).to_csv(exp / "metrics.csv", index=False)
    return exp


def test_render_experiment_from_files_alone(tmp_path: Path) -> None:
    exp = write_experiment(tmp_path, per_prompt_fixture(), seed_column=False)  # written before runs had seeds
    made = figures.render_all(tmp_path, analyses=False)
    assert {p.name for p in made} == {"fig4.png", "table.md", "README.md"}  # the YAML of this EXP names fig4
    table = (exp / "table.md").read_text()
    # the CI is the bootstrap over the per-prompt file (lap's prompts agree within each task: zero width), not the
    # CI recorded in metrics.csv
    assert "| lap | 10 | 1 | 0.833 [0.83, 0.83] | n/a |" in table and "lap - last_layer: +0.667" in table
    assert comparisons.ONE_SEED in table
    paired = pd.read_csv(exp / "paired.csv")
    assert len(paired) == 3 and {"p_value", "p_holm", "mde80", "seeds"} <= set(paired.columns)
    readme = (tmp_path / "README.md").read_text()
    assert "## conditioning_candidates" in readme and comparisons.ONE_SEED in readme


def test_table_shows_each_runs_dit_parameters_beside_its_scores() -> None:
    base = {"exp": "x", "seed": 0, "step": 10, "ci_low": None, "ci_high": None, "n": 1}
    rows = [{**base, "run": "lap", "candidate": "lap", "metric": "geneval.overall", "value": 0.5},
            {**base, "run": "lap", "candidate": "lap", "metric": "params.dit", "value": 731_568},
            {**base, "run": "kv_fusion", "candidate": "kv_fusion", "metric": "geneval.overall", "value": 0.25},
            {**base, "run": "kv_fusion", "candidate": "kv_fusion", "metric": "params.dit", "value": 2_647_728}]
    table = figures.table_markdown(comparisons.summarize(pd.DataFrame(rows)))
    assert table.splitlines()[0] == "| run | step | seeds | DiT params | overall | seed SD |"
    assert "| kv_fusion | 10 | 1 | 2.65M | 0.250 | n/a |" in table and "| lap | 10 | 1 | 0.73M | 0.500 | n/a |" in table
    # results made before the metric existed get no parameter column
    old = figures.table_markdown(comparisons.summarize(pd.DataFrame([r for r in rows if r["metric"] != "params.dit"])))
    assert old.splitlines()[0] == "| run | step | seeds | overall | seed SD |"
    assert "| lap | 10 | 1 | 0.500 | n/a |" in old


def test_two_seed_tables_say_what_the_cis_cover(tmp_path: Path) -> None:
    pp = pd.concat([per_prompt_fixture(0), per_prompt_fixture(1, shift=2)], ignore_index=True)
    exp = write_experiment(tmp_path, pp)
    figures.render_all(tmp_path, analyses=False)
    table = (exp / "table.md").read_text()
    assert "| lap | 10 | 2 | 0.750 [" in table and f"| {np.std([5 / 6, 4 / 6], ddof=1):.3f} |" in table
    assert comparisons.ONE_SEED not in table and "two-level bootstrap over 2 training seeds" in table


def test_readme_calls_significant_only_what_survives_holm(tmp_path: Path) -> None:
    """Three all-zero runs, one with a single correct image in 6 of its 40 prompts (raw p ~ 0.016 against a zero
    run) and one with every image correct. 10 pairs: the 4 smallest p-values (1/501, x 10 at most after Holm)
    survive, the three ~0.016 ones (x 6 after Holm) do not; the generated text must name exactly the survivors."""
    from analysis.results_readme import section

    rows = []
    tasks = ["single_object", "colors", "position", "counting"]
    for run in ["zero_a", "zero_b", "zero_c", "few", "all"]:
        for i in range(40):
            c = 4 if run == "all" else int(run == "few" and i < 6)
            rows.append({"exp": "x", "run": run, "seed": 0, "metadata": f"m{i}", "tag": tasks[i % 4], "prompt": "p",
                         "n_images": 4, "n_correct": c, "correct": c / 4})
    pp = pd.DataFrame(rows)
    paired = comparisons.paired_comparisons(pp, n_resamples=500)
    readme = section(tmp_path / "holm_case", comparisons.summarize(metrics_for(pp), pp, n_resamples=100), paired)
    raw_only = paired[(paired.p_value < 0.05) & (paired.p_holm >= 0.05)]
    survivors = paired[paired.p_holm < 0.05]
    assert sorted(raw_only.run_a) == ["few"] * 3 and len(survivors) == 4  # the fixture has both kinds
    for _, r in raw_only.iterrows():
        assert f"{r.run_a} - {r.run_b}:" not in readme and f"{r.run_b} - {r.run_a}:" not in readme
    for _, r in survivors.iterrows():
        assert f"{r.run_a} - {r.run_b}:" in readme  # "all" first: the larger run
    assert "Significant after Holm over 10 pairs" in readme
    assert "No other pair differs significantly (6 pairs)" in readme


@pytest.mark.slow
def test_make_figures_reproduces_the_committed_results_byte_for_byte(tmp_path: Path) -> None:
    """Every figure, table, paired.csv, checkpoint analysis and results/README.md regenerated from the committed
    results/ equals the committed file byte for byte, and nothing new appears: `make figures` leaves
    `git status --porcelain results/` empty."""
    import filecmp
    import shutil

    committed = Path(__file__).resolve().parents[1] / "results"
    copy = tmp_path / "results"
    shutil.copytree(committed, copy)
    made = figures.render_all(copy)
    assert (copy / "README.md") in made and len(made) > 20
    files = sorted(p.relative_to(committed) for p in committed.rglob("*") if p.is_file())
    assert sorted(p.relative_to(copy) for p in copy.rglob("*") if p.is_file()) == files
    changed = [str(f) for f in files if not filecmp.cmp(committed / f, copy / f, shallow=False)]
    assert changed == [], f"make figures changed {changed}: regenerate and commit them"


def test_layer_dropout_images_follow_their_checkpoint(tmp_path: Path) -> None:
    """Images drawn from one checkpoint are not reused for another: a different checkpoint empties the folder, the
    same one keeps it (resume)."""
    a, b = tmp_path / "a.ckpt", tmp_path / "b.ckpt"
    a.write_bytes(b"weights A")
    b.write_bytes(b"weights B")
    images = tmp_path / "out" / "images"
    layer_dropout.fresh_images_for(a, images)
    (images / "none").mkdir()
    (images / "none" / "00000.png").write_bytes(b"drawn by A")
    layer_dropout.fresh_images_for(a, images)  # same checkpoint: resume keeps what it drew
    assert (images / "none" / "00000.png").read_bytes() == b"drawn by A"
    layer_dropout.fresh_images_for(b, images)  # another checkpoint: nothing of A's survives
    assert not (images / "none").exists()
    unstamped = tmp_path / "old" / "images"
    (unstamped / "none").mkdir(parents=True)  # a folder from before the stamp existed is not trusted either
    layer_dropout.fresh_images_for(a, unstamped)
    assert not (unstamped / "none").exists()


# ---------------------------------------------------------------- held-out validation loss across training seeds
def val_rows(losses: dict[str, list[float]], gains: dict[str, list[float]], step: int = 20) -> pd.DataFrame:
    """metrics.csv rows: per run and seed, val.* at steps 10 and ``step`` (the earlier step must be ignored)."""
    rows = []
    for run, values in losses.items():
        for seed, (loss, gain) in enumerate(zip(values, gains[run], strict=True)):
            for s, scale in ((10, 5.0), (step, 1.0)):
                for metric, v in (("val.loss", loss * scale), ("val.loss_uncond", (loss + gain) * scale),
                                  ("val.cond_gain", gain * scale)):
                    rows.append({"exp": "x", "run": run, "seed": seed, "step": s, "metric": metric, "value": v,
                                 "ci_low": None, "ci_high": None, "n": 60})
    return pd.DataFrame(rows)


def welch_by_hand(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Welch's t, its Welch-Satterthwaite df and two-sided p, from the textbook formulas."""
    from scipy.stats import t as student

    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    t = (np.mean(a) - np.mean(b)) / np.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return t, df, 2 * student.sf(abs(t), df)


def test_validation_loss_tests_are_welch_over_seeds_with_holm() -> None:
    losses = {"untrained": [1.0, 1.0, 1.0], "t5": [0.070, 0.072, 0.071], "lap": [0.060, 0.061, 0.063],
              "hsi": [0.069, 0.076, 0.070], "one_seed": [0.05]}
    gains = {"untrained": [0.0, 0.0, 0.0], "t5": [0.001, 0.002, 0.0015], "lap": [0.001, -0.001, 0.0005],
             "hsi": [0.002, 0.0021, 0.0019], "one_seed": [0.003]}
    m = val_rows(losses, gains)
    m.loc[m.run == "untrained", "step"] = 0  # the floor: never trained, validated at step 0 only
    pairs = comparisons.validation_comparisons(m).set_index(["run_a", "run_b"])
    # the untrained floor and the one-seed run are not tested; the 3 trained pairs are, in the figure's order
    assert list(pairs.index) == [("t5", "hsi"), ("t5", "lap"), ("hsi", "lap")]
    for (a, b), r in pairs.iterrows():
        t, df, p = welch_by_hand(losses[a], losses[b])  # the last step's values, not step 10's
        assert r["diff"] == pytest.approx(np.mean(losses[a]) - np.mean(losses[b]))
        assert r.p_value == pytest.approx(p) and r.df == pytest.approx(df)
        from scipy.stats import t as student

        half = student.ppf(0.975, df) * abs(r["diff"] / t)
        assert (r.ci_low, r.ci_high) == pytest.approx((r["diff"] - half, r["diff"] + half))
    p = pairs.p_value.sort_values()
    np.testing.assert_allclose(pairs.loc[p.index, "p_holm"],
                               np.minimum(1, np.maximum.accumulate(p.to_numpy() * [3, 2, 1])))

    summary = comparisons.validation_summary(m).set_index("run")
    assert summary.loc["lap", "loss"] == pytest.approx(np.mean(losses["lap"]))
    assert summary.loc["lap", "cond_gain_sd"] == pytest.approx(np.std(gains["lap"], ddof=1))
    assert summary.loc["one_seed", "seeds"] == 1 and np.isnan(summary.loc["one_seed", "cond_gain_p"])
    assert np.isnan(summary.loc["untrained", "cond_gain_p"])  # no training, no variance: no test, no NaN in Holm
    from scipy.stats import ttest_1samp

    tested = ["t5", "hsi", "lap"]
    raw = [ttest_1samp(gains[r], 0).pvalue for r in tested]
    np.testing.assert_allclose(summary.loc[tested, "cond_gain_p"], raw)
    order = np.argsort(raw)
    holm = np.empty(3)
    holm[order] = np.minimum(1, np.maximum.accumulate(np.sort(raw) * [3, 2, 1]))
    np.testing.assert_allclose(summary.loc[tested, "cond_gain_p_holm"], holm)


def test_readme_reports_the_validation_loss_and_only_holm_survivors(tmp_path: Path) -> None:
    from analysis.results_readme import validation_lines

    # lap is far below t5 (tiny seed SD); hsi overlaps both
    losses = {"t5": [0.0700, 0.0701, 0.0702], "lap": [0.0600, 0.0601, 0.0602], "hsi": [0.060, 0.075, 0.066]}
    gains = {"t5": [0.001, 0.0011, 0.0012], "lap": [0.001, -0.001, 0.0], "hsi": [0.0, 0.001, -0.0005]}
    text = "\n".join(validation_lines(val_rows(losses, gains)))
    assert "| lap | 3 | 0.0601 ± 0.0001 |" in text
    assert "Lower `val.loss` after Holm over 3 pairs (Welch t over training seeds): lap < t5: -0.0100" in text
    assert "hsi <" not in text and "< hsi" not in text and "No other pair differs significantly (2 pairs)" in text
    assert "Conditioning gain above 0 (one-sample t over seeds, Holm over 3 trained runs): t5." in text
    one = "\n".join(validation_lines(val_rows({"t5": [0.07], "lap": [0.06]}, {"t5": [0.0], "lap": [0.001]})))
    assert "One training seed per run: no test on the validation loss" in one and "Lower" not in one
