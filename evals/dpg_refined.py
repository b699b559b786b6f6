"""Refined DPG-Bench (paper App. A.3.2): judge every tile with a VQA judge, then score with the fixed aggregation
and, side by side, an exact emulation of the official ELLA ``compute_dpg_bench.py`` ("legacy"): its aggregation,
not its judge (mPLUG-large), so legacy numbers from another judge do not reproduce published DPG-Bench tables.

Pipeline: questions CSV (official header) + an image folder -> ``OUT/judgments.jsonl`` (one row per (item_id,
image_index, proposition_id); the unit of resume) -> the ``evals.outputs`` files ``OUT/summary.json``,
``OUT/items.jsonl`` (one row per prompt), ``OUT/table.md``, ``OUT/judge.json``.

    python -m evals.dpg_refined --images DIR --prompt-file Q.csv --judge oracle|hf|openai --out OUT
    python -m evals.dpg_refined --ckpt CKPT --prompt-file Q.csv --judge ... --out OUT   (generates OUT/images first)
    python -m evals.dpg_refined aggregate --prompt-file Q.csv --judgments J.jsonl --out DIR

Score definitions (all in [0, 1]) are in ``aggregate`` (refined) and ``legacy_scores`` (official). Image layouts:
one ``<item_id>.<ext>`` 2x2 grid per prompt (tiles TL, TR, BL, BR = image 0..3, the official crop order) or
per-seed files ``<item_id>/<k>.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from common.files import atomic_write_text, open_rgb
from common.stats import bootstrap_ci
from evals.cache import (
    bytes_digest,
    check_cache_file,
    check_judge,
    confirm_revision,
    drop_stale,
    file_digest,
    fingerprint,
    identity_of,
    lock_folder,
)
from evals.judges import HF_PRESETS, JUDGE_MODES, OPENAI_DEFAULT, Judge, JudgeRequest, judge_identity, make_judge

CSV_COLUMNS: tuple[str, ...] = (
    "item_id", "text", "keywords", "proposition_id", "dependency", "category_broad", "category_detailed", "tuple",
    "question_natural_language",
)
L1_ORDER: tuple[str, ...] = ("entity", "attribute", "relation", "global", "other")
IMAGE_EXTS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
DEFAULT_PROMPTS = Path(__file__).parent / "data" / "dpg_bench" / "prompts.jsonl"
HF_DATASET = "Jialuo21/DPG-Bench"
JUDGMENTS = "judgments.jsonl"


# ----------------------------------------------------------------------------------------------------- questions
@dataclass(frozen=True)
class Question:
    """One CSV row. ``parents``: dependency ids without the root 0; ``l2`` = tuple text before "(" stripped
    (e.g. "entity - whole"); ``l1`` = l2 before the first "-" stripped; ``csv_index``: 0-based data-row index."""

    item_id: str
    proposition_id: int
    parents: tuple[int, ...]
    l2: str
    l1: str
    question: str
    csv_index: int
    row: dict[str, Any] = field(compare=False, repr=False)


def category_of(tuple_text: str) -> tuple[str, str]:
    """(L2, L1) names of a DSG ``tuple``: "attribute - color (cigar, brown)" -> ("attribute - color", "attribute")."""
    l2 = str(tuple_text).split("(")[0].strip()
    return l2, l2.split("-")[0].strip()


def _parse_dependency(text: str, where: str) -> tuple[int, ...]:
    try:
        ids = [int(d.strip()) for d in str(text).split(",")]
    except ValueError:
        raise ValueError(f"{where}: dependency must be comma-separated integers ('0' = none), got {text!r}") from None
    return tuple(i for i in ids if i != 0)


def questions_from_rows(rows: Iterable[dict[str, Any]], source: str = "questions") -> list[Question]:
    """Validated ``Question`` list in row order from dicts with the official columns."""
    out = []
    for i, row in enumerate(rows):
        where = f"{source} data row {i + 1} (item {row.get('item_id')!r})"
        try:
            pid = int(str(row["proposition_id"]).strip())
        except ValueError:
            raise ValueError(f"{where}: proposition_id must be an integer, got {row['proposition_id']!r}") from None
        l2, l1 = category_of(row["tuple"])
        out.append(Question(str(row["item_id"]).strip(), pid, _parse_dependency(row["dependency"], where), l2, l1,
                            str(row["question_natural_language"]), i, dict(row)))
    return out


def load_questions(path: str | Path) -> list[Question]:
    """Read a DPG-Bench questions CSV (official header ``CSV_COLUMNS``; extra columns are kept in ``row``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"questions CSV not found: {path}")
    with open(path, newline="", encoding="utf-8") as fp:
        reader = csv.DictReader(fp)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in CSV_COLUMNS if c not in header]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; a DPG-Bench CSV needs {list(CSV_COLUMNS)}")
        reader.fieldnames = header
        rows = list(reader)
    if not rows:
        raise ValueError(f"{path}: no question rows")
    return questions_from_rows(rows, str(path))


def load_questions_hf(prompts_path: str | Path = DEFAULT_PROMPTS) -> list[Question]:
    """Questions from the HF dataset ``Jialuo21/DPG-Bench`` (online only). The dataset has no ``tuple`` column, so
    it is rebuilt as "<broad> - <detailed>" (the category name the official script reads from it)."""
    try:
        import datasets
    except ImportError:
        raise ValueError("no --prompt-file given and the `datasets` package is not installed; pass --prompt-file "
                         "dpg_bench.csv (official format) or install `datasets` and run online") from None
    texts = {}
    if Path(prompts_path).is_file():
        with open(prompts_path, encoding="utf-8") as fp:
            texts = {d["item_id"]: d["prompt"] for d in map(json.loads, fp)}
    try:
        dataset = datasets.load_dataset(HF_DATASET, split="train")
    except Exception as err:  # offline, a firewall, a moved dataset: all end in the same advice
        raise ValueError(f"could not load the DPG-Bench questions from the hub ({HF_DATASET}: "
                         f"{type(err).__name__}); pass --prompt-file dpg_bench.csv (the official CSV)") from None
    rows = []
    for ex in dataset:
        for q in ex["questions"]:
            broad, detailed = q["category_broad"], q["category_detailed"] or ""
            rows.append({"item_id": ex["item_id"], "text": texts.get(ex["item_id"], ex.get("prompt", "")),
                         "keywords": "", "proposition_id": q["proposition_id"], "dependency": q["dependency"],
                         "category_broad": broad, "category_detailed": detailed, "tuple": f"{broad} - {detailed}",
                         "question_natural_language": q["question"]})
    return questions_from_rows(rows, HF_DATASET)


