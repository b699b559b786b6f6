"""GenEval: object-focused correctness of generated images, reimplemented without mmdet.

Rules reproduced from djghosh13/geneval ``evaluation/evaluate_images.py`` and ``summary_scores.py``:

- Detections per class: score ``> threshold`` (``counting_threshold`` for tag ``counting``), compared in float32
  as the official mmdet path does (its scores and boxes are float32 arrays; ``relative_position`` computes in
  float32 too), BEFORE the cut to the ``max_objects`` highest scores; then greedy same-class NMS, off by default
  (``max_overlap == 1``), IoU with the +1 pixel convention. Kept detections stay sorted by score, descending
  (ties keep the backend's order; numpy's ``argsort[::-1]`` in the original leaves tie order
  implementation-defined).
- Include clause: ``found = kept[class][:count]``; fails if fewer than ``count``. Colour (only if presence passed)
  classifies the top-``count`` objects only and needs ``count`` of the required colour. Position (only if the
  clause passed so far) needs the relation between every found object and every object of the target group; a
  failed target group gives "no target". Exclude clause: fails if ``len(kept[class]) >= count``.
- Summary: per-task accuracy over images; overall = unweighted mean of the task accuracies; "% correct prompts"
  = ``any()`` over a prompt's images, prompts keyed by their metadata JSON string (as ``groupby('metadata')``).

Deliberate differences: sample names must fully match ``\\d+\\.png`` (the original's ``re.match`` is a prefix
match); non-PNG or misnamed samples, non-digit folders and prompt folders without samples are COUNTED in
``summary["counts"]`` and reported on stderr instead of being skipped silently; a corrupt PNG raises (naming the
file) rather than being scored as wrong, so a broken generation run cannot pass for a bad model; a looping or
dangling symlink, a ``.png`` that is not a regular file (a FIFO) or whose bytes are not PNG raises naming it
(``check_entry``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from common.files import atomic_write_text, open_rgb
from common.geneval_spec import POSITION_THRESHOLD, RELATIONS, TASKS, relative_position
from common.stats import PairedResult, bootstrap_ci, hierarchical_ci, hierarchical_paired, seed_mean, seed_sd
from evals import outputs
from evals.detectors import Detection, DetectorBackend, get_detector

ROW_FIELDS: tuple[str, ...] = ("filename", "tag", "prompt", "correct", "reason", "metadata", "details")
_SAMPLE_NAME = re.compile(r"\d+\.png")

ColorFn = Callable[[list[Detection], str], list[str]]


# ------------------------------------------------------------------------------------------------ options


@dataclass(frozen=True)
class GenevalOptions:
    """The official ``--options`` that the rules read (defaults = GenEval's)."""

    threshold: float = 0.3
    counting_threshold: float = 0.9
    max_objects: int = 16
    max_overlap: float = 1.0  # NMS IoU; 1.0 = NMS off
    position_threshold: float = POSITION_THRESHOLD

    def __post_init__(self) -> None:
        if self.max_objects < 1:
            raise ValueError(f"max_objects must be >= 1, got {self.max_objects}")
        if not 0.0 < self.max_overlap <= 1.0:
            raise ValueError(f"max_overlap must be in (0, 1], got {self.max_overlap}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> GenevalOptions:
        """Options from ``{key: value}`` (values may be strings, as from ``--options key=value``)."""
        types = {f.name: f.type for f in fields(cls)}
        unknown = sorted(set(values) - set(types))
        if unknown:
            raise ValueError(f"unknown GenEval option(s) {unknown}; valid: {sorted(types)}")
        parsed = {}
        for key, value in values.items():
            try:
                parsed[key] = int(value) if types[key] == "int" else float(value)
            except (TypeError, ValueError) as err:
                raise ValueError(f"option {key}={value!r} is not a {types[key]}") from err
        return replace(cls(), **parsed)


def parse_options(pairs: Sequence[str]) -> dict[str, str]:
    """``["threshold=0.5", ...]`` -> ``{"threshold": "0.5"}``."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"option {pair!r} must look like key=value")
        out[key.strip()] = value.strip()
    return out


# ------------------------------------------------------------------------------------------------ geometry


def compute_iou(box_a: Sequence[float], box_b: Sequence[float]) -> float:
    """IoU of ``(x1, y1, x2, y2)`` boxes with GenEval's +1 pixel convention (inclusive integer bounds)."""

    def area(b: Sequence[float]) -> float:
        return max(b[2] - b[0] + 1, 0) * max(b[3] - b[1] + 1, 0)

    inter = area((max(box_a[0], box_b[0]), max(box_a[1], box_b[1]), min(box_a[2], box_b[2]), min(box_a[3], box_b[3])))
    union = area(box_a) + area(box_b) - inter
    return inter / union if union else 0.0


# ------------------------------------------------------------------------------------------------ rules


def select_detections(detections: Sequence[Detection], tag: str, options: GenevalOptions) -> list[Detection]:
    """One class's kept detections: score threshold, then top-``max_objects``, then optional NMS; best first."""
    # float32, as the official scorer compares mmdet's float32 scores with the threshold: a score of exactly
    # float32(0.3) (0.30000001 as a double) is not above 0.3 there, so it is dropped here too
    cut = np.float32(options.counting_threshold if tag == "counting" else options.threshold)
    ranked = sorted((d for d in detections if np.float32(d.score) > cut), key=lambda d: -d.score)
    ranked = ranked[: options.max_objects]
    kept: list[Detection] = []
    while ranked:
        best = ranked.pop(0)
        kept.append(best)
        if options.max_overlap < 1.0:
            ranked = [d for d in ranked if compute_iou(best.box, d.box) < options.max_overlap]
    return kept


def _group(detections: Mapping[str, Sequence[Detection]] | Sequence[Detection]) -> dict[str, list[Detection]]:
    if isinstance(detections, Mapping):
        return {cls: list(dets) for cls, dets in detections.items()}
    grouped: dict[str, list[Detection]] = {}
    for d in detections:
        grouped.setdefault(d.cls, []).append(d)
    return grouped


def _exact_colors(found: list[Detection], class_name: str) -> list[str]:
    if any(d.color is None for d in found):
        raise ValueError(f"detections of {class_name!r} carry no colour; pass classify_colors")
    return [d.color for d in found]


def evaluate_image(detections_by_class: Mapping[str, Sequence[Detection]] | Sequence[Detection],
                   metadata: Mapping[str, Any], options: GenevalOptions | None = None,
                   classify_colors: ColorFn | None = None) -> tuple[bool, str, dict[str, list[list[float]]]]:
    """Score one image against one GenEval metadata object.

    detections_by_class: RAW detections (class -> list, or a flat list), before thresholding; classify_colors:
    ``(found, class_name) -> colours`` for the top-``count`` objects (default: each Detection's ``color``).
    Returns ``(correct, reason, details)``: reason = newline-joined official failure messages ("" if correct),
    details = ``{class: [[x1, y1, x2, y2, score], ...]}`` of the kept detections.
    """
    options = options or GenevalOptions()
    classify_colors = classify_colors or _exact_colors
    tag = metadata["tag"]
    kept = {cls: sel for cls, dets in _group(detections_by_class).items()
            if (sel := select_detections(dets, tag, options))}
    correct, reasons = True, []
    matched: list[list[Detection] | None] = []
    for req in metadata["include"]:
        cls, count = req["class"], int(req["count"])
        found = kept.get(cls, [])[:count]
        ok = len(found) >= count
        if not ok:
            reasons.append(f"expected {cls}>={count}, found {len(found)}")
        else:
            if "color" in req:
                colors = classify_colors(found, cls)
                n_ok = colors.count(req["color"])
                if n_ok < count:
                    ok = False
                    seen = ", ".join(f"{colors.count(c)} {c}" for c in dict.fromkeys(colors))
                    reasons.append(f"expected {req['color']} {cls}>={count}, found {n_ok} {req['color']}; and {seen}")
            if "position" in req and ok:
                rel, target = req["position"][0], int(req["position"][1])
                if matched[target] is None:
                    ok = False
                    reasons.append(f"no target for {cls} to be {rel}")
                else:
                    for obj in found:
                        for tgt in matched[target]:
                            true_rels = relative_position(obj.box, tgt.box, options.position_threshold)
                            if rel not in true_rels:
                                ok = False
                                names = " and ".join(r for r in RELATIONS if r in true_rels)
                                reasons.append(f"expected {cls} {rel} target, found {names} target")
                                break
                        if not ok:
                            break
        correct = correct and ok
        matched.append(found if ok else None)
    for req in metadata.get("exclude", []):
        cls, count = req["class"], int(req["count"])
        if len(kept.get(cls, [])) >= count:
            correct = False
            reasons.append(f"expected {cls}<{count}, found {len(kept[cls])}")
    details = {cls: [d.row() for d in dets] for cls, dets in kept.items()}
    return correct, "\n".join(reasons), details


COMPONENTS: tuple[str, ...] = ("drawn", "shape", "color", "count", "position")


def component_outcomes(detections_by_class: Mapping[str, Sequence[Detection]] | Sequence[Detection],
                       metadata: Mapping[str, Any], options: GenevalOptions | None = None,
                       classify_colors: ColorFn | None = None) -> dict[str, bool | None]:
    """Where one image fails, beside GenEval's single correct/incorrect (not part of the official score).

    With the kept detections of ``evaluate_image`` (same thresholds):

    - ``drawn``: any object of any class is there (the image is not empty or shapeless);
    - ``shape``: given drawn, every class the prompt asks for has at least one object;
    - ``color`` (prompts with a colour): every asked colour appears on some object, whatever its class -- colour
      following on its own, which the class-and-colour rule of GenEval hides when shapes are wrong;
    - ``count`` (prompts asking for more than one object of a class): given shape, every class has its number
      (at least ``count``, and fewer than each ``exclude`` bound: exactly, for the counting task);
    - ``position`` (prompts with a relation): given shape, the official relation holds for the found objects.

    None where a component does not apply (or its condition failed); shares are taken over the images where it
    applies.
    """
    options = options or GenevalOptions()
    classify_colors = classify_colors or _exact_colors
    tag = metadata["tag"]
    kept = {cls: sel for cls, dets in _group(detections_by_class).items()
            if (sel := select_detections(dets, tag, options))}
    includes = list(metadata["include"])
    drawn = bool(kept)
    shape = all(kept.get(r["class"]) for r in includes) if drawn else None
    asked = {r["color"] for r in includes if "color" in r}
    color = None
    if asked:
        seen = {c for cls, found in kept.items() for c in classify_colors(found, cls)}
        color = asked <= seen
    count = None
    if shape and any(int(r["count"]) > 1 for r in includes):
        count = all(len(kept[r["class"]]) >= int(r["count"]) for r in includes) and not any(
            len(kept.get(r["class"], [])) >= int(r["count"]) for r in metadata.get("exclude", []))
    position = None
    if shape and any("position" in r for r in includes):
        position = True
        for r in includes:
            if "position" not in r:
                continue
            rel, target = r["position"][0], int(r["position"][1])
            tgt_req = includes[target]
            objs, tgts = kept[r["class"]][: int(r["count"])], kept[tgt_req["class"]][: int(tgt_req["count"])]
            if not all(rel in relative_position(o.box, t.box, options.position_threshold) for o in objs for t in tgts):
                position = False
    return {"drawn": drawn, "shape": shape, "color": color, "count": count, "position": position}


def component_shares(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Share of images passing each component, overall and per task, over the images where it applies.

    ``rows``: ``evaluate_folder`` rows (their ``components``). Returns columns ``task`` ("all" or a task),
    ``component``, ``value`` (share), ``n`` (images where it applies); components that never apply are left out.
    """
    recs = []
    for r in rows:
        comps = r.get("components")
        if comps is None:
            raise ValueError(f"row of {r.get('filename')} has no component outcomes: score its folder again")
        for c in COMPONENTS:
            if comps.get(c) is not None:
                recs.append({"task": r["tag"], "component": c, "ok": bool(comps[c])})
    df = pd.DataFrame(recs, columns=["task", "component", "ok"])
    both = pd.concat([df.assign(task="all"), df])
    out = both.groupby(["task", "component"], sort=False)["ok"].agg(value="mean", n="size").reset_index()
    order = {t: i for i, t in enumerate(("all", *TASKS))}
    out["_t"], out["_c"] = out["task"].map(order), out["component"].map(COMPONENTS.index)
    return out.sort_values(["_t", "_c"]).drop(columns=["_t", "_c"]).reset_index(drop=True)


# ------------------------------------------------------------------------------------------------ metadata


def validate_metadata(metadata: Any, where: str, classes: Sequence[str] | None = None,
                      colors: Sequence[str] | None = None) -> dict[str, Any]:
    """Check one GenEval metadata object; errors name ``where`` (a path) and the valid choices."""
    if not isinstance(metadata, dict):
        raise ValueError(f"{where}: metadata must be one JSON object, got {type(metadata).__name__}")
    missing = [k for k in ("tag", "prompt", "include") if k not in metadata]
    if missing:
        raise ValueError(f"{where}: metadata lacks key(s) {missing}")
    if metadata["tag"] not in TASKS:
        raise ValueError(f"{where}: unknown tag {metadata['tag']!r}; valid: {list(TASKS)}")
    include, exclude = metadata["include"], metadata.get("exclude", [])
    if not isinstance(include, list) or not include or not isinstance(exclude, list):
        raise ValueError(f"{where}: 'include' must be a non-empty list and 'exclude' a list")
    for i, req in enumerate(include + exclude):
        if not isinstance(req, dict) or "class" not in req or "count" not in req:
            raise ValueError(f"{where}: clause {req!r} needs 'class' and 'count'")
        if not isinstance(req["count"], int) or req["count"] < 1:
            raise ValueError(f"{where}: count must be an integer >= 1, got {req['count']!r}")
        if classes is not None and req["class"] not in classes:
            raise ValueError(f"{where}: class {req['class']!r} unknown to the detector; valid: {list(classes)}")
        if colors is not None and "color" in req and req["color"] not in colors:
            raise ValueError(f"{where}: colour {req['color']!r} unknown to the detector; valid: {list(colors)}")
        if "position" in req:
            pos = req["position"]
            if not (isinstance(pos, list) and len(pos) == 2 and pos[0] in RELATIONS and isinstance(pos[1], int)):
                raise ValueError(f"{where}: position must be [relation, target index] with relation in "
                                 f"{list(RELATIONS)}, got {pos!r}")
            if not 0 <= pos[1] < min(i, len(include)):
                raise ValueError(f"{where}: position target {pos[1]} must index an earlier include clause")
    return metadata


def read_results(path: str | Path) -> list[dict[str, Any]]:
    """The per-image rows of a ``results.jsonl`` (``evaluate_folder``'s output), one JSON object per line."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def load_metadata_file(path: str | Path, classes: Sequence[str] | None = None,
                       colors: Sequence[str] | None = None) -> dict[str, Any]:
    """A prompt folder's ``metadata.jsonl``: ONE JSON object (read whole, as GenEval's ``json.load``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing metadata.jsonl (GenEval layout: <dir>/<NNNNN>/metadata.jsonl)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not one JSON object ({err})") from err
    return validate_metadata(data, str(path), classes, colors)


def read_metadata_lines(path: str | Path) -> list[dict[str, Any]]:
    """An ``evaluation_metadata.jsonl`` prompt list: one metadata object per non-empty line."""
    path = Path(path)
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                out.append(validate_metadata(json.loads(line), f"{path}:{n}"))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not a JSON object ({err})") from err
    if not out:
        raise ValueError(f"{path}: no metadata lines")
    return out


# ------------------------------------------------------------------------------------------------ folders


def summarize(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Official aggregation: ``overall`` (unweighted task mean), ``tasks``, ``images`` and ``prompts`` (any())."""
    if not rows:
        raise ValueError("no rows to summarise")
    df = pd.DataFrame(list(rows))
    task_acc = df.groupby("tag", sort=False)["correct"].mean()
    tasks = {t: float(task_acc[t]) for t in TASKS if t in task_acc}
    return {
        "overall": float(np.mean(list(tasks.values()))),
        "tasks": tasks,
        "images": float(df["correct"].mean()),
        "prompts": float(df.groupby("metadata", sort=False)["correct"].any().mean()),
    }


def per_prompt_scores(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per prompt (keyed by metadata string, first-appearance order).

    Columns: ``metadata, tag, prompt, n_images, n_correct, correct`` (mean over the prompt's images).
    """
    df = pd.DataFrame(list(rows))
    out = df.groupby("metadata", sort=False).agg(tag=("tag", "first"), prompt=("prompt", "first"),
                                                 n_images=("correct", "size"), n_correct=("correct", "sum"))
    out["correct"] = out["n_correct"] / out["n_images"]
    return out.reset_index()


def prompt_table(prompts: pd.DataFrame) -> np.ndarray:
    """``per_prompt_scores`` rows -> (P, 3) float: task id (TASKS order), correct images, images; the unit the
    bootstrap resamples (one prompt with all its images) and ``overall_from_prompts`` reads."""
    task_id = prompts["tag"].map({t: i for i, t in enumerate(TASKS)}).to_numpy()
    return np.stack([task_id, prompts["n_correct"].to_numpy(), prompts["n_images"].to_numpy()], 1).astype(float)


def overall_from_prompts(table: np.ndarray) -> float:
    """table (P, 3): task id, correct images, images -> mean over tasks of (correct / images) within the task."""
    tasks = np.unique(table[:, 0])
    return float(np.mean([table[table[:, 0] == t, 1].sum() / table[table[:, 0] == t, 2].sum() for t in tasks]))


def seed_tables(per_prompt: pd.DataFrame, seeds: Sequence[int] | None = None,
                keys: Sequence[str] | None = None) -> tuple[np.ndarray, list[int], list[str]]:
    """One run's ``per_prompt_scores`` rows (with a ``seed`` column when it was trained with several training
    seeds; without one, a single seed) -> ``(tables (S, P, 3), seeds, prompt keys)``: ``prompt_table`` of each
    seed over the same prompts, matched by metadata.

    Defaults: every seed, and the first seed's prompts in file order. Every seed must hold every key (ValueError
    naming the first missing one): the two-level bootstrap pairs a prompt across seeds.
    """
    rows = per_prompt if "seed" in per_prompt else per_prompt.assign(seed=0)
    seeds = sorted(int(s) for s in rows["seed"].unique()) if seeds is None else [int(s) for s in seeds]
    if keys is None:
        keys = list(dict.fromkeys(rows.loc[rows["seed"] == seeds[0], "metadata"]))
    tables = []
    for s in seeds:
        by_key = rows[rows["seed"] == s].drop_duplicates("metadata").set_index("metadata")
        missing = [k for k in keys if k not in by_key.index]
        if missing:
            run = f"run {rows['run'].iloc[0]!r} " if "run" in rows and len(rows) else ""
            raise ValueError(f"{run}seed {s} has no per-prompt row for {missing[0]!r} (scored by another seed): every "
                             "training seed must score the same prompts")
        tables.append(prompt_table(by_key.loc[list(keys)]))
    return np.stack(tables), seeds, list(keys)


def task_accuracy(table: np.ndarray) -> float:
    """table (P, 3) of one task's prompts -> the mean over its prompts of each prompt's share of correct images."""
    return float(np.mean(table[:, 1] / table[:, 2]))


def _task_columns(tables: np.ndarray, task: str) -> np.ndarray:
    return tables[:, tables[0, :, 0] == TASKS.index(task)]


def overall_score(per_prompt: pd.DataFrame, n_resamples: int = 1000, seed: int = 0,
                  alpha: float = 0.05) -> tuple[float, float, float, float]:
    """(score, CI low, CI high, seed SD) of the overall: the mean over training seeds, two-level bootstrap over the
    seeds and the prompts (resampled within tasks), ``common.stats.hierarchical_ci``; SD NaN for one seed."""
    tables, _, _ = seed_tables(per_prompt)
    lo, hi = hierarchical_ci(tables, overall_from_prompts, n_resamples, seed, alpha, strata=tables[0, :, 0])
    return seed_mean(tables, overall_from_prompts), lo, hi, seed_sd(tables, overall_from_prompts)


def task_score(per_prompt: pd.DataFrame, task: str, n_resamples: int = 1000, seed: int = 0,
               alpha: float = 0.05) -> tuple[float, float, float, float] | None:
    """(score, CI low, CI high, seed SD) of one task's accuracy, as ``overall_score`` over that task's prompts;
    None when the task has no prompt."""
    tables, _, _ = seed_tables(per_prompt)
    sub = _task_columns(tables, task)
    if not sub.shape[1]:
        return None
    lo, hi = hierarchical_ci(sub, task_accuracy, n_resamples, seed, alpha)
    return seed_mean(sub, task_accuracy), lo, hi, seed_sd(sub, task_accuracy)


def task_ci(per_prompt: pd.DataFrame, task: str, n_resamples: int = 1000, seed: int = 0,
            alpha: float = 0.05) -> tuple[float | None, float | None]:
    """Percentile bootstrap CI of one task's accuracy over its prompts (each prompt's share of correct images),
    from ``per_prompt_scores`` rows; ``(None, None)`` when the task has no prompt."""
    score = task_score(per_prompt, task, n_resamples, seed, alpha)
    return (None, None) if score is None else score[1:3]


def paired_overall(a: pd.DataFrame, b: pd.DataFrame, n_resamples: int = 2000,
                   seed: int = 0) -> tuple[PairedResult, int, int] | None:
    """Paired two-level bootstrap of overall(a) - overall(b) (each the mean over its training seeds) over the
    training seeds and prompts both ``per_prompt_scores`` tables hold (a ``seed`` column, or one seed each),
    prompts matched by metadata and resampled within tasks: (result, shared prompts, shared seeds); None when they
    share none."""
    a = a if "seed" in a else a.assign(seed=0)
    b = b if "seed" in b else b.assign(seed=0)
    seeds = sorted(set(a["seed"].astype(int)) & set(b["seed"].astype(int)))
    if not seeds:
        return None
    have = [set(zip(t["seed"].astype(int), t["metadata"], strict=True)) for t in (a, b)]
    keys = [k for k in dict.fromkeys(a.loc[a["seed"] == seeds[0], "metadata"])
            if all((s, k) in h for h in have for s in seeds)]
    if not keys:
        return None
    ta, _, _ = seed_tables(a, seeds, keys)
    tb, _, _ = seed_tables(b, seeds, keys)
    result = hierarchical_paired(ta, tb, overall_from_prompts, n_resamples=n_resamples, seed=seed,
                                 strata=ta[0, :, 0])
    return result, len(keys), len(seeds)


def geneval_bootstrap(rows: Sequence[Mapping[str, Any]], n_resamples: int = 1000, seed: int = 0,
                      alpha: float = 0.05) -> tuple[float, float]:
    """Percentile bootstrap CI of the overall score: prompts (all their images together) resampled per task."""
    table = prompt_table(per_prompt_scores(rows))
    return bootstrap_ci(table, overall_from_prompts, n_resamples=n_resamples, seed=seed, alpha=alpha,
                        strata=table[:, 0])


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def check_entry(path: Path) -> None:
    """Refuse, naming it, what a GenEval folder must not hold in place of a prompt folder or a sample: a symlink
    that loops or points nowhere (it would otherwise look like no folder at all and be skipped), something that
    is not a regular file where a ``.png`` sample is expected (a FIFO would hang the reader; it is not opened),
    and a ``.png`` whose bytes are not PNG (a renamed JPEG: GenEval reads PNG only, and JPEG's compression would
    be scored as the model's)."""
    if path.is_symlink() and not path.exists():
        raise ValueError(f"{path} is a symlink that loops or points nowhere: fix or remove it")
    if path.suffix.lower() != ".png" or path.is_dir():
        return
    if not path.is_file():
        raise ValueError(f"{path} is not a regular file (a FIFO, socket or device?): GenEval samples are PNG files")
    with open(path, "rb") as fp:
        head = fp.read(len(PNG_SIGNATURE))
    if head != PNG_SIGNATURE:
        kind = "JPEG" if head.startswith(b"\xff\xd8\xff") else "not PNG"
        raise ValueError(f"{path} is named .png but its bytes are {kind}: GenEval reads PNG only; write PNG "
                         "samples (python -m evals.generate does)")


def evaluate_folder(images_dir: str | Path, detector: str | DetectorBackend = "shapes",
                    out_dir: str | Path | None = None, ci_resamples: int = 1000, ci_seed: int = 0,
                    progress: bool = False, **options: Any) -> tuple[list[dict], dict]:
    """Score a GenEval image folder (``<dir>/<NNNNN>/metadata.jsonl`` + ``samples/<k>.png``).

    ``options``: GenEval overrides (``threshold=0.5``, ...); ``progress``: a progress bar over the samples on
    stderr (the CLI shows it). Returns ``(rows, summary)``; with ``out_dir`` also
    writes ``results.jsonl`` (official per-image rows) and the ``evals.outputs`` contract: ``summary.json``,
    ``items.jsonl`` (one row per image, with its ``component_outcomes``), ``table.md``, ``judge.json``.
    """
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise FileNotFoundError(f"image folder not found: {images_dir}")
    opts = GenevalOptions.from_mapping(options)
    backend = get_detector(detector) if isinstance(detector, str) else detector
    counts = {"images": 0, "prompts": 0, "prompt_folders": 0, "prompts_without_samples": 0, "non_png_samples": 0,
              "misnamed_samples": 0, "non_digit_folders": 0}
    problems: list[str] = []
    rows: list[dict] = []
    # the bar's total: every candidate sample, counted before the detector runs (a listing, no image is read)
    total = sum(1 for sub in images_dir.iterdir() if sub.is_dir() and sub.name.isdigit()
                for p in ((sub / "samples").iterdir() if (sub / "samples").is_dir() else ())
                if _SAMPLE_NAME.fullmatch(p.name))
    bar = tqdm(total=total, desc=f"GenEval ({backend.name})", unit="img", disable=not progress or not total)
    for sub in sorted(images_dir.iterdir()):
        check_entry(sub)
        if not sub.is_dir():
            continue  # loose files beside the prompt folders (results, READMEs) are not GenEval input
        if not sub.name.isdigit():
            counts["non_digit_folders"] += 1
            problems.append(f"non-digit folder skipped: {sub}")
            continue
        counts["prompt_folders"] += 1
        meta = load_metadata_file(sub / "metadata.jsonl", backend.classes, backend.colors)
        samples_dir = sub / "samples"
        names = sorted(p.name for p in samples_dir.iterdir()) if samples_dir.is_dir() else []
        n_before = len(rows)
        for name in names:
            path = samples_dir / name
            if not name.lower().endswith(".png"):
                counts["non_png_samples"] += 1
                problems.append(f"non-PNG sample not scored (GenEval reads PNG only): {path}")
                continue
            if not _SAMPLE_NAME.fullmatch(name):
                counts["misnamed_samples"] += 1
                problems.append(f"sample name must match \\d+\\.png, not scored: {path}")
                continue
            check_entry(path)
            image = open_rgb(path, "PNG", exif_transpose=True)
            detections = backend.detect(image)
            colors = lambda found, cls, image=image: backend.classify_colors(image, found, cls)  # noqa: E731
            correct, reason, details = evaluate_image(detections, meta, opts, colors)
            rows.append({"filename": str(path), "tag": meta["tag"], "prompt": meta["prompt"], "correct": correct,
                         "reason": reason, "metadata": json.dumps(meta), "details": json.dumps(details),
                         "components": component_outcomes(detections, meta, opts, colors)})
            bar.update(1)
        if len(rows) == n_before:
            counts["prompts_without_samples"] += 1
            problems.append(f"prompt folder without PNG samples: {sub}")
    bar.close()
    for line in problems:
        print(f"geneval: {line}", file=sys.stderr)
    if not rows:
        raise ValueError(f"no PNG samples scored under {images_dir}; problems: {problems[:5]}")
    counts["images"] = len(rows)
    counts["prompts"] = int(pd.Series([r["metadata"] for r in rows]).nunique())
    # the contract's counts (evals.outputs): an image is scored whole or not at all, so none is partial
    counts.update(scored=len(rows), failed=counts["non_png_samples"] + counts["misnamed_samples"], partial=0)
    summary = summarize(rows)
    identity = getattr(backend, "identity", None) or {"judge": backend.name}
    lo, hi = geneval_bootstrap(rows, ci_resamples, ci_seed)
    per_prompt = per_prompt_scores(rows)
    breakdown = {t: outputs.score(acc, task_ci(per_prompt, t, ci_resamples, ci_seed),
                                  int((per_prompt["tag"] == t).sum())) for t, acc in summary["tasks"].items()}
    summary = {"benchmark": "geneval",
               "headline": {"name": "overall", **outputs.score(summary["overall"], (lo, hi), counts["prompts"])},
               "breakdown": breakdown, "judge": identity, "generator": outputs.generator_of(images_dir),
               "items_are": "images", **summary}
    summary["ci95"] = {"overall": [lo, hi]}
    parts = component_shares(rows)
    summary["components"] = {r.component: {"value": float(r.value), "n": int(r.n)}
                             for r in parts[parts.task == "all"].itertuples()}
    summary["counts"] = counts
    summary["problems"] = problems
    summary["options"] = asdict(opts)
    if out_dir is not None:
        out = Path(out_dir)
        # results.jsonl keeps GenEval's own row fields, the official per-image format
        official = [{k: v for k, v in r.items() if k != "components"} for r in rows]
        atomic_write_text(out / "results.jsonl", "".join(json.dumps(r) + "\n" for r in official))
        items = [{"filename": r["filename"], "tag": r["tag"], "prompt": r["prompt"], "correct": bool(r["correct"]),
                  "components": r["components"]} for r in rows]
        outputs.write_outputs(out, summary, items, detail=_detail_table(summary), retire=("components.jsonl",))
    return rows, summary


def missing_samples(images_dir: str | Path, n_prompts: int | None = None, n_samples: int | None = None) -> list[str]:
    """What a partly generated GenEval folder lacks, as paths relative to it: ``00003/`` for a missing prompt
    folder, ``00005/samples/00002.png`` for a missing sample.

    Expected: prompt folders ``0 .. n_prompts - 1`` (default: up to the highest one present) with samples
    ``0 .. n_samples - 1`` each (default: as many as the fullest prompt has), named as GenEval's generator names
    them (``<NNNNN>/samples/<k:05d>.png``).
    """
    images_dir = Path(images_dir)
    present: dict[int, set[int]] = {}
    for sub in images_dir.iterdir() if images_dir.is_dir() else []:
        if sub.is_dir() and sub.name.isdigit():
            names = [q.name for q in (sub / "samples").iterdir()] if (sub / "samples").is_dir() else []
            present[int(sub.name)] = {int(n[:-4]) for n in names if _SAMPLE_NAME.fullmatch(n)}
    if n_prompts is None:
        n_prompts = max(present, default=-1) + 1
    if n_samples is None:
        n_samples = max((max(ks) + 1 for ks in present.values() if ks), default=0)
    missing = []
    for i in range(n_prompts):
        if i not in present:
            missing.append(f"{i:05d}/")
            continue
        missing += [f"{i:05d}/samples/{k:05d}.png" for k in range(n_samples) if k not in present[i]]
    return missing


# ------------------------------------------------------------------------------------------------ CLI


def format_summary(summary: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> str:
    """Compact text table: one line per task, then overall with its CI, images and prompts."""
    df = pd.DataFrame(list(rows))
    lines = [f"GenEval [{summary['judge']['judge']}]: {summary['counts']['prompts']} prompts, "
             f"{summary['counts']['images']} images", f"{'task':<14} {'acc':>6}  correct/images"]
    for tag, acc in summary["tasks"].items():
        sub = df[df["tag"] == tag]
        lines.append(f"{tag:<14} {acc:>6.3f}  {int(sub['correct'].sum())}/{len(sub)}")
    lo, hi = summary["ci95"]["overall"]
    lines.append(f"{'overall':<14} {summary['overall']:>6.3f}  95% CI [{lo:.3f}, {hi:.3f}]")
    lines.append(f"% correct images {summary['images']:.3f} | % correct prompts {summary['prompts']:.3f}")
    if summary.get("components"):
        lines.append("where it fails (share of images where each applies): " + ", ".join(
            f"{c} {v['value']:.3f} (n={v['n']})" for c, v in summary["components"].items()))
    issues = {k: v for k, v in summary["counts"].items()
              if k not in ("images", "prompts", "prompt_folders", *outputs.COUNT_KEYS) and v}
    if issues:
        lines.append(f"problems: {issues}")
    return "\n".join(lines)


def _detail_table(summary: Mapping[str, Any]) -> str:
    """``table.md``'s GenEval part below the contract rows: shares of correct images / prompts and where images
    fail (not part of the official score)."""
    lines = ["| score | value |", "|---|---:|", f"| images | {outputs.fmt(summary['images'])} |",
             f"| prompts | {outputs.fmt(summary['prompts'])} |"]
    for c, v in summary.get("components", {}).items():
        lines.append(f"| components.{c} | {outputs.fmt(v['value'])} (n={v['n']}) |")
    return "\n".join(lines)


def check_folder(images_dir: str | Path, classes: Sequence[str] | None = None,
                 colors: Sequence[str] | None = None) -> int:
    """Before any model loads: ``images_dir`` is a GenEval folder whose metadata fits the judge's vocabulary and
    which holds PNG samples. Returns the number of prompt folders; raises naming what is wrong."""
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise FileNotFoundError(f"image folder not found: {images_dir}")
    for entry in sorted(images_dir.iterdir()):
        check_entry(entry)
    folders = [p for p in sorted(images_dir.iterdir()) if p.is_dir() and p.name.isdigit()]
    if not folders:
        loose = len([p for p in images_dir.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg")])
        raise ValueError(f"{images_dir} holds no GenEval prompt folders (<dir>/<NNNNN>/metadata.jsonl + "
                         f"samples/<k>.png){f', only {loose} loose images' if loose else ''}; write them with "
                         "python -m evals.generate --benchmark geneval")
    for sub in folders:
        load_metadata_file(sub / "metadata.jsonl", classes, colors)
        for sample in sorted((sub / "samples").iterdir()) if (sub / "samples").is_dir() else []:
            check_entry(sample)  # before any model loads: a FIFO, a broken link, a renamed JPEG
    if not any(_SAMPLE_NAME.fullmatch(p.name) for sub in folders for p in (sub / "samples").glob("*.png")):
        raise ValueError(f"no samples/<k>.png under the prompt folders of {images_dir}")
    return len(folders)


def build_detector(args: argparse.Namespace) -> DetectorBackend:
    """The ``--judge`` backend with the placement flags that apply to it."""
    from evals.runtime import pick_dtype

    if args.judge == "shapes":
        return get_detector("shapes")
    if args.judge == "mmdet":
        return get_detector("mmdet", checkpoint=args.judge_model, device=None if args.device == "auto" else args.device)
    dtype = None if args.dtype == "auto" else pick_dtype(args.dtype, "cpu")
    return get_detector(args.judge, model_id=args.judge_model, color_model=args.color_model, dtype=dtype,
                        device=args.device, device_map=args.device_map)


def parser() -> argparse.ArgumentParser:
    from evals import cli
    from evals.detectors import CLIP_ID, DETECTORS, MASK2FORMER_ID

    p = cli.Parser(prog="python -m evals.geneval", description=__doc__.split("\n\n")[0] + "\n\n"
                   "  python -m evals.geneval --images DIR --out OUT                  (DIR: <NNNNN>/metadata.jsonl + "
                   "samples/<k>.png, see python -m evals.generate)\n"
                   "  python -m evals.geneval --images DIR --judge shapes --out OUT   (the shapes world's exact judge)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", type=Path, help="a GenEval image folder")
    src.add_argument("--ckpt", type=Path, help="a checkpoint of this harness: generate OUT/images first, then score")
    cli.add_out(p, help="writes results.jsonl (GenEval's per-image rows), summary.json, items.jsonl, table.md and "
                        "judge.json here")
    cli.add_judge(p, sorted(DETECTORS), "hf-mask2former", url=False,
                  help="hf-mask2former: COCO Mask2Former (Swin-S) + CLIP colours through transformers; mmdet: "
                       "GenEval's own detector in its conda env; shapes: the shapes world's exact detector",
                  model_help=f"hf-mask2former: hub id or folder (default {MASK2FORMER_ID}); mmdet: the .pth "
                             "checkpoint (default $GENEVAL_MMDET_CHECKPOINT)")
    p.add_argument("--color-model", default=CLIP_ID, help="hf-mask2former: the CLIP model of the colour classifier")
    cli.add_placement(p)
    prompts = p.add_mutually_exclusive_group()
    prompts.add_argument(cli.PROMPT_FILE, dest="prompt_file", type=Path,
                         help="--ckpt: an evaluation_metadata.jsonl (with --images each prompt folder's own "
                              "metadata.jsonl is read)")
    prompts.add_argument("--n-per-task", type=cli.positive_int, help="--ckpt: a shapes-world prompt set, K per task")
    p.add_argument("--n-samples", type=cli.positive_int, default=4, help="--ckpt: images per prompt")
    cli.add_seed(p, 0, help="--ckpt: image k of prompt i uses seed + 1000 i + k; also the bootstrap's seed")
    cli.add_batch_size(p, 64, help="--ckpt: images per generation call")
    cli.add_n_resamples(p)
    p.add_argument("--allow-partial", action="store_true",
                   help="score a partly generated folder (missing prompt folders or samples) instead of failing")
    p.add_argument("--options", nargs="*", default=[], metavar="KEY=VALUE",
                   help=f"rule overrides; keys: {[f.name for f in fields(GenevalOptions)]}")
    cli.alias(p, "--detector", "--judge", choices=sorted(DETECTORS))
    cli.alias(p, "--metadata", cli.PROMPT_FILE, type=Path)
    cli.alias(p, "--ci-resamples", "--n-resamples", type=cli.positive_int)
    return p


def _main(argv: Sequence[str] | None = None) -> int:
    """``python -m evals.geneval --images DIR | --ckpt CKPT (--prompt-file FILE | --n-per-task K) --out OUT``."""
    from evals import cli
    from evals.detectors import detector_vocabulary

    p = parser()
    args = p.parse_args(argv)
    options = parse_options(args.options)
    GenevalOptions.from_mapping(options)  # fail before any generation
    classes, colors = detector_vocabulary(args.judge)
    if args.device_map is not None:
        from evals.runtime import check_device_map

        check_device_map(args.device_map)
    out = Path(args.out)
    images = args.images
    expected: dict[str, int | None] = {"n_prompts": None, "n_samples": None}
    if args.ckpt is not None:
        if args.prompt_file is not None and args.n_per_task is not None:
            raise ValueError(f"{cli.PROMPT_FILE} and --n-per-task are two prompt sets: pass one")
        if args.prompt_file is None and args.n_per_task is None:
            raise ValueError(f"--ckpt needs {cli.PROMPT_FILE} FILE or --n-per-task K")
        if args.n_per_task is not None and args.judge != "shapes":
            raise ValueError(f"--n-per-task writes shapes-world prompts, which only --judge shapes knows (not "
                             f"{args.judge!r})")
        if not args.ckpt.is_file():
            raise FileNotFoundError(f"checkpoint not found: {args.ckpt}")
        if args.prompt_file is not None:
            metadata = read_metadata_lines(args.prompt_file)
            for n, meta in enumerate(metadata, 1):
                validate_metadata(meta, f"{args.prompt_file}:{n}", classes, colors)
        else:
            from world.prompts import write_geneval_metadata

            metadata = write_geneval_metadata(out / "evaluation_metadata.jsonl", args.n_per_task, args.seed)
        from evals import images as layouts

        layouts.write_folder("geneval", layouts.checkpoint_generator(args.ckpt, args.device), metadata,
                             out / "images", args.n_samples, args.seed, args.batch_size,
                             generator=f"ckpt:{args.ckpt.resolve()}", rank=0, world=1)
        images = out / "images"
        expected = {"n_prompts": len(metadata), "n_samples": args.n_samples}
    elif args.prompt_file is not None or args.n_per_task is not None:
        raise ValueError(f"{cli.PROMPT_FILE} / --n-per-task only apply with --ckpt (with --images each prompt "
                         "folder's metadata.jsonl is read)")
    check_folder(images, classes, colors)
    missing = missing_samples(images, **expected)
    if missing and not args.allow_partial:
        shown = ", ".join(missing[:8]) + (f", ... ({len(missing)} in all)" if len(missing) > 8 else "")
        raise ValueError(f"{images} is partly generated; missing: {shown}. Finish the generation (python -m "
                         "evals.generate resumes it), or pass --allow-partial to score what is there")
    rows, summary = evaluate_folder(images, build_detector(args), out, ci_resamples=args.n_resamples,
                                    ci_seed=args.seed, progress=True, **options)
    print(format_summary(summary, rows))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from evals.cli import entry

    return entry(_main)(argv)


if __name__ == "__main__":
    sys.exit(main())
