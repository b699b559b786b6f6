"""Lightning data module over the seeded shapes stream, resumable at the exact sample.

Item i of the stream is a pure function of (seed, i), and an optimizer step consumes accumulate_grad_batches ×
world_size batches of it, so the data position at step s is ``s * accumulate_grad_batches * world_size *
batch_size``: a run resumed from a checkpoint continues with exactly the samples an uninterrupted run would have
seen. Under DDP/FSDP each rank reads its own batches of the stream (``sharding.owns_batch``: rank r reads global
batches r, r + world_size, ...): Lightning shards only map-style datasets, never an ``IterableDataset``, so without
this every rank would train on the same batch. ``val_dataloader`` serves the held-out validation set.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from experiments.data.shapes import ShapesStream


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack images (B, 3, S, S); keep captions (str or ``Prompt`` with images) as a list. Validation items'
    noise levels, noise seeds and level weights (``experiments.data.heldout``) stack to (B, K); HF items'
    ``skipped`` to (B,)."""
    out = {
        "image": torch.stack([it["image"] for it in items]),
        "caption": [it["caption"] for it in items],
        "index": torch.tensor([it["index"] for it in items]),
    }
    for key in ("sigmas", "noise_seeds", "level_weights"):
        if key in items[0]:
            out[key] = torch.stack([it[key] for it in items])
    if "skipped" in items[0]:  # HF rows skipped by the worker before each item (experiments.data.hf)
        out["skipped"] = torch.tensor([it["skipped"] for it in items])
    return out


def trainer_position(trainer: L.Trainer | None) -> tuple[int, int, int]:
    """(global batches consumed so far, global rank, world size) of the trainer a data module serves.

    The first is ``global_step * accumulate_grad_batches * world_size`` (every rank reads its own batch of each
    micro-step); (0, 0, 1) without a trainer.
    """
    if trainer is None:
        return 0, 0, 1
    world = int(trainer.world_size)
    return int(trainer.global_step) * int(trainer.accumulate_grad_batches) * world, int(trainer.global_rank), world


class ShapesDataModule(L.LightningDataModule):
    def __init__(
        self, seed: int, batch_size: int, size: int = 32, long_caption_prob: float = 0.2, num_workers: int = 0,
        tasks: dict[str, float] | None = None, val_batch_size: int = 64,
    ):
        super().__init__()
        self.tasks = tasks
        self.seed, self.batch_size, self.size = seed, batch_size, size
        self.long_caption_prob, self.num_workers = long_caption_prob, num_workers
        self.val_batch_size = val_batch_size

    def train_dataloader(self) -> DataLoader:
        start_batch, rank, world = trainer_position(self.trainer)
        stream = ShapesStream(
            seed=self.seed, size=self.size, long_caption_prob=self.long_caption_prob,
            start_index=start_batch * self.batch_size, batch_size=self.batch_size,  # workers take whole batches
            tasks=self.tasks, rank=rank, world_size=world,
        )
        return DataLoader(stream, batch_size=self.batch_size, collate_fn=collate, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        """The held-out validation set (``experiments.data.heldout``): the same for every seed and run; every rank
        scores all of it (the trainer runs without a distributed sampler when it validates)."""
        from experiments.data.heldout import HeldOutSet

        return DataLoader(HeldOutSet(self.size), batch_size=self.val_batch_size, collate_fn=collate, shuffle=False)
