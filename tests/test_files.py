"""common.files.atomic_write: the one way files are written for other tools to read."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import pytest

from common.files import atomic_write, atomic_write_text


def test_a_failed_write_leaves_the_old_file_whole_and_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "table.csv"
    atomic_write_text(path, "a,b\n1,2\n")

    def dies_half_way(tmp: Path) -> None:
        tmp.write_text("a,b\n3")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(path, dies_half_way)
    assert path.read_text() == "a,b\n1,2\n"
    assert [p.name for p in path.parent.iterdir()] == ["table.csv"]
    atomic_write(path, lambda tmp: tmp.write_bytes(b"\x00\x01"), durable=True)
    assert path.read_bytes() == b"\x00\x01" and [p.name for p in path.parent.iterdir()] == ["table.csv"]


def _write_many(path: str, char: str) -> None:
    for _ in range(200):
        atomic_write_text(path, char * 100_000)


def test_concurrent_writers_never_leave_a_mixed_file(tmp_path: Path) -> None:
    """Two processes writing the same file: every read sees one writer's whole text (a shared temporary name
    would interleave them or fail the rename)."""
    path = tmp_path / "f.txt"
    atomic_write_text(path, "a" * 100_000)
    procs = [mp.get_context("spawn").Process(target=_write_many, args=(str(path), c)) for c in "xy"]
    for p in procs:
        p.start()
    seen = set()
    while any(p.is_alive() for p in procs):
        text = path.read_text()
        assert len(text) == 100_000 and len(set(text)) == 1
        seen.add(text[0])
    for p in procs:
        p.join()
        assert p.exitcode == 0
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
