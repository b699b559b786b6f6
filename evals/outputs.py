"""The output contract every scorer writes (``evals.geneval``, ``evals.dpg_refined``, ``evals.genai_bench``, and the
combined ``evals.all``), so that one reader serves all three benchmarks.

Into ``--out``:

- ``summary.json``: ``benchmark``; ``headline`` = ``{"name", "value", "ci95": [lo, hi], "n"}`` (the benchmark's
  headline score, a 95% bootstrap CI, and ``n`` = the units the CI resamples, the prompts); ``breakdown`` = the
  per-task / per-category scores, ``{name: {"value", "ci95", "n"}}``; ``judge`` = the judge's identity (what
  ``judge.json`` records); ``counts`` with at least ``scored``, ``failed`` and ``partial`` (items scored, items
  that could not be scored and count as 0 or were skipped, items scored from incomplete judgments); then the
  benchmark's own keys (GenEval's ``tasks``, DPG's ``fixed`` / ``best_of_n`` / ``legacy``, GenAI-Bench's
  ``skills``, ...);
- ``items.jsonl``: one row per scored item (a GenEval image, a DPG prompt, a GenAI-Bench prompt);
- ``table.md``: the same numbers for people, one row per ``headline`` / ``breakdown`` key, named exactly as in
  the JSON, then the benchmark's own detail;
- ``judge.json``: ``{"fingerprint", "identity"}`` of the judge, the key of the resumable caches (``evals.cache``).

Beside them each benchmark keeps its own files: GenEval's official per-image ``results.jsonl``, DPG's
``judgments.jsonl`` and GenAI-Bench's ``scores.jsonl`` (the resumable caches). A folder written before this
contract holds the same caches, so it resumes as it is; its old-named summaries (``scores.json`` and
``per_prompt.csv`` of DPG, ``results.json`` of GenAI-Bench, ``components.jsonl`` of GenEval) are removed when the
new files are written, so no stale numbers stay beside fresh ones.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from common.files import atomic_write_text
from evals.cache import JUDGE_FILE, check_judge, describe

SUMMARY = "summary.json"
ITEMS = "items.jsonl"
TABLE = "table.md"
JUDGE = JUDGE_FILE
CONTRACT_FILES: tuple[str, ...] = (SUMMARY, ITEMS, TABLE, JUDGE)
COUNT_KEYS: tuple[str, ...] = ("scored", "failed", "partial")
BENCHMARK_TITLES: dict[str, str] = {"geneval": "GenEval", "dpg": "DPG-Bench (refined)", "genai": "GenAI-Bench VQAScore"}


def score(value: float | None, ci95: Sequence[float | None] | None, n: int) -> dict[str, Any]:
    """One contract score: ``{"value", "ci95": [lo, hi], "n"}`` (None where undefined, e.g. an empty category)."""
    lo, hi = (None, None) if ci95 is None else (ci95[0], ci95[1])
    return {"value": _num(value), "ci95": [_num(lo), _num(hi)], "n": int(n)}


def _num(v: Any) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def fmt(v: float | None) -> str:
    """A score as ``table.md`` prints it: three decimals, an en dash where undefined."""
    return "–" if v is None else f"{v:.3f}"


def headline_rows(summary: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """``(name, score)`` of the headline then every breakdown entry, in the order ``table.md`` lists them."""
    head = summary["headline"]
    return [(head["name"], head), *summary["breakdown"].items()]


def render_table(summary: Mapping[str, Any], detail: str = "") -> str:
    """``table.md``: the judge, one row per headline / breakdown key (names as in summary.json), the counts, then
    the benchmark's own ``detail`` (markdown)."""
    title = BENCHMARK_TITLES.get(summary["benchmark"], summary["benchmark"])
    lines = [f"# {title}", "", f"judge: `{describe(summary['judge'])}`"]
    gen = summary.get("generator")
    if gen:  # the folder's generation.json: the user's --generator-id, else the label evals.generate recorded
        lines.append(f"generator: `{gen['id'] or gen['generator']}`")
    lines += ["", "| score | value | 95% CI | n |", "|---|---:|---|---:|"]
    for i, (name, s) in enumerate(headline_rows(summary)):
        shown = f"**{name}**" if i == 0 else name
        lines.append(f"| {shown} | {fmt(s['value'])} | [{fmt(s['ci95'][0])}, {fmt(s['ci95'][1])}] | {s['n']} |")
    c = summary["counts"]
    lines += ["", f"counts: {c['scored']} scored, {c['failed']} failed, {c['partial']} partial "
              f"({summary.get('items_are', 'items')})", ""]
    if detail:
        lines += [detail.rstrip("\n"), ""]
    return "\n".join(lines)


