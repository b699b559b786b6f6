"""Paper Fig. 8: drop groups of encoder layers from LAP's pooling at inference and see what the images lose.

    python -m analysis.layer_dropout --ckpt CKPT --out DIR [--groups first,middle,last] [--drop 0,1 --drop 3]
                                     [--n-per-task 2] [--n-samples 2] [--seed 1234]

"Dropping" layers = zeroing their pooling weights (``LayerwiseAttentionPooling.set_layer_dropout``) for the whole
sampling run; the trained weights are untouched. The same prompts and seeds are sampled for every group, so any
difference is the dropout's. Named groups split the N pooled positions into thirds (``numpy.array_split``):
``first``, ``middle``, ``last``; ``--drop`` adds explicit position lists. ``none`` (the full model) is always run.

Per group, ``layer_dropout.csv`` holds: the dropped positions and hidden-state ids, the GenEval-shapes overall
score with its 95% bootstrap CI, and the change against the full model's images over all (prompt, seed) pairs:
``pixel_mad`` (mean |difference| / 255) and ``changed_frac`` (fraction of pixels that differ). Images go to
``images/<group>/`` in GenEval's layout; ``layer_dropout.png/.pdf`` shows one sample per prompt per group next to
the scores.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from analysis.common import default_prompts, load_checkpoint, require_lap, run_cli, save_figure, write_csv

NAMED_GROUPS = ("first", "middle", "last")


def named_groups(n: int, names: tuple[str, ...] = NAMED_GROUPS) -> dict[str, tuple[int, ...]]:
    """{"first": (...), "middle": (...), "last": (...)} = the three ``array_split`` thirds of positions 0..n-1."""
    bad = [g for g in names if g not in NAMED_GROUPS]
    if bad:
        raise ValueError(f"unknown layer group(s) {bad}; valid: {', '.join(NAMED_GROUPS)} (or --drop positions)")
    thirds = dict(zip(NAMED_GROUPS, np.array_split(np.arange(n), 3), strict=True))
    return {g: tuple(int(i) for i in thirds[g]) for g in names if len(thirds[g])}


def sample_group(module, metadata: list[dict], drop: tuple[int, ...], out_dir: Path, n_samples: int, seed: int,
                 batch_size: int = 64) -> np.ndarray:
    """Sample every (prompt, k) with ``drop`` zeroed into GenEval's layout (``evals.images``, same seeds as every
    benchmark); return the images, uint8 (P, n_samples, S, S, 3), read back losslessly from the PNGs."""
    from evals.images import generate_geneval_folder

    generate_geneval_folder(module, metadata, out_dir, n_samples=n_samples, seed=seed, batch_size=batch_size,
                            layer_dropout=list(drop))
    return np.stack([[np.asarray(Image.open(out_dir / f"{i:05d}" / "samples" / f"{k:05d}.png").convert("RGB"))
                      for k in range(n_samples)] for i in range(len(metadata))])


def compute(module, metadata: list[dict], groups: dict[str, tuple[int, ...]], out_dir: Path, n_samples: int = 2,
            seed: int = 1234) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """Run every group (plus ``none``); returns the tidy table and the images per group."""
    from evals.geneval import evaluate_folder

    cond = require_lap(module, "layer_dropout")
    n = cond.num_layers
    for name, drop in groups.items():
        bad = [p for p in drop if not -n <= p < n]
        if bad:
            raise ValueError(f"group {name!r}: positions {bad} out of range for N={n} pooled layers "
                             f"(hidden states {list(module.encoder.layer_ids)})")
    ids = module.encoder.layer_ids
    rows, images = [], {}
    for name, drop in tqdm([("none", ()), *groups.items()], desc="layer groups"):
        images[name] = sample_group(module, metadata, drop, out_dir / "images" / name, n_samples, seed)
        _, summary = evaluate_folder(out_dir / "images" / name, detector="shapes")
        lo, hi = summary["ci95"]["overall"]
        diff = np.abs(images[name].astype(np.int16) - images["none"].astype(np.int16))
        rows.append({"group": name, "positions": " ".join(map(str, sorted(p % n for p in drop))),
                     "layer_ids": " ".join(str(ids[p % n]) for p in sorted(drop)),
                     "geneval_overall": summary["overall"], "ci_low": lo, "ci_high": hi,
                     "pixel_mad": float(diff.mean() / 255.0), "changed_frac": float((diff.max(-1) > 0).mean()),
                     "images": int(images[name].shape[0] * images[name].shape[1])})
    return pd.DataFrame(rows), images


def draw(df: pd.DataFrame, images: dict[str, np.ndarray], out_dir: Path, max_prompts: int = 8) -> Path:
    import matplotlib.pyplot as plt

    groups = list(df.group)
    strip = [np.concatenate(list(images[g][:max_prompts, 0]), axis=1) for g in groups]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 0.9 * len(groups) + 1.2),
                                   gridspec_kw={"width_ratios": [2.6, 1]})
    ax1.imshow(np.concatenate(strip, axis=0), interpolation="nearest")
    ax1.grid(False)
    size = images[groups[0]].shape[2]
    ax1.set_yticks([size * (i + 0.5) for i in range(len(groups))],
                   [f"{g} [{p}]" if p else g for g, p in zip(groups, df.positions, strict=True)])
    ax1.set_xticks([])
    ax1.set_title("same prompts and seeds, pooled layers dropped")
    y = np.arange(len(groups))
    ax2.barh(y, df.geneval_overall, color="tab:blue")
    ax2.errorbar(df.geneval_overall, y, xerr=[df.geneval_overall - df.ci_low, df.ci_high - df.geneval_overall],
                 fmt="none", ecolor="black", capsize=3)
    ax2.set_yticks(y, groups)
    ax2.invert_yaxis()
    ax2.set_xlim(0, 1)
    ax2.set_xlabel("GenEval-shapes overall (95% CI)")
    return save_figure(fig, out_dir, "layer_dropout")


def fresh_images_for(ckpt: Path, images_dir: Path) -> None:
    """Sampled images resume per file, so they are valid only for the checkpoint that drew them: the folder records
    that checkpoint's SHA-256 and is emptied when another checkpoint (or an unrecorded one) meets it."""
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    stamp = images_dir / "checkpoint.sha256"
    if images_dir.exists() and (not stamp.is_file() or stamp.read_text().strip() != digest):
        shutil.rmtree(images_dir)
    images_dir.mkdir(parents=True, exist_ok=True)
    stamp.write_text(digest + "\n")


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--groups", default=",".join(NAMED_GROUPS), help="named groups: first, middle, last ('' = none)")
    p.add_argument("--drop", action="append", default=[], help="explicit positions to drop, e.g. 0,1 (repeatable)")
    p.add_argument("--n-per-task", type=int, default=2)
    p.add_argument("--n-samples", type=int, default=2)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    module = load_checkpoint(a.ckpt)
    n = require_lap(module, "layer_dropout").lap.num_layers
    names = tuple(g for g in a.groups.split(",") if g)
    groups = named_groups(n, names)
    for spec in a.drop:
        try:
            groups[f"drop {spec}"] = tuple(int(x) for x in spec.split(",") if x.strip())
        except ValueError:
            raise ValueError(f"--drop takes comma-separated integer positions, got {spec!r}") from None
    fresh_images_for(Path(a.ckpt), a.out / "images")
    df, images = compute(module, default_prompts(a.out, a.n_per_task, a.seed), groups, a.out, a.n_samples, a.seed)
    write_csv(df, a.out / "layer_dropout.csv")
    return draw(df, images, a.out)


if __name__ == "__main__":
    run_cli(main)
