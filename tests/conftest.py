"""Shared fixtures: ``slurm_cluster`` starts (once per session) the one-node SLURM the SLURM tests run on."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
START_SCRIPT = ROOT / "tests" / "slurm" / "start_cluster.sh"
PARTITION = "debug"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slurm: needs the local SLURM of tests/slurm/start_cluster.sh (skips without)")


def slurm_partition_up(partition: str = PARTITION) -> bool:
    """True when ``sinfo`` answers and ``partition`` has a usable node."""
    if shutil.which("sinfo") is None:
        return False
    out = subprocess.run(["sinfo", "-h", "-p", partition, "-o", "%t"], capture_output=True, text=True, timeout=30)
    return out.returncode == 0 and any(s.strip() in ("idle", "mix", "alloc") for s in out.stdout.split())


@pytest.fixture(scope="session")
def slurm_cluster() -> str:
    """The partition name of a running local SLURM; skips the test (with the reason) where none can start."""
    if slurm_partition_up():
        return PARTITION
    if os.geteuid() != 0:
        pytest.skip(f"no SLURM partition {PARTITION!r} up and not root, so {START_SCRIPT.name} cannot start one")
    try:
        out = subprocess.run(["bash", str(START_SCRIPT)], capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        pytest.skip(f"{START_SCRIPT.name} did not finish within 900 s")
    if out.returncode != 0 or not slurm_partition_up():
        pytest.skip(f"local SLURM could not start: {(out.stderr or out.stdout).strip()[-800:]}")
    return PARTITION
