"""Shared fixtures and the skip policy.

``slurm_cluster`` starts (once per session) the one-node SLURM the SLURM tests run on.

Skip policy: a skipped test is lost coverage, so the session FAILS when a test skips unless its id matches a
pattern of ``ALLOWED_SKIPS``. An entry allowed ``"outside_ci"`` may skip on a developer's machine (no root, no
SLURM, no time for a cold compile) but must run in CI, which sets ``CI`` (``.ci/run`` does); an entry allowed
``"always"`` is a genuinely optional part (a GPU-only path, a separate environment such as mmdet's). To allow a
new skip, add ``"tests/test_file.py::test_name*": Allowed(where, "why it may skip")``; patterns are ``fnmatch``
globs over pytest node ids. Tests deselected with ``-k`` / ``-m`` are not skips.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
START_SCRIPT = ROOT / "tests" / "slurm" / "start_cluster.sh"
PARTITION = "debug"


@dataclass(frozen=True)
class Allowed:
    where: str  # "always" | "outside_ci"
    reason: str


ALLOWED_SKIPS: dict[str, Allowed] = {
    "tests/test_slurm.py::*": Allowed("outside_ci", "needs the one-node SLURM of tests/slurm/start_cluster.sh (root, "
                                                    "apt, daemons); .ci/run starts it and fails if it cannot"),
    "tests/test_scale.py::test_inductor_compiled_dit_matches_eager": Allowed(
        "outside_ci", "a cold inductor compile takes ~70 s on 2 CPU cores; opt in with UNIFUSION_SLOW_TESTS=1 "
                      "(.ci/run does)"),
    "tests/test_ab_browser.py::*": Allowed("outside_ci", "needs Debian's chromium + chromium-driver; .ci/run installs "
                                                         "them"),
    "tests/test_ab_load.py::test_load_postgresql": Allowed("outside_ci", "needs Debian's postgresql; .ci/run installs "
                                                                         "it"),
}
_SKIPS: list[tuple[str, str]] = []  # (node id, skip message) of this session


def in_ci() -> bool:
    """True under CI (the ``CI`` environment variable set and not "0"/"false"), where outside_ci skips fail."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def unlisted_skips(skips: list[tuple[str, str]], ci: bool) -> list[tuple[str, str, str]]:
    """(node id, skip message, why it fails the session) of every skip the allow-list does not cover."""
    out = []
    for nodeid, message in skips:
        allowed = [a for pattern, a in ALLOWED_SKIPS.items() if fnmatch.fnmatchcase(nodeid, pattern)]
        if not allowed:
            out.append((nodeid, message, "not in tests/conftest.py ALLOWED_SKIPS"))
        elif ci and all(a.where == "outside_ci" for a in allowed):
            out.append((nodeid, message, "allowed to skip only outside CI"))
    return out


def _record(report: pytest.TestReport | pytest.CollectReport) -> None:
    if report.skipped:
        longrepr = report.longrepr
        message = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
        _SKIPS.append((report.nodeid, message.removeprefix("Skipped: ")))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _record(report)


def pytest_collectreport(report: pytest.CollectReport) -> None:
    _record(report)  # a whole module skipped at import (pytest.importorskip, allow_module_level)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    ok = (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED)  # the latter: every module skipped at import
    if unlisted_skips(_SKIPS, in_ci()) and session.exitstatus in ok:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    bad = unlisted_skips(_SKIPS, in_ci())
    if bad:
        terminalreporter.section("skips that fail the session", sep="=", red=True)
        for nodeid, message, why in bad:
            terminalreporter.line(f"SKIPPED {nodeid}: {message} ({why})", red=True)


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
