"""Where the project keeps what it builds: the cache, the run directories and the committed results.

- ``cache_dir()``: ``$UNIFUSION_CACHE`` or ``<repo>/.cache`` (pretrained tiny VLM, feature cache): on the repo, so
  SLURM jobs on other nodes see it too.
- ``RUNS_DIR``: ``$UNIFUSION_RUNS`` or ``runs`` (relative to the working directory): one folder per sweep run.
- ``RESULTS_DIR``: ``results``: the tidy tables and figures of every experiment, committed.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
RUNS_DIR = Path(os.environ.get("UNIFUSION_RUNS", "runs"))
RESULTS_DIR = Path("results")


def cache_dir() -> Path:
    """``$UNIFUSION_CACHE`` or ``<repo>/.cache``: on the repo, so SLURM jobs on other nodes see it too."""
    return Path(os.environ.get("UNIFUSION_CACHE", REPO_ROOT / ".cache"))
