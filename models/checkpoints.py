"""Checkpoints of a trained ``UniFusionModule``: writing ``final.ckpt`` and reading any checkpoint back.

Checkpoints are Lightning's format (``state_dict``, ``hyper_parameters`` = the run's config, ``global_step``)
without the frozen encoder's weights: the encoder is rebuilt from its preset on load
(``UniFusionModule.on_save_checkpoint`` / ``on_load_checkpoint``).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, path)
    return path


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
