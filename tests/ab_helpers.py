"""Shared pieces of the A/B study tests: system folders with secrets to leak, a loopback server, required tools.

Every image carries its system's name in a PNG text chunk, and folders and file names carry it too, so a blinding
test can look for those strings in everything an annotator receives.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from PIL import Image, ImageDraw
from PIL.PngImagePlugin import PngInfo

ROOT = Path(__file__).resolve().parents[1]
SYSTEMS = ("SYSALPHA", "SYSBETA")
PAIR_ID_PATTERN = r'name="pair" value="([^"]+)"'


def draw(kind: int, size: int = 64) -> Image.Image:
    """A small distinct picture (a shape and colour picked by ``kind``)."""
    img = Image.new("RGB", (size, size), (128, 128, 128))
    d = ImageDraw.Draw(img)
    color = [(220, 40, 40), (40, 160, 60), (40, 80, 220), (230, 200, 30)][kind % 4]
    box = (size // 5, size // 5, size - size // 5, size - size // 5)
    (d.ellipse if kind % 2 else d.rectangle)(box, fill=color)
    return img


def write_system(root: Path, system: str, n_prompts: int, n_seeds: int, layout: str = "geneval",
                 shift: int = 0, size: int = 64) -> Path:
    """A system folder ``root/<system>_outputs`` in the geneval or edit layout of ``size`` x ``size`` images; image
    file names and a PNG text chunk name the system. Prompts are ``"prompt number i"`` (edits: ``"make number i
    blue"``)."""
    folder = root / f"{system}_outputs"
    for i in range(n_prompts):
        sub = folder / f"{i:05d}"
        (sub / "samples").mkdir(parents=True, exist_ok=True)
        prompt = f"make number {i} blue" if layout == "edit" else f"prompt number {i}"
        (sub / "metadata.jsonl").write_text(json.dumps({"prompt": prompt}) + "\n")
        if layout == "edit":
            draw(i, size).save(sub / "source.png")
        for k in range(n_seeds):
            info = PngInfo()
            info.add_text("generator", f"{system} from {folder}")
            draw(i + k + shift, size).save(sub / "samples" / f"{k:05d}.png", pnginfo=info)
    return folder


@contextmanager
def running_app(db: str) -> Iterator[str]:
    """The study app on a free loopback port, in a thread, until the block ends; yields its base URL."""
    import uvicorn

    from evals.ab.web import create_app

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(db), log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(400):  # bounded wait for startup
        if server.started:
            break
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def require(paths: list[str], what: str, install: str) -> str:
    """The first existing path (or PATH name) of a required external tool. Without it the test skips with the
    install command; tests/conftest.py ALLOWED_SKIPS lets that happen only outside CI (``.ci/run`` installs it)."""
    for p in paths:
        found = shutil.which(p) if "/" not in p else (p if os.path.exists(p) else None)
        if found:
            return found
    message = f"{what} not found ({', '.join(paths)}); install with: {install}"
    pytest.skip(message)


def postgres_bin(name: str) -> list[str]:
    """Candidate paths of a PostgreSQL server program (Debian keeps them off PATH)."""
    return sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True) + [name]
