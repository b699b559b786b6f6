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

import csv
import io
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any


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


def adopt_identical(dst: Path, exp: str, run: str, config: dict[str, Any]) -> Path | None:
    """Give run ``run`` of sweep ``exp`` (folder ``dst`` = ``<runs>/<EXP>/<run><tail>``) the results of the same
    config finished in another sweep of the same runs folder (``<runs>/<OTHER>/<name><tail>``: same training seed
    and config hash, and a ``config.yaml`` whose config hashes the same), instead of training it again:
    ``refiner``'s ``lap_refiner`` is ``conditioning_candidates``' ``lap``. The copy is relabelled (``exp`` and
    ``run`` in ``config.yaml`` and ``metrics.csv``), ``job.json`` records where it came from, and an unfinished
    ``dst`` is replaced; the resume checkpoints are not copied. Returns the source folder, or None when no finished
    run has this config."""
    import yaml

    from common.files import atomic_write_text
    from experiments.config import config_hash

    dst = Path(dst)
    tail = dst.name[len(run):]  # "-seed<s>-<hash>" or "-<hash>"
    want = config_hash(config)
    for src in sorted(dst.parent.parent.glob(f"*/*{tail}")):
        if src.parent == dst.parent or not RunDir(src).is_done() or not src.name.endswith(tail):
            continue
        recorded = yaml.safe_load(RunDir(src).config.read_text()) or {}
        if config_hash(recorded.get("config") or {}) != want:
            continue
        tmp = dst.with_name(dst.name + ".adopting")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("checkpoints", ".submitit"))
        out = RunDir(tmp)
        atomic_write_text(out.config, yaml.safe_dump({**recorded, "exp": exp, "run": run}))
        rows = list(csv.DictReader(io.StringIO(out.metrics.read_text())))  # text in, text out: values untouched
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["exp", "run"], lineterminator="\n")
        writer.writeheader()
        writer.writerows({**row, "exp": exp, "run": run} for row in rows)
        atomic_write_text(out.metrics, buf.getvalue())
        atomic_write_text(out.job_record, json.dumps({"cluster": "adopted", "from": str(src)}, indent=1))
        shutil.rmtree(dst, ignore_errors=True)
        os.replace(tmp, dst)
        return src
    return None
