"""Run scores and pairwise tests of one sweep from its results files, at two levels: training seeds and prompts.

A run trained with several training seeds (``seeds`` in the config) has one ``metrics.csv`` row per seed and
metric and one ``per_prompt.csv`` row per seed and prompt; every seed is scored on the same prompts and sampling
seeds. Here:

- a run's score is the mean over its training seeds; its 95% CI comes from the two-level bootstrap of
  ``common.stats`` (training seeds, and the prompts within GenEval tasks; ``per_prompt.csv``); ``sd`` is the
  seed-to-seed standard deviation. With one seed per run the CI is over prompts only and says nothing about
  training variance: every caption then says "prompt-level CI only; training variance not measured".
- ``paired_comparisons``: every pair of runs, over the seeds and prompts both have, paired two-level bootstrap of
  the GenEval-shapes overall difference; ``p_holm`` is Holm's adjustment over all the pairs of the sweep (the
  family of ``paired.csv``); a difference is called significant only when ``p_holm < 0.05``.
- power: ``mde80``, the smallest difference each pair's test detects with 80% power at alpha 0.05 after Holm over
  the family, from the normal approximation ``(z_{1 - 0.05 / (2 m)} + z_0.8) x SE`` where SE is the standard
  deviation of that pair's bootstrap differences -- so it carries the measured seed and prompt variance (prompt
  variance alone with one seed).

Metrics without per-prompt data (reconstruction / edit PSNR, SSIM) are averaged over seeds from ``metrics.csv``;
their CI is the one recorded with the metric (held-out items) for one seed, and left empty for several seeds.
"""

from __future__ import annotations

import itertools
import re

import numpy as np
import pandas as pd

from experiments.evaluation import BENCHMARKS, table_metrics

ALPHA, POWER = 0.05, 0.8
OVERALL = BENCHMARKS["geneval"].headline  # GenEval-shapes overall: the bars' headline, the paired tests' metric
# A metric "<benchmark>.<score>@<x>" is one point of a setting swept inside a benchmark (zero-shot editing's p):
# tables list those per x, in a table of their own, and ``fig15b`` draws them against x.
SWEPT = "@"
# the reconstruction / editing benchmarks' metrics, in their registry order
IMAGE_METRICS = [m for name, b in BENCHMARKS.items() if name != "geneval" for m in b.metrics if SWEPT not in m]
RUN_ORDER = ["untrained", "t5", "last_layer", "kv_fusion", "kv_fusion_hidden", "hsi", "lap", "oracle"]
ONE_SEED = "prompt-level CI only; training variance not measured"
SUMMARY_COLUMNS = ["exp", "run", "metric", "step", "seeds", "value", "ci_low", "ci_high", "sd", "n"]
PAIRED_COLUMNS = ["run_a", "run_b", "diff", "ci_low", "ci_high", "p_value", "p_holm", "se", "mde80", "seeds",
                  "prompts"]