def item_prompts(questions: Sequence[Question]) -> list[tuple[str, str]]:
    """(item_id, prompt text) per item, in first-appearance order; the prompt is the CSV's ``text`` column."""
    seen: dict[str, str] = {}
    for q in questions:
        text = str(q.row.get("text", "")).strip()
        if not text:
            raise ValueError(f"item {q.item_id!r} has an empty 'text' column: nothing to generate from")
        seen.setdefault(q.item_id, text)
    return list(seen.items())


def group_items(questions: Sequence[Question]) -> dict[str, list[Question]]:
    """Questions per item_id (first-appearance order; rows need not be contiguous). Raises on a duplicate
    proposition id, a parent that is not in the item, or a dependency cycle."""
    items: dict[str, list[Question]] = {}
    for q in questions:
        items.setdefault(q.item_id, []).append(q)
    for item_id, qs in items.items():
        ids = [q.proposition_id for q in qs]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"item {item_id!r}: duplicate proposition_id(s) {dup}")
        for q in qs:
            bad = [p for p in q.parents if p not in ids]
            if bad:
                raise ValueError(f"item {item_id!r} proposition {q.proposition_id}: parent(s) {bad} are not "
                                 f"propositions of the item (valid: {sorted(ids)} or 0 = none)")
        dependency_order(qs)
    return items


def dependency_order(qs: Sequence[Question]) -> list[Question]:
    """Parents before children (stable w.r.t. the given order otherwise); raises on a cycle."""
    by_id = {q.proposition_id: q for q in qs}
    state: dict[int, int] = {}  # 1 = on the stack, 2 = done
    order: list[Question] = []

    def visit(pid: int, path: list[int]) -> None:
        if state.get(pid) == 2:
            return
        if state.get(pid) == 1:
            raise ValueError(f"item {qs[0].item_id!r}: dependency cycle {path + [pid]}")
        state[pid] = 1
        for parent in by_id[pid].parents:
            visit(parent, path + [pid])
        state[pid] = 2
        order.append(by_id[pid])

    for q in qs:
        visit(q.proposition_id, [])
    return order


def post_dependency(raw: dict[int, float], order: Sequence[Question]) -> dict[int, float]:
    """Scores after the dependency rule, transitively: a question scores 0 if any ancestor scores 0.
    ``raw``: proposition_id -> 0/1; ``order``: from ``dependency_order``."""
    out: dict[int, float] = {}
    for q in order:
        out[q.proposition_id] = 0.0 if any(out[p] == 0 for p in q.parents) else raw[q.proposition_id]
    return out


# ----------------------------------------------------------------------------------------------------- judgments
Key = tuple[str, int, int]
_ANSWERS = ("yes", "no", None)


def _check_row(row: Any, where: str) -> dict[str, Any]:
    ok = (isinstance(row, dict) and isinstance(row.get("item_id"), str) and type(row.get("image_index")) is int
          and type(row.get("proposition_id")) is int and row.get("answer", "?") in _ANSWERS)
    if not ok:
        raise ValueError(f"{where}: a judgment needs item_id (str), image_index (int), proposition_id (int) and "
                         f"answer in {list(_ANSWERS)}, got {str(row)[:200]}")
    return row


def read_judgments(path: str | Path, repair: bool = False) -> list[dict[str, Any]]:
    """Rows of a judgments JSONL. A last line without its newline (a run killed mid-write) is ignored, and with
    ``repair`` also cut from the file, so it gets judged again; any other bad line raises."""
    path = Path(path)
    if not path.exists():
        if repair:
            return []
        raise FileNotFoundError(f"judgments file not found: {path}")
    check_cache_file(path)
    data = path.read_bytes()
    cut = data.rfind(b"\n") + 1
    if cut < len(data):
        print(f"note: ignoring a torn last line in {path} ({len(data) - cut} bytes); it will be re-judged",
              file=sys.stderr)
        if repair:
            with open(path, "r+b") as fp:
                fp.truncate(cut)
    rows = []
    for n, line in enumerate(data[:cut].decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e.msg}); only a torn LAST line is tolerated") from None
        rows.append(_check_row(row, f"{path}:{n}"))
    return rows


