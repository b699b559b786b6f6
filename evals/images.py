"""Images for benchmarks: from a checkpoint (generate) into each benchmark's official folder layout.

Seeds: image k of prompt i uses seed ``seed + 1000 * i + k``; noise is drawn per image from its own seed, so a
folder is the same whatever the batch size.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from models.module import UniFusionModule


def load_module(ckpt: str | Path | UniFusionModule, device: str | None = None) -> UniFusionModule:
    """A trained module from a Lightning checkpoint (or pass one through), in eval mode."""
    if isinstance(ckpt, UniFusionModule):
        return ckpt.eval()
    path = Path(ckpt)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return UniFusionModule.load_from_checkpoint(path, map_location=device).eval()


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
) -> Path:
    """Write GenEval's official layout: <out>/<NNNNN>/metadata.jsonl (one object) + samples/<k:05d>.png.

    Images that already exist are kept (resume); only missing ones are generated.
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
        images = module.generate([p for p, _, _ in chunk], [s for _, s, _ in chunk])
        for (_, _, path), img in zip(chunk, images, strict=True):
            save_png(img, path)
    return out
