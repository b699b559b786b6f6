"""The run directory protocol: which file of ``runs/<EXP>/<run>-<confighash>/`` holds what.

Training, the launcher, the status table and the collector all find a run's files through ``RunDir``, so the
layout is spelled once (docs/DESIGN.md §4 lists it):

- ``config.yaml``: the run's resolved config; ``job.json``: the job the launcher submitted;
- ``checkpoints/last.ckpt``: where a requeued run resumes; ``final.ckpt``: the trained weights;
- ``logs/metrics.csv``: Lightning's training log; ``validation.csv``: the held-out validation points
  (``experiments.validation``); ``eval/<benchmark>/``: each benchmark's images and scores;
  ``eval/samples.png``: a grid of the evaluation's samples;
- ``metrics.csv``: the run's tidy metric rows; ``DONE``: the headline metrics as JSON, written last, so a run
  is finished exactly when it exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunDir:
    """The files of one run directory ``path`` (which need not exist yet)."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def job_record(self) -> Path:
        return self.path / "job.json"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def last_ckpt(self) -> Path:
        return self.checkpoints / "last.ckpt"

    @property
    def final_ckpt(self) -> Path:
        return self.path / "final.ckpt"

    @property
    def train_log(self) -> Path:
        return self.path / "logs" / "metrics.csv"

    @property
    def validation(self) -> Path:
        """Held-out validation rows, one block per validated step (``experiments.validation``)."""
        return self.path / "validation.csv"

    @property
    def eval(self) -> Path:
        return self.path / "eval"

    def benchmark_dir(self, name: str) -> Path:
        """``eval/<name>/``: what benchmark ``name`` writes for this run."""
        return self.eval / name

    @property
    def sample_grid(self) -> Path:
        """``eval/samples.png``: a grid of the evaluation's sample images (``experiments.loggers.sample_grid``)."""
        return self.eval / "samples.png"

    @property
    def geneval_results(self) -> Path:
        """GenEval's per-image rows of this run (``evals.geneval.evaluate_folder``'s ``results.jsonl``)."""
        return self.benchmark_dir("geneval") / "results.jsonl"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.csv"

    @property
    def done(self) -> Path:
        return self.path / "DONE"

    def is_done(self) -> bool:
        """Finished: ``DONE`` is written last, after ``final.ckpt`` and ``metrics.csv``."""
        return self.done.exists()