def drop_duplicates(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """Rows with the first judgment of each (item_id, image_index, proposition_id) per judge and image hash;
    later copies (two runs that judged the same folder at once) are dropped. Returns (rows, dropped). Two
    judgments of one key by different judges or of different image files are left for ``check_judge`` /
    ``drop_stale`` to refuse or re-judge."""
    seen: set[tuple[Any, ...]] = set()
    kept = []
    for row in rows:
        key = (row["item_id"], row["image_index"], row["proposition_id"], row.get("judge"), row.get("image"))
        if key not in seen:
            seen.add(key)
            kept.append(row)
    return kept, len(rows) - len(kept)


def _append_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """Append JSONL rows and fsync: everything written survives a kill, at worst one torn last line."""
    with open(path, "a", encoding="utf-8") as fp:
        fp.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        fp.flush()
        os.fsync(fp.fileno())


# ----------------------------------------------------------------------------------------------------- aggregation
def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def _category_table(sums: dict[str, float], counts: dict[str, int]) -> dict[str, float]:
    """L1 names first (in ``L1_ORDER``), then L2 names sorted."""
    l1 = [c for c in L1_ORDER if c in counts] + sorted(c for c in counts if "-" not in c and c not in L1_ORDER)
    l2 = sorted(c for c in counts if c not in l1)
    return {c: sums[c] / counts[c] for c in l1 + l2}


def _macro(cats: dict[str, float]) -> float | None:
    return _mean([v for c, v in cats.items() if "-" not in c])


def legacy_scores(questions: Sequence[Question], answers: dict[Key, str | None], n_images: int,
                  complete: set[str]) -> tuple[dict[str, Any], dict[str, float]]:
    """Exact emulation of the official ``compute_dpg_bench.py`` with ``pic_num = n_images``.

    Its quirks, in order: the first CSV data row is skipped; rows are grouped by runs of equal item_id (a later run
    replaces an earlier one); per tile, one pass of the dependency rule in CSV order (a parent zeroed later in the
    pass does not propagate; the parent loop stops at the first zero parent) and a missing parent raises, which
    drops the whole item; categories use the RAW answers of the LAST tile, micro-averaged over questions; only
    items whose images all exist (``complete``) are scored. Answers are exact "yes" matches.
    Returns ``({"overall", "categories"}, {item_id: legacy prompt score})``.
    """
    table: dict[str, dict[str, dict[int, Any]]] = {}
    previous = None
    for q in questions[1:]:  # BUG (official L72-74): `if i == 0: continue` drops the first question
        if q.item_id != previous:
            table[q.item_id] = {"tuple": {}, "dependency": {}}
        table[q.item_id]["tuple"][q.proposition_id] = q.row["tuple"]
        table[q.item_id]["dependency"][q.proposition_id] = q.parents
        previous = q.item_id
    per_item: dict[str, float] = {}
    cat_values: dict[str, list[float]] = defaultdict(list)
    for item_id in sorted(complete):
        if item_id not in table:
            continue  # the official lookup raises KeyError inside try/except: the item is skipped
        entry = table[item_id]
        tile_scores, last_raw, failed = [], {}, False
        for k in range(n_images):
            scores = {pid: float(answers.get((item_id, k, pid)) == "yes") for pid in entry["tuple"]}
            last_raw = dict(scores)  # copied BEFORE the dependency loop (official L138)
            try:
                for pid, parents in entry["dependency"].items():
                    for parent in parents:
                        if scores[parent] == 0:  # KeyError for a dropped/unknown parent, as in the original
                            scores[pid] = 0.0
                            break
            except KeyError:
                failed = True
                break
            tile_scores.append(sum(scores.values()) / len(scores))
        if failed:
            continue
        per_item[item_id] = sum(tile_scores) / len(tile_scores)
        for pid, tup in entry["tuple"].items():
            cat_values[category_of(tup)[0]].append(last_raw[pid])
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for l2, vals in cat_values.items():
        for name in {l2, category_of(l2)[1]}:
            sums[name] += sum(vals)
            counts[name] += len(vals)
    overall = _mean(list(per_item.values()))
    return {"overall": overall, "categories": _category_table(sums, counts)}, per_item


def _index_judgments(items: dict[str, list[Question]], judgments: Iterable[dict[str, Any]]) -> dict[Key, Any]:
    answers: dict[Key, Any] = {}
    for row in judgments:
        _check_row(row, "judgment")
        key = (row["item_id"], row["image_index"], row["proposition_id"])
        if row["item_id"] not in items:
            raise ValueError(f"judgment for unknown item_id {row['item_id']!r} (not in the questions CSV)")
        if row["proposition_id"] not in {q.proposition_id for q in items[row["item_id"]]}:
            raise ValueError(f"judgment for unknown proposition {key[2]} of item {key[0]!r}")
        if row["image_index"] < 0:
            raise ValueError(f"judgment with negative image_index: {key}")
        if key in answers:
            raise ValueError(f"duplicate judgment for (item_id, image_index, proposition_id) = {key}")
        answers[key] = row["answer"]
    return answers


def aggregate(questions: Sequence[Question], judgments: Iterable[dict[str, Any]], n_images: int | None = None,
              n_resamples: int = 1000, seed: int = 0) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Refined and legacy DPG-Bench scores from question rows and judgment rows. Returns ``(scores, per_prompt_rows)``.

    a = [answer == "yes"]; post-dependency scores per image (transitive, in dependency order); image score
    s(p, i) = mean over the prompt's questions (an image without any judgment is missing: all 0; a judged image
    lacking some question's judgment scores that question 0). fixed: micro = mean_p mean_i s(p, i); categories =
    micro means over (prompt, image, question), L1 pooling its L2s; macro = mean of the L1 scores. best_of_n: the
    same on i* = argmax_i s(p, i) (lowest index on ties). legacy: ``legacy_scores``. ci95: percentile bootstrap over
    prompts (``n_resamples``, ``seed``).
    """
    items = group_items(questions)
    answers = _index_judgments(items, judgments)
    seen_n = 1 + max((k[1] for k in answers), default=-1)
    n = n_images if n_images is not None else seen_n
    if n < 1:
        raise ValueError("no judgments and no n_images: cannot tell how many images each prompt has")
    if seen_n > n:
        raise ValueError(f"judgments have image_index up to {seen_n - 1} but n_images = {n}")
    judged_images = {(k[0], k[1]) for k in answers}
    l1_names = [c for c in L1_ORDER if any(q.l1 == c for q in questions)]
    l1_names += sorted({q.l1 for q in questions} - set(l1_names))
    counts = {"prompts": len(items), "images": len(items) * n, "judgments": len(answers),
              "unparsed": sum(a is None for a in answers.values()), "missing_images": 0, "missing_judgments": 0}
    partial = 0
    rows, complete = [], set()
    # per prompt: [mean_i s, best s, then (sum, count) per L1 for all images, then for image i*]
    boot = np.zeros((len(items), 2 + 4 * len(l1_names)))
    sums = {"fixed": defaultdict(float), "best": defaultdict(float)}
    cnts = {"fixed": defaultdict(int), "best": defaultdict(int)}
    for pi, (item_id, qs) in enumerate(items.items()):
        order = dependency_order(qs)
        post_per_image, s, missing = [], [], 0
        for k in range(n):
            if (item_id, k) not in judged_images:
                missing += 1
            raw, incomplete = {}, False
            for q in qs:
                ans = answers.get((item_id, k, q.proposition_id), "absent")
                if (item_id, k) in judged_images and ans in ("absent", None):
                    incomplete = True  # scored, but a question counts 0 for want of a usable answer
                    counts["missing_judgments"] += ans == "absent"
                raw[q.proposition_id] = 1.0 if ans == "yes" else 0.0
            partial += incomplete
            post = post_dependency(raw, order)
            post_per_image.append(post)
            s.append(sum(post.values()) / len(post))
        counts["missing_images"] += missing
        if missing == 0:
            complete.add(item_id)
        best = int(np.argmax(s))  # first maximum = lowest index on ties
        for mode, images in (("fixed", range(n)), ("best", [best])):
            for k in images:
                for q in qs:
                    v = post_per_image[k][q.proposition_id]
                    for name in {q.l2, q.l1}:  # a tuple without "-" has L1 == L2: count once
                        sums[mode][name] += v
                        cnts[mode][name] += 1
        boot[pi, 0], boot[pi, 1] = float(np.mean(s)), s[best]
        for ci, l1 in enumerate(l1_names):
            for j, images in enumerate((range(n), [best])):
                vals = [post_per_image[k][q.proposition_id] for k in images for q in qs if q.l1 == l1]
                boot[pi, 2 + 4 * ci + 2 * j], boot[pi, 3 + 4 * ci + 2 * j] = sum(vals), len(vals)
        rows.append({"item_id": item_id, "n_questions": len(qs), **{f"image_{k}": s[k] for k in range(n)},
                     "avg": float(np.mean(s)), "best_index": best, "best": s[best], "missing_images": missing,
                     "unparsed": sum(answers.get((item_id, k, q.proposition_id), "x") is None
                                     for k in range(n) for q in qs)})
    legacy, legacy_items = legacy_scores(questions, answers, n, complete)
    for row in rows:
        row["legacy_included"] = row["item_id"] in legacy_items
        row["legacy_score"] = legacy_items.get(row["item_id"], "")
    scores: dict[str, Any] = {}
    for mode, col, key in (("fixed", 0, "fixed"), ("best", 1, "best_of_n")):
        cats = _category_table(sums[mode], cnts[mode])
        scores[key] = {"micro_avg": float(boot[:, col].mean()), "macro_avg": _macro(cats), "categories": cats}
    scores["legacy"] = legacy
    # the contract's counts (evals.outputs), over images: judged, missing (scored 0), judged with a question
    # unanswered or unparsed
    counts.update(scored=counts["images"] - counts["missing_images"], failed=counts["missing_images"],
                  partial=partial)
    scores["counts"] = counts
    scores["category_prompts"] = {l1: int((boot[:, 3 + 4 * ci] > 0).sum()) for ci, l1 in enumerate(l1_names)}
    scores["n_images"] = n
    scores["legacy_prompts"] = len(legacy_items)  # the prompts the official script scores (see legacy_scores)
    scores["ci95"] = _bootstrap(boot, l1_names, np.array(list(legacy_items.values())), n_resamples, seed)
    return scores, rows


def _bootstrap(boot: np.ndarray, l1_names: list[str], legacy: np.ndarray, n_resamples: int,
               seed: int) -> dict[str, list[float]]:
    """Percentile CIs, resampling prompts (rows of ``boot``; see ``aggregate`` for its columns)."""

    def category(j: int, ci: int) -> Callable[[np.ndarray], float]:
        return lambda d: d[:, 2 + 4 * ci + 2 * j].sum() / d[:, 3 + 4 * ci + 2 * j].sum()

    def macro(j: int) -> Callable[[np.ndarray], float]:
        def stat(d: np.ndarray) -> float:
            num, den = d[:, 2 + 2 * j::4], d[:, 3 + 2 * j::4]
            den_sum = den.sum(axis=0)
            return float(np.mean(num.sum(axis=0)[den_sum > 0] / den_sum[den_sum > 0]))
        return stat

    out: dict[str, list[float]] = {}
    for j, key in enumerate(("fixed", "best_of_n")):
        out[f"{key}.micro_avg"] = list(bootstrap_ci(boot, lambda d, j=j: d[:, j].mean(), n_resamples, seed))
        out[f"{key}.macro_avg"] = list(bootstrap_ci(boot, macro(j), n_resamples, seed))
        for ci, l1 in enumerate(l1_names):
            has = boot[boot[:, 3 + 4 * ci + 2 * j] > 0]  # resample the prompts that have this category
            out[f"{key}.categories.{l1}"] = list(bootstrap_ci(has, category(j, ci), n_resamples, seed))
    if len(legacy):
        out["legacy.overall"] = list(bootstrap_ci(legacy, np.mean, n_resamples, seed))
    return out


# ----------------------------------------------------------------------------------------------------- reports
def _fmt(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    s = f"{v:.3f}"
    return s[1:] if s.startswith("0.") else s  # the paper's ".786"


def detail_table(scores: dict[str, Any]) -> str:
    """Markdown in the layout of the paper's Table 1 (its "Avg." column is ``fixed``, its "Top-n" column
    ``best_of_n``), then the L2 detail, the legacy score and the counts."""
    n, f, b = scores["n_images"], scores["fixed"], scores["best_of_n"]
    lines = [f"Paper Table 1 layout (Avg. = fixed, Top-{n} = best_of_n):", "",
             "| category | fixed | best_of_n |", "|---|---|---|",
             f"| macro_avg | {_fmt(f['macro_avg'])} | {_fmt(b['macro_avg'])} |",
             f"| micro_avg | {_fmt(f['micro_avg'])} | {_fmt(b['micro_avg'])} |"]
    for l1 in L1_ORDER:
        lines.append(f"| {l1} | {_fmt(f['categories'].get(l1))} | {_fmt(b['categories'].get(l1))} |")
    l2s = [c for c in f["categories"] if "-" in c]
    lines += ["", "| subcategory | fixed | best_of_n | legacy |", "|---|---|---|---|"]
    lines += [f"| {c} | {_fmt(f['categories'][c])} | {_fmt(b['categories'][c])} | "
              f"{_fmt(scores['legacy']['categories'].get(c))} |" for c in l2s]
    c = scores["counts"]
    lines += ["", f"legacy.overall (the official script's aggregation): {_fmt(scores['legacy']['overall'])}.",
              f"Counts: {c['prompts']} prompts, {c['images']} images ({c['missing_images']} missing, scored 0), "
              f"{c['judgments']} judgments ({c['unparsed']} unparsed, scored 0).", ""]
    return "\n".join(lines)


def contract_summary(scores: dict[str, Any], judge: dict[str, Any]) -> dict[str, Any]:
    """``aggregate``'s scores as the ``evals.outputs`` summary: headline ``fixed.micro_avg``; breakdown keys are
    the paths of ``scores`` (and of its ``ci95``): ``fixed.macro_avg``, ``best_of_n.micro_avg``, ...,
    ``fixed.categories.entity``, ..., ``legacy.overall``; ``n`` = the prompts each CI resamples."""
    from evals import outputs

    ci, n_prompts = scores["ci95"], scores["counts"]["prompts"]

    def entry(path: str, n: int) -> dict[str, Any]:
        mode, *rest = path.split(".")
        value: Any = scores[mode]
        for part in rest:
            value = value.get(part) if isinstance(value, dict) else None
        return outputs.score(value, ci.get(path), n)

    breakdown = {p: entry(p, n_prompts) for p in ("fixed.macro_avg", "best_of_n.micro_avg", "best_of_n.macro_avg")}
    for mode in ("fixed", "best_of_n"):
        for l1, n in scores.get("category_prompts", {}).items():
            breakdown[f"{mode}.categories.{l1}"] = entry(f"{mode}.categories.{l1}", n)
    if "legacy.overall" in ci:
        breakdown["legacy.overall"] = entry("legacy.overall", scores.get("legacy_prompts", 0))
    head = {"name": "fixed.micro_avg", **entry("fixed.micro_avg", n_prompts)}
    rest = {k: v for k, v in scores.items() if k not in ("headline", "breakdown", "judge", "benchmark")}
    return {"benchmark": "dpg", "headline": head, "breakdown": breakdown, "judge": judge, "items_are": "images",
            **rest}


def render_table(scores: dict[str, Any]) -> str:
    """``table.md`` of a contract summary (``contract_summary``): the contract rows, then ``detail_table``."""
    from evals import outputs

    return outputs.render_table(scores, detail_table(scores))


def write_reports(scores: dict[str, Any], rows: list[dict[str, Any]], out_dir: str | Path,
                  judge: dict[str, Any] | None = None, record_judge: bool = True) -> dict[str, Any]:
    """The ``evals.outputs`` files in ``out_dir`` (``items.jsonl``: one row per prompt), each written atomically;
    a folder's earlier ``scores.json`` / ``per_prompt.csv`` are removed. Returns the contract summary."""
    from evals import outputs

    summary = contract_summary(scores, judge if judge is not None else scores.get("judge", {"judge": "unrecorded"}))
    outputs.write_outputs(out_dir, summary, rows, detail=detail_table(summary),
                          retire=("scores.json", "per_prompt.csv"), record_judge=record_judge)
    return summary


