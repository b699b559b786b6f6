"""Figures and tables drawn from results files alone (``results/<EXP>/metrics.csv``, docs/DESIGN.md §4).

    python -m analysis.figures results/conditioning_candidates/metrics.csv --figure fig4
    python -m analysis.figures --all [--results results]          (`make figures`: every EXP present)

Each drawer takes a run summary (one row per run and metric: ``analysis.comparisons.summarize``, the mean over
training seeds with its two-level CI; ``learning_curves`` takes the tidy rows) and an output folder and writes
PNG + PDF. With ``--all``, every ``results/<EXP>/`` also gets ``learning_curves.png`` where its runs have
held-out validation rows (``val.*``, mean ± SD over training seeds against the step), ``table.md`` (the runs in
the paper's bar-chart order: overall and per-task scores with 95% CIs and the seed-to-seed SD) and, where
``per_prompt.csv`` exists (written by ``make collect``), ``paired.csv``: the paired two-level bootstrap of the
GenEval-shapes overall difference for every pair of runs with raw and Holm-adjusted p and the detectable
difference (``analysis.comparisons``), summarised under the figure and the table; ``results/README.md`` gets one
generated section per experiment (``analysis.results_readme``).
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from analysis.common import save_figure, write_csv  # noqa: E402
from analysis.comparisons import (  # noqa: E402
    IMAGE_METRICS,
    OVERALL,
    SWEPT,
    caption,
    order_runs,
    paired_comparisons,
    summarize,
    validation_comparisons,
    with_seed,
)
from analysis.results_readme import control_lines, validation_lines  # noqa: E402
from common.files import atomic_write_text  # noqa: E402
from common.geneval_spec import TASKS  # noqa: E402
from experiments.evaluation import table_metrics  # noqa: E402
from experiments.validation import VAL_METRICS  # noqa: E402

SWEEP_LABELS = {"zero_shot_edit": ("p", "p = share of sampling steps on the source image's tokens (then the "
                                        "target's description)")}


def _themed(drawer: Callable[..., Path]) -> Callable[..., Path]:
    """Draw under seaborn's whitegrid / paper theme without leaking it: matplotlib's settings are restored
    afterwards, so figures drawn later in the same process (the checkpoint analyses) look as when drawn alone."""

    @functools.wraps(drawer)
    def draw_themed(*args, **kwargs) -> Path:
        with plt.rc_context():
            sns.set_theme(style="whitegrid", context="paper")
            return drawer(*args, **kwargs)

    return draw_themed


def _errorbars(ax, x, values, lo, hi) -> None:
    mask = lo.notna() & hi.notna()
    ax.errorbar(
        x[mask.to_numpy()], values[mask], yerr=[values[mask] - lo[mask], hi[mask] - values[mask]],
        fmt="none", ecolor="black", capsize=4, lw=1.2,
    )


def _finish(fig: plt.Figure, out_dir: Path, name: str, caption: str) -> Path:
    """Lay out, print the caption under the axes, write ``<name>.png`` (150 dpi) and a reproducible ``.pdf``."""
    import textwrap

    fig.tight_layout()
    if caption:  # long lines wrapped, so the caption does not widen the figure
        lines = [textwrap.fill(line, 140, subsequent_indent="    ") for line in caption.splitlines()]
        fig.text(0.01, -0.01, "\n".join(lines), ha="left", va="top", fontsize=7, family="monospace")
    return save_figure(fig, out_dir, name)


def fig4(df: pd.DataFrame, out_dir: Path, caption: str = "") -> Path:
    """Paper Fig. 4 analogue: GenEval-shapes overall per candidate (95% CI), plus the six task accuracies."""
    return bars(df, out_dir, name="fig4", title="Conditioning candidates", caption=caption)


@_themed
def bars(df: pd.DataFrame, out_dir: Path, name: str = "bars", title: str | None = None, caption: str = "") -> Path:
    """Any sweep: GenEval-shapes overall per run (95% CI; mean over training seeds) + the six task accuracies.
    df: a run summary (``summarize``). Writes ``<name>.png`` and ``<name>.pdf``; the title defaults to the
    experiment name in ``df.exp``."""
    if title is None:
        title = str(df.exp.iloc[0]) if "exp" in df and len(df) else "runs"

    overall = df[df.metric == OVERALL].copy()
    order = order_runs(list(overall.run.unique()))
    overall = overall.set_index("run").loc[order].reset_index()
    tasks = df[df.metric.isin([f"geneval.{t}" for t in TASKS])].copy()
    tasks["task"] = tasks.metric.str.removeprefix("geneval.")

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [1, 1.8]})
    palette = dict(zip(order, sns.color_palette("deep", len(order)), strict=True))
    x = np.arange(len(order))
    ax1.bar(x, overall["value"], color=[palette[r] for r in order])
    _errorbars(ax1, x, overall["value"], overall["ci_low"], overall["ci_high"])
    for xi, v in zip(x, overall["value"], strict=True):
        ax1.text(xi, v + 0.01, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    params = dit_params(df)  # under each run's name: its DiT's size, where the results record it
    ax1.set_xticks(x, [f"{r}\n{params[r]}" if r in params else r for r in order], rotation=20)
    ax1.set_ylabel("GenEval-shapes overall (95% CI)")
    ax1.set_ylim(0, 1)
    steps = int(overall.loc[overall.run != "untrained", "step"].max()) if (overall.run != "untrained").any() else 0
    ax1.set_title(f"{title} after {steps} steps")
    sns.barplot(data=tasks, x="task", y="value", hue="run", hue_order=order, order=list(TASKS), palette=palette,
                ax=ax2, errorbar=None)
    ax2.set_ylim(0, 1)
    ax2.set_xlabel("")
    ax2.set_ylabel("task accuracy (images)")
    ax2.legend(fontsize=7, ncols=3, loc="upper right")
    ax2.set_title("Per GenEval task")
    return _finish(fig, out_dir, name, caption)


def draw(name: str, df: pd.DataFrame, out_dir: Path, caption: str = "") -> Path:
    """Draw figure ``name``; a ``caption`` (e.g. the paired tests) is printed under it."""
    if name not in FIGURES:
        raise ValueError(f"unknown figure {name!r}; valid: {', '.join(FIGURES)}")
    return FIGURES[name](df, Path(out_dir), caption=caption)


def dit_params(metrics: pd.DataFrame) -> dict[str, str]:
    """Each run's trainable DiT parameters as "2.65M" (metric ``params.dit``); {} for results made before it."""
    rows = metrics[metrics.metric == "params.dit"]
    return {r.run: f"{r.value / 1e6:.2f}M" for r in rows.itertuples()}