def check_summary(summary: Mapping[str, Any]) -> None:
    """The contract keys are there (a scorer that forgot one fails its own tests, not a reader later)."""
    missing = [k for k in ("benchmark", "headline", "breakdown", "judge", "counts") if k not in summary]
    missing += [f"counts.{k}" for k in COUNT_KEYS if k not in summary.get("counts", {})]
    if missing:
        raise ValueError(f"summary lacks contract key(s) {missing}")


def write_outputs(out_dir: str | Path, summary: Mapping[str, Any], items: Iterable[Mapping[str, Any]],
                  detail: str = "", retire: Sequence[str] = (), record_judge: bool = True) -> Path:
    """Write ``summary.json``, ``items.jsonl``, ``table.md`` and ``judge.json`` into ``out_dir`` (each atomically),
    then remove the old-named outputs ``retire`` a folder of an earlier layout may hold (with a note). Returns the
    folder. Without ``record_judge`` an existing ``judge.json`` is left as it is."""
    check_summary(summary)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # judge.json: recorded for a judge without a cache (GenEval's detector) as for those with one; a cache of
    # another judge has already been refused by then, so this only (re)writes this run's identity
    if record_judge:
        check_judge(out, summary["judge"], (), record=True)
    atomic_write_text(out / ITEMS, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in items))
    atomic_write_text(out / TABLE, render_table(summary, detail))
    atomic_write_text(out / SUMMARY, json.dumps(summary, indent=2, default=str) + "\n")
    old = [name for name in retire if (out / name).is_file()]
    for name in old:
        (out / name).unlink()
    if old:
        print(f"note: {out} held outputs of an earlier layout ({', '.join(old)}); replaced by {SUMMARY}, {ITEMS}, "
              f"{TABLE}", file=sys.stderr)
    return out


def read_summary(out_dir: str | Path) -> dict[str, Any]:
    """A scorer's ``summary.json``; a folder with only an earlier layout's summary is refused in one line."""
    out = Path(out_dir)
    path = out / SUMMARY
    if not path.is_file():
        old = [n for n in ("scores.json", "results.json") if (out / n).is_file()]
        hint = (f" (it holds {old[0]}, an earlier layout: re-score into a new --out)" if old else "")
        raise FileNotFoundError(f"{path} not found{hint}")
    summary = json.loads(path.read_text())
    if "headline" not in summary:
        raise ValueError(f"{path} is of an earlier layout (no headline): re-score into a new --out")
    return summary


def render_combined_table(combined: Mapping[str, Any]) -> str:
    """The combined ``table.md`` of ``evals.all``: one row per benchmark scored (headline, CI, n, judge)."""
    lines = ["# All benchmarks", "", "| benchmark | score | value | 95% CI | n | judge | generator |",
             "|---|---|---:|---|---:|---|---|"]
    for r in combined["rows"]:
        gen = r.get("generator") or {}
        lines.append(f"| {r['benchmark']} | {r['score']} | {fmt(r['value'])} | [{fmt(r['ci95'][0])}, "
                     f"{fmt(r['ci95'][1])}] | {r['n']} | `{describe(r['judge'])}` | "
                     f"{gen.get('id') or gen.get('generator') or '–'} |")
    if combined.get("absent"):
        lines += ["", f"not scored (no image folder): {', '.join(combined['absent'])}"]
    return "\n".join(lines) + "\n"


def write_combined(out_dir: str | Path, rows: Sequence[Mapping[str, Any]], absent: Sequence[str] = ()
                   ) -> dict[str, Any]:
    """``OUT/summary.json`` (``{"benchmark": "all", "rows": [...], "absent": [...]}``) and ``OUT/table.md`` of
    ``evals.all``, atomically. Returns the combined summary."""
    out = Path(out_dir)
    combined = {"benchmark": "all", "rows": [dict(r) for r in rows], "absent": list(absent)}
    atomic_write_text(out / TABLE, render_combined_table(combined))
    atomic_write_text(out / SUMMARY, json.dumps(combined, indent=2, default=str) + "\n")
    return combined


def generator_of(images_dir: str | Path) -> dict[str, Any] | None:
    """What made an image folder, from its ``generation.json`` (``evals.generate``): ``{"generator", "id"}``, the
    label the tool recorded and the user's ``--generator-id`` (None when not given); None for a folder made
    elsewhere."""
    from evals.images import MANIFEST

    path = Path(images_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not readable JSON ({err}): regenerate the folder or remove the file") from None
    return {"generator": manifest.get("generator"), "id": manifest.get("generator_id")}