def aggregate_files(questions_csv: str | Path, judgments_path: str | Path, out_dir: str | Path,
                    n_images: int | None = None, n_resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """``aggregate`` on files, then ``write_reports``. Returns the scores."""
    judgments, duplicates = drop_duplicates(read_judgments(judgments_path))
    if duplicates:
        print(f"note: {judgments_path} holds {duplicates} duplicate judgments (two runs judged one folder at once); "
              "scoring one of each", file=sys.stderr)
    scores, rows = aggregate(load_questions(questions_csv), judgments, n_images, n_resamples, seed)
    scores["counts"]["duplicate_judgments_dropped"] = duplicates
    identity = _recorded_judge(Path(judgments_path).parent, judgments)
    # judge.json is only written from a recorded identity: an "unrecorded" one would block the cache's resume
    return write_reports(scores, rows, out_dir, identity, record_judge=identity.get("judge") != "unrecorded")


def _recorded_judge(folder: Path, judgments: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The identity in ``folder/judge.json`` when it is the judge of ``judgments`` (its fingerprint), else
    ``{"judge": "unrecorded"}``: the aggregate says who judged only where the folder records it."""
    from evals.cache import JUDGE_FILE

    path = folder / JUDGE_FILE
    if path.is_file() and judgments:
        data = json.loads(path.read_text())
        if all(r.get("judge") == data.get("fingerprint") for r in judgments):
            return dict(data.get("identity", {}))
    return {"judge": "unrecorded"}


# ----------------------------------------------------------------------------------------------------- images
@dataclass
class ImageSet:
    """Image files found for the items. ``grids``: item_id -> 2x2 grid file; ``seeds``: item_id -> {k: file}."""

    root: Path
    n_images: int
    grids: dict[str, Path]
    seeds: dict[str, dict[int, Path]]
    _digests: dict[Path, str] = field(default_factory=dict, repr=False)

    def available(self, item_id: str) -> list[int]:
        """Image indices present for an item."""
        if item_id in self.grids:
            return list(range(self.n_images))
        return sorted(self.seeds.get(item_id, {}))

    def digest(self, item_id: str, k: int) -> str | None:
        """Content hash of the file holding image ``k`` of an item (its grid, or its per-seed file); None when
        there is none. Each file is hashed once."""
        path = self.grids.get(item_id) or self.seeds.get(item_id, {}).get(k)
        if path is None:
            return None
        if path not in self._digests:
            self._digests[path] = file_digest(path)
        return self._digests[path]

    def load(self, item_id: str) -> dict[int, Image.Image]:
        """RGB tiles of an item, image index -> PIL image (grid tiles TL, TR, BL, BR = 0..3)."""
        return self.load_with_digest(item_id)[0]

    def load_with_digest(self, item_id: str) -> tuple[dict[int, Image.Image], dict[int, str]]:
        """(tiles as ``load``, image index -> content hash of the bytes that tile was decoded from). Each file is
        read once and hashed from those same bytes, so a file replaced while its tiles are judged cannot lend
        its new hash to the old pixels' answers (the next run sees the change and judges it again)."""
        files = ({k: self.grids[item_id] for k in range(self.n_images)} if item_id in self.grids
                 else self.seeds.get(item_id, {}))
        decoded: dict[Path, tuple[Image.Image, str]] = {}
        for path in dict.fromkeys(files.values()):
            data = path.read_bytes()
            decoded[path] = open_rgb(path, data=data), bytes_digest(data)
        if item_id in self.grids:
            grid, digest = decoded[self.grids[item_id]]
            r = grid.width // 2
            boxes = [(0, 0, r, r), (r, 0, 2 * r, r), (0, r, r, 2 * r), (r, r, 2 * r, 2 * r)]
            return {k: grid.crop(box) for k, box in enumerate(boxes)}, {k: digest for k in range(len(boxes))}
        return ({k: decoded[p][0] for k, p in files.items()}, {k: decoded[p][1] for k, p in files.items()})



def _check_image(path: Path, resolution: int | None, grid: bool) -> None:
    try:
        with Image.open(path) as im:
            size = im.size
            im.verify()  # checksums/structure, without decoding every pixel
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"corrupt or unreadable image {path}: {e}") from None
    w, h = size
    if grid:
        if w != h or w % 2 or (resolution is not None and w != 2 * resolution):
            want = f"{2 * resolution}x{2 * resolution}" if resolution else "square with an even side (2 x tile)"
            raise ValueError(f"{path}: a DPG-Bench grid must be 2x2 tiles, i.e. {want}; got {w}x{h}")
    elif resolution is not None and (w, h) != (resolution, resolution):
        raise ValueError(f"{path}: expected a {resolution}x{resolution} image (--resolution), got {w}x{h}")


def scan_images(images_dir: str | Path, item_ids: Iterable[str], n_images: int = 4,
                resolution: int | None = None) -> ImageSet:
    """Find and validate the images of ``item_ids`` under ``images_dir`` (official grids ``<item_id>.<ext>`` or
    per-seed ``<item_id>/<k>.png``). Files with non-image extensions are ignored (the official script writes its
    results .txt into this folder); an image for an unknown item_id, a bad grid size or a corrupt file raise."""
    root = Path(images_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"images folder not found: {root}")
    known = set(item_ids)
    grids: dict[str, Path] = {}
    seeds: dict[str, dict[int, Path]] = {}

    def unknown(path: Path, item: str) -> ValueError:
        return ValueError(f"{path}: image for unknown item_id {item!r} (not in the questions); known ids look like "
                          f"{sorted(known)[:3]}")

    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            files = [p for p in sorted(entry.iterdir()) if p.suffix.lower() in IMAGE_EXTS]
            if not files:
                continue  # e.g. an output folder placed next to the images
            if entry.name not in known:
                raise unknown(entry, entry.name)
            for p in files:
                if not p.stem.isdigit() or int(p.stem) >= n_images:
                    raise ValueError(f"{p}: per-seed images must be named <k>.png with k in 0..{n_images - 1}")
                _check_image(p, resolution, grid=False)
                seeds.setdefault(entry.name, {})[int(p.stem)] = p
        elif entry.suffix.lower() in IMAGE_EXTS:
            item = entry.name.rsplit(".", 1)[0]
            if item not in known:
                raise unknown(entry, item)
            if item in grids:
                raise ValueError(f"two grid images for item {item!r}: {grids[item].name} and {entry.name}")
            if n_images != 4:
                raise ValueError(f"{entry}: a grid holds 2x2 = 4 images, but n_images = {n_images}")
            _check_image(entry, resolution, grid=True)
            grids[item] = entry
    both = sorted(set(grids) & set(seeds))
    if both:
        raise ValueError(f"items with both a grid and per-seed images (ambiguous): {both[:5]}")
    if not grids and not seeds:
        raise ValueError(f"no DPG-Bench images in {root}: expected <item_id>.png 2x2 grids or <item_id>/<k>.png "
                         f"per-seed files for the {len(known)} items of the questions (ids like "
                         f"{sorted(known)[:2]}); found {_describe_folder(root)}")
    return ImageSet(root, n_images, grids, seeds)


def _describe_folder(root: Path, shown: int = 3) -> str:
    """What a folder holds, in a phrase: ``an empty folder`` or ``2 files (a.txt, b.json), 1 folder (00000/)``."""
    entries = [e for e in sorted(root.iterdir()) if not e.name.startswith(".")]
    if not entries:
        return "an empty folder"
    parts = []
    for kind, group in (("file", [e.name for e in entries if not e.is_dir()]),
                        ("folder", [e.name + "/" for e in entries if e.is_dir()])):
        if group:
            more = ", ..." if len(group) > shown else ""
            parts.append(f"{len(group)} {kind}{'s' if len(group) > 1 else ''} ({', '.join(group[:shown])}{more})")
    return ", ".join(parts)


# ----------------------------------------------------------------------------------------------------- judging
def check_resume(out_dir: str | Path, identity: dict[str, Any]) -> None:
    """Before a judge loads: ``OUT/judgments.jsonl`` may only be resumed by the same judge (``evals.cache``)."""
    path = Path(out_dir) / JUDGMENTS
    check_judge(out_dir, identity, read_judgments(path) if path.is_file() else [], JUDGMENTS, record=False)


def judge_images(images: str | Path | ImageSet, questions: Sequence[Question], judge: Judge, out_dir: str | Path,
                 n_images: int = 4, resolution: int | None = None, progress: bool = True,
                 stats: dict[str, int] | None = None) -> Path:
    """Judge every (item, image, question) not yet in ``OUT/judgments.jsonl`` and append the rows (resume unit).

    Rows: ``{"item_id", "image_index", "proposition_id", "answer": "yes"|"no"|null, "raw", "judge", "image"}``
    (``judge``: the judge's fingerprint, ``image``: the judged file's content hash; ``evals.cache``), written per
    judge batch with fsync, so a killed run loses at most the batch in flight (and leaves at most a torn last
    line, which the next run cuts and re-judges). A resume under another judge raises; rows of images that changed
    since are dropped and judged again (``stats["rejudged"]``). Returns the judgments path.
    """
    items = group_items(questions)
    image_set = images if isinstance(images, ImageSet) else scan_images(images, items, n_images, resolution)
    with lock_folder(out_dir):
        return _judge_images(image_set, items, judge, Path(out_dir), progress, stats)


def _judge_images(image_set: ImageSet, items: dict[str, list[Question]], judge: Judge, out: Path, progress: bool,
                  stats: dict[str, int] | None) -> Path:
    """``judge_images`` while holding ``out``'s lock."""
    path = out / JUDGMENTS
    identity = identity_of(judge)
    fp = fingerprint(identity)
    rows, duplicates = drop_duplicates(read_judgments(path, repair=True))
    if duplicates:
        print(f"note: {path} held {duplicates} duplicate judgments (two runs judged this folder at once); kept one "
              "of each", file=sys.stderr)
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    check_judge(out, identity, rows, JUDGMENTS)
    confirm_revision(out, identity)
    rows, stale = drop_stale(path, rows, lambda r: image_set.digest(r["item_id"], r["image_index"]))
    if stale:
        print(f"note: {stale} judgments of images that changed since were dropped; judging them again",
              file=sys.stderr)
    if stats is not None:
        stats["rejudged"], stats["duplicates"] = stale, duplicates
    done = set(_index_judgments(items, rows))
    todo = {item_id: [(k, q) for k in image_set.available(item_id) for q in qs
                      if (item_id, k, q.proposition_id) not in done] for item_id, qs in items.items()}
    total = sum(map(len, todo.values()))
    batch: list[JudgeRequest] = []
    digests: dict[tuple[str, int], str] = {}  # of the bytes each tile was decoded from, not of the file now
    with tqdm(total=total, desc=f"judging ({getattr(judge, 'name', 'judge')})", disable=not progress or not total,
              unit="q") as bar:

        def flush() -> None:
            results = judge.judge(batch)
            _append_rows(path, [{"item_id": r.item_id, "image_index": r.image_index,
                                 "proposition_id": r.proposition_id, "answer": res.answer, "raw": res.raw,
                                 "judge": fp, "image": digests[r.item_id, r.image_index]}
                                for r, res in zip(batch, results, strict=True)])
            bar.update(len(batch))
            batch.clear()

        for item_id, work in todo.items():
            if not work:
                continue
            tiles, digest = image_set.load_with_digest(item_id)
            for k, q in work:
                digests[item_id, k] = digest[k]
                batch.append(JudgeRequest(item_id, k, q.proposition_id, q.question, tiles[k], q.row))
                if len(batch) >= judge.batch_size:
                    flush()
        if batch:
            flush()
    return path


def run(images_dir: str | Path | ImageSet, questions_csv: str | Path | Sequence[Question], judge: Judge | str,
        out_dir: str | Path, n_images: int = 4, resolution: int | None = None, n_resamples: int = 1000,
        seed: int = 0, progress: bool = True, **judge_kwargs: Any) -> dict[str, Any]:
    """Judge a folder of images (resumable), then aggregate into ``out_dir``. ``judge``: a ``Judge`` or a registry
    name (oracle, hf, openai) built with ``judge_kwargs``. Returns the summary (as in summary.json)."""
    questions = (load_questions(questions_csv) if isinstance(questions_csv, (str, Path)) else list(questions_csv))
    images = images_dir if isinstance(images_dir, ImageSet) else scan_images(images_dir, group_items(questions),
                                                                             n_images, resolution)
    judge = make_judge(judge, **judge_kwargs) if isinstance(judge, str) else judge  # after every input check
    stats: dict[str, int] = {}
    path = judge_images(images, questions, judge, out_dir, n_images, resolution, progress, stats)
    scores, rows = aggregate(questions, read_judgments(path), n_images, n_resamples, seed)
    scores["judge"] = identity_of(judge)
    from evals.outputs import generator_of

    scores["generator"] = generator_of(images.root)
    scores["counts"]["rejudged_changed_images"] = stats.get("rejudged", 0)
    scores["counts"]["duplicate_judgments_dropped"] = stats.get("duplicates", 0)
    if "retries" in getattr(judge, "counts", {}):
        scores["counts"]["judge_retries"] = judge.counts["retries"]
    return write_reports(scores, rows, out_dir)


# ----------------------------------------------------------------------------------------------------- CLI
JUDGE_CHOICES: tuple[str, ...] = (*HF_PRESETS, "hf", "openai", "oracle")


def _parser() -> argparse.ArgumentParser:
    from evals import cli

    p = cli.Parser(prog="python -m evals.dpg_refined", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=cli.Parser)
    j = sub.add_parser("judge", help="judge an image folder, then aggregate (the default command)",
                       description="Judge every tile of an image folder (resumable), then aggregate.",
                       formatter_class=p.formatter_class)
    src = j.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="folder: <item_id>.png 2x2 grids or <item_id>/<k>.png")
    src.add_argument("--ckpt", help="a checkpoint of this harness: generate 4 seeds per prompt into OUT/images "
                     "(2x2 grids, resumable), then judge them")
    j.add_argument(cli.PROMPT_FILE, help="DPG-Bench questions CSV (official header); default: the HF dataset "
                   f"{HF_DATASET} (needs the hub)")
    j.add_argument("--prompts", default=str(DEFAULT_PROMPTS), help="prompts.jsonl used with the HF dataset")
    cli.add_judge(j, JUDGE_CHOICES, "gemma-3-27b-it",
                  help="gemma-3-27b-it / gemma-3-12b-it: that VLM through transformers; hf: any transformers VLM "
                       "(--judge-model); openai: an OpenAI-compatible server (--judge-url); oracle: the shapes "
                       "world's exact answers",
                  model_help="hf / presets: hub id or local folder of the VLM (default: the preset's hub id); "
                             "openai: the served model name (default google/gemma-3-27b-it)")
    j.add_argument("--judge-mode", default="cot", choices=JUDGE_MODES, help="chain-of-thought prompt or a direct "
                   "yes/no question")
    j.add_argument("--size-hint", type=int, default=None, help="oracle: world canvas size the tiles depict")
    cli.add_placement(j)
    cli.add_batch_size(j, None, help="questions per judge call (default: the judge's own: oracle 256, hf 8, "
                                     "openai 16 concurrent requests)")
    j.add_argument("--resolution", type=int, default=None, help="tile size in pixels (default: inferred)")
    cli.add_out(j, help="judgments.jsonl (the resumable cache), summary.json, items.jsonl, table.md, judge.json")
    a = sub.add_parser("aggregate", help="scores from a judgments file", formatter_class=p.formatter_class,
                       description="Scores, table and per-prompt rows from an existing judgments file.")
    # not required= here: its old name --questions (an alias) must satisfy it too; checked in _main
    a.add_argument(cli.PROMPT_FILE, help="DPG-Bench questions CSV (required)")
    a.add_argument("--judgments", required=True, help="a judgments.jsonl")
    cli.add_out(a, help="summary.json, items.jsonl, table.md, judge.json (when the judgments' folder records "
                        "the judge)")
    for s in (j, a):
        s.add_argument("--n-samples", type=cli.positive_int, default=None,
                       help="images per prompt (default: judge 4, aggregate: as many as judged)")
        cli.add_n_resamples(s)
        cli.add_seed(s, 0, help="bootstrap seed; with --ckpt also the generation seed (image k of item i: "
                                "seed + 1000 i + k)")
        cli.alias(s, "--n-images", "--n-samples", type=cli.positive_int)
        cli.alias(s, "--questions", cli.PROMPT_FILE)
    cli.alias(j, "--gen-seed", "--seed", type=int)
    return p