def table_markdown(summary: pd.DataFrame, caption: str = "") -> str:
    """Runs x (DiT parameters, GenEval overall, its seed-to-seed SD, the six tasks, then any reconstruction / edit
    metric present): value [95% CI], in the figure's run order, then the swept metrics' tables and the caption.
    Columns no run has are left out.

    summary: ``analysis.comparisons.summarize`` rows. The SD column is the first metric's (the headline)."""
    runs = order_runs(list(summary.run.unique()))
    keys = [k for k in table_metrics() if SWEPT not in k and (summary.metric == k).any()]
    cols = [k.removeprefix("geneval.") for k in keys]
    if cols:
        cols.insert(1, "seed SD")
    params = dit_params(summary)
    cols = ["step", "seeds", *(["DiT params"] if params else []), *cols]
    head = "| run | " + " | ".join(cols) + " |\n|---|" + "---:|" * len(cols) + "\n"
    body = []
    for run in runs:
        m = summary[summary.run == run].set_index("metric")
        cells = [str(int(m["step"].max())), str(int(m["seeds"].max())), *([params.get(run, "")] if params else [])]
        for key in keys:
            digits = 2 if key.endswith("psnr") else 3
            if key not in m.index:
                cells.append("")
            else:
                v, lo, hi = m.loc[key, "value"], m.loc[key, "ci_low"], m.loc[key, "ci_high"]
                cells.append(f"{v:.{digits}f}" + (f" [{lo:.2f}, {hi:.2f}]" if pd.notna(lo) and pd.notna(hi) else ""))
            if key == keys[0]:
                sd = m.loc[key, "sd"] if key in m.index else np.nan
                cells.append("n/a" if pd.isna(sd) else f"{sd:.{digits}f}")
        body.append(f"| {run} | " + " | ".join(cells) + " |")
    text = head + "\n".join(body) + "\n" + swept_table(summary)
    return text + (f"\n```\n{caption}\n```\n" if caption else "")


