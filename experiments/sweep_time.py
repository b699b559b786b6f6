"""``results/<EXP>/sweep_time.txt``: one line per sweep invocation -- date, wall seconds, runs started, runs found
done, failures, cluster -- appended by the launcher and read back by the results page and ``make bench``."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from common.files import atomic_write_text


def log_sweep_time(path: Path, wall: float, ran: int, skipped: int, failed: int, cluster: str) -> None:
    """Append one line per sweep invocation to ``sweep_time.txt`` (a partial re-run adds its line instead of
    replacing the full sweep's): UTC date, wall seconds, runs started, runs found done, runs failed, cluster."""
    from datetime import datetime, timezone

    date = datetime.now(timezone.utc).isoformat(timespec="seconds")
    line = (f"{date}  {wall:.1f} s for {ran} runs ({cluster}; {skipped} already done"
            + (f", {failed} failed" if failed else "") + ")\n")
    old = path.read_text() if path.is_file() else ""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, old + ("" if not old or old.endswith("\n") else "\n") + line)


SWEEP_TIME_LINE = re.compile(r"^(?:(?P<date>\S+T\S+)\s+)?(?P<wall>[\d.]+) s for (?P<ran>\d+) runs \((?P<cluster>\w+)"
                             r"(?:; (?P<skipped>\d+) already done)?(?:, (?P<failed>\d+) failed)?\)$")


def read_sweep_times(path: Path) -> pd.DataFrame:
    """``sweep_time.txt`` as a table, one row per invocation in file order: ``date`` (None on lines written before
    dates were), ``wall`` seconds, runs ``ran``, ``skipped`` (already done), ``failed``, ``cluster``. A line that is
    not in the format ``log_sweep_time`` writes raises ValueError naming it."""
    rows = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        m = SWEEP_TIME_LINE.match(line.strip())
        if m is None:
            raise ValueError(f"{path}:{n}: not a sweep-time line: {line!r}")
        rows.append({"date": m["date"], "wall": float(m["wall"]), "ran": int(m["ran"]),
                     "skipped": int(m["skipped"] or 0), "failed": int(m["failed"] or 0), "cluster": m["cluster"]})
    return pd.DataFrame(rows, columns=["date", "wall", "ran", "skipped", "failed", "cluster"])


def full_sweep_time(path: Path) -> tuple[float, int] | None:
    """(wall seconds, runs) of the last invocation that trained every run itself (none already done, none
    failed): the whole sweep's time; None when no such line exists. Lines written before dates were do not say
    how many runs were already done, so they never count."""
    if not Path(path).is_file():
        return None
    t = read_sweep_times(path)
    full = t[t.date.notna() & (t.skipped == 0) & (t.failed == 0)]
    return (float(full.wall.iloc[-1]), int(full.ran.iloc[-1])) if len(full) else None
