"""Paper Fig. 7 / Fig. 20: what LAP's pooling layer learned, per encoder layer (and per DiT block).

    python -m analysis.pooling_weights --ckpt CKPT --out DIR [--raw]

Reads the ``Linear(N, 1)`` pooling weights of the LAP that feeds the DiT input tokens and, for the ``per_layer``
injection variant (App. A.1.1), of every dedicated LAP whose output is injected after DiT block i (so it is
block i+1's view). By default the EMA weights (what sampling uses); ``--raw`` reads the optimised ones.

Writes ``pooling_weights.csv``: ``lap, dit_block, position, layer_id, weight, magnitude, share`` (share =
|w| / sum |w| within that LAP; a uniform pooling gives 1/N) and ``pooling_weights.png/.pdf`` (bars for one LAP,
a DiT-block x layer heatmap as Fig. 20 for several).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from analysis.common import load_checkpoint, require_lap, run_cli, save_figure, write_csv


def compute(module, ema: bool = True) -> pd.DataFrame:
    """Tidy table of every LAP's pooling weights. Raises ValueError for a checkpoint without LAP."""
    cond = require_lap(module, "pooling_weights", ema=ema)
    layer_ids = module.encoder.layer_ids
    laps = [("input", 0, cond.lap)] + [(f"inject_{i}", i + 1, lap) for i, lap in enumerate(cond.inject_laps)]
    rows = []
    for name, block, lap in laps:
        w = lap.pooling_weights().double()
        total = float(w.abs().sum()) or 1.0
        for pos, value in enumerate(w.tolist()):
            rows.append({"lap": name, "dit_block": block, "position": pos, "layer_id": layer_ids[pos],
                         "weight": value, "magnitude": abs(value), "share": abs(value) / total})
    df = pd.DataFrame(rows)
    df["candidate"], df["injection"] = module.config["candidate"], cond.injection
    return df


def draw(df: pd.DataFrame, out_dir: Path) -> Path:
    import matplotlib.pyplot as plt
    import seaborn as sns

    if df.lap.nunique() == 1:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        sns.barplot(data=df, x="layer_id", y="magnitude", color=sns.color_palette("deep")[0], ax=ax)
        uniform = df.magnitude.sum() / len(df)
        ax.axhline(uniform, ls="--", c="gray", lw=1, label="uniform (same total)")
        ax.set_xlabel("encoder hidden state")
        ax.set_ylabel("|pooling weight|")
        ax.legend(fontsize=7)
        ax.set_title("LAP pooling weights")
    else:
        mat = df.pivot(index="dit_block", columns="layer_id", values="magnitude")
        fig, ax = plt.subplots(figsize=(6, 0.4 * len(mat) + 1.8))
        sns.heatmap(mat, ax=ax, cmap="magma", cbar_kws={"label": "|pooling weight|"})
        ax.set_xlabel("encoder hidden state")
        ax.set_ylabel("DiT block fed (0 = input tokens)")
        ax.set_title("Per-layer LAP pooling weights (Fig. 20)")
    return save_figure(fig, out_dir, "pooling_weights")


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--raw", action="store_true", help="the optimised weights instead of their EMA")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    df = compute(load_checkpoint(a.ckpt), ema=not a.raw)
    write_csv(df, a.out / "pooling_weights.csv")
    return draw(df, a.out)


if __name__ == "__main__":
    run_cli(main)
