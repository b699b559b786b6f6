"""The validation set: fixed held-out scenes of the shapes world, a fixed grid of noise levels and fixed noise.

``N_PER_TASK`` GenEval-style prompts per task (``world.prompts``), each with a scene made for it whose render is
held out (``world.holdout``): no training stream of any seed ever shows one of these images. Every scene is scored
at the same ``NOISE_LEVELS`` with the same noise (``noise_seeds``), so the validation loss of two runs differs
only through their weights: the set is a function of the canvas size alone, never of a run's seed or config.

The levels are the midpoints of ``len(NOISE_LEVELS)`` equal-probability bins of the default training density of
noise levels (SD3's logit-normal, mean 0, std 1, shift 1), so the validation loss is a quadrature of the loss
training minimises, without its sampling noise. ``PROBE_LEVELS`` (0.85, 0.9) are scored too, outside that mean:
the conditioning gain is ~0 at low noise (the pixels already tell everything) and largest where the prompt decides
the pixels, so ``GAIN_LEVELS`` (the top quadrature level ~0.76 and the probes) get a gain each
(``val.cond_gain.s<level>``, ``experiments.validation``). Items carry ``level_weights``: 1/N_LEVELS on the
quadrature levels, 0 on the probes.
"""

from __future__ import annotations

import functools
from statistics import NormalDist
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from common.geneval_spec import TASKS
from experiments.data.shapes import to_tensor
from world.holdout import held_out_scene
from world.prompts import sample_prompt, scene_for_prompt

N_PER_TASK = 10  # 60 scenes: all of them in one forward batch of eval.batch_size 64
N_LEVELS = 4
NOISE_LEVELS: tuple[float, ...] = tuple(1 / (1 + np.exp(-NormalDist().inv_cdf((j + 0.5) / N_LEVELS)))
                                        for j in range(N_LEVELS))  # sigmoid of normal quantiles: ~0.24 .. 0.76
PROBE_LEVELS: tuple[float, ...] = (0.85, 0.9)  # high noise: where the prompt decides the pixels
GAIN_LEVELS: tuple[float, ...] = (NOISE_LEVELS[-1], *PROBE_LEVELS)  # levels with their own conditioning gain
SIGMAS: tuple[float, ...] = (*NOISE_LEVELS, *PROBE_LEVELS)
LEVEL_WEIGHTS: tuple[float, ...] = (*[1 / N_LEVELS] * N_LEVELS, *[0.0] * len(PROBE_LEVELS))
_SCENE_ENTROPY = 0x5A11DA7E  # rng of prompts and scene draws: [this, size, i]; held-out status is the hash's
_NOISE_SEED_BASE = 7_000_000  # torch seed of the noise of scene i at level j: base + i * N_LEVELS + j


_PROBE_SEED_BASE = 8_000_000  # the probe levels' noise: base + i * len(PROBE_LEVELS) + j


def noise_seeds(i: int) -> list[int]:
    """The torch seeds of scene ``i``'s noise, one per level of ``SIGMAS``."""
    return ([_NOISE_SEED_BASE + i * N_LEVELS + j for j in range(N_LEVELS)]
            + [_PROBE_SEED_BASE + i * len(PROBE_LEVELS) + j for j in range(len(PROBE_LEVELS))])


@functools.lru_cache(maxsize=4)
def held_out_items(size: int = 32) -> tuple[dict[str, Any], ...]:
    """The validation items, TASKS-major (scene i has task ``TASKS[i // N_PER_TASK]``).

    Each: ``{"image": float32 (3, S, S) in [-1, 1], "caption": str, "scene": dict, "index": i,
    "sigmas": float32 (K,), "noise_seeds": int64 (K,), "level_weights": float32 (K,)}`` with K = ``len(SIGMAS)``.
    """
    items = []
    for i in range(N_PER_TASK * len(TASKS)):
        rng = np.random.default_rng([_SCENE_ENTROPY, size, i])
        meta = sample_prompt(rng, TASKS[i // N_PER_TASK])
        scene, image = held_out_scene(lambda meta=meta, rng=rng: scene_for_prompt(meta, rng, size))
        items.append({"image": to_tensor(image), "caption": meta["prompt"], "scene": scene.to_json(), "index": i,
                      "sigmas": torch.tensor(SIGMAS, dtype=torch.float32),
                      "noise_seeds": torch.tensor(noise_seeds(i), dtype=torch.int64),
                      "level_weights": torch.tensor(LEVEL_WEIGHTS, dtype=torch.float32)})
    return tuple(items)


class HeldOutSet(Dataset):
    """Map-style dataset over ``held_out_items(size)`` (for Lightning's validation loop)."""

    def __init__(self, size: int = 32):
        self.items = held_out_items(size)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]
