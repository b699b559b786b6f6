"""Benchmark folders -> study items: which image of a system answers which prompt and seed.

Layouts (the folders the benchmarks in ``evals`` write):
- ``geneval``: ``DIR/<NNNNN>/metadata.jsonl`` (one JSON object with ``prompt``) + ``DIR/<NNNNN>/samples/<k>.png``;
  one item per prompt folder x sample ``k`` (the seed).
- ``genai``: ``DIR/<NNNNN>.png|jpg|jpeg`` (one image per prompt); prompts from ``--prompts`` or GenAI-Bench's
  shipped ``evals/data/genai_bench/genai_image.json``.
- ``dpg``: ``DIR/<item_id>.png`` (the 2x2 grid of four seeds, compared as one image) or
  ``DIR/<item_id>/<k>.png``; prompts from ``--prompts`` (JSONL ``{"item_id", "prompt"}``) or the shipped
  ``evals/data/dpg_bench/prompts.jsonl``.
- ``edit``: ``DIR/<item>/metadata.jsonl`` (``prompt`` = the edit instruction) + ``DIR/<item>/source.png`` + ``DIR/
  <item>/samples/<k>.png``; the source image is shown beside the two edits and must be the same file content in
  both systems' folders where both have one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

LAYOUTS: tuple[str, ...] = ("geneval", "dpg", "genai", "edit")
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp")
DATA = Path(__file__).resolve().parents[1] / "data"
DEFAULT_PROMPTS = {"genai": DATA / "genai_bench" / "genai_image.json", "dpg": DATA / "dpg_bench" / "prompts.jsonl"}


class LayoutError(ValueError):
    """A folder does not hold what its layout promises (message names the path)."""


@dataclass(frozen=True)
class Item:
    """One image of one system: ``prompt_key`` identifies the prompt (the bootstrap unit), ``item_key`` the prompt
    and seed (what is paired across systems)."""

    prompt_key: str
    item_key: str
    prompt: str
    image: Path
    source: Path | None = None


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _metadata_prompt(path: Path) -> str:
    if not path.is_file():
        raise LayoutError(f"missing {path}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8").splitlines()[0])
        return str(meta["prompt"])
    except (IndexError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise LayoutError(f"{path}: first line must be a JSON object with 'prompt' ({err})") from err


def load_prompts(layout: str, prompts_file: Path | None) -> dict[str, str]:
    """{prompt key: prompt} for layouts whose folders hold images only (``genai``, ``dpg``)."""
    path = Path(prompts_file) if prompts_file else DEFAULT_PROMPTS[layout]
    if not path.is_file():
        raise LayoutError(f"prompts file not found: {path}")
    if path.suffix == ".json":  # GenAI-Bench's genai_image.json: {"00000": {"prompt": ...}, ...}
        return {str(k): str(v["prompt"]) for k, v in json.loads(path.read_text(encoding="utf-8")).items()}
    out = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
                out[str(row.get("item_id", row.get("id")))] = str(row["prompt"])
            except (json.JSONDecodeError, KeyError, AttributeError) as err:
                raise LayoutError(f"{path}:{n}: expected {{'item_id', 'prompt'}} ({err})") from err
    return out


def read_folder(folder: str | Path, layout: str, prompts_file: Path | None = None) -> dict[str, Item]:
    """{item_key: Item} of one system's folder in ``layout``."""
    root = Path(folder)
    if layout not in LAYOUTS:
        raise LayoutError(f"unknown layout {layout!r}; valid: {', '.join(LAYOUTS)}")
    if not root.is_dir():
        raise LayoutError(f"not a folder: {root}")
    items: dict[str, Item] = {}
    if layout in ("geneval", "edit"):
        for sub in sorted(p for p in root.iterdir() if p.is_dir()):
            prompt = _metadata_prompt(sub / "metadata.jsonl")
            source = None
            if layout == "edit":
                source = sub / "source.png"
                if not source.is_file():
                    raise LayoutError(f"missing source image {source}")
            samples = sub / "samples"
            if not samples.is_dir() or not _images(samples):
                raise LayoutError(f"no images in {samples}")
            for img in _images(samples):
                key = f"{sub.name}/{img.stem}"
                items[key] = Item(sub.name, key, prompt, img.resolve(), source.resolve() if source else None)
    else:
        prompts = load_prompts(layout, prompts_file)
        files = [(p.stem, p.stem, p) for p in _images(root)]
        if layout == "dpg":  # DPG's per-seed form: <item_id>/<k>.png
            files += [(sub.name, f"{sub.name}/{p.stem}", p) for sub in sorted(root.iterdir()) if sub.is_dir()
                      for p in _images(sub)]
        for prompt_key, key, path in files:
            lookup = prompt_key if prompt_key in prompts else str(int(prompt_key)) if prompt_key.isdigit() else None
            if lookup not in prompts:
                raise LayoutError(f"{path}: no prompt with id {prompt_key!r} in the prompts file")
            items[key] = Item(prompt_key, key, prompts[lookup], path.resolve())
    if not items:
        raise LayoutError(f"no images found in {root} (layout {layout})")
    return items


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pair_items(a: dict[str, Item], b: dict[str, Item], name_a: str, name_b: str) -> list[tuple[Item, Item]]:
    """[(A's item, B's item)] for every prompt and seed, sorted by key. Both systems must cover the same keys with
    the same prompt (and, for edits, the same source image); any mismatch is an error naming examples."""
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if only_a or only_b:
        raise LayoutError(f"the two systems do not cover the same prompts and seeds: {len(only_a)} only in "
                          f"{name_a} (e.g. {only_a[:3]}), {len(only_b)} only in {name_b} (e.g. {only_b[:3]})")
    pairs = []
    for key in sorted(a):
        ia, ib = a[key], b[key]
        if ia.prompt != ib.prompt:
            raise LayoutError(f"{key}: prompts differ between {name_a} ({ia.prompt!r}) and {name_b} ({ib.prompt!r})")
        if ia.source and ib.source and ia.source != ib.source and _digest(ia.source) != _digest(ib.source):
            raise LayoutError(f"{key}: source images differ between {ia.source} and {ib.source}")
        pairs.append((ia, ib))
    return pairs
