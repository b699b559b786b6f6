"""Benchmark image folders: any generator's images written in each benchmark's official layout.

A generator is ``fn(prompts: list[str], seeds: list[int]) -> images`` (one image per prompt/seed; PIL images or
uint8 (H, W, 3) arrays). Layouts (``write_folder``):

- ``geneval``: ``<out>/<NNNNN>/metadata.jsonl`` (the prompt's ONE metadata object) + ``samples/<k:05d>.png``;
  image k of prompt i uses seed ``seed + 1000 i + k`` (default seed 0).
- ``dpg``: ``<out>/<item_id>.png``, a 2x2 grid of 4 samples (image k at tile TL, TR, BL, BR for k = 0..3, the
  official crop order), built from the per-seed files ``<out>/samples/<item_id>/<k>.png``; image k of the i-th
  item uses seed ``seed + 1000 i + k`` (default 0).
- ``genai``: ``<out>/<index:05d>.png``, one image per prompt, seed ``seed + index`` (default 42, as the official
  ``generate.py``).

Every image is generated from its own seed, so a folder does not depend on the batch size or on how the work is
split. Resumable: finished files are kept, and every file is written atomically (a private temporary file renamed
into place), so a killed run never leaves a truncated image. Sharded: ``rank`` / ``world`` (torchrun's ``RANK`` /
``WORLD_SIZE`` by default) give each process every ``world``-th prompt; the union of the shares is the one-process
folder. ``<out>/generation.json`` records what made the folder (generator, seed, samples, prompt list); writing
into a folder made otherwise is refused, so two generators never mix in one folder.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from common.files import atomic_write, atomic_write_text
from models.checkpoints import load_module

GenerateFn = Callable[[list[str], list[int]], Sequence[Any]]
BENCHMARKS: tuple[str, ...] = ("geneval", "dpg", "genai")
DEFAULT_SEEDS: dict[str, int] = {"geneval": 0, "dpg": 0, "genai": 42}
SEED_STRIDE = 1000  # seed of image k of prompt i = seed + SEED_STRIDE * i + k (geneval, dpg)
MANIFEST = "generation.json"


# ------------------------------------------------------------------------------------------------ checkpoints
def module_generator(module: Any, **kwargs: Any) -> GenerateFn:
    """A harness module as a generator (``kwargs`` go to ``UniFusionModule.generate``, e.g. ``layer_dropout``)."""
    return lambda prompts, seeds: list(module.generate(prompts, seeds, **kwargs))


def checkpoint_generator(ckpt: str | Path, device: str | None = "auto") -> GenerateFn:
    """A harness checkpoint as a generator, loaded on ``device`` (``auto``: ``evals.runtime.pick_device``)."""
    from evals.runtime import pick_device

    return module_generator(load_module(ckpt, pick_device(device)))


# ------------------------------------------------------------------------------------------------ files
def to_rgb_array(image: Any, where: str = "generator") -> np.ndarray:
    """A PIL image or an (H, W, 3) uint8 array -> (H, W, 3) uint8; anything else raises naming ``where``."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"{where} must return PIL images or uint8 (H, W, 3) arrays, got "
                         f"{type(image).__name__} {getattr(array, 'dtype', '')} {getattr(array, 'shape', '')}")
    return array


def save_png(image: Any, path: str | Path) -> Path:
    """Atomic PNG write: a temporary file private to this process, then a rename."""
    array = to_rgb_array(image)
    return atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))


def grid_2x2(tiles: Sequence[np.ndarray]) -> np.ndarray:
    """Four (S, S, 3) tiles -> (2S, 2S, 3): tiles 0..3 at TL, TR, BL, BR (DPG-Bench's crop order)."""
    if len(tiles) != 4 or len({t.shape for t in tiles}) != 1:
        raise ValueError(f"a 2x2 grid needs 4 tiles of one size, got {[t.shape for t in tiles]}")
    tl, tr, bl, br = tiles
    return np.concatenate([np.concatenate([tl, tr], axis=1), np.concatenate([bl, br], axis=1)], axis=0)


