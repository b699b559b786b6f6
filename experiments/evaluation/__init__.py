"""The benchmarks a sweep runs on each trained model: ``BENCHMARKS`` (name -> ``Benchmark``).

A config's ``eval.tasks`` lists their names; after training, ``experiments.train`` runs each one on the final
model and writes its rows into the run's ``metrics.csv``. A new benchmark is one module with a ``run`` function
plus one line here, as a new conditioning candidate is one file plus one line in ``CANDIDATES``.

``run(module, config, run_dir)`` samples from the trained ``UniFusionModule``, writes what it scored under
``run_dir/eval/`` and returns tidy metric rows ``{"metric", "value", "ci_low", "ci_high", "n"}`` (the run's
identity and config columns are added by the caller). ``metrics`` names the rows tables and figures show, in
their order; ``headline`` is the one recorded in ``DONE``; ``per_prompt`` (optional) reads a finished run's
per-prompt outcomes for paired tests between runs (``results/<EXP>/per_prompt.csv``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from evals.zero_shot_edit import METRICS as ZERO_SHOT_METRICS
from experiments.evaluation import geneval, image_tasks, zero_shot_edit

MetricRows = list[dict[str, Any]]


@dataclass(frozen=True)
class Benchmark:
    """One benchmark of a sweep; see the module docstring."""

    run: Callable[[Any, dict[str, Any], Path], MetricRows]
    metrics: tuple[str, ...]
    headline: str
    per_prompt: Callable[[Path], pd.DataFrame | None] | None = None


BENCHMARKS: dict[str, Benchmark] = {
    "geneval": Benchmark(geneval.run, geneval.METRICS, "geneval.overall", geneval.per_prompt),
    "reconstruction": Benchmark(image_tasks.reconstruction, ("reconstruction.psnr", "reconstruction.ssim"),
                                "reconstruction.psnr"),
    "edit": Benchmark(image_tasks.edit, ("edit.correct", "edit.psnr", "edit.ssim"), "edit.correct"),
    "zero_shot_edit": Benchmark(zero_shot_edit.run, ZERO_SHOT_METRICS, "zero_shot_edit.correct@0.2"),
}


def table_metrics() -> list[str]:
    """Every benchmark's table metrics, in registry order: the columns of ``table.md``."""
    return [m for b in BENCHMARKS.values() for m in b.metrics]


def headline_metrics() -> list[str]:
    """The metric each benchmark records in a run's ``DONE``."""
    return [b.headline for b in BENCHMARKS.values()]
