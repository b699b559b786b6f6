"""Real training data through HF ``datasets``: image-caption and edit-pair rows, exactly resumable.

    data:
      source: hf
      hf: {path: parquet, data_files: "/data/captions/*.parquet", split: train,
           image_column: image, caption_column: caption, source_image_column: null}

``path`` is anything ``datasets.load_dataset`` takes: a hub id, or a builder ("parquet", "webdataset", "imagefolder")
with ``data_files``. Rows are read in the dataset's order (shuffle it when you build it: a run must see the same
rows after a requeue), streamed, so a 800M-row set never lands on local disk. Row i of the stream is item i; the
data position of a run is ``global_step * batch_size``, as for the shapes world, and ``skip`` resumes there.

Items have the shapes world's format: ``{"image": (3, S, S) float in [-1, 1], "caption": str | Prompt, "index"}``;
with ``source_image_column`` (edit pairs) the caption is ``Prompt(instruction, (source image,))``, so the source
image reaches the DiT only through the VLM. Images are centre-cropped to a square and resized to S (Lanczos).
A row whose image does not decode, or whose caption is empty, is skipped, counted and reported (a warning
naming the row and the running count); it is never silently dropped. The resume position counts items, so a run
resumed after k skipped rows re-reads k rows: exact resume holds for data without bad rows.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import lightning as L
import numpy as np
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from experiments.data.datamodule import collate

log = logging.getLogger(__name__)
HF_KEYS = ("path", "name", "data_files", "split", "image_column", "caption_column", "source_image_column")


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


class HFStream(IterableDataset):
    """Stream of items from an HF dataset, starting at row ``start_index`` (see module docstring).

    With W DataLoader workers and ``batch_size`` B, worker k yields the rows of batches k, k + W, ... so batches
    arrive in row order, as ``ShapesStream`` does.
    """

    def __init__(self, hf: dict[str, Any], size: int, start_index: int = 0, batch_size: int = 1,
                 tasks: dict[str, float] | None = None, seed: int = 0):
        super().__init__()
        if tasks is not None and tasks.get("edit", 0) > 0 and not hf.get("source_image_column"):
            raise ValueError("data.tasks asks for edit batches but data.hf.source_image_column is not set")
        self.tasks, self.seed = tasks, seed
        bad = sorted(set(hf) - set(HF_KEYS))
        if bad:
            raise ValueError(f"unknown data.hf key(s) {bad}; valid: {list(HF_KEYS)}")
        if not hf.get("path"):
            raise ValueError("data.source=hf needs data.hf.path: a hub dataset id, or a builder such as 'parquet' "
                             "with data.hf.data_files")
        self.hf, self.size, self.start_index, self.batch_size = dict(hf), size, start_index, batch_size
        self.skipped = 0

    def _rows(self) -> Iterator[tuple[int, dict[str, Any]]]:
        import datasets

        ds = datasets.load_dataset(self.hf["path"], self.hf.get("name"), data_files=self.hf.get("data_files"),
                                   split=self.hf.get("split") or "train", streaming=True)
        img_col = self.hf.get("image_column") or "image"
        if img_col in (ds.features or {}):
            ds = ds.cast_column(img_col, datasets.Image(decode=False))  # decode here: a bad file is one skip
        src_col = self.hf.get("source_image_column")
        if src_col and src_col in (ds.features or {}):
            ds = ds.cast_column(src_col, datasets.Image(decode=False))
        yield from enumerate(ds.skip(self.start_index), start=self.start_index)

    def item(self, index: int, row: dict[str, Any]) -> dict[str, Any] | None:
        """The training item of one row, or None (counted, reported) when it cannot be used."""
        from experiments.data.shapes import to_tensor
        from models.encoders import Prompt

        img_col = self.hf.get("image_column") or "image"
        cap_col = self.hf.get("caption_column") or "caption"
        src_col = self.hf.get("source_image_column")
        try:
            image = square(_to_pil(row[img_col]), self.size)
            text = row[cap_col]
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"empty or non-text caption {text!r}")
            caption: str | Prompt = text
            task = self._task(index)
            if task == "reconstruction":  # the image is its own condition, through the VLM
                caption = Prompt("", (image,))
            elif src_col:
                caption = Prompt(text, (np.asarray(_to_pil(row[src_col]).convert("RGB")),))
        except KeyError as e:
            raise ValueError(f"row {index} has no column {e}; columns: {sorted(row)}") from None
        except Exception as e:  # noqa: BLE001 - corrupt files are skipped, counted and reported
            self.skipped += 1
            log.warning("data row %d skipped (%s: %s); %d skipped so far", index, type(e).__name__, e, self.skipped)
            return None
        return {"image": to_tensor(image), "caption": caption, "index": index}

    def _task(self, index: int) -> str:
        """t2i / reconstruction per batch, drawn as the shapes stream does (``data.tasks``); edit rows are the
        rows with a source image."""
        from experiments.data.shapes import _draw_task

        if not self.tasks or not any(w > 0 for t, w in self.tasks.items() if t != "t2i"):
            return "t2i"
        return _draw_task(self.tasks, np.random.default_rng([self.seed, index // self.batch_size, 2]))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        for index, row in self._rows():
            if ((index - self.start_index) // self.batch_size) % nw != wid:
                continue
            item = self.item(index, row)
            if item is not None:
                yield item


class HFDataModule(L.LightningDataModule):
    """``data.source: hf`` (see module docstring); resumes at ``global_step * batch_size`` rows."""

    def __init__(self, hf: dict[str, Any], batch_size: int, size: int, num_workers: int = 0,
                 tasks: dict[str, float] | None = None, seed: int = 0):
        super().__init__()
        HFStream(hf, size, tasks=tasks)  # validates the keys before a job is launched
        self.hf, self.batch_size, self.size, self.num_workers = hf, batch_size, size, num_workers
        self.tasks, self.seed = tasks, seed

    def train_dataloader(self) -> DataLoader:
        step = self.trainer.global_step if self.trainer is not None else 0
        stream = HFStream(self.hf, self.size, start_index=step * self.batch_size, batch_size=self.batch_size,
                          tasks=self.tasks, seed=self.seed)
        return DataLoader(stream, batch_size=self.batch_size, collate_fn=collate, num_workers=self.num_workers)
