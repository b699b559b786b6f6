"""Held-out validation during training: when it runs, what a run records, and its tidy metric rows.

``eval.val_every: k`` (null = off) runs Lightning's validation loop over the held-out set
(``experiments.data.heldout``; the loss itself is ``UniFusionModule.validation_step``) every k optimizer steps and
once more at the last step. Each validation gives three metrics, with 95% bootstrap CIs over the held-out scenes
(resampled within GenEval tasks):

- ``val.loss``: flow-matching loss with the caption's condition;
- ``val.loss_uncond``: the same with the null condition (the unconditional branch of classifier-free guidance);
- ``val.cond_gain`` = ``val.loss_uncond - val.loss``: how much the condition tells the DiT about the image;
- ``val.cond_gain.s<level>``: the same gain at one noise level of ``experiments.data.heldout.GAIN_LEVELS``
  (0.76, 0.85, 0.9): levels where the prompt decides the pixels, so the gain is not diluted by the low levels
  where it is ~0.

``ValidationRecorder`` keeps them in ``<run>/validation.csv`` (tidy rows: step, metric, value, ci_low, ci_high, n;
plus ``time.val_s``, the seconds spent validating), rewritten after each validation, so a requeued run keeps the
points of the steps its checkpoint covers; ``run`` copies them into the run's ``metrics.csv``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd

from common.files import atomic_write_text

VAL_METRICS: tuple[str, ...] = ("val.loss", "val.loss_uncond", "val.cond_gain")
ROW_COLUMNS = ["step", "metric", "value", "ci_low", "ci_high", "n"]


def val_every(config: dict[str, Any]) -> int | None:
    """``eval.val_every``: a positive int, or None (off); ValueError otherwise or when the data has no held-out
    set (only the shapes world has one)."""
    k = (config.get("eval") or {}).get("val_every")
    if k is None:
        return None
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"eval.val_every must be a positive number of steps or null, got {k!r}")
    source = config["data"].get("source", "shapes")
    if source != "shapes":
        raise ValueError(f"eval.val_every needs data.source: shapes (the held-out set is of the shapes world), "
                         f"got {source!r}; set eval.val_every: null")
    return k


def trainer_options(config: dict[str, Any], accumulate: int) -> dict[str, Any]:
    """``L.Trainer`` arguments for validation: every ``val_every`` optimizer steps (Lightning counts batches, so
    times ``accumulate``), over all of the set on every rank; ``limit_val_batches=0`` when off."""
    k = val_every(config)
    if k is None:
        return {"limit_val_batches": 0}
    return {"val_check_interval": k * accumulate, "check_val_every_n_epoch": None, "limit_val_batches": 1.0,
            "use_distributed_sampler": False}


def is_val_metric(metric: str) -> bool:
    """Whether a metric name is a validation metric: one of ``VAL_METRICS`` or a per-level gain."""
    return metric in VAL_METRICS or metric.startswith("val.cond_gain.s")


def gain_metric(level: float) -> str:
    """``val.cond_gain.s0.85``: the name of the conditioning gain at one noise level."""
    return f"val.cond_gain.s{level:.2f}"


def summary_rows(step: int, losses: dict[str, np.ndarray], strata: np.ndarray | None = None,
                 n_resamples: int = 1000, gain_levels: tuple[float, ...] = ()) -> list[dict[str, Any]]:
    """The three validation metrics of one step from per-item losses ``{"cond": (N,), "uncond": (N,)}``, and with
    ``cond_levels``/``uncond_levels``/``sigmas`` (N, K) the gain at each of ``gain_levels``: means and percentile
    bootstrap CIs over items (resampled within ``strata``; the gain paired item by item)."""
    from common.stats import bootstrap_ci

    cond, uncond = np.asarray(losses["cond"], float), np.asarray(losses["uncond"], float)
    series = list(zip(VAL_METRICS, (cond, uncond, uncond - cond), strict=True))
    for level in gain_levels:
        if "sigmas" not in losses:
            break
        hit = np.flatnonzero(np.abs(np.asarray(losses["sigmas"])[0] - level) < 1e-4)
        if len(hit) != 1:
            raise ValueError(f"validation scored no noise level {level}; it scored {np.asarray(losses['sigmas'])[0]}")
        j = int(hit[0])
        series.append((gain_metric(level), np.asarray(losses["uncond_levels"])[:, j]
                       - np.asarray(losses["cond_levels"])[:, j]))
    rows = []
    for metric, values in series:
        lo, hi = bootstrap_ci(values, np.mean, n_resamples=n_resamples, seed=0, strata=strata)
        rows.append({"step": int(step), "metric": metric, "value": float(values.mean()), "ci_low": lo, "ci_high": hi,
                     "n": len(values)})
    return rows


def read_rows(path: Path, upto: int | None = None) -> pd.DataFrame:
    """The rows of a run's ``validation.csv`` (steps <= ``upto`` when given); empty when absent."""
    path = Path(path)
    if not path.is_file():
        return pd.DataFrame(columns=ROW_COLUMNS)
    df = pd.read_csv(path)
    return df if upto is None else df[df["step"] <= upto].reset_index(drop=True)


class ValidationRecorder(L.Callback):
    """Writes each validation's rows to ``path`` (global rank 0), replacing earlier rows of the same step.

    ``resume_at``: the step the run resumes at (None: a fresh start, which discards an old file): rows of later
    steps are dropped, since the resumed run validates those steps again.
    """

    def __init__(self, path: Path, resume_at: int | None):
        self.path = Path(path)
        self.rows = read_rows(self.path, resume_at) if resume_at is not None else pd.DataFrame(columns=ROW_COLUMNS)
        self._t0 = 0.0

    def steps(self) -> set[int]:
        """Steps that have a validation."""
        return set(self.rows.loc[self.rows.metric == VAL_METRICS[0], "step"].astype(int))

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0 = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        from experiments.data.heldout import GAIN_LEVELS, N_PER_TASK

        losses = pl_module.val_losses
        step = int(trainer.global_step)
        new = summary_rows(step, losses, strata=np.asarray(losses["index"]) // N_PER_TASK, gain_levels=GAIN_LEVELS)
        new.append({"step": step, "metric": "time.val_s", "value": time.perf_counter() - self._t0, "ci_low": None,
                    "ci_high": None, "n": 1})
        keep = self.rows[self.rows["step"] != step]
        self.rows = pd.concat([keep, pd.DataFrame(new, columns=ROW_COLUMNS)] if len(keep) else
                              [pd.DataFrame(new, columns=ROW_COLUMNS)], ignore_index=True)
        if trainer.is_global_zero:
            atomic_write_text(self.path, self.rows.to_csv(index=False))
