"""Figures drawn from a results table alone (``results/<EXP>/metrics.csv``, DESIGN.md §4).

    python -m analysis.figures results/conditioning_candidates/metrics.csv --figure fig4

Each drawer takes the tidy DataFrame and an output folder and writes PNG + PDF.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

TASK_ORDER = ["single_object", "two_object", "counting", "colors", "position", "color_attr"]
RUN_ORDER = ["untrained", "t5", "last_layer", "kv_fusion", "hsi", "lap"]


def _order(runs: list[str]) -> list[str]:
    known = [r for r in RUN_ORDER if r in runs]
    return known + sorted(r for r in runs if r not in known)


def _errorbars(ax, x, values, lo, hi) -> None:
    mask = lo.notna() & hi.notna()
    ax.errorbar(
        x[mask.to_numpy()], values[mask], yerr=[values[mask] - lo[mask], hi[mask] - values[mask]],
        fmt="none", ecolor="black", capsize=4, lw=1.2,
    )


def fig4(df: pd.DataFrame, out_dir: Path) -> Path:
    """Paper Fig. 4 analogue: GenEval-shapes overall per candidate (95% bootstrap CI over prompts), plus the
    six task accuracies."""
    import numpy as np

    overall = df[df.metric == "geneval.overall"].copy()
    order = _order(list(overall.run.unique()))
    overall = overall.set_index("run").loc[order].reset_index()
    tasks = df[df.metric.isin([f"geneval.{t}" for t in TASK_ORDER])].copy()
    tasks["task"] = tasks.metric.str.removeprefix("geneval.")

    sns.set_theme(style="whitegrid", context="paper")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [1, 1.8]})
    palette = dict(zip(order, sns.color_palette("deep", len(order)), strict=True))
    x = np.arange(len(order))
    ax1.bar(x, overall["value"], color=[palette[r] for r in order])
    _errorbars(ax1, x, overall["value"], overall["ci_low"], overall["ci_high"])
    for xi, v in zip(x, overall["value"], strict=True):
        ax1.text(xi, v + 0.01, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    ax1.set_xticks(x, order, rotation=20)
    ax1.set_ylabel("GenEval-shapes overall (95% CI)")
    ax1.set_ylim(0, 1)
    steps = int(overall.loc[overall.run != "untrained", "step"].max()) if (overall.run != "untrained").any() else 0
    ax1.set_title(f"Conditioning candidates after {steps} steps")
    sns.barplot(data=tasks, x="task", y="value", hue="run", hue_order=order, order=TASK_ORDER, palette=palette,
                ax=ax2, errorbar=None)
    ax2.set_ylim(0, 1)
    ax2.set_xlabel("")
    ax2.set_ylabel("task accuracy (images)")
    ax2.legend(fontsize=7, ncols=3, loc="upper right")
    ax2.set_title("Per GenEval task")
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "fig4.png"
    fig.savefig(path, dpi=150)
    fig.savefig(out_dir / "fig4.pdf")
    plt.close(fig)
    return path


FIGURES: dict[str, Callable[[pd.DataFrame, Path], Path]] = {"fig4": fig4}


def draw(name: str, df: pd.DataFrame, out_dir: Path) -> Path:
    if name not in FIGURES:
        raise ValueError(f"unknown figure {name!r}; valid: {', '.join(FIGURES)}")
    return FIGURES[name](df, Path(out_dir))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("metrics", type=Path)
    p.add_argument("--figure", default="fig4", choices=sorted(FIGURES))
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    print(draw(a.figure, pd.read_csv(a.metrics), a.out or a.metrics.parent))


if __name__ == "__main__":
    main()