def _judge_spec(args: argparse.Namespace) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(registry name, constructor arguments, identity) of the ``--judge``: the identity is known before the
    judge's weights load, so a resume under another judge is refused first."""
    kw: dict[str, Any] = {} if args.batch_size is None else {"batch_size": args.batch_size}
    if args.judge == "oracle":
        return "oracle", {"size_hint": args.size_hint, **kw}, judge_identity("oracle", size_hint=args.size_hint)
    kw["mode"] = args.judge_mode
    if args.judge == "openai":
        model = args.judge_model or OPENAI_DEFAULT
        return ("openai", {"url": args.judge_url, "api_key": os.environ.get(args.judge_api_key_env), "model": model,
                           **kw}, judge_identity("openai", model, args.judge_mode))
    model_id = args.judge_model or (args.judge if args.judge in HF_PRESETS else "gemma-3-27b-it")
    return ("hf", {"model_id": model_id, "device": args.device, "dtype": args.dtype, "device_map": args.device_map,
                   **kw}, judge_identity("hf", model_id, args.judge_mode))


def _check_judge_args(args: argparse.Namespace) -> None:
    if args.judge == "openai" and not args.judge_url:
        raise ValueError("--judge openai needs --judge-url (an OpenAI-compatible API base, e.g. http://host:8000/v1)")
    if args.judge_url:
        if args.judge != "openai":
            raise ValueError(f"--judge-url only applies to --judge openai, not {args.judge!r}")
        from evals.judges import chat_endpoint

        chat_endpoint(args.judge_url)
    if args.device_map is not None:
        from evals.runtime import check_device_map

        check_device_map(args.device_map)
    if args.n_samples not in (None, 4) and args.ckpt:
        raise ValueError(f"--ckpt writes 2x2 grids: --n-samples must be 4, got {args.n_samples}")


