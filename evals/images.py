"""Images for benchmarks: from a checkpoint (generate) into each benchmark's official folder layout.

Seeds: image k of prompt i uses seed ``seed + 1000 * i + k``; noise is drawn per image from its own seed, so a
folder is the same whatever the batch size.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from models.checkpoints import load_module
from models.module import UniFusionModule


def save_png(array, path: Path) -> None:
    """Atomic PNG write (tmp + rename), so an interrupted run never leaves a truncated image."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp, path)


def generate_geneval_folder(
    ckpt_path: str | Path | UniFusionModule,
    metadata: list[dict],
    out_dir: str | Path,
    n_samples: int = 4,
    seed: int = 0,
    batch_size: int = 64,
    layer_dropout: list[int] | None = None,
) -> Path:
    """Write GenEval's official layout: <out>/<NNNNN>/metadata.jsonl (one object) + samples/<k:05d>.png.

    Images that already exist are kept (resume); only missing ones are generated. ``layer_dropout`` is passed to
    ``UniFusionModule.generate`` (LAP positions zeroed while sampling, paper Fig. 8).
    """
    module = load_module(ckpt_path)
    out = Path(out_dir)
    todo: list[tuple[str, int, Path]] = []
    for i, meta in enumerate(metadata):
        folder = out / f"{i:05d}"
        (folder / "samples").mkdir(parents=True, exist_ok=True)
        with open(folder / "metadata.jsonl", "w") as f:
            json.dump(meta, f)
        for k in range(n_samples):
            path = folder / "samples" / f"{k:05d}.png"
            if not path.exists():
                todo.append((meta["prompt"], seed + 1000 * i + k, path))
    for start in tqdm(range(0, len(todo), batch_size), desc="generating", disable=not todo):
        chunk = todo[start : start + batch_size]
        images = module.generate([p for p, _, _ in chunk], [s for _, s, _ in chunk], layer_dropout=layer_dropout)
        for (_, _, path), img in zip(chunk, images, strict=True):
            save_png(img, path)
    return out


def generate_genai_folder(
    ckpt_or_module: str | Path | UniFusionModule,
    prompts: dict[int, str],
    out_dir: str | Path,
    seed: int = 42,
    batch_size: int = 32,
) -> Path:
    """Write GenAI-Bench's layout: one ``<out>/<index:05d>.png`` per prompt index (seed = ``seed + index``; the
    official ``generate.py`` uses one image per prompt and seed 42). Existing images are kept (resume)."""
    module = load_module(ckpt_or_module)
    out = Path(out_dir)
    todo = [i for i in sorted(prompts) if not (out / f"{i:05d}.png").exists()]
    for start in tqdm(range(0, len(todo), batch_size), desc="generating", disable=not todo):
        chunk = todo[start : start + batch_size]
        images = module.generate([prompts[i] for i in chunk], [seed + i for i in chunk])
        for i, img in zip(chunk, images, strict=True):
            save_png(img, out / f"{i:05d}.png")
    return out


def generate_dpg_folder(
    ckpt_or_module: str | Path | UniFusionModule,
    items: list[tuple[str, str]],
    out_dir: str | Path,
    n_samples: int = 4,
    seed: int = 0,
    batch_size: int = 64,
) -> Path:
    """Write DPG-Bench's official layout: one ``<out>/<item_id>.png`` per (item_id, text), a 2x2 grid of 4 samples
    (image k at tile TL, TR, BL, BR for k = 0..3, the official crop order), so a grid is (2S, 2S, 3) uint8.

    Seeds as in the module docstring (``seed + 1000 * i + k`` for the i-th item). Grids that already exist are
    kept (resume); each grid is written atomically once its 4 samples exist.
    """
    if n_samples != 4:
        raise ValueError(f"the DPG-Bench layout is a 2x2 grid, so n_samples must be 4, got {n_samples}")
    ids = [item_id for item_id, _ in items]
    if len(set(ids)) != len(ids):
        raise ValueError("item_ids must be unique")
    bad = [i for i in ids if not i or "." in i or "/" in i]
    if bad:
        raise ValueError(f"item_ids must be non-empty file stems without '.' or '/', got {bad[:3]}")
    module = load_module(ckpt_or_module)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    todo = [(i, item_id, text) for i, (item_id, text) in enumerate(items) if not (out / f"{item_id}.png").exists()]
    per_batch = max(1, batch_size // n_samples)  # whole grids per generate() call
    for start in tqdm(range(0, len(todo), per_batch), desc="generating", disable=not todo):
        chunk = todo[start : start + per_batch]
        prompts = [text for _, _, text in chunk for _ in range(n_samples)]
        seeds = [seed + 1000 * i + k for i, _, _ in chunk for k in range(n_samples)]
        images = module.generate(prompts, seeds)
        for j, (_, item_id, _) in enumerate(chunk):
            tl, tr, bl, br = images[j * n_samples : (j + 1) * n_samples]
            grid = np.concatenate([np.concatenate([tl, tr], axis=1), np.concatenate([bl, br], axis=1)], axis=0)
            save_png(grid, out / f"{item_id}.png")
    return out