def order_runs(runs: list[str]) -> list[str]:
    """The paper's bar order for known names, natural order for the rest (tiles1, tiles5, tiles10)."""
    known = [r for r in RUN_ORDER if r in runs]
    return known + sorted((r for r in runs if r not in known),
                          key=lambda r: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", r)])


def with_seed(per_prompt: pd.DataFrame, metrics: pd.DataFrame) -> pd.DataFrame:
    """``per_prompt.csv`` with its ``seed`` column; files written before runs had seeds get each run's seed from
    ``metrics.csv`` (ValueError when such a run has several)."""
    if "seed" in per_prompt:
        return per_prompt
    seeds = metrics.groupby("run")["seed"].unique()
    multi = [r for r, s in seeds.items() if len(s) > 1 and r in set(per_prompt.run)]
    if multi:
        raise ValueError(f"per_prompt.csv has no seed column but metrics.csv has several seeds for {multi}")
    return per_prompt.assign(seed=per_prompt.run.map(lambda r: int(seeds[r][0]) if r in seeds else 0))


def summarize(metrics: pd.DataFrame, per_prompt: pd.DataFrame | None = None, n_resamples: int = 1000,
              seed: int = 0) -> pd.DataFrame:
    """One row per (run, metric) of the table metrics (swept ones included) and the model sizes (``params.*``):
    columns ``SUMMARY_COLUMNS``, from each metric's last recorded step.

    value: mean over the run's training seeds; ci_low/high: two-level bootstrap 95% CI for GenEval metrics (from
    ``per_prompt``: ``evals.geneval.overall_score`` / ``task_score``), else the recorded CI of a single seed; sd:
    seed-to-seed SD (NaN with one seed); seeds: how many; n: the metric's recorded ``n`` (largest over seeds).
    """
    from evals.geneval import overall_score, task_score

    if per_prompt is not None and len(per_prompt):
        per_prompt = with_seed(per_prompt, metrics)
    metrics = metrics.assign(**{c: pd.to_numeric(metrics[c], errors="coerce") for c in ("ci_low", "ci_high")})
    present = set(metrics.metric)
    keys = [k for k in table_metrics() if k in present] + sorted(k for k in present if k.startswith("params."))
    rows = []
    for run in order_runs(list(metrics.run.unique())):
        m = metrics[(metrics.run == run) & metrics.metric.isin(keys)]
        exp = str(m.exp.iloc[0]) if "exp" in m and len(m) else ""
        step = int(m.step.max()) if len(m) else 0
        prompts = None
        if per_prompt is not None and len(per_prompt) and (per_prompt.run == run).any():
            prompts = per_prompt[per_prompt.run == run]
        for key in keys:
            rec = m[m.metric == key]
            if rec.empty:
                continue
            rec = rec[rec.step == rec.step.max()]
            n_seeds = int(rec.seed.nunique())
            value, sd = float(rec.value.mean()), float(rec.value.std(ddof=1)) if n_seeds > 1 else float("nan")
            lo, hi = (float(rec.ci_low.iloc[0]), float(rec.ci_high.iloc[0])) if n_seeds == 1 else (np.nan, np.nan)
            if prompts is not None and key in BENCHMARKS["geneval"].metrics:
                n_seeds = int(prompts.seed.nunique())
                score = (overall_score(prompts, n_resamples, seed) if key == OVERALL else
                         task_score(prompts, key.removeprefix("geneval."), n_resamples, seed))
                if score is not None:
                    value, lo, hi, sd = score
            rows.append({"exp": exp, "run": run, "metric": key, "step": step, "seeds": n_seeds, "value": value,
                         "ci_low": lo, "ci_high": hi, "sd": sd, "n": rec.n.max() if "n" in rec else np.nan})
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def paired_comparisons(per_prompt: pd.DataFrame, n_resamples: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Every pair of runs (a, b) of one sweep: GenEval-shapes overall(a) - overall(b) over the training seeds and
    prompts both scored, paired two-level bootstrap CI, SE and two-sided p (``evals.geneval.paired_overall``,
    prompts resampled within tasks); ``p_holm`` over all the pairs; ``mde80`` (see the module docstring).

    per_prompt: rows ``run, seed, metadata, tag, n_correct, n_images`` (``per_prompt.csv``; without ``seed``: one
    seed per run). Returns one row per pair, columns ``PAIRED_COLUMNS``.
    """
    from common.stats import holm, min_detectable_difference
    from evals.geneval import paired_overall

    runs = order_runs(list(per_prompt.run.unique()))
    rows = []
    for a, b in itertools.combinations(runs, 2):
        paired = paired_overall(per_prompt[per_prompt.run == a], per_prompt[per_prompt.run == b], n_resamples, seed)
        if paired is None:
            continue
        r, n_prompts, n_seeds = paired
        rows.append({"run_a": a, "run_b": b, "diff": r.diff, "ci_low": r.lo, "ci_high": r.hi, "p_value": r.p_value,
                     "se": r.se, "seeds": n_seeds, "prompts": n_prompts})
    out = pd.DataFrame(rows, columns=PAIRED_COLUMNS)
    if len(out):
        out["p_holm"] = holm(out.p_value.to_numpy())
        # a zero SE (both runs score 0 on every resample) measures no variance to size a test with: no MDE
        out["mde80"] = [min_detectable_difference(se, len(out), ALPHA, POWER) if se > 0 else np.nan for se in out.se]
    return out


def fmt_p(name: str, p: float) -> str:
    """"p = 0.012", or "p < 0.001" below what three decimals show."""
    return f"{name} = {p:.3f}" if p >= 0.001 else f"{name} < 0.001"


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def ci_note(summary: pd.DataFrame) -> str:
    """What the CIs cover: the single-seed warning, or the two-level bootstrap with the seed counts; and what is
    resampled (GenEval prompts within tasks, held-out items of the image metrics)."""
    seeds = sorted(set(summary.seeds.astype(int))) if len(summary) else [1]
    geneval = summary.metric.str.startswith("geneval.").any() if len(summary) else False
    image = (summary.metric.isin(IMAGE_METRICS) | summary.metric.str.contains(SWEPT, regex=False)).any() if len(
        summary) else False
    if max(seeds) == 1:
        units = ["prompts resampled within GenEval tasks"] * bool(geneval) + ["held-out items resampled"] * bool(image)
        return f"95% CIs: {ONE_SEED} (1 training seed per run; {'; '.join(units) or 'no CI recorded'})."
    count = str(seeds[0]) if len(seeds) == 1 else f"{seeds[0]}-{seeds[-1]}"
    note = (f"95% CIs: two-level bootstrap over {count} training seeds per run, then prompts within GenEval tasks; "
            "score = mean over seeds; seed SD = seed-to-seed standard deviation.")
    if image:
        note += (" Image metrics (PSNR, SSIM, edits): mean over seeds, no CI across seeds (their per-item scores are "
                 "not in the results files).")
    return note + (f" Runs with one seed: {ONE_SEED}." if min(seeds) == 1 else "")


def power_note(paired: pd.DataFrame) -> str:
    """The smallest difference detectable at 80% power after Holm: median (and range) over the family's pairs."""
    if paired.empty:
        return ""
    mde = paired.mde80.dropna()
    if mde.empty:
        return ("Smallest detectable difference: not estimable (every pair's bootstrap SE is 0: no variation "
                "measured).")
    lo, med, hi = np.quantile(mde, [0.0, 0.5, 1.0])
    spread = f"{med:.3f}" if len(mde) == 1 else f"{med:.3f} (median over {len(mde)} pairs; {lo:.3f}-{hi:.3f})"
    one_seed = int(paired.seeds.max()) == 1
    return (f"Smallest difference detectable at 80% power (alpha {ALPHA}, Holm over {plural(len(paired), 'pair')}): "
            f"{spread}, normal approximation with each pair's bootstrap SE"
            + (" -- prompt variance only, so training variance would raise it." if one_seed else
               " (seed and prompt variance)."))


def significant_pairs(paired: pd.DataFrame) -> list[str]:
    """"hi - lo: +d [ci], p_holm = x" for every pair with p_holm < alpha, the larger run first."""
    out = []
    for _, r in paired[paired.p_holm < ALPHA].sort_values("p_holm", kind="stable").iterrows():
        sign = 1 if r["diff"] >= 0 else -1
        hi, lo_run = (r.run_a, r.run_b) if sign > 0 else (r.run_b, r.run_a)
        ci = sorted((sign * r.ci_low, sign * r.ci_high))
        out.append(f"{hi} - {lo_run}: {sign * r['diff']:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}], "
                   + fmt_p("p_holm", r.p_holm))
    return out


def caption(summary: pd.DataFrame, paired: pd.DataFrame) -> str:
    """The lines under a figure and a table: what the CIs cover; the best run against every other (raw p and
    Holm-adjusted p); the pairs significant after Holm; the detectable difference."""
    lines = [ci_note(summary)]
    overall = summary[summary.metric == OVERALL].set_index("run")["value"]
    if not paired.empty and len(overall):
        best = overall.idxmax()
        n_seeds = int(paired.seeds.max())
        lines.append(f"paired bootstrap over the same prompts+sampling seeds ({int(paired.prompts.max())} prompts, "
                     f"{plural(n_seeds, 'training seed')}); two-sided p and p_holm (Holm over the "
                     f"{plural(len(paired), 'pair')} of paired.csv):")
        for _, r in paired.iterrows():
            if best not in (r.run_a, r.run_b):
                continue
            sign, other = (1, r.run_b) if r.run_a == best else (-1, r.run_a)
            lo, hi = sorted((sign * r.ci_low, sign * r.ci_high))
            lines.append(f"  {best} - {other}: {sign * r['diff']:+.3f} [{lo:+.3f}, {hi:+.3f}], "
                         f"{fmt_p('p', r.p_value)}, {fmt_p('p_holm', r.p_holm)}")
        sig = significant_pairs(paired)
        lines.append("significant after Holm (p_holm < 0.05):" + ("" if sig else " none"))
        lines += [f"  {s}" for s in sig]
        lines.append(power_note(paired))
    return "\n".join(lines)


# ---------------------------------------------------------------- held-out validation loss across training seeds
VAL_SUMMARY_COLUMNS = ["run", "step", "seeds", "loss", "loss_sd", "loss_uncond", "loss_uncond_sd", "cond_gain",
                       "cond_gain_sd", "cond_gain_p", "cond_gain_p_holm"]
VAL_PAIRED_COLUMNS = ["run_a", "run_b", "diff", "ci_low", "ci_high", "p_value", "p_holm", "df", "seeds_a",
                      "seeds_b"]


def _final_validation(metrics: pd.DataFrame) -> pd.DataFrame:
    """One row per (run, seed) of the held-out validation metrics at that run's last validated step:
    columns run, seed, step, loss, loss_uncond, cond_gain."""
    from experiments.validation import VAL_METRICS

    v = metrics[metrics.metric.isin(VAL_METRICS)]
    if "seed" not in v:
        v = v.assign(seed=0)
    if v.empty:
        return pd.DataFrame(columns=["run", "seed", "step", "loss", "loss_uncond", "cond_gain"])
    last = v.groupby("run").step.transform("max")
    wide = v[v.step == last].pivot_table(index=["run", "seed", "step"], columns="metric", values="value")
    return wide.rename(columns=lambda m: m.removeprefix("val.")).reset_index()


def validation_summary(metrics: pd.DataFrame) -> pd.DataFrame:
    """Each run's held-out validation at its final step (``VAL_SUMMARY_COLUMNS``): mean and seed-to-seed SD over
    its training seeds of ``val.loss``, ``val.loss_uncond`` and ``val.cond_gain``; ``cond_gain_p``: one-sample
    two-sided t-test of "the condition does not lower the loss" (mean gain = 0) over the seeds (NaN with one seed),
    ``cond_gain_p_holm`` over the runs that have one. A run trained for 0 steps (the floor) gets no test.

    The validation set (scenes, noise levels, noise) is the same for every run and seed, so the only variation
    between two values is training: the seeds are the replicates, and the test is over them."""
    from scipy.stats import ttest_1samp

    from common.stats import holm

    final = _final_validation(metrics)
    rows = []
    for run in order_runs(list(final.run.unique())):
        d = final[final.run == run]
        row = {"run": run, "step": int(d.step.max()), "seeds": len(d)}
        for m in ("loss", "loss_uncond", "cond_gain"):
            row[m] = float(d[m].mean())
            row[f"{m}_sd"] = float(d[m].std(ddof=1)) if len(d) > 1 else np.nan
        # NaN when untestable: one seed, no training, or gains identical across seeds (no variance to test with)
        trained = row["step"] > 0 and len(d) > 1 and d.cond_gain.std(ddof=1) > 0
        row["cond_gain_p"] = float(ttest_1samp(d.cond_gain, 0.0).pvalue) if trained else np.nan
        rows.append(row)
    out = pd.DataFrame(rows, columns=VAL_SUMMARY_COLUMNS)
    tested = out.cond_gain_p.notna()
    out.loc[tested, "cond_gain_p_holm"] = holm(out.loc[tested, "cond_gain_p"].to_numpy())
    return out


def validation_comparisons(metrics: pd.DataFrame) -> pd.DataFrame:
    """Every pair of trained runs (final step > 0: an untrained floor is left out) with ≥ 2 training seeds each:
    final held-out ``val.loss`` of a minus b (means over seeds), Welch's t-test across the seeds (unequal
    variances; Welch-Satterthwaite ``df``) with its 95% CI, two-sided p and ``p_holm`` over all the pairs
    (``VAL_PAIRED_COLUMNS``). Empty when fewer than two such runs. A negative ``diff``: run a reaches the lower
    loss."""
    from scipy.stats import ttest_ind

    from common.stats import holm

    final = _final_validation(metrics)
    counts, steps = final.groupby("run").seed.nunique(), final.groupby("run").step.max()
    runs = [r for r in order_runs(list(final.run.unique())) if counts[r] >= 2 and steps[r] > 0]
    rows = []
    for a, b in itertools.combinations(runs, 2):
        xa, xb = final.loss[final.run == a].to_numpy(), final.loss[final.run == b].to_numpy()
        t = ttest_ind(xa, xb, equal_var=False)
        ci = t.confidence_interval(1 - ALPHA)
        rows.append({"run_a": a, "run_b": b, "diff": float(xa.mean() - xb.mean()), "ci_low": float(ci.low),
                     "ci_high": float(ci.high), "p_value": float(t.pvalue), "df": float(t.df),
                     "seeds_a": len(xa), "seeds_b": len(xb)})
    out = pd.DataFrame(rows, columns=VAL_PAIRED_COLUMNS)
    if len(out):
        out["p_holm"] = holm(out.p_value.to_numpy())
    return out


# ------------------------------------------------------------------------------------------------ controls
FLOOR, CEILING = "untrained", "oracle"  # the negative and positive controls of a conditioning comparison
PART = "geneval.part."


GAIN_LEVEL = 0.85  # high noise: the prompt decides the pixels, so the gain is not diluted by levels where it is ~0


def control_table(metrics: pd.DataFrame) -> pd.DataFrame:
    """Runs x where their samples fail, between the controls: one row per run with ``seeds``, ``overall`` (GenEval
    overall, mean over training seeds), ``of_oracle`` (the run's share of the oracle's gain over the untrained
    floor, (run - floor) / (oracle - floor); NaN without both controls or when the oracle is not above the floor)
    and one column per ``evals.geneval.COMPONENTS`` entry (``geneval.part.<c>``: share of the images where it
    applies, mean over seeds); ``gain``: the held-out conditioning gain at noise level ``GAIN_LEVEL``
    (``val.cond_gain.s0.85``, mean over seeds) and ``gain_of_oracle`` = gain / the oracle's gain (NaN unless the
    oracle's is > 0). Each metric at its last step; empty when no run records components."""
    from evals.geneval import COMPONENTS
    from experiments.validation import gain_metric

    parts = [f"{PART}{c}" for c in COMPONENTS]
    gain = gain_metric(GAIN_LEVEL)
    m = metrics[metrics.metric.isin([OVERALL, *parts, gain])]
    if not m.metric.isin(parts).any():
        return pd.DataFrame()
    last = m[m.step == m.groupby(["run", "metric"]).step.transform("max")]
    wide = last.groupby(["run", "metric"]).value.mean().unstack("metric")
    seeds = last[last.metric == OVERALL].groupby("run").seed.nunique()
    out = pd.DataFrame({"run": order_runs(list(wide.index))}).set_index("run")
    out["seeds"] = seeds.reindex(out.index)
    out["overall"] = wide[OVERALL].reindex(out.index) if OVERALL in wide else np.nan
    floor = out.overall.get(FLOOR, np.nan)
    ceiling = out.overall.get(CEILING, np.nan)
    gap = ceiling - floor
    out["of_oracle"] = (out.overall - floor) / gap if pd.notna(gap) and gap > 0 else np.nan
    for c, col in zip(COMPONENTS, parts, strict=True):
        out[c] = wide[col].reindex(out.index) if col in wide else np.nan
    out["gain"] = wide[gain].reindex(out.index) if gain in wide else np.nan
    oracle_gain = out.gain.get(CEILING, np.nan)
    out["gain_of_oracle"] = out.gain / oracle_gain if pd.notna(oracle_gain) and oracle_gain > 0 else np.nan
    return out.reset_index()
