"""Paper Fig. 6: adjacent encoder layers produce highly similar token features.

    python -m analysis.layer_similarity --encoder tiny-llama --out DIR          (any encoder preset)
    python -m analysis.layer_similarity --ckpt CKPT --out DIR                   (the checkpoint's encoder)

For every pair of hidden states (i, j) (``hidden_states`` ids 0..num_layers, docs/DESIGN.md §2) the similarity is the
cosine between the two layers' features of the same token, averaged over every real token of the prompts:

    S[i, j] = mean over tokens t of  <h_i(t), h_j(t)> / (|h_i(t)| |h_j(t)|)        S symmetric, S[i, i] = 1

Writes ``layer_similarity.csv`` (``layer_i, layer_j, cosine, tokens``) and ``layer_similarity.png/.pdf``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from analysis.common import default_prompts, load_checkpoint, run_cli, save_figure, write_csv


def layer_cosine(features: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """features (B, T, N, D), mask (B, T) bool -> (N, N) mean cosine over real tokens (float64)."""
    x = features[mask].double()  # (R, N, D)
    if x.shape[0] == 0:
        raise ValueError("no real tokens to compare")
    unit = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return torch.einsum("rnd,rmd->nm", unit, unit).div(x.shape[0]).numpy()


def all_layers_encoder(preset: str):
    """The preset's encoder tapping every hidden state 0..num_layers (stride 1 from 0)."""
    from models.encoders import build_encoder

    return build_encoder(preset, stride=1, start=0)


def compute(preset: str, prompts: list[str], batch_size: int = 32) -> pd.DataFrame:
    """Tidy similarity table over ``prompts`` for encoder ``preset``."""
    enc = all_layers_encoder(preset)
    n = len(enc.layer_ids)
    total, tokens = np.zeros((n, n)), 0
    for start in range(0, len(prompts), batch_size):
        out = enc(prompts[start: start + batch_size])
        r = int(out.mask.sum())
        total += layer_cosine(out.features, out.mask) * r
        tokens += r
    sim = total / tokens
    ids = enc.layer_ids
    rows = [{"layer_i": ids[a], "layer_j": ids[b], "cosine": sim[a, b], "tokens": tokens, "encoder": preset}
            for a in range(n) for b in range(n)]
    return pd.DataFrame(rows)


def draw(df: pd.DataFrame, out_dir: Path) -> Path:
    import matplotlib.pyplot as plt
    import seaborn as sns

    mat = df.pivot(index="layer_i", columns="layer_j", values="cosine")
    fig, ax = plt.subplots(figsize=(5.5, 4.6))
    sns.heatmap(mat, ax=ax, cmap="viridis", vmin=float(np.nanmin(mat.values)), vmax=1.0, square=True,
                cbar_kws={"label": "mean token cosine"})
    ax.set_xlabel("hidden state j")
    ax.set_ylabel("hidden state i")
    ax.set_title(f"Layer similarity of {df.encoder.iloc[0]} ({int(df.tokens.iloc[0])} tokens)")
    return save_figure(fig, out_dir, "layer_similarity")


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--encoder", help="encoder preset name (models.encoders.ENCODER_PRESETS)")
    src.add_argument("--ckpt", help="a checkpoint: its encoder preset is used")
    p.add_argument("--n-per-task", type=int, default=4, help="shapes-world GenEval prompts per task")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    preset = a.encoder or load_checkpoint(a.ckpt).config["encoder"]["preset"]
    prompts = [m["prompt"] for m in default_prompts(a.out, a.n_per_task, a.seed)]
    df = compute(preset, prompts)
    write_csv(df, a.out / "layer_similarity.csv")
    return draw(df, a.out)


if __name__ == "__main__":
    run_cli(main)