def _main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("judge", "aggregate", "-h", "--help"):
        argv = ["judge", *argv]
    args = _parser().parse_args(argv)
    if args.command == "aggregate":
        if args.prompt_file is None:
            raise ValueError("aggregate needs --prompt-file Q.csv (the questions the judgments answer)")
        scores = aggregate_files(args.prompt_file, args.judgments, args.out, args.n_samples, args.n_resamples,
                                 args.seed)
    else:
        _check_judge_args(args)
        questions = load_questions(args.prompt_file) if args.prompt_file else load_questions_hf(args.prompts)
        with lock_folder(args.out):  # before anything is generated or loaded: one run per --out
            scores = _judge_command(args, questions)
    print(render_table(scores))
    return scores


def _judge_command(args: argparse.Namespace, questions: list[Question]) -> dict[str, Any]:
    """The ``judge`` subcommand once ``--out`` is locked: generate (``--ckpt``), check, judge, aggregate."""
    n_images = args.n_samples or 4
    if args.ckpt:
        from evals import images as layouts

        if not Path(args.ckpt).is_file():
            raise FileNotFoundError(f"checkpoint not found: {args.ckpt}")
        images = Path(args.out) / "images"
        layouts.write_folder("dpg", layouts.checkpoint_generator(args.ckpt, args.device), item_prompts(questions),
                             images, 4, args.seed, 64,
                             generator=f"ckpt:{Path(args.ckpt).resolve()}", rank=0, world=1)
    else:
        images = args.images
    image_set = scan_images(images, group_items(questions), n_images, args.resolution)
    name, kwargs, identity = _judge_spec(args)
    check_resume(args.out, identity)
    return run(image_set, questions, make_judge(name, **kwargs), args.out, n_images, args.resolution,
               args.n_resamples, args.seed)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """CLI entry; ``judge`` is the default subcommand. Returns the scores; input errors exit 2 with one line."""
    from evals.cli import entry

    return entry(_main)(argv)


if __name__ == "__main__":
    main()
