"""Paper Fig. 18: LAP's Query-Key norms per word across encoder layers, showing clusters of adjacent layers.

    python -m analysis.qk_norms --ckpt CKPT --out DIR [--prompt "a red circle left of a blue square"]... [--block 0]

For each prompt the frozen encoder's features go through the checkpoint's LAP (EMA weights) with recording on;
``qk_norm`` of layer n of token t in LAP block b is ``|q| * |k|`` of that layer's query and key projections before
QK-RMSNorm (``LayerwiseAttentionPooling`` docstring: after the RMSNorm every vector has the same norm). Words
spanning several tokens get the mean over their tokens, as the paper's caption says; with the shapes world's
word-level tokenizer every token is a word.

Writes ``qk_norms.csv`` (``prompt_index, word_index, word, n_tokens, block, position, layer_id, q_norm, k_norm,
qk_norm``) and ``qk_norms.png/.pdf`` (word x layer heatmap of the first prompt, the chosen block).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import torch

from analysis.common import load_checkpoint, require_lap, run_cli, save_figure, write_csv

DEFAULT_PROMPTS = (
    "a photo of a red circle left of a blue square",
    "a photo of three yellow triangles",
)
_WORD_START = ("Ġ", "▁", " ")  # GPT-2/Llama-3 byte-level BPE, SentencePiece, plain-space markers


def word_groups(tokens: list[str]) -> list[tuple[str, list[int]]]:
    """Group sub-tokens into words: ``[(word, [token positions]), ...]`` in order.

    A token opens a new word when it starts with a word-start marker (``Ġ``, ``▁``, a space) or is the first
    token. Tokenizers without markers (word-level, like the shapes world's) give one word per token.
    """
    if not any(t.startswith(_WORD_START) for t in tokens):
        return [(t, [i]) for i, t in enumerate(tokens)]
    groups: list[tuple[str, list[int]]] = []
    for i, tok in enumerate(tokens):
        if i == 0 or tok.startswith(_WORD_START):
            groups.append((tok.lstrip("".join(_WORD_START)), [i]))
        else:
            word, idx = groups[-1]
            groups[-1] = (word + tok, [*idx, i])
    return groups


@torch.no_grad()
def compute(module, prompts: list[str]) -> pd.DataFrame:
    """Tidy per-word QK norms of every prompt, block and pooled layer. ValueError for a checkpoint without LAP."""
    cond = require_lap(module, "qk_norms")
    lap, enc = cond.lap, module.encoder
    if not lap.blocks:
        raise ValueError("this LAP has no attention blocks (lap_blocks=0): there are no query/key norms to show")
    out = enc(prompts)
    lap.record = True
    try:
        lap(out.features, out.mask)
        rec = lap.recorded
    finally:
        lap.record = False
    rows = []
    for b, prompt in enumerate(prompts):
        n_real = int(out.mask[b].sum())
        tokens = enc.tokenizer.convert_ids_to_tokens(out.token_ids[b, :n_real].tolist())
        for w, (word, idx) in enumerate(word_groups(tokens)):
            for blk in range(len(lap.blocks)):
                for pos, layer_id in enumerate(enc.layer_ids):
                    rows.append({
                        "prompt_index": b, "prompt": prompt, "word_index": w, "word": word, "n_tokens": len(idx),
                        "block": blk, "position": pos, "layer_id": layer_id,
                        **{k: float(rec[k][b, idx, blk, pos].mean()) for k in ("q_norm", "k_norm", "qk_norm")},
                    })
    return pd.DataFrame(rows)


def draw(df: pd.DataFrame, out_dir: Path, block: int = 0) -> Path:
    import matplotlib.pyplot as plt
    import seaborn as sns

    if block not in set(df.block):
        raise ValueError(f"block {block} not recorded; LAP blocks: {sorted(set(df.block))}")
    one = df[(df.prompt_index == 0) & (df.block == block)]
    mat = one.pivot(index="word_index", columns="layer_id", values="qk_norm")
    labels = one.drop_duplicates("word_index").sort_values("word_index").word.tolist()
    fig, ax = plt.subplots(figsize=(0.5 * mat.shape[1] + 3, 0.3 * len(mat) + 1.5))
    sns.heatmap(mat, ax=ax, cmap="rocket", yticklabels=labels, cbar_kws={"label": "|q| |k| (before QK-norm)"})
    ax.set_yticklabels(labels, rotation=0)
    ax.set_xlabel("encoder hidden state")
    ax.set_ylabel("")
    ax.set_title(f"LAP block {block} Query-Key norms: \"{one.prompt.iloc[0]}\"", fontsize=9)
    return save_figure(fig, out_dir, "qk_norms")


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--prompt", action="append", help="repeatable; default: two shapes-world prompts")
    p.add_argument("--block", type=int, default=0, help="LAP block drawn in the figure (the CSV has all)")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    df = compute(load_checkpoint(a.ckpt), a.prompt or list(DEFAULT_PROMPTS))
    write_csv(df, a.out / "qk_norms.csv")
    return draw(df, a.out, a.block)


if __name__ == "__main__":
    run_cli(main)
