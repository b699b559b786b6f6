"""Checkpoints of a trained ``UniFusionModule``: writing ``final.ckpt`` and reading any checkpoint back; atomic
writes and the choice of the checkpoint a run resumes from.

Checkpoints are Lightning's format (``state_dict``, ``hyper_parameters`` = the run's config, ``global_step``)
without the frozen encoder's weights: the encoder is rebuilt from its preset on load
(``UniFusionModule.on_save_checkpoint`` / ``on_load_checkpoint``).

Every checkpoint is written to a temporary file in its own folder, fsynced and renamed over the old one
(``write_atomic``; ``atomic_checkpoint_io`` does it for Lightning's own saves). Lightning's default writes to
``$TMPDIR`` and moves the file, a copy when ``$TMPDIR`` is node-local and the runs folder shared: a preemption
or a full disk during that copy leaves a truncated ``last.ckpt``. ``resume_checkpoint`` then resumes from the
newest intact checkpoint instead and says so.
"""

from __future__ import annotations

import re
import sys
import warnings
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from common.files import atomic_write

if TYPE_CHECKING:
    from models.module import UniFusionModule


def save_final(module: UniFusionModule, path: Path) -> Path:
    """``final.ckpt``: the trained weights (EMA included, frozen encoder stripped) in Lightning's checkpoint format,
    loadable with ``load_module`` -- also for step 0. Written atomically, by global rank 0 only."""
    import lightning as L

    trainer = module._trainer
    # Through the strategy: under FSDP the weights are sharded and this gathers them (a collective: every rank
    # must call it); otherwise it is module.state_dict(). Only global rank 0 writes.
    state = trainer.strategy.lightning_module_state_dict() if trainer is not None else module.state_dict()
    if module.global_rank != 0:
        return path
    ckpt = {"state_dict": state, "hyper_parameters": dict(module.hparams),
            "global_step": int(module.global_step), "pytorch-lightning_version": L.__version__}
    module.on_save_checkpoint(ckpt)  # drops the encoder's weights: it is rebuilt from its preset
    return write_atomic(ckpt, path)


def write_atomic(obj: Any, path: Path) -> Path:
    """``torch.save(obj)`` to ``path`` so that ``path`` is always either its old file or the whole new one, and the
    new one survives a crash of the node (``common.files.atomic_write``, durable)."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp), durable=True)


def atomic_checkpoint_io() -> Any:
    """Lightning's checkpoint writer with ``write_atomic`` (a ``TorchCheckpointIO``): ``last.ckpt`` and the step
    checkpoints are never left half-written, whatever filesystems ``$TMPDIR`` and the runs folder are on. Built on
    use: scoring a checkpoint needs no Lightning."""
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    class AtomicCheckpointIO(TorchCheckpointIO):
        def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
            if storage_options is not None:
                raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
            write_atomic(checkpoint, Path(path))

    return AtomicCheckpointIO()


def damage(path: Path) -> str | None:
    """Why the checkpoint file at ``path`` cannot be read back (None when it is intact): every member of torch's
    zip archive is read and its CRC checked, without unpickling anything."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        return f"{type(err).__name__}: {err}"
    return None if bad is None else f"member {bad} fails its CRC check"


def _step_of(path: Path) -> int:
    match = re.search(r"step=(\d+)", path.name)
    return int(match[1]) if match else -1


def resume_checkpoint(folder: Path, last: str = "last.ckpt") -> Path | None:
    """The checkpoint a run resumes from: ``folder/last`` when it is intact, else the intact checkpoint of the
    highest step in ``folder`` (a line on stderr says which and why); None when the folder holds no checkpoint.
    Raises RuntimeError when checkpoints exist but none is intact."""
    folder = Path(folder)
    first = folder / last
    others = sorted((p for p in folder.glob("*.ckpt") if p.name != last),
                    key=lambda p: (_step_of(p), p.stat().st_mtime), reverse=True)
    candidates = ([first] if first.is_file() else []) + others
    if not candidates:
        return None
    damaged = []
    for path in candidates:
        why = damage(path)
        if why is None:
            if damaged:
                print(f"resume: {'; '.join(damaged)}; resuming from {path.name} (step {resume_step(path)})",
                      file=sys.stderr, flush=True)
            return path
        damaged.append(f"{path.name} is damaged ({why})")
    raise RuntimeError(f"no intact checkpoint in {folder}: {'; '.join(damaged)}; remove the folder to start over")


def load_module(ckpt: str | Path | UniFusionModule, device: str | None = None) -> UniFusionModule:
    """A trained module from a Lightning checkpoint (or pass one through), in eval mode; ``device`` defaults to
    CUDA when available."""
    from models.module import UniFusionModule  # on use: Lightning and the model stack load only when needed

    if isinstance(ckpt, UniFusionModule):
        return ckpt.eval()
    path = Path(ckpt)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    with warnings.catch_warnings():  # the frozen encoder's keys are absent by design (rebuilt from its preset)
        warnings.filterwarnings("ignore", message="Found keys that are in the model state dict but not in")
        return UniFusionModule.load_from_checkpoint(path, map_location=device).eval()


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The raw checkpoint dict (``state_dict``, ``global_step``, ...) on the CPU."""
    return torch.load(path, map_location="cpu", weights_only=False)


def resume_step(ckpt: Path) -> int | None:
    """The global step a Lightning checkpoint resumes at (None when there is no checkpoint)."""
    if not ckpt.is_file():
        return None
    return int(read_checkpoint(ckpt)["global_step"])
