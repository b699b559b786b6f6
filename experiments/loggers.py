"""Where a run reports while it trains: ``train.logger`` = csv | tensorboard | wandb, and its sample grids.

The CSV log (``logs/metrics.csv``) is always written: ``make status`` and the resume logic read it. ``tensorboard``
adds a TensorBoard log under ``logs/tensorboard/`` (``tensorboard --logdir runs/<EXP>``); ``wandb`` adds a Weights &
Biases run named after the run, id = the run directory's name (so a requeued job continues the same W&B run),
under ``<run>/wandb/``. It is offline unless ``WANDB_MODE=online`` (compute nodes often cannot reach the W&B
server, and an online run without a login stops at its first step): ``wandb sync <run>/wandb/offline-run-*``
uploads it later. Each evaluation writes a grid of sample images into the
run directory (``eval/samples.png``) and logs it to TensorBoard / W&B at the step it was sampled.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

LOGGERS: tuple[str, ...] = ("csv", "tensorboard", "wandb")


def logger_kind(config: dict[str, Any]) -> str:
    """The validated ``train.logger`` (default csv); a missing package is named before training starts."""
    kind = (config.get("train") or {}).get("logger") or "csv"
    if kind not in LOGGERS:
        raise ValueError(f"unknown train.logger {kind!r}; valid: {', '.join(LOGGERS)}")
    package = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(kind)
    if package:
        import importlib.util

        if importlib.util.find_spec(package) is None:
            raise ValueError(f"train.logger {kind} needs the {package} package: pip install {package}")
    return kind


def extra_loggers(config: dict[str, Any], run_dir: Path, run_name: str) -> list[Any]:
    """The Lightning loggers ``train.logger`` adds next to the CSV log (none for csv)."""
    kind = logger_kind(config)
    if kind == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        return [TensorBoardLogger(save_dir=str(Path(run_dir) / "logs"), name="tensorboard", version="")]
    if kind == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        offline = os.environ.get("WANDB_MODE", "offline") == "offline"  # "online" / "disabled": as asked
        return [WandbLogger(name=run_name, id=Path(run_dir).name, save_dir=str(run_dir), resume="allow",
                            project=Path(run_dir).parent.name, offline=offline)]
    return []


def sample_grid(images_dir: Path, out: Path, max_prompts: int = 16, scale: int = 4) -> Path | None:
    """A GenEval image folder's samples as one PNG: one row per prompt (its first ``max_prompts``, spread over the
    tasks in folder order), one column per sample, each image enlarged ``scale`` x (nearest neighbour). None when
    the folder holds no samples."""
    import numpy as np
    from PIL import Image

    from evals.images import contact_sheet, save_png

    folders = sorted(p for p in Path(images_dir).iterdir() if p.is_dir() and p.name.isdigit())
    step = max(1, len(folders) // max_prompts)
    rows = [sorted((f / "samples").glob("*.png")) for f in folders[::step][:max_prompts]]
    rows = [r for r in rows if r]
    if not rows:
        return None
    cols = max(len(r) for r in rows)
    tiles = []
    for r in rows:
        ims = [np.asarray(Image.open(p).convert("RGB")) for p in r]
        ims += [np.full_like(ims[0], 255)] * (cols - len(ims))
        tiles += [im.repeat(scale, 0).repeat(scale, 1) for im in ims]
    return save_png(contact_sheet(tiles, cols=cols), out)


def log_image(loggers: list[Any], path: Path, step: int, tag: str = "samples") -> list[str]:
    """Send the PNG ``path`` to every TensorBoard / W&B logger at ``step``; returns the kinds it went to."""
    import numpy as np
    from PIL import Image

    sent = []
    image = np.asarray(Image.open(path).convert("RGB"))
    for lg in loggers:
        name = type(lg).__name__
        if name == "TensorBoardLogger":
            lg.experiment.add_image(tag, image, global_step=step, dataformats="HWC")
            lg.experiment.flush()
            sent.append("tensorboard")
        elif name == "WandbLogger":
            lg.log_image(key=tag, images=[str(path)], step=step)
            sent.append("wandb")
    return sent


def finish(loggers: list[Any]) -> None:
    """End the run's W&B run, if it has one: its records are written out now, and the next run trained in the same
    process (``--cluster debug``) opens its own W&B run instead of logging into this one."""
    for lg in loggers:
        if type(lg).__name__ == "WandbLogger" and lg._experiment is not None:
            lg.experiment.finish()
