"""Real training data through HF ``datasets``: image-caption and edit-pair rows, exactly resumable.

    data:
      source: hf
      hf: {path: parquet, data_files: "/data/captions/*.parquet", split: train,
           image_column: image, caption_column: caption, source_image_column: null}
      hf_edit: null     # or a second source of edit pairs, same keys, e.g.
                        # {path: parquet, data_files: "/data/edits/*.parquet", image_column: target,
                        #  caption_column: instruction, source_image_column: source}

``path`` is anything ``datasets.load_dataset`` takes: a hub id, or a builder ("parquet", "webdataset", "imagefolder")
with ``data_files``. Rows are read in the dataset's order (shuffle it when you build it: a run must see the same
rows after a requeue), streamed, so a 800M-row set never lands on local disk.

One source (``hf_edit: null``): row i of the stream is item i; the data position of a run is
``global_step * accumulate_grad_batches * world_size * batch_size``, as for the shapes world, and ``skip`` resumes
there. Each batch's task is drawn from ``data.tasks`` (seeded by (seed, global batch number)): reconstruction
batches condition on the image itself; with ``source_image_column`` every other batch is an edit batch (the rows
are edit pairs).

Two sources (``hf_edit`` set and ``data.tasks.edit > 0``): the task of each batch is drawn the same way;
text-to-image and reconstruction batches take the next ``batch_size`` rows of ``data.hf``, edit batches the next
rows of ``data.hf_edit``. The number of earlier batches of each task is a pure function of (seed, tasks, step)
(``source_rows``), so a run resumed at step s skips each source to its own row position. An item's ``index`` is
its data position (global batch * batch_size + k); it also carries ``source`` ("hf" / "hf_edit") and its ``row``
there.

Under DDP/FSDP (``world_size`` > 1) each rank reads its own share of every source
(``datasets.distributed.split_dataset_by_node``: whole files when the number of files divides by the world size,
so no rank reads another's bytes; otherwise every world_size-th row) and its t-th batch is global batch
``t * world_size + rank``; rows and ``row`` then count within the rank's share. The order thus depends on the
world size, which a run keeps across requeues. With W DataLoader workers, worker k of a rank takes that rank's
batches k, k + W, ... (``sharding.owns_batch``): each worker reads the rank's rows and decodes only its own batches.

Items have the shapes world's format: ``{"image": (3, S, S) float in [-1, 1], "caption": str | Prompt, "index"}``;
for an edit pair the caption is ``Prompt(instruction, (source image,))``, so the source image reaches the DiT only
through the VLM. Images are centre-cropped to a square and resized to S (Lanczos).
A row whose image does not decode (PIL's decode errors) or that does not fit the schema (no image, an empty or
non-text caption) is skipped, counted and reported (a warning naming the source, the row and the running count);
any other error stops the run. Each item carries ``skipped``, the rows its DataLoader worker skipped since its
previous item, so ``SkipRate`` (a training callback) totals the skips of every worker and rank and, at the end of
training, reports them and fails the run when they exceed ``data.hf.max_skip_rate`` of the rows read (null = 1%).
The resume position counts rows (B per batch), so exact resume holds for data without bad rows; a skipped row
shifts later batch boundaries by one item.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from typing import Any

import lightning as L
import numpy as np
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from experiments.data.datamodule import collate, trainer_position
from experiments.data.shapes import to_tensor
from experiments.data.sharding import batch_task, check_rank, draw_task, owns_batch

log = logging.getLogger(__name__)
HF_KEYS = ("path", "name", "data_files", "split", "image_column", "caption_column", "source_image_column",
           "max_skip_rate")
DEFAULT_MAX_SKIP_RATE = 0.01  # data.hf.max_skip_rate: null
# What a bad row raises: PIL's decode errors (UnidentifiedImageError and truncated files are OSErrors, broken
# chunks SyntaxErrors, oversized images DecompressionBombError) and the schema checks' ValueError.
ROW_ERRORS: tuple[type[BaseException], ...] = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def square(img: Image.Image, size: int) -> np.ndarray:
    """Centre-crop to a square, resize to ``size`` (Lanczos): uint8 (size, size, 3)."""
    img = img.convert("RGB")
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return np.asarray(img.crop((left, top, left + s, top + s)).resize((size, size), Image.LANCZOS))


def _to_pil(value: Any) -> Image.Image:
    """A datasets Image feature value (PIL, or {"bytes", "path"}) -> decoded PIL image."""
    import io

    if isinstance(value, Image.Image):
        value.load()
        return value
    if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
        src = io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"]
        img = Image.open(src)
        img.load()
        return img
    raise ValueError(f"not an image: {type(value).__name__}")


def _rows_of(ds: Any, chunk: int = 256) -> Iterator[dict[str, Any]]:
    """Every row of a streaming ``datasets.IterableDataset``, in order, also inside a DataLoader worker.

    Iterating the dataset itself in a worker process hands that worker only its share of the dataset's files
    (datasets' own worker split), on top of the batch split here: rows were silently lost and reordered with 2+
    workers and 2+ files. ``ds.iter`` reads every file in order wherever it runs.
    """
    for block in ds.iter(batch_size=chunk):
        columns = list(block)
        for values in zip(*(block[c] for c in columns), strict=True):
            yield dict(zip(columns, values, strict=True))


def source_rows(tasks: dict[str, float] | None, seed: int, batches: int, batch_size: int, rank: int = 0,
                world_size: int = 1) -> dict[str, int]:
    """Two-source position of training rank ``rank`` after its first ``batches`` batches (global batches
    ``t * world_size + rank`` for t < batches): rows of its share of ``data.hf`` / ``data.hf_edit`` read so far
    (each batch reads ``batch_size`` rows of the source its task names)."""
    n_edit = sum(batch_task(tasks, seed, t * world_size + rank) == "edit" for t in range(batches))
    return {"hf": (batches - n_edit) * batch_size, "hf_edit": n_edit * batch_size}


def _check_keys(cfg: dict[str, Any], name: str) -> None:
    bad = sorted(set(cfg) - set(HF_KEYS))
    if bad:
        raise ValueError(f"unknown {name} key(s) {bad}; valid: {list(HF_KEYS)}")


class HFStream(IterableDataset):
    """Stream of items from one HF dataset (``hf``), or two (``hf`` + ``hf_edit`` for edit batches), starting at
    data position ``start_index`` (see module docstring).

    Rank ``rank`` of ``world_size`` reads its share of the rows; its batches of ``batch_size`` rows are dealt to
    its DataLoader workers by ``owns_batch``, so they arrive in row order, as ``ShapesStream``'s do.
    """

    def __init__(self, hf: dict[str, Any], size: int, start_index: int = 0, batch_size: int = 1,
                 tasks: dict[str, float] | None = None, seed: int = 0, hf_edit: dict[str, Any] | None = None,
                 rank: int = 0, world_size: int = 1):
        super().__init__()

        check_rank(rank, world_size)
        self.rank, self.world_size = rank, world_size

        if tasks:
            draw_task(tasks, np.random.default_rng(0))  # validates names and weights before any row is read
        edit = bool(tasks) and tasks.get("edit", 0) > 0
        if edit and hf_edit is None and not hf.get("source_image_column"):
            raise ValueError("data.tasks asks for edit batches but data.hf.source_image_column is not set and "
                             "there is no data.hf_edit (a second source of edit pairs)")
        self.tasks, self.seed = tasks, seed
        _check_keys(hf, "data.hf")
        if not hf.get("path"):
            raise ValueError("data.source=hf needs data.hf.path: a hub dataset id, or a builder such as 'parquet' "
                             "with data.hf.data_files")
        if hf_edit is not None:
            _check_keys(hf_edit, "data.hf_edit")
            if not hf_edit.get("source_image_column"):
                raise ValueError("data.hf_edit needs source_image_column: the column of the image each edit "
                                 "instruction applies to (image_column is the edited target)")
            if hf.get("source_image_column"):
                raise ValueError("data.hf_edit is set, so edit batches read it: unset data.hf.source_image_column "
                                 "(data.hf then serves text-to-image and reconstruction batches)")
            if edit and not hf_edit.get("path"):
                raise ValueError("data.tasks asks for edit batches: data.hf_edit needs path, a hub dataset id or a "
                                 "builder such as 'parquet' with data.hf_edit.data_files")
        self.hf, self.size, self.start_index, self.batch_size = dict(hf), size, start_index, batch_size
        self.hf_edit = dict(hf_edit) if hf_edit is not None else None
        self.two = edit and hf_edit is not None  # edit batches read hf_edit
        self.skipped = 0
        self.skipped_by = {"hf": 0, "hf_edit": 0}
        self._unreported = 0  # skips since the last item this worker yielded (each item carries its count)
        if start_index % (batch_size * world_size):
            raise ValueError(f"the stream resumes at whole steps: start_index {start_index} is not a multiple of "
                             f"batch_size {batch_size} x world_size {world_size}")
        self.start_batch = start_index // (batch_size * world_size)  # this rank's batches before the start
        if self.two:
            self.starts = source_rows(tasks, seed, self.start_batch, batch_size, rank, world_size)
        else:
            self.starts = {"hf": self.start_batch * batch_size, "hf_edit": 0}

    def _open(self, cfg: dict[str, Any], start: int) -> Iterator[tuple[int, dict[str, Any]]]:
        """(row index, row) of the source ``cfg`` from row ``start`` on; images left undecoded."""
        import datasets

        ds = datasets.load_dataset(cfg["path"], cfg.get("name"), data_files=cfg.get("data_files"),
                                   split=cfg.get("split") or "train", streaming=True)
        for col in (cfg.get("image_column") or "image", cfg.get("source_image_column")):
            if col and col in (ds.features or {}):
                ds = ds.cast_column(col, datasets.Image(decode=False))  # decode here: a bad file is one skip
        if self.world_size == 1:
            return enumerate(_rows_of(ds.skip(start)), start=start)
        from datasets.distributed import split_dataset_by_node

        # This rank's share: whole files when their number divides by the world size, else every world_size-th
        # row. Skipped here, not with ds.skip: after a row-level split that skips rows of the whole dataset.
        mine = split_dataset_by_node(ds, rank=self.rank, world_size=self.world_size)
        return enumerate(itertools.islice(_rows_of(mine), start, None), start=start)

    def _make(self, cfg: dict[str, Any], source: str, row_index: int, row: dict[str, Any], task: str,
              index: int) -> dict[str, Any] | None:
        """The item of one row of ``cfg`` for ``task``, or None (counted, reported) when it cannot be used."""
        from common.prompt import Prompt

        img_col = cfg.get("image_column") or "image"
        cap_col = cfg.get("caption_column") or "caption"
        src_col = cfg.get("source_image_column")
        label = f"data.{source}" if self.two else "data"
        if self.world_size > 1:
            label += f" (rank {self.rank}'s share)"
        try:
            image = square(_to_pil(row[img_col]), self.size)
            text = row[cap_col]
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"empty or non-text caption {text!r}")
            caption: str | Prompt = text
            if task == "reconstruction":  # the image is its own condition, through the VLM
                caption = Prompt("", (image,))
            elif src_col:
                caption = Prompt(text, (np.asarray(_to_pil(row[src_col]).convert("RGB")),))
        except KeyError as e:
            raise ValueError(f"{label} row {row_index} has no column {e}; columns: {sorted(row)}") from None
        except ROW_ERRORS as e:  # a corrupt file or a row off the schema: skipped, counted and reported
            self.skipped += 1
            self.skipped_by[source] += 1
            self._unreported += 1
            log.warning("%s row %d skipped (%s: %s); %d skipped so far", label, row_index, type(e).__name__, e,
                        self.skipped)
            return None
        out = {"image": to_tensor(image), "caption": caption, "index": index, "skipped": self._unreported}
        self._unreported = 0
        if self.two:
            out.update(source=source, row=row_index)
        return out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Batch by batch of this rank (global batch ``t * world_size + rank`` for t = start_batch, ...): draw its
        task, read ``batch_size`` rows of the source it names (decoding only this DataLoader worker's batches);
        ends when a source it needs runs out."""
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        cfgs = {"hf": self.hf, "hf_edit": self.hf_edit}
        rows: dict[str, Iterator[tuple[int, dict[str, Any]]]] = {}  # opened at first use, at its start row
        t, bs = self.start_batch, self.batch_size
        while True:
            g = t * self.world_size + self.rank
            task = batch_task(self.tasks, self.seed, g)
            source = "hf_edit" if self.two and task == "edit" else "hf"
            if source not in rows:
                rows[source] = self._open(cfgs[source], self.starts[source])
            mine = owns_batch(t - self.start_batch, workers=nw, worker=wid)
            for k in range(bs):
                got = next(rows[source], None)
                if got is None:
                    return
                if mine:
                    item = self._make(cfgs[source], source, got[0], got[1], task, g * bs + k)
                    if item is not None:
                        yield item
            t += 1


def max_skip_rate(hf: dict[str, Any]) -> float:
    """``data.hf.max_skip_rate`` (null = ``DEFAULT_MAX_SKIP_RATE``); ValueError outside [0, 1]."""
    rate = hf.get("max_skip_rate")
    rate = DEFAULT_MAX_SKIP_RATE if rate is None else rate
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
        raise ValueError(f"data.hf.max_skip_rate must be a fraction in [0, 1] or null, got {rate!r}")
    return float(rate)


class SkipRate(L.Callback):
    """Totals the rows skipped by every DataLoader worker of every rank (the ``skipped`` each batch carries, next to
    its rows used); at the end of training reports ``skipped of read`` and raises when the fraction exceeds
    ``max_rate``. The totals are kept in checkpoints, so a resumed run counts from its start."""

    def __init__(self, max_rate: float):
        self.max_rate = max_rate
        self.skipped = self.used = 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.skipped += int(batch["skipped"].sum()) if "skipped" in batch else 0
        self.used += len(batch["index"])

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped, "used": self.used}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.skipped, self.used = int(state_dict["skipped"]), int(state_dict["used"])

    def totals(self, trainer: L.Trainer) -> tuple[int, int]:
        """(rows skipped, rows read) over every rank: a collective under DDP (every rank calls it)."""
        import torch

        both = torch.tensor([self.skipped, self.skipped + self.used], dtype=torch.float64,
                            device=trainer.strategy.root_device)
        both = trainer.strategy.reduce(both, reduce_op="sum")
        return int(both[0]), int(both[1])

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        skipped, read = self.totals(trainer)
        rate = skipped / read if read else 0.0
        msg = f"data: {skipped} of {read} rows read skipped ({100 * rate:.2f}%) over all workers and ranks"
        if trainer.is_global_zero:
            log.warning(msg)
        if rate > self.max_rate:
            raise RuntimeError(f"{msg}: more than data.hf.max_skip_rate = {self.max_rate}; check the data (the "
                               "warnings name each skipped row) or raise the limit")


