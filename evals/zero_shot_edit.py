"""Zero-shot editing in the shapes world (paper Sec. 5, Fig. 15b).

A model trained on text-to-image and reconstruction only (never on edit pairs) edits by switching its condition
during sampling: the first ``round(p * steps)`` steps see only the source image's VLM tokens, the rest only the
text, which is the target scene's description (``world.descriptions.describe``: "the respective textual scene
descriptions" of the paper). p = 0 is plain text-to-image from the description, p = 1 is reconstruction of the
source; the paper finds 10-20% keeps most of the source while following the text.

For each held-out edit (``evals.reconstruction.held_out_items("edit", ...)``) and each p, one sample with the same
seed (seed + item index, so the p are compared on the same noise), scored on:

- ``correct``: the exact edit check: the detector's coloured objects equal the target scene's;
- ``target``: the change the instruction asks is in the image (``world.edits.edit_target_present``);
- ``psnr_untouched``: PSNR (dB) against the source over the pixels the edit leaves alone (source == target);
- ``psnr``: PSNR against the target render, whole image.

Writes ``<out>/zero_shot_edit.jsonl`` (one row per item and p) and ``<out>/examples.png`` (source, one sample per
p, target, for the first items); returns tidy rows ``zero_shot_edit.<metric>@<p>`` with bootstrap CIs over items.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

FRACTIONS: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.5, 1.0)  # p: the share of sampling steps on image tokens
SCORES: tuple[str, ...] = ("correct", "target", "psnr_untouched", "psnr")
PREFIX = "zero_shot_edit"
PSNR_CAP = 100.0  # dB; one uint8 level of error on every pixel is 48 dB


def metric_name(score: str, p: float) -> str:
    """``zero_shot_edit.<score>@<p>``, e.g. ``zero_shot_edit.correct@0.2``."""
    return f"{PREFIX}.{score}@{p:g}"


METRICS: tuple[str, ...] = tuple(metric_name(s, p) for p in FRACTIONS for s in SCORES)


def masked_psnr(sample: np.ndarray, reference: np.ndarray, mask: np.ndarray) -> float:
    """PSNR (dB, data range 255) of uint8 (H, W, 3) images over the pixels where ``mask`` (H, W) is True; an exact
    match is capped at ``PSNR_CAP`` dB so that item means and their CIs stay finite."""
    if not mask.any():
        raise ValueError("the mask selects no pixel")
    diff = sample.astype(np.float64)[mask] - reference.astype(np.float64)[mask]
    mse = float(np.mean(diff**2))
    return PSNR_CAP if mse == 0 else min(PSNR_CAP, float(10 * np.log10(255.0**2 / mse)))


def score(sample: np.ndarray, item: dict[str, Any], size: int) -> dict[str, Any]:
    """The four scores of one sample of a held-out edit ``item`` (module docstring)."""
    from world.detector import detect_shapes
    from world.edits import edit_target_present, parse_instruction

    spec = parse_instruction(item["instruction"])
    if spec is None:
        raise ValueError(f"not an instruction of the shapes world's edits: {item['instruction']!r}")
    found = [(f"{d.color} {d.cls}", d.box) for d in detect_shapes(sample, size_hint=size)]
    counts: dict[str, int] = {}
    for name, _ in found:
        counts[name] = counts.get(name, 0) + 1
    untouched = (item["source"] == item["target"]).all(axis=-1)
    everywhere = np.ones(untouched.shape, dtype=bool)
    return {"correct": counts == item["groups"], "target": edit_target_present(spec, item["target_scene"], found),
            "psnr_untouched": masked_psnr(sample, item["source"], untouched),
            "psnr": masked_psnr(sample, item["target"], everywhere)}


def examples_grid(items: list[dict[str, Any]], samples: dict[float, np.ndarray], path: Path, k: int = 6) -> Path:
    """A PNG, one row per item: source | a sample per p | target, 1 px gray gaps, upscaled 4x."""
    from PIL import Image

    k = min(k, len(items))
    size = items[0]["source"].shape[0]
    cols = [np.stack([it["source"] for it in items[:k]]), *(samples[p][:k] for p in sorted(samples)),
            np.stack([it["target"] for it in items[:k]])]
    grid = np.full((k * (size + 1), len(cols) * (size + 1), 3), 128, np.uint8)
    for c, col in enumerate(cols):
        for r in range(k):
            grid[r * (size + 1): r * (size + 1) + size, c * (size + 1): c * (size + 1) + size] = col[r]
    Image.fromarray(grid).resize((grid.shape[1] * 4, grid.shape[0] * 4), Image.NEAREST).save(path)
    return path


def evaluate(module: Any, out_dir: str | Path, n: int = 64, seed: int = 4321, batch_size: int = 32,
             fractions: tuple[float, ...] = FRACTIONS) -> list[dict[str, Any]]:
    """Sample every held-out edit at every p, score, write the files (module docstring); returns metric rows
    ``{"metric", "value", "ci_low", "ci_high", "n"}`` (mean over items, 95% bootstrap CI)."""
    from tqdm.auto import tqdm

    from common.files import atomic_write_text
    from common.prompt import Prompt
    from common.stats import bootstrap_ci
    from evals.reconstruction import held_out_items
    from world.descriptions import describe

    size = module.config["data"]["size"]
    items = held_out_items("edit", n, seed, size)
    rows, samples = [], {}
    for p in fractions:
        out = []
        for start in tqdm(range(0, n, batch_size), desc=f"zero-shot edits, p={p:g}"):
            chunk = items[start: start + batch_size]
            prompts = [Prompt(describe(it["target_scene"]), (it["source"],)) for it in chunk]
            seeds = [seed + start + j for j in range(len(chunk))]
            out.append(module.generate(prompts, seeds, image_steps=p))
        samples[p] = np.concatenate(out)
        for i, (it, sample) in enumerate(zip(items, samples[p], strict=True)):
            rows.append({"index": i, "seed": seed + i, "p": p, "instruction": it["instruction"],
                         **score(sample, it, size)})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "zero_shot_edit.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    examples_grid(items, samples, out_dir / "examples.png")
    metrics = []
    for p in fractions:
        for key in SCORES:
            v = np.asarray([float(r[key]) for r in rows if r["p"] == p])
            lo, hi = bootstrap_ci(v, lambda x: x.mean(axis=-1), seed=seed)
            metrics.append({"metric": metric_name(key, p), "value": float(v.mean()), "ci_low": lo, "ci_high": hi,
                            "n": len(v)})
    return metrics