def swept(metrics: pd.DataFrame) -> pd.DataFrame:
    """The swept metrics' rows with ``benchmark`` ("zero_shot_edit"), ``score`` ("correct") and ``at`` (x as a
    float) split out of the metric name, sorted by benchmark, run and x."""
    d = metrics[metrics.metric.str.contains(SWEPT, regex=False)].copy()
    if d.empty:
        return d.assign(benchmark=[], score=[], at=[])
    parts = d.metric.str.rsplit(SWEPT, n=1, expand=True)
    head = parts[0].str.split(".", n=1, expand=True)
    d["benchmark"], d["score"], d["at"] = head[0], head[1], parts[1].astype(float)
    return d.sort_values(["benchmark", "run", "at"], kind="stable")


def swept_table(metrics: pd.DataFrame) -> str:
    """One markdown table per swept benchmark: a row per run and x, a column per score, value [95% CI]; "" when
    the results have none."""
    d = swept(metrics)
    out = ""
    for bench, b in d.groupby("benchmark", sort=False):
        scores = list(dict.fromkeys(b.score))
        x, meaning = SWEEP_LABELS.get(bench, ("x", "x = the swept setting"))
        out += f"\n## {bench}\n\n{meaning}\n\n"
        out += f"| run | {x} | " + " | ".join(scores) + " |\n|---|---:|" + "---:|" * len(scores) + "\n"
        for run in order_runs(list(b.run.unique())):
            r = b[b.run == run]
            for at in sorted(r["at"].unique()):
                cells = []
                for sc in scores:
                    row = r[(r["at"] == at) & (r.score == sc)]
                    if row.empty:
                        cells.append("")
                        continue
                    v, lo, hi = row[["value", "ci_low", "ci_high"]].iloc[0]
                    cells.append(f"{v:.{2 if 'psnr' in sc else 3}f}"
                                 + (f" [{lo:.2f}, {hi:.2f}]" if pd.notna(lo) and pd.notna(hi) else ""))
                out += f"| {run} | {at:g} | " + " | ".join(cells) + " |\n"
    return out