class HFDataModule(L.LightningDataModule):
    """``data.source: hf`` (see module docstring); resumes at the trainer's data position (``trainer_position``),
    each source at its own row when ``hf_edit`` serves the edit batches; each training rank reads its own batches."""

    def __init__(self, hf: dict[str, Any], batch_size: int, size: int, num_workers: int = 0,
                 tasks: dict[str, float] | None = None, seed: int = 0, hf_edit: dict[str, Any] | None = None):
        super().__init__()
        HFStream(hf, size, batch_size=batch_size, tasks=tasks, seed=seed, hf_edit=hf_edit)  # validates before launch
        max_skip_rate(hf)
        self.hf, self.batch_size, self.size, self.num_workers = hf, batch_size, size, num_workers
        self.tasks, self.seed, self.hf_edit = tasks, seed, hf_edit

    def train_dataloader(self) -> DataLoader:
        start_batch, rank, world = trainer_position(self.trainer)
        stream = HFStream(self.hf, self.size, start_index=start_batch * self.batch_size, batch_size=self.batch_size,
                          tasks=self.tasks, seed=self.seed, hf_edit=self.hf_edit, rank=rank, world_size=world)
        return DataLoader(stream, batch_size=self.batch_size, collate_fn=collate, num_workers=self.num_workers)