def contact_sheet(images: Sequence[np.ndarray], cols: int = 8, pad: int = 2, fill: int = 255) -> np.ndarray:
    """Images (H, W, 3) of one size in a grid of ``cols`` columns with ``pad`` pixels between them; (R, C, 3)."""
    if not images:
        raise ValueError("contact_sheet needs at least one image")
    h, w, _ = images[0].shape
    cols = min(cols, len(images))
    rows = -(-len(images) // cols)
    sheet = np.full((rows * h + (rows - 1) * pad, cols * w + (cols - 1) * pad, 3), fill, dtype=np.uint8)
    for n, im in enumerate(images):
        r, c = divmod(n, cols)
        sheet[r * (h + pad): r * (h + pad) + h, c * (w + pad): c * (w + pad) + w] = im
    return sheet


# ------------------------------------------------------------------------------------------------ sharding
def launch_share() -> tuple[int, int]:
    """(rank, world size) from torchrun's ``RANK`` / ``WORLD_SIZE`` (0, 1 outside torchrun)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is not in [0, WORLD_SIZE={world})")
    return rank, world


# ------------------------------------------------------------------------------------------------ layouts
@dataclass
class Unit:
    """One prompt's share of a folder: its images (path + seed each) and the files written once they all exist."""

    prompt: str
    paths: list[Path]
    seeds: list[int]
    finish: Callable[[], None] | None = None  # e.g. assemble the DPG grid
    final: list[Path] = field(default_factory=list)  # files that mark the unit complete

    def complete(self) -> bool:
        return all(p.is_file() for p in self.final or self.paths)


@dataclass
class Stats:
    """What one call wrote: images generated, images kept from an earlier run, prompts in this process's share."""

    generated: int = 0
    kept: int = 0
    prompts: int = 0


def _check_n_samples(n_samples: int) -> None:
    if not 1 <= n_samples < SEED_STRIDE:
        raise ValueError(f"--n-samples must be in 1..{SEED_STRIDE - 1} (seeds are seed + {SEED_STRIDE} i + k), "
                         f"got {n_samples}")


def geneval_units(metadata: Sequence[dict], out: Path, n_samples: int, seed: int) -> list[Unit]:
    """One unit per metadata object; an existing ``metadata.jsonl`` that holds another prompt raises."""
    _check_n_samples(n_samples)
    units = []
    for i, meta in enumerate(metadata):
        folder = out / f"{i:05d}"
        meta_path = folder / "metadata.jsonl"
        if meta_path.is_file():
            try:
                old = json.loads(meta_path.read_text())
            except json.JSONDecodeError:
                old = None
            if old != meta:
                raise ValueError(f"{meta_path} holds another prompt than prompt {i} of this run "
                                 f"({meta['prompt']!r}): write into a new --out")
        paths = [folder / "samples" / f"{k:05d}.png" for k in range(n_samples)]

        def finish(meta_path: Path = meta_path, meta: dict = meta) -> None:
            if not meta_path.is_file():
                atomic_write_text(meta_path, json.dumps(meta))

        units.append(Unit(meta["prompt"], paths, [seed + SEED_STRIDE * i + k for k in range(n_samples)], finish,
                          final=[*paths, meta_path]))
    return units


def check_item_ids(ids: Sequence[str]) -> None:
    if len(set(ids)) != len(ids):
        raise ValueError("item_ids must be unique")
    bad = [i for i in ids if not i or "." in i or "/" in i]
    if bad:
        raise ValueError(f"item_ids must be non-empty file stems without '.' or '/', got {bad[:3]}")


def dpg_units(items: Sequence[tuple[str, str]], out: Path, n_samples: int, seed: int) -> list[Unit]:
    """One unit per (item_id, prompt): 4 per-seed files under ``samples/<item_id>/``, then the grid."""
    if n_samples != 4:
        raise ValueError(f"the DPG-Bench layout is a 2x2 grid, so --n-samples must be 4, got {n_samples}")
    check_item_ids([item_id for item_id, _ in items])
    units = []
    for i, (item_id, text) in enumerate(items):
        paths = [out / "samples" / item_id / f"{k}.png" for k in range(n_samples)]
        grid = out / f"{item_id}.png"

        def finish(paths: list[Path] = paths, grid: Path = grid) -> None:
            if not grid.is_file():
                save_png(grid_2x2([np.asarray(Image.open(p).convert("RGB")) for p in paths]), grid)

        units.append(Unit(text, paths, [seed + SEED_STRIDE * i + k for k in range(n_samples)], finish,
                          final=[grid]))
    return units


def genai_units(prompts: dict[int, str], out: Path, n_samples: int, seed: int) -> list[Unit]:
    """One unit per prompt index: ``<index:05d>.png`` with seed ``seed + index``."""
    if n_samples != 1:
        raise ValueError(f"the GenAI-Bench layout holds one image per prompt, so --n-samples must be 1, got "
                         f"{n_samples}")
    return [Unit(prompts[i], [out / f"{i:05d}.png"], [seed + i]) for i in sorted(prompts)]


def prompts_digest(prompts: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(prompts)).encode()).hexdigest()[:16]


def check_manifest(out: Path, manifest: dict[str, Any]) -> None:
    """Refuse a folder that another generator / seed / prompt list made; write the manifest when it is new."""
    path = out / MANIFEST
    if path.is_file():
        old = json.loads(path.read_text())
        diff = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
        if diff:
            was = ", ".join(f"{k}: {old.get(k)!r}" for k in diff)
            now = ", ".join(f"{k}: {manifest.get(k)!r}" for k in diff)
            raise ValueError(f"{out} was generated with other settings ({was}; now {now}): write into a new --out")
    else:
        atomic_write_text(path, json.dumps(manifest, indent=1) + "\n")