@_themed
def image_bars(df: pd.DataFrame, out_dir: Path, name: str = "image_metrics", caption: str = "") -> Path:
    """Reconstruction / editing sweeps (paper Fig. 5 question): PSNR, SSIM (and exact edit accuracy) per run
    with 95% bootstrap CIs over the held-out items. df: a run summary. Writes ``<name>.png`` / ``.pdf``."""
    present = [m for m in IMAGE_METRICS if (df.metric == m).any()]
    if not present:
        raise ValueError(f"no reconstruction/edit metrics in this metrics.csv; expected some of {IMAGE_METRICS}")
    order = order_runs(list(df[df.metric.isin(present)].run.unique()))
    fig, axes = plt.subplots(1, len(present), figsize=(3.6 * len(present), 3.6), squeeze=False)
    palette = dict(zip(order, sns.color_palette("deep", len(order)), strict=True))
    for ax, metric in zip(axes[0], present, strict=True):
        d = df[df.metric == metric].set_index("run").loc[order].reset_index()
        x = np.arange(len(order))
        ax.bar(x, d["value"], color=[palette[r] for r in order])
        _errorbars(ax, x, d["value"], d["ci_low"], d["ci_high"])
        for xi, v in zip(x, d["value"], strict=True):
            ax.text(xi, v, f"{v:.2f}" if metric.endswith("psnr") else f"{v:.3f}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(x, order, rotation=20)
        ax.set_title(metric + (" (dB)" if metric.endswith("psnr") else ""))
        if not metric.endswith("psnr"):
            ax.set_ylim(0, 1)
    title = str(df.exp.iloc[0]) if "exp" in df and len(df) else "runs"
    steps = int(df["step"].max())
    fig.suptitle(f"{title} after {steps} steps (95% CI over held-out items)")
    return _finish(fig, out_dir, name, caption)


VAL_TITLES = {"val.loss": "held-out loss (conditional)", "val.loss_uncond": "held-out loss (null condition)",
              "val.cond_gain": "conditioning gain (uncond - cond)"}


def curve_table(metrics: pd.DataFrame) -> pd.DataFrame:
    """The held-out validation rows (``experiments.validation``), one row per (run, metric, step): ``mean`` over
    the run's training seeds (the ``seed`` column), ``sd`` across them, ``seeds``, and the band ``lo``/``hi`` =
    mean ± sd (NaN with one seed: its training variance is not measured)."""
    df = metrics[metrics.metric.isin(VAL_METRICS)].copy()
    if "seed" not in df:
        df["seed"] = 0
    g = df.groupby(["run", "metric", "step"], sort=True)
    out = g.agg(mean=("value", "mean"), sd=("value", "std"), seeds=("seed", "nunique")).reset_index()
    out["lo"], out["hi"] = out["mean"] - out["sd"], out["mean"] + out["sd"]
    return out


@_themed
def learning_curves(df: pd.DataFrame, out_dir: Path, name: str = "learning_curves", caption: str = "") -> Path:
    """Held-out validation against the training step (runs with ``eval.val_every``): one panel per metric of
    ``VAL_METRICS``, one line per run = the mean over its training seeds, band = ± 1 SD across seeds (none for a
    run with one seed; the caption then says that training variance is not measured). Every run is scored on the
    same scenes, noise levels and noise, so the gaps between lines are paired differences.

    df: the tidy ``metrics.csv`` rows (one per run, seed, metric and step), not a run summary."""
    table = curve_table(df)
    if table.empty:
        raise ValueError(f"no held-out validation rows in this metrics.csv ({', '.join(VAL_METRICS)}); runs "
                         "record them with eval.val_every")
    runs = order_runs(list(table.run.unique()))
    palette = dict(zip(runs, sns.color_palette("deep", len(runs)), strict=True))
    fig, axes = plt.subplots(1, len(VAL_METRICS), figsize=(4.2 * len(VAL_METRICS), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], VAL_METRICS, strict=True):
        for run in runs:
            d = table[(table.run == run) & (table.metric == metric)]
            if d.empty:
                continue
            ax.plot(d.step, d["mean"], marker="o", ms=3, color=palette[run], label=run)
            ax.fill_between(d.step, d.lo, d.hi, color=palette[run], alpha=0.2, lw=0)
        ax.set_title(VAL_TITLES[metric])
        ax.set_xlabel("training step")
        if metric == "val.cond_gain":
            ax.axhline(0, color="black", lw=0.8)
        else:  # losses fall by an order of magnitude: on a log axis the late gaps between runs stay visible
            ax.set_yscale("log")
    axes[0][0].legend(fontsize=7)
    title = str(df.exp.iloc[0]) if "exp" in df and len(df) else "runs"
    fig.suptitle(f"{title}: held-out validation (fixed scenes, noise levels and noise)")
    seeds = sorted(set(table.seeds))
    same = "every run on the same held-out scenes and noise"
    if seeds == [1]:
        bands = f"one training seed per run: no band, training variance not measured; {same}"
    else:
        bands = (f"line = mean over training seeds ({'/'.join(map(str, seeds))} per run), band = ± 1 SD across "
                 f"seeds (none for a run with one seed); {same}")
    return _finish(fig, out_dir, name, "\n".join(filter(None, [bands, caption])))


@_themed
def fig15b(df: pd.DataFrame, out_dir: Path, caption: str = "") -> Path:
    """Paper Fig. 15b, measured: zero-shot editing against p, the share of sampling steps on the source image's
    tokens. Left: exact edit check and the asked change present; right: PSNR of the untouched pixels (to the
    source) and of the whole image (to the target); 95% bootstrap CIs over held-out items; the paper's 10-20% is
    shaded. One line style per run."""
    d = swept(df)
    d = d[d.benchmark == "zero_shot_edit"]
    if d.empty:
        raise ValueError("no zero_shot_edit.<score>@<p> metrics in this metrics.csv")
    labels = {"correct": "exact edit check", "target": "asked change present",
              "psnr_untouched": "PSNR untouched pixels vs source", "psnr": "PSNR vs target"}
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    styles = dict(zip(order_runs(list(d.run.unique())), ["-", "--", ":", "-."] * 4, strict=False))
    for ax, group in zip(axes, (("correct", "target"), ("psnr_untouched", "psnr")), strict=True):
        ax.axvspan(0.1, 0.2, color="0.9", zorder=0, label="paper: 10-20%")
        for (run, sc), r in d[d.score.isin(group)].groupby(["run", "score"], sort=False):
            color = sns.color_palette("deep")[group.index(sc)]
            ax.plot(r["at"], r["value"], styles[run], marker="o", color=color,
                    label=labels[sc] + (f" ({run})" if len(styles) > 1 else ""))
            ax.fill_between(r["at"], r["ci_low"], r["ci_high"], color=color, alpha=0.2, lw=0)
        ax.set_xlabel("p: share of steps on the source image's tokens")
        ax.set_xticks(sorted(d["at"].unique()))
        ax.legend(fontsize=7)
    axes[0].set_ylim(0, 1)
    axes[0].set_ylabel("share of held-out edits")
    axes[1].set_ylabel("dB")
    steps, n = int(d["step"].max()), int(d["n"].max())
    fig.suptitle(f"Zero-shot editing ({df.exp.iloc[0]}, {steps} steps, {n} held-out edits, 95% CI over items)")
    return _finish(fig, out_dir, "fig15b", caption)


FIGURES: dict[str, Callable[..., Path]] = {"fig4": fig4, "bars": bars, "image_bars": image_bars, "fig15b": fig15b,
                                           "learning_curves": learning_curves}


def experiment_figure(exp: str) -> str:
    """The figure an experiment's YAML names (``bars`` when the YAML is gone or names none)."""
    import yaml

    from experiments.config import CONFIG_DIR

    path = CONFIG_DIR / f"{exp}.yaml"
    name = (yaml.safe_load(path.read_text()) or {}).get("figure") if path.is_file() else None
    return name if name in FIGURES else "bars"


def experiment_report(exp_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """(run summary, paired tests, caption) of one ``results/<EXP>/`` folder, from its files alone; the paired
    tests are empty without ``per_prompt.csv``."""
    exp_dir = Path(exp_dir)
    metrics = pd.read_csv(exp_dir / "metrics.csv", dtype={"layers": str})
    per_prompt, paired = None, pd.DataFrame()
    if (exp_dir / "per_prompt.csv").is_file():
        per_prompt = with_seed(pd.read_csv(exp_dir / "per_prompt.csv"), metrics)
        paired = paired_comparisons(per_prompt)
    summary = summarize(metrics, per_prompt)
    return summary, paired, caption(summary, paired)


def render_experiment(exp_dir: Path, figure: str | None = None,
                      report: tuple[pd.DataFrame, pd.DataFrame, str] | None = None) -> list[Path]:
    """Figure + table.md (+ paired.csv; + learning_curves and val_paired.csv with held-out validation rows) of one
    ``results/<EXP>/`` folder, from its files alone.
    ``figure``: the drawer (default: the one ``experiments/configs/<folder name>.yaml`` names); ``report``: its
    ``experiment_report`` when already computed."""
    exp_dir = Path(exp_dir)
    summary, paired, text = report if report is not None else experiment_report(exp_dir)
    if (exp_dir / "per_prompt.csv").is_file():
        write_csv(paired, exp_dir / "paired.csv")
    fig = draw(figure or experiment_figure(exp_dir.name), summary, exp_dir, text)
    metrics = pd.read_csv(exp_dir / "metrics.csv", dtype={"layers": str})
    has_val = metrics.metric.isin(VAL_METRICS).any()  # held-out validation, when the runs record it
    val = "\n".join(validation_lines(metrics)) + "\n" if has_val else ""
    controls = "\n".join(control_lines(metrics))
    table = atomic_write_text(exp_dir / "table.md", f"# {exp_dir.name}\n\n" + table_markdown(summary, text)
                              + (f"\n{controls}" if controls else "") + (f"\n{val}" if val else ""))
    made = [fig, table]
    if has_val:
        made.append(learning_curves(metrics, exp_dir))
        made.append(write_csv(validation_comparisons(metrics), exp_dir / "val_paired.csv"))
    return made


def render_checkpoint_analyses(exp_dir: Path) -> list[Path]:
    """The LAP analyses (Figs. 6, 7, 8, 18) of every committed ``<EXP>/checkpoints/*.ckpt`` with a LAP, into
    ``<EXP>/analysis/<ckpt stem>/<analysis>/``; checkpoints of other candidates get the layer similarity only."""
    from analysis import layer_dropout, layer_similarity, pooling_weights, qk_norms
    from analysis.common import load_checkpoint
    from models.conditioning.lap import LAPConditioner

    made = []
    for ckpt in sorted(Path(exp_dir).glob("checkpoints/*.ckpt")):
        out = Path(exp_dir) / "analysis" / ckpt.stem
        made.append(layer_similarity.main(["--ckpt", str(ckpt), "--out", str(out / "layer_similarity")]))
        if not isinstance(load_checkpoint(ckpt).conditioner, LAPConditioner):
            continue
        made.append(pooling_weights.main(["--ckpt", str(ckpt), "--out", str(out / "pooling_weights")]))
        made.append(qk_norms.main(["--ckpt", str(ckpt), "--out", str(out / "qk_norms")]))
        made.append(layer_dropout.main(["--ckpt", str(ckpt), "--out", str(out / "layer_dropout")]))
    return made


def render_all(results: Path = Path("results"), analyses: bool = True) -> list[Path]:
    """``make figures``: figure + tables of every ``results/<EXP>/metrics.csv`` present, ``results/README.md``
    (one generated section per experiment) and (``analyses``) the checkpoint analyses of every committed
    checkpoint."""
    from analysis.results_readme import write_readme

    out, reports = [], {}
    for metrics in sorted(Path(results).glob("*/metrics.csv")):
        reports[metrics.parent] = experiment_report(metrics.parent)
        out += render_experiment(metrics.parent, report=reports[metrics.parent])
        if analyses:
            out += render_checkpoint_analyses(metrics.parent)
    out.append(write_readme(Path(results), reports))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("metrics", type=Path, nargs="?")
    p.add_argument("--figure", default="fig4", choices=sorted(FIGURES))
    p.add_argument("--out", type=Path)
    p.add_argument("--all", action="store_true", help="every results/<EXP>/ folder: figure, table.md, paired.csv")
    p.add_argument("--results", type=Path, default=Path("results"))
    p.add_argument("--no-analyses", action="store_true", help="with --all: skip the checkpoint analyses")
    a = p.parse_args(argv)
    if a.all:
        for path in render_all(a.results, analyses=not a.no_analyses):
            print(path)
        return
    if a.metrics is None:
        p.error("give a metrics.csv or --all")
    out = a.out or a.metrics.parent
    if a.figure == "learning_curves":  # drawn from the tidy rows (every step), not from a run summary
        print(learning_curves(pd.read_csv(a.metrics, dtype={"layers": str}), out))
        return
    summary, _, text = experiment_report(a.metrics.parent) if a.metrics.name == "metrics.csv" else (
        summarize(pd.read_csv(a.metrics, dtype={"layers": str})), None, "")
    print(draw(a.figure, summary, out, text))


if __name__ == "__main__":
    main()
