"""The shapes-world training stream: items as a pure function of (seed, index), sharded over ranks and workers.

Text-to-image items pair a render with a GenEval prompt or a long description; reconstruction and editing items
condition on a ``Prompt`` with the source image (``world.edits``). The world itself lives in ``world/``. No item
ever shows a held-out image (``world.holdout``): one that would is redrawn from the item's own rng, so the
validation set (``experiments.data.heldout``) is disjoint from every training draw of every seed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from common.geneval_spec import TASKS
from common.prompt import Prompt
from experiments.data.sharding import batch_task, check_rank, draw_task
from world.descriptions import describe
from world.edits import random_edit
from world.holdout import is_held_out
from world.prompts import sample_prompt, scene_for_prompt
from world.scene import radius_range, render, sample_scene


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 (S, S, 3) -> float32 (3, S, S) in [-1, 1]."""
    return torch.from_numpy(image).permute(2, 0, 1).float().div(127.5).sub(1.0)


def stream_item(seed: int, index: int, size: int = 32, long_caption_prob: float = 0.2,
                caption_block: int = 1, tasks: dict[str, float] | None = None) -> dict[str, Any]:
    """Item ``index`` of the stream: a pure function of (seed, index) through ``default_rng([seed, index])``.

    With probability ``long_caption_prob`` a random scene captioned by ``describe``; otherwise a task drawn
    uniformly from TASKS, a ``sample_prompt`` for it, a ``scene_for_prompt`` and the prompt as caption.
    ``caption_block`` > 1 draws that long-or-short coin once per block of indices (one batch), so a batch is all
    short prompts or all long descriptions: a batch pads to its longest caption, and a single ~150-token
    description in every batch would triple the condition length of every step.
    A scene whose render is held out (``world.holdout``) is redrawn from the same rng, for the same prompt.
    Returns ``{"image": float32 (3, S, S) in [-1, 1], "caption": str, "scene": dict, "index": int}``.
    """
    task = batch_task(tasks, seed, index // caption_block)
    if task != "t2i":
        return _image_item(seed, index, size, task)
    rng = np.random.default_rng([seed, index])
    coin = rng.random()
    if caption_block > 1:
        coin = np.random.default_rng([seed, index // caption_block, 1]).random()
    meta = None if coin < long_caption_prob else sample_prompt(rng, TASKS[rng.integers(len(TASKS))])
    while True:  # a held-out scene is redrawn (same prompt): validation keeps those
        scene = sample_scene(rng, size) if meta is None else scene_for_prompt(meta, rng, size)
        image = render(scene)
        if not is_held_out(image):
            break
    text = describe(scene) if meta is None else meta["prompt"]
    return {"image": to_tensor(image), "caption": text, "scene": scene.to_json(), "index": index}


def _image_item(seed: int, index: int, size: int, task: str) -> dict[str, Any]:
    """A reconstruction (image -> same image) or editing (image + instruction -> edited image) item; the
    condition is a ``Prompt`` whose image reaches the DiT only through the VLM."""
    rng = np.random.default_rng([seed, index, 3])
    while True:  # neither the target nor the source image may be held out
        if task == "reconstruction":
            target = sample_scene(rng, size)
            image = source = render(target)
            instruction = ""
        else:
            src, instruction, target = random_edit(rng, size)
            source, image = render(src), render(target)
        if not (is_held_out(image) or is_held_out(source)):
            break
    prompt = Prompt(instruction, (source,))
    return {"image": to_tensor(image), "caption": prompt, "scene": target.to_json(), "index": index}


class ShapesStream(IterableDataset):
    """Infinite, exactly resumable stream of (image, caption) items of the shapes world.

    Item i is ``stream_item(seed, i, ...)``; iteration starts at ``start_index``, the *global* data position (over
    all training ranks). Under a DataLoader with W workers, worker k yields indices ``start_index + k + j*W``
    (j = 0, 1, ...). If ``batch_size`` is given, workers take whole batches instead (worker k yields batches k,
    k+W, ...), which matches the DataLoader's round-robin fetch order, so batches arrive exactly in index order for
    any W; it also makes each batch all-short or all-long captions (``stream_item``'s ``caption_block``).
    With ``world_size`` > 1 (DDP/FSDP) rank r of the training job sees only its share (``owns_batch``: batches,
    or items without ``batch_size``, r, r + world_size, ...): a step's global batch is world_size × batch_size
    distinct items (times accumulate_grad_batches), and a run resumed at step s starts at
    ``s * accumulate_grad_batches * world_size * batch_size`` (``datamodule.trainer_position``).
    """

    def __init__(self, seed: int, size: int = 32, long_caption_prob: float = 0.2, start_index: int = 0,
                 batch_size: int | None = None, tasks: dict[str, float] | None = None, rank: int = 0,
                 world_size: int = 1):
        super().__init__()
        radius_range(size)
        if not 0.0 <= long_caption_prob <= 1.0:
            raise ValueError(f"long_caption_prob must be in [0, 1], got {long_caption_prob}")
        if start_index < 0:
            raise ValueError(f"start_index must be >= 0, got {start_index}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}")
        check_rank(rank, world_size)
        self.seed, self.size, self.long_caption_prob = seed, size, long_caption_prob
        self.start_index, self.batch_size = start_index, batch_size
        self.rank, self.world_size = rank, world_size
        if tasks is not None:
            draw_task(tasks, np.random.default_rng(0))  # validates
        self.tasks = tasks

    def indices(self, worker_id: int = 0, num_workers: int = 1) -> Iterator[int]:
        """The (infinite) index sequence worker ``worker_id`` of ``num_workers`` of this rank yields."""
        b = self.batch_size or 1
        stride = self.world_size * num_workers  # consecutive blocks of this worker lie this many blocks apart
        block = self.rank + self.world_size * worker_id  # its first block (owns_batch's rule, solved for offset)
        while True:
            yield from range(self.start_index + block * b, self.start_index + (block + 1) * b)
            block += stride

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        for i in self.indices(wid, nw):
            yield stream_item(self.seed, i, self.size, self.long_caption_prob, self.batch_size or 1, self.tasks)