def run_units(units: Sequence[Unit], generate: GenerateFn, batch_size: int = 16, rank: int | None = None,
              world: int | None = None, progress: bool = True, where: str = "generator") -> Stats:
    """Generate every missing image of this process's share of ``units`` (``units[rank::world]``), batching
    images of different prompts together, and finish each unit as soon as its images exist."""
    if rank is None or world is None:
        rank, world = launch_share()
    mine = list(units)[rank::world]
    stats = Stats(prompts=len(mine))
    todo: list[tuple[int, int]] = []  # (unit, sample)
    left: dict[int, int] = {}
    for u, unit in enumerate(mine):
        if unit.complete():
            stats.kept += len(unit.paths)
            continue
        missing = [k for k, p in enumerate(unit.paths) if not p.is_file()]
        stats.kept += len(unit.paths) - len(missing)
        if not missing and unit.finish:
            unit.finish()
        todo += [(u, k) for k in missing]
        left[u] = len(missing)
    label = f"generating (rank {rank}/{world})" if world > 1 else "generating"
    for start in tqdm(range(0, len(todo), batch_size), desc=label, disable=not progress or not todo, unit="batch"):
        chunk = todo[start: start + batch_size]
        images = generate([mine[u].prompt for u, _ in chunk], [mine[u].seeds[k] for u, k in chunk])
        if not isinstance(images, Sequence) or isinstance(images, (str, bytes)):
            # a generator that forgot its `return` gives None: name it instead of failing inside len()
            raise ValueError(f"{where} returned {type(images).__name__} for {len(chunk)} prompts; it must return "
                             "a list of images (PIL images or uint8 (H, W, 3) arrays), one per (prompt, seed)")
        if len(images) != len(chunk):
            raise ValueError(f"{where} returned {len(images)} images for {len(chunk)} prompts")
        for (u, k), image in zip(chunk, images, strict=True):
            save_png(to_rgb_array(image, where), mine[u].paths[k])
            stats.generated += 1
            left[u] -= 1
            if left[u] == 0 and mine[u].finish:
                mine[u].finish()
    return stats


def write_folder(benchmark: str, generate: GenerateFn, prompts: Any, out_dir: str | Path, n_samples: int | None = None,
                 seed: int | None = None, batch_size: int = 16, generator: str | None = None,
                 rank: int | None = None, world: int | None = None, progress: bool = True,
                 generator_id: str | None = None) -> Stats:
    """Write ``benchmark``'s layout (module docstring) into ``out_dir``.

    ``prompts``: GenEval metadata objects (geneval), ``(item_id, text)`` pairs (dpg) or ``{index: text}`` (genai);
    ``generator``: a label of what makes the images; with it, ``generation.json`` guards the folder against
    mixing (``check_manifest``); ``generator_id``: the user's name for the generator, recorded there too (a
    folder written without one has none: it is only added when given, so such folders resume as before).
    """
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; valid: {', '.join(BENCHMARKS)}")
    out = Path(out_dir)
    n_samples = n_samples if n_samples is not None else (1 if benchmark == "genai" else 4)
    seed = DEFAULT_SEEDS[benchmark] if seed is None else seed
    make = {"geneval": geneval_units, "dpg": dpg_units, "genai": genai_units}[benchmark]
    units = make(prompts, out, n_samples, seed)
    if generator is not None:
        manifest = {"benchmark": benchmark, "generator": generator, "seed": seed, "n_samples": n_samples,
                    "prompts": len(units), "prompts_sha256": prompts_digest([u.prompt for u in units])}
        if generator_id is not None:
            manifest["generator_id"] = generator_id
        check_manifest(out, manifest)
    out.mkdir(parents=True, exist_ok=True)
    return run_units(units, generate, batch_size, rank, world, progress, where=generator or "generator")


# ------------------------------------------------------------------------------------------------ harness modules
def generate_geneval_folder(ckpt_path: Any, metadata: list[dict], out_dir: str | Path, n_samples: int = 4,
                            seed: int = 0, batch_size: int = 64, layer_dropout: list[int] | None = None) -> Path:
    """GenEval layout from a harness checkpoint or module (``layer_dropout``: LAP positions zeroed while sampling,
    paper Fig. 8). One process, resumable."""
    module = load_module(ckpt_path)
    write_folder("geneval", module_generator(module, layer_dropout=layer_dropout), metadata, out_dir, n_samples,
                 seed, batch_size, rank=0, world=1)
    return Path(out_dir)


def generate_genai_folder(ckpt_or_module: Any, prompts: dict[int, str], out_dir: str | Path, seed: int = 42,
                          batch_size: int = 32) -> Path:
    """GenAI-Bench layout from a harness checkpoint or module. One process, resumable."""
    write_folder("genai", module_generator(load_module(ckpt_or_module)), prompts, out_dir, 1, seed, batch_size,
                 rank=0, world=1)
    return Path(out_dir)


def generate_dpg_folder(ckpt_or_module: Any, items: list[tuple[str, str]], out_dir: str | Path, n_samples: int = 4,
                        seed: int = 0, batch_size: int = 64) -> Path:
    """DPG-Bench layout (2x2 grids) from a harness checkpoint or module. One process, resumable."""
    if n_samples != 4:
        raise ValueError(f"the DPG-Bench layout is a 2x2 grid, so n_samples must be 4, got {n_samples}")
    check_item_ids([item_id for item_id, _ in items])
    write_folder("dpg", module_generator(load_module(ckpt_or_module)), items, out_dir, n_samples, seed, batch_size,
                 rank=0, world=1)
    return Path(out_dir)
