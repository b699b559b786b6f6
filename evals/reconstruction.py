"""Image-conditioned evaluation in the shapes world: reconstruction (paper Fig. 5) and editing (Sec. 4).

- reconstruction: a held-out scene is given to the VLM as an image only (``Prompt("", (image,))``); the sample is
  compared with the input by PSNR and SSIM (torchmetrics, data range 255, 7x7 Gaussian SSIM on 32 px images).
- edit: a held-out (source, instruction, target) triple; the sample is compared with the target by PSNR / SSIM,
  and scored exactly: the shapes detector's coloured objects on the sample must equal the target's (``correct``).

Both write ``<out>/<kind>.jsonl`` (one row per sample: index, seed, psnr, ssim[, correct, instruction]) and return
tidy summary numbers with bootstrap CIs over the held-out items. Items are pure functions of (seed, index).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from common.stats import bootstrap_ci

KINDS = ("reconstruction", "edit")


def image_metrics(sample: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """PSNR (dB) and SSIM of uint8 (B, H, W, 3) samples against references (same shape); per image."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    if sample.shape != reference.shape:
        raise ValueError(f"sample {sample.shape} and reference {reference.shape} differ in shape")
    x = torch.from_numpy(sample).permute(0, 3, 1, 2).double()
    y = torch.from_numpy(reference).permute(0, 3, 1, 2).double()
    psnr = peak_signal_noise_ratio(x, y, data_range=255.0, reduction="none", dim=(1, 2, 3))
    ssim = structural_similarity_index_measure(x, y, data_range=255.0, reduction="none", kernel_size=7)
    return psnr.tolist(), ssim.tolist()


def held_out_items(kind: str, n: int, seed: int, size: int = 32) -> list[dict[str, Any]]:
    """``n`` items: {"source": uint8 image, "instruction": str, "target": uint8 image, "groups": dict,
    "source_scene" / "target_scene": the ``world.scene.Scene`` of each image}."""
    from world.edits import random_edit
    from world.scene import render, sample_scene

    if kind not in KINDS:
        raise ValueError(f"unknown image task {kind!r}; valid: {KINDS}")
    items = []
    for i in range(n):
        rng = np.random.default_rng([seed, i, 11])
        if kind == "reconstruction":
            scene = sample_scene(rng, size)
            src, instruction, tgt = scene, "", scene
        else:
            src, instruction, tgt = random_edit(rng, size)
        groups: dict[str, int] = {}
        for o in tgt.objects:
            groups[o.name] = groups.get(o.name, 0) + 1
        items.append({"source": render(src), "instruction": instruction, "target": render(tgt), "groups": groups,
                      "source_scene": src, "target_scene": tgt})
    return items


def evaluate(module: Any, kind: str, out_dir: str | Path, n: int = 64, seed: int = 4321,
             batch_size: int = 32) -> dict[str, Any]:
    """Sample every held-out item once (seed + index), score it, write ``<kind>.jsonl``; returns the summary
    ``{"psnr": mean, "psnr_ci": (lo, hi), "ssim": ..., "ssim_ci": ..., "correct": ... (edit only), "n": n}``."""
    from common.prompt import Prompt
    from world.detector import detect_shapes

    items = held_out_items(kind, n, seed, module.config["data"]["size"])
    rows = []
    for start in tqdm(range(0, n, batch_size), desc=f"{kind} samples"):
        chunk = items[start: start + batch_size]
        prompts = [Prompt(it["instruction"], (it["source"],)) for it in chunk]
        seeds = [seed + start + j for j in range(len(chunk))]
        samples = module.generate(prompts, seeds)
        psnr, ssim = image_metrics(samples, np.stack([it["target"] for it in chunk]))
        for j, it in enumerate(chunk):
            row = {"index": start + j, "seed": seeds[j], "psnr": psnr[j], "ssim": ssim[j]}
            if kind == "edit":
                found: dict[str, int] = {}
                for det in detect_shapes(samples[j], size_hint=module.config["data"]["size"]):
                    name = f"{det.color} {det.cls}"
                    found[name] = found.get(name, 0) + 1
                row.update(instruction=it["instruction"], correct=found == it["groups"])
            rows.append(row)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from common.files import atomic_write_text

    atomic_write_text(out / f"{kind}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    summary: dict[str, Any] = {"n": n}
    keys = ("psnr", "ssim", "correct") if kind == "edit" else ("psnr", "ssim")
    for key in keys:
        v = np.asarray([float(r[key]) for r in rows])
        summary[key] = float(v.mean())
        summary[f"{key}_ci"] = bootstrap_ci(v, lambda x: x.mean(axis=-1), seed=seed)
    return summary
