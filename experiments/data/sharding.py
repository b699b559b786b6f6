"""How a training stream is shared: the task of each batch and which rank / DataLoader worker reads it.

Used by the shapes stream (``experiments.data.shapes``) and the HF streams (``experiments.data.hf``) alike.
"""

from __future__ import annotations

import numpy as np

TRAIN_TASKS: tuple[str, ...] = ("t2i", "reconstruction", "edit")


def batch_task(tasks: dict[str, float] | None, seed: int, batch: int) -> str:
    """The task of batch ``batch`` of a training stream (shapes or HF): drawn from ``data.tasks`` with rng
    ``[seed, batch, 2]``; "t2i" when no other task has weight."""
    if not tasks or not any(w > 0 for t, w in tasks.items() if t != "t2i"):
        return "t2i"
    return draw_task(tasks, np.random.default_rng([seed, batch, 2]))


def draw_task(tasks: dict[str, float], rng: np.random.Generator) -> str:
    """One task name drawn from ``tasks`` (name -> weight, ``TRAIN_TASKS`` only); ValueError on bad weights."""
    bad = sorted(set(tasks) - set(TRAIN_TASKS))
    if bad or not tasks or any(v < 0 for v in tasks.values()) or sum(tasks.values()) <= 0:
        raise ValueError(f"data.tasks must map some of {TRAIN_TASKS} to non-negative weights, got {tasks}")
    names = sorted(tasks)
    w = np.asarray([tasks[n] for n in names], dtype=float)
    return names[int(rng.choice(len(names), p=w / w.sum()))]


def check_rank(rank: int, world_size: int) -> None:
    """A training rank/world size pair a stream can shard by (ValueError otherwise)."""
    if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
        raise ValueError(f"rank must be in [0, world_size) with world_size >= 1, got rank={rank!r}, "
                         f"world_size={world_size!r}")


def owns_batch(offset: int, rank: int = 0, world_size: int = 1, worker: int = 0, workers: int = 1) -> bool:
    """Whether DataLoader worker ``worker`` of training rank ``rank`` reads the batch ``offset`` batches after a
    stream's start.

    Ranks take turns first (rank r reads batches r, r + world_size, ...: one training step consumes the next
    world_size batches, one per rank), then a rank's workers take turns over its batches (the DataLoader's
    round-robin fetch order), so every rank gets its batches in order and no batch is read twice.
    """
    return offset % world_size == rank and (offset // world_size) % workers == worker
