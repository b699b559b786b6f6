"""Lightning data module over the seeded shapes stream, resumable at the exact sample.

Item i of the stream is a pure function of (seed, i), so the data position is just ``global_step * batch_size``:
a run resumed from a checkpoint continues with exactly the samples an uninterrupted run would have seen.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from experiments.data.shapes import ShapesStream


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack images (B, 3, S, S); keep captions (str or ``Prompt`` with images) as a list."""
    return {
        "image": torch.stack([it["image"] for it in items]),
        "caption": [it["caption"] for it in items],
        "index": torch.tensor([it["index"] for it in items]),
    }


class ShapesDataModule(L.LightningDataModule):
    def __init__(
        self, seed: int, batch_size: int, size: int = 32, long_caption_prob: float = 0.2, num_workers: int = 0,
        tasks: dict[str, float] | None = None,
    ):
        super().__init__()
        self.tasks = tasks
        self.seed, self.batch_size, self.size = seed, batch_size, size
        self.long_caption_prob, self.num_workers = long_caption_prob, num_workers

    def train_dataloader(self) -> DataLoader:
        step = self.trainer.global_step if self.trainer is not None else 0
        stream = ShapesStream(
            seed=self.seed, size=self.size, long_caption_prob=self.long_caption_prob,
            start_index=step * self.batch_size, batch_size=self.batch_size,  # workers take whole batches
            tasks=self.tasks,
        )
        return DataLoader(stream, batch_size=self.batch_size, collate_fn=collate, num_workers=self.num_workers)
