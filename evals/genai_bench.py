"""GenAI-Bench (1600 prompts) scored with VQAScore, aggregated exactly as t2v_metrics' ``genai_bench/evaluate.py``.

    python -m evals.genai_bench --images DIR --model hf --model-id Qwen/Qwen2.5-VL-7B-Instruct --out OUT
    python -m evals.genai_bench --ckpt CKPT --model hf --model-id ... --out OUT    (generates OUT/images first)

Images: ``DIR/<00000>.(png|jpeg|jpg)``, one per prompt index (the official layout); a missing or undecodable
image is an error naming it (the official script asserts every file exists). Scores are cached per image in
``OUT/scores.jsonl`` (``{"index", "score", "judge", "image"}``: the judge's fingerprint and the image's content
hash, ``evals.cache``): a restarted run scores only what is missing, a cache of another judge is refused, and an
image that changed since is scored again. Outputs the ``evals.outputs`` files (``OUT/summary.json``,
``OUT/items.jsonl``: one row per prompt, ``OUT/table.md``, ``OUT/judge.json``), labelled with the judge that produced
the numbers.

Aggregation (``aggregate``), as the official ``show_performance_per_skill``: per prompt the score (mean over its
images); per skill tag of ``genai_skills.json`` the mean over its prompt list; ``basic`` and ``advanced`` are plain
means over their own lists (not means of skill means); ``all`` is the mean over the *union* of every tag's list,
1593 prompts (the 7 untagged prompts are excluded). We add percentile bootstrap 95% CIs over prompts.

Human correlation (``--human-correlation genai_image.json``): how well a judge agrees with GenAI-Bench's released
human 1-5 alignment ratings of its six generators' images, as t2v_metrics' ``GenAIBench_Image.correlation``
(``dataset.py``, "no grouping"): every (generator, prompt) image is one item, its human score the mean of its 3
ratings, all items pooled; reported are Pearson r, Kendall tau-b, and pairwise accuracy with tie calibration
(``acc_23`` of Deutsch et al. 2023, "Ties Matter", the papers' headline agreement number; the papers print
x100). Images: ``DIR/<generator>/<00000>.(jpeg|png|jpg)`` (the released zips' layout) scored with ``--model``
and cached in ``OUT/human_scores.jsonl``, or ``--scores FILE.jsonl`` of ``{"model", "index", "score"}`` rows.
Items without an image or score are counted per generator and reported, not fatal. Writes
``OUT/human_correlation.json`` and ``.md``, labelled with the backend.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from common.files import atomic_write_text, open_rgb

DATA = Path(__file__).parent / "data" / "genai_bench"
SCORES = "scores.jsonl"
BASIC_SKILLS = ("attribute", "scene", "spatial relation", "action relation", "part relation")
ADVANCED_SKILLS = ("counting", "comparison", "differentiation", "negation", "universal")
IMAGE_EXTS = (".png", ".jpeg", ".jpg")


def load_benchmark(data_dir: Path = DATA) -> tuple[dict[int, str], dict[str, list[int]]]:
    """({prompt index: prompt}, {skill tag: [prompt indices]}) from genai_image.json + genai_skills.json.

    ``data_dir``: the folder holding both, or its ``genai_image.json`` (the skills are read beside it)."""
    data_dir = Path(data_dir)
    if data_dir.is_file() and data_dir.name == "genai_image.json":
        data_dir = data_dir.parent
    for name in ("genai_image.json", "genai_skills.json"):
        if not (data_dir / name).is_file():
            raise FileNotFoundError(f"--prompt-file {data_dir} has no {name} (pass a folder holding "
                                    "genai_image.json and genai_skills.json, or its genai_image.json)")
    images = json.loads((Path(data_dir) / "genai_image.json").read_text())
    skills = json.loads((Path(data_dir) / "genai_skills.json").read_text())
    prompts = {int(k): v["prompt"] for k, v in images.items()}
    return prompts, {tag: [int(i) for i in idx] for tag, idx in skills.items()}


def _mean_ci(values: np.ndarray, n_resamples: int, seed: int) -> dict[str, Any]:
    from common.stats import bootstrap_ci

    lo, hi = bootstrap_ci(values, lambda x: float(np.mean(x)), n_resamples=n_resamples, seed=seed)
    return {"mean": float(values.mean()), "std": float(values.std()), "n": int(len(values)), "ci95": [lo, hi]}


def aggregate(scores: dict[int, float], skills: dict[str, list[int]], n_resamples: int = 1000,
              seed: int = 0) -> dict[str, Any]:
    """Official aggregation (module docstring) + bootstrap CIs. ``scores``: {prompt index: per-prompt score}.

    Raises ValueError when a tagged prompt has no score (the official script would crash on it too).
    """
    tagged = sorted({i for idx in skills.values() for i in idx})
    missing = [i for i in tagged if i not in scores]
    if missing:
        raise ValueError(f"{len(missing)} tagged prompts have no score, e.g. indices {missing[:5]}")
    out: dict[str, Any] = {"skills": {}}
    for tag, idx in skills.items():
        out["skills"][tag] = _mean_ci(np.array([scores[i] for i in idx], dtype=float), n_resamples, seed)
    for group in ("basic", "advanced"):
        out[group] = out["skills"][group]
    out["all"] = _mean_ci(np.array([scores[i] for i in tagged], dtype=float), n_resamples, seed)
    out["untagged"] = sorted(set(scores) - set(tagged))
    return out


def find_images(images_dir: Path, indices: Sequence[int]) -> dict[int, Path]:
    """``{index: path}`` of ``<index:05d>.(png|jpeg|jpg)``; raises naming the missing ones (all must exist)."""
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise FileNotFoundError(f"image folder not found: {images_dir}")
    found, missing = {}, []
    for i in indices:
        paths = [images_dir / f"{i:05d}{ext}" for ext in IMAGE_EXTS if (images_dir / f"{i:05d}{ext}").is_file()]
        if not paths:
            missing.append(i)
        else:
            found[i] = paths[0]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(indices)} prompts have no image in {images_dir} "
                                f"(expected <00000>.png|jpeg|jpg), e.g. {[f'{i:05d}' for i in missing[:5]]}")
    return found


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL score cache; a truncated last line (a killed run) is skipped, any other bad line raises."""
    from evals.cache import check_cache_file

    path = Path(path)
    check_cache_file(path)
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    rows = []
    for n, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if n == len(lines):
                continue  # a killed run's partial last line
            raise ValueError(f"{path}:{n}: not JSON") from None
    return rows


def cached_scores(out_dir: Path, name: str, scorer: Any, paths: dict[Any, Path], key: Any
                  ) -> tuple[dict[Any, float], int]:
    """The cache ``out_dir/name`` of ``scorer`` (refused when another judge wrote it), without the rows whose
    image changed since (``evals.cache``). ``key(row)`` -> the row's key in ``paths``. Returns (scores, dropped)."""
    from evals.cache import check_judge, confirm_revision, drop_stale, identity_of

    identity = identity_of(scorer)
    path = Path(out_dir) / name
    rows = read_rows(path)
    check_judge(out_dir, identity, rows, name)
    confirm_revision(out_dir, identity)
    digests: dict[Path, str] = {}

    def digest(row: dict) -> str | None:
        from evals.cache import file_digest

        p = paths.get(key(row))
        if p is not None and p not in digests:
            digests[p] = file_digest(p)
        return digests.get(p)

    rows, dropped = drop_stale(path, rows, digest)
    if dropped:
        print(f"note: {dropped} cached scores of images that changed since were dropped; scoring them again",
              file=sys.stderr)
    return {key(r): float(r["score"]) for r in rows}, dropped


def score_pairs(paths: dict[Any, Path], texts: dict[Any, str], scorer: Any, cache: Path, row: Any,
                desc: str, progress: bool) -> None:
    """Score every key of ``paths`` (image) against ``texts[key]`` in batches, appending ``row(key, score)`` plus
    the judge's fingerprint and the image hash to ``cache`` after each batch (fsync: a kill loses one batch)."""
    from evals.cache import bytes_digest, fingerprint, identity_of

    fp = fingerprint(identity_of(scorer))
    todo = sorted(paths)
    bs = max(1, getattr(scorer, "batch_size", 16))
    for start in tqdm(range(0, len(todo), bs), desc=desc, disable=not progress or not todo):
        chunk = todo[start: start + bs]
        data = {k: paths[k].read_bytes() for k in chunk}  # hashed and decoded from the same bytes
        values = scorer.score([open_rgb(paths[k], data=data[k]) for k in chunk], [texts[k] for k in chunk])
        with open(cache, "a") as f:
            for k, v in zip(chunk, values.tolist(), strict=True):
                f.write(json.dumps({**row(k, v), "judge": fp, "image": bytes_digest(data[k])}) + "\n")
            f.flush()
            os.fsync(f.fileno())


def score_folder(images_dir: Path, prompts: dict[int, str], scorer: Any, out_dir: Path,
                 progress: bool = True, stats: dict[str, int] | None = None) -> dict[int, float]:
    """Score every prompt's image (resumable through ``out_dir/scores.jsonl``, rows ``{"index", "score", "judge",
    "image"}``); returns {index: score}. ``stats["rescored"]``: cached scores dropped because the image changed."""
    from evals.cache import lock_folder

    out_dir = Path(out_dir)
    paths = find_images(images_dir, sorted(prompts))
    with lock_folder(out_dir):
        scores, dropped = cached_scores(out_dir, SCORES, scorer, paths, lambda r: int(r["index"]))
        if stats is not None:
            stats["rescored"] = dropped
        todo = {i: p for i, p in paths.items() if i not in scores}
        score_pairs(todo, prompts, scorer, out_dir / SCORES, lambda i, v: {"index": i, "score": v}, "VQAScore",
                    progress)
        return {**scores, **{int(r["index"]): float(r["score"]) for r in read_rows(out_dir / SCORES)}}


def contract_summary(results: dict[str, Any]) -> dict[str, Any]:
    """``aggregate``'s results as the ``evals.outputs`` summary: headline ``all``; breakdown in the official print
    order, keyed by the JSON paths (``skills.attribute``, ..., ``basic``, ``skills.counting``, ..., ``advanced``)."""
    from evals import outputs

    def entry(r: dict[str, Any]) -> dict[str, Any]:
        return outputs.score(r["mean"], r["ci95"], r["n"])

    breakdown: dict[str, Any] = {}
    for group, names in (("basic", BASIC_SKILLS), ("advanced", ADVANCED_SKILLS)):
        for name in names:
            if name in results["skills"]:  # a custom prompt set may hold fewer skills
                breakdown[f"skills.{name}"] = entry(results["skills"][name])
        breakdown[group] = entry(results[group])
    others = [t for t in results["skills"] if t not in (*BASIC_SKILLS, *ADVANCED_SKILLS, "basic", "advanced")]
    breakdown.update({f"skills.{t}": entry(results["skills"][t]) for t in others})
    return {"benchmark": "genai", "headline": {"name": "all", **entry(results["all"])}, "breakdown": breakdown,
            "items_are": "prompts", **results}


def render_table(results: dict[str, Any]) -> str:
    """``table.md`` of a contract summary (``contract_summary``): the contract rows, then the note of a judge that
    is a pipeline check."""
    from evals import outputs

    return outputs.render_table(results, _detail(results))


def _detail(results: dict[str, Any]) -> str:
    lines = [results["note"]] if "note" in results else []
    if results.get("untagged"):
        lines.append(f"{len(results['untagged'])} untagged prompts are scored but in no group (as the official "
                     "aggregation).")
    return "\n\n".join(lines)


ORACLE_NOTE = ("The shapes world's exact answers on shapes-world prompts: a check of the generator's pipeline, not a "
               "GenAI-Bench score.")


def run(images_dir: Path, scorer: Any, out_dir: Path, data_dir: Path = DATA, n_resamples: int = 1000,
        seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Score + aggregate + write the ``evals.outputs`` files; returns the summary (as in summary.json)."""
    from evals import outputs
    from evals.cache import identity_of

    prompts, skills = load_benchmark(data_dir)
    stats: dict[str, int] = {}
    scores = score_folder(images_dir, prompts, scorer, out_dir, progress, stats)
    # every prompt's image must exist and decode (find_images / open_rgb raise), so none fails or is partial
    counts = {**getattr(scorer, "counts", {}), "rescored_changed_images": stats["rescored"], "scored": len(scores),
              "failed": 0, "partial": 0}
    results = contract_summary({"judge": identity_of(scorer), "generator": outputs.generator_of(images_dir),
                                "prompts": len(prompts), "counts": counts,
                                **aggregate(scores, skills, n_resamples, seed)})
    if scorer.name == "oracle":
        results["note"] = ORACLE_NOTE
    members = {t: set(idx) for t, idx in skills.items()}
    tags = {i: [t for t, idx in members.items() if i in idx] for i in prompts}
    items = [{"index": i, "prompt": prompts[i], "score": scores[i], "skills": tags[i]} for i in sorted(scores)]
    outputs.write_outputs(out_dir, results, items, detail=_detail(results), retire=("results.json",))
    return results


# ------------------------------------------------------------------------------------------------ human correlation
HUMAN_CACHE = "human_scores.jsonl"


def load_human_ratings(path: Path) -> tuple[dict[tuple[str, int], float], list[str]]:
    """``({(generator, prompt index): mean human rating}, out-of-range notes)`` from a ``genai_image.json``.

    Ratings outside 1-5 are KEPT in the mean, as t2v_metrics does, and listed: the released file has two typos,
    ``00231/DALLE_3 [5, 41, 4]`` and ``00252/DeepFloyd_I_XL_v1 [3, 3, 33]``. Non-numeric or empty lists raise.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"human ratings file not found: {path} (GenAI-Bench's genai_image.json, e.g. "
                                f"{DATA / 'genai_image.json'})")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not JSON ({err})") from err
    out: dict[tuple[str, int], float] = {}
    odd: list[str] = []
    for key, entry in data.items() if isinstance(data, dict) else ():
        models = entry.get("models") if isinstance(entry, dict) else None
        if not isinstance(models, dict):
            raise ValueError(f"{path}: prompt {key!r} has no 'models' mapping of human ratings")
        for model, ratings in models.items():
            ok = isinstance(ratings, list) and ratings and all(
                isinstance(r, int | float) and not isinstance(r, bool) and np.isfinite(r) for r in ratings)
            if not ok:
                raise ValueError(f"{path}: prompt {key!r}, model {model!r}: ratings must be a non-empty list of "
                                 f"numbers, got {ratings!r}")
            if not all(1 <= r <= 5 for r in ratings):
                odd.append(f"{key}/{model} {ratings}")
            out[(model, int(key))] = float(np.mean(ratings))
    if not out:
        raise ValueError(f"{path}: no human ratings (expected {{'00000': {{'models': {{name: [1-5, ...]}}}}}})")
    return out, odd


def _pair_diffs(x: np.ndarray, y: np.ndarray, chunk: int = 1024):
    """Yield ``(x_j - x_i, y_j - y_i)`` for all pairs i < j, a block of rows at a time (O(n * chunk) memory)."""
    n = len(x)
    for a in range(0, n, chunk):
        rows = np.arange(a, min(a + chunk, n))
        upper = np.arange(n)[None, :] > rows[:, None]
        yield (x[None, :] - x[rows, None])[upper], (y[None, :] - y[rows, None])[upper]


def agreement(human: Sequence[float], judge: Sequence[float]) -> dict[str, Any]:
    """Agreement of ``judge`` scores with ``human`` scores over all item pairs (both (n,), n >= 2).

    - ``kendall_tau_b``: (C - D) / sqrt((P - T_judge)(P - T_human)), P = n(n-1)/2 pairs, T = pairs tied in that
      variable (ties in both count in both). tau-b, as t2v_metrics, because both sides tie a lot (means of three
      1-5 ratings); tau-c would target rectangular contingency tables, which this is not.
    - ``pairwise_accuracy``: Deutsch et al.'s acc_23 with tie calibration: a pair is right when the judge orders it
      as the humans do, or when the humans tie and the judge scores differ by <= eps; the fraction right over all
      P pairs is maximised over eps in {0} and the judge differences of human-tied pairs (where it can change).
      ``pairwise_accuracy_eps0`` is the same without calibration (only exact judge ties count as ties).
    - ``pearson``: Pearson r (t2v_metrics prints 100 r).
    """
    x, y = np.asarray(judge, dtype=float), np.asarray(human, dtype=float)
    if x.shape != y.shape or x.ndim != 1 or len(x) < 2:
        raise ValueError(f"need two equal-length 1-D score lists with >= 2 items, got {x.shape} and {y.shape}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("judge or human scores contain NaN/inf")
    con = dis = tie_x = tie_y = tie_both = 0
    tied_gaps, con_gaps = [], []  # |judge diff| of human-tied pairs, of concordant pairs
    for dx, dy in _pair_diffs(x, y):
        prod = np.sign(dx) * np.sign(dy)
        con += int((prod > 0).sum())
        dis += int((prod < 0).sum())
        tie_x += int(((dx == 0) & (dy != 0)).sum())
        tie_y += int(((dx != 0) & (dy == 0)).sum())
        tie_both += int(((dx == 0) & (dy == 0)).sum())
        tied_gaps.append(np.abs(dx[dy == 0]))
        con_gaps.append(np.abs(dx[prod > 0]))
    pairs = len(x) * (len(x) - 1) // 2
    tied, conc = np.sort(np.concatenate(tied_gaps)), np.sort(np.concatenate(con_gaps))
    eps = np.unique(np.concatenate([[0.0], tied]))
    right = np.searchsorted(tied, eps, side="right") + len(conc) - np.searchsorted(conc, eps, side="right")
    best = int(np.argmax(right))  # first maximum: the smallest eps reaching it
    denom = np.sqrt(float(pairs - tie_x - tie_both) * float(pairs - tie_y - tie_both))
    return {
        "n_items": int(len(x)), "n_pairs": pairs,
        "pearson": float(np.corrcoef(x, y)[0, 1]) if x.std() > 0 and y.std() > 0 else float("nan"),
        "kendall_tau_b": float((con - dis) / denom) if denom > 0 else float("nan"),
        "pairwise_accuracy": float(right[best] / pairs), "tie_epsilon": float(eps[best]),
        "pairwise_accuracy_eps0": float((con + tie_both) / pairs),
        "pair_counts": {"concordant": con, "discordant": dis, "judge_tie_only": tie_x, "human_tie_only": tie_y,
                        "tie_both": tie_both},
    }


def find_generator_images(images_dir: Path, keys: Sequence[tuple[str, int]]) -> dict[tuple[str, int], Path]:
    """``{(generator, index): DIR/<generator>/<index:05d>.(jpeg|png|jpg)}`` for the keys that have an image."""
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise FileNotFoundError(f"image folder not found: {images_dir} (expected <generator>/<00000>.jpeg)")
    found = {}
    for model, i in keys:
        for ext in (".jpeg", ".png", ".jpg"):
            path = images_dir / model / f"{i:05d}{ext}"
            if path.is_file():
                found[(model, i)] = path
                break
    return found


def score_generator_images(paths: dict[tuple[str, int], Path], prompts: dict[int, str], scorer: Any,
                           out_dir: Path, progress: bool = True) -> dict[tuple[str, int], float]:
    """Judge scores of the released images (resumable through ``out_dir/human_scores.jsonl``, tied to the judge
    and to each image's content as ``scores.jsonl`` is)."""
    from evals.cache import lock_folder

    out_dir = Path(out_dir)
    with lock_folder(out_dir):
        scores, _ = cached_scores(out_dir, HUMAN_CACHE, scorer, paths, lambda r: (str(r["model"]), int(r["index"])))
        todo = {k: p for k, p in paths.items() if k not in scores}
        score_pairs(todo, {k: prompts[k[1]] for k in todo}, scorer, out_dir / HUMAN_CACHE,
                    lambda k, v: {"model": k[0], "index": k[1], "score": v, "backend": scorer.name},
                    "VQAScore (human correlation)", progress)
    cache = out_dir / HUMAN_CACHE
    return {**scores, **(read_generator_scores(cache) if cache.is_file() else {})}


def read_generator_scores(path: Path, backend: str | None = None) -> dict[tuple[str, int], float]:
    """``{(model, index): score}`` from JSONL rows ``{"model", "index", "score", "backend"?}``; a truncated last
    line is skipped; with ``backend``, rows of another backend are refused."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"score file not found: {path}")
    out = {}
    lines = path.read_text().splitlines()
    for n, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):
                continue  # a killed run's partial last line
            raise ValueError(f"{path}:{n}: not JSON") from None
        if backend is not None and row.get("backend") != backend:
            raise ValueError(f"{path} holds scores of backend {row.get('backend')!r}, not {backend!r}: use another "
                             "--out")
        try:
            out[(str(row["model"]), int(row["index"]))] = float(row["score"])
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}:{n}: rows need model, index and score ({err})") from err
    return out


def human_correlation(ratings: dict[tuple[str, int], float], scores: dict[tuple[str, int], float],
                      backend: str) -> dict[str, Any]:
    """Agreement over the rated items that have a judge score; the others are counted per generator."""
    used = sorted(k for k in ratings if k in scores)
    missing = sorted(k for k in ratings if k not in scores)
    if len(used) < 2:
        raise ValueError(f"only {len(used)} of {len(ratings)} rated images have a judge score; nothing to correlate")
    by_model: dict[str, dict[str, Any]] = {}
    for model in sorted({m for m, _ in ratings}):
        mine = [k for k in used if k[0] == model]
        by_model[model] = {"n": len(mine), "missing": sum(1 for k in missing if k[0] == model),
                           "judge_mean": float(np.mean([scores[k] for k in mine])) if mine else None,
                           "human_mean": float(np.mean([ratings[k] for k in mine])) if mine else None}
    return {"backend": backend, "grouping": "none (all generator x prompt images pooled)",
            **agreement([ratings[k] for k in used], [scores[k] for k in used]),
            "counts": {"rated": len(ratings), "scored": len(used), "missing": len(missing)},
            "missing_examples": [f"{m}/{i:05d}" for m, i in missing[:10]], "generators": by_model}


def render_human_table(r: dict[str, Any]) -> str:
    """Markdown of ``human_correlation``'s result."""
    lines = [f"GenAI-Bench human correlation, backend `{r['backend']}`: {r['n_items']} images "
             f"({r['counts']['missing']} of {r['counts']['rated']} rated images missing), {r['n_pairs']} pairs", "",
             "| metric | value |", "|---|---:|",
             f"| pairwise accuracy (tie-calibrated, eps={r['tie_epsilon']:.4g}) | {r['pairwise_accuracy']:.4f} |",
             f"| pairwise accuracy (eps=0) | {r['pairwise_accuracy_eps0']:.4f} |",
             f"| Kendall tau-b | {r['kendall_tau_b']:.4f} |", f"| Pearson r | {r['pearson']:.4f} |", "",
             "| generator | images | missing | judge mean | human mean |", "|---|---:|---:|---:|---:|"]
    for model, g in r["generators"].items():
        fmt = (lambda v: "-" if v is None else f"{v:.3f}")
        lines.append(f"| {model} | {g['n']} | {g['missing']} | {fmt(g['judge_mean'])} | {fmt(g['human_mean'])} |")
    return "\n".join(lines) + "\n"


def human_correlation_run(ratings_path: Path, out_dir: Path, images_dir: Path | None = None, scorer: Any = None,
                          scores_path: Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Score the released images (or read ``scores_path``), correlate, write ``human_correlation.json`` / ``.md``."""
    ratings, odd = load_human_ratings(ratings_path)
    if scores_path is not None:
        scores = read_generator_scores(scores_path)
        if not scores:
            raise ValueError(f"{scores_path}: no score rows")
        first = json.loads(Path(scores_path).read_text().splitlines()[0])  # parsed above, so valid
        backend = str(first.get("backend", f"scores:{Path(scores_path).name}"))
    else:
        if images_dir is None or scorer is None:
            raise ValueError("human correlation needs --images DIR (with a --model) or --scores FILE")
        prompts = {int(k): v["prompt"] for k, v in json.loads(Path(ratings_path).read_text()).items()}
        paths = find_generator_images(images_dir, sorted(ratings))
        scores = score_generator_images(paths, prompts, scorer, out_dir, progress)
        backend = scorer.name
    result = human_correlation(ratings, scores, backend)
    result["ratings_outside_1_5"] = odd  # kept in the means, as the official code does
    if result["counts"]["missing"]:
        print(f"genai_bench: {result['counts']['missing']} of {result['counts']['rated']} rated images have no "
              f"image/score, e.g. {result['missing_examples'][:3]}", file=sys.stderr)
    atomic_write_text(Path(out_dir) / "human_correlation.json", json.dumps(result, indent=1))
    atomic_write_text(Path(out_dir) / "human_correlation.md", render_human_table(result))
    return result


JUDGE_DEFAULT = "clip-flant5-xxl"  # the VQAScore model of GenAI-Bench's published tables


def parser() -> argparse.ArgumentParser:
    from evals import cli
    from evals.vqascore import HF_DEFAULT, SCORERS

    p = cli.Parser(prog="python -m evals.genai_bench", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", type=Path, help="folder of <00000>.png|jpeg, one per prompt (see python -m "
                     "evals.generate --benchmark genai)")
    src.add_argument("--ckpt", help="checkpoint of this harness: generate OUT/images first (seed + index)")
    src.add_argument("--scores", type=Path, help="with --human-correlation: per-image judge scores, JSONL rows "
                     '{"model", "index", "score", "backend"}, instead of scoring --images')
    p.add_argument("--human-correlation", type=Path, metavar="GENAI_IMAGE_JSON",
                   help="agreement with the human ratings in this file; --images is then DIR/<generator>/<00000>.jpeg")
    cli.add_judge(p, sorted(SCORERS), JUDGE_DEFAULT,
                  help="VQAScore backend: clip-flant5-xxl / -xl (the published tables' model), hf (any transformers "
                       "VLM, --judge-model), openai (a server with logprobs, --judge-url), oracle (the shapes "
                       "world's exact answer, offline: --prompt-file of python -m evals.generate --prompts shapes)",
                  model_help=f"hf: hub id or local folder (default {HF_DEFAULT}); openai: the served model name; "
                             "clip-flant5-*: a local checkpoint folder (default: the hub id)")
    p.add_argument("--judge-tokenizer", default=None,
                   help="clip-flant5-*: its T5 tokenizer as a local folder (default: the checkpoint folder's own, "
                        "else google/flan-t5-xxl / -xl from the hub)")
    p.add_argument("--judge-vision-tower", default=None,
                   help="clip-flant5-*: its CLIP vision tower as a local folder (default: the checkpoint's "
                        "mm_vision_tower hub id, openai/clip-vit-large-patch14-336)")
    cli.add_placement(p)
    cli.add_batch_size(p, 16, help="image-prompt pairs per model call (openai: concurrent requests)")
    p.add_argument(cli.PROMPT_FILE, type=Path, default=DATA,
                   help="the prompt set: a genai_image.json (its genai_skills.json beside it) or their folder")
    cli.add_seed(p, 42, help="--ckpt: the image of prompt i uses seed + i (GenAI-Bench's 42); also the bootstrap's "
                             "seed")
    cli.add_n_resamples(p)
    cli.add_out(p, help="scores.jsonl (the resumable cache), summary.json, items.jsonl, table.md, judge.json")
    cli.alias(p, "--model", "--judge", choices=sorted(SCORERS))
    cli.alias(p, "--model-id", "--judge-model")
    cli.alias(p, "--url", "--judge-url")
    cli.alias(p, "--api-key-env", "--judge-api-key-env")
    cli.alias(p, "--data", cli.PROMPT_FILE, type=Path)
    return p


def check_args(a: argparse.Namespace) -> None:
    """Flag combinations, before anything is read or loaded."""
    if a.scores is not None and a.human_correlation is None:
        raise ValueError("--scores only applies with --human-correlation")
    if a.human_correlation is not None and a.ckpt is not None:
        raise ValueError("--human-correlation judges GenAI-Bench's released images: pass --images DIR or --scores "
                         "FILE")
    if a.judge == "oracle" and a.human_correlation is not None and a.scores is None:
        raise ValueError("--judge oracle cannot judge GenAI-Bench's natural-language prompts; use clip-flant5-xxl, "
                         "hf or openai")
    if a.judge == "openai" and a.scores is None and (not a.judge_url or not a.judge_model):
        raise ValueError("--judge openai needs --judge-url (API base) and --judge-model (the served model name)")
    if a.judge_url:
        from evals.judges import chat_endpoint

        chat_endpoint(a.judge_url)
    if a.device_map is not None:
        from evals.runtime import check_device_map

        check_device_map(a.device_map)


def scorer_spec(a: argparse.Namespace) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(backend, constructor arguments, identity) of ``--judge``: the identity is known before any weights load,
    so a resume under another judge is refused first."""
    from evals.clip_flant5 import clip_flant5_identity
    from evals.vqascore import HF_DEFAULT
    from evals.vqascore_base import scorer_identity

    if a.judge == "openai":
        return ("openai", {"url": a.judge_url, "model": a.judge_model, "batch_size": a.batch_size,
                           "api_key": os.environ.get(a.judge_api_key_env)},
                scorer_identity("openai", a.judge_model, top_logprobs=20))
    if a.judge == "oracle":  # the shapes world's exact answer (evals.shapes_prompts)
        from evals.shapes_prompts import genai_metadata

        return "oracle", {"metadata": genai_metadata(load_benchmark(a.prompt_file)[0])}, {"judge": "oracle"}
    place = {"device": a.device, "dtype": a.dtype, "device_map": a.device_map, "batch_size": a.batch_size}
    if a.judge.startswith("clip-flant5"):
        return (a.judge, {"model_id": a.judge_model, "tokenizer_id": a.judge_tokenizer,
                          "vision_tower": a.judge_vision_tower, **place}, clip_flant5_identity(a.judge, a.judge_model))
    model = a.judge_model or HF_DEFAULT
    return "hf", {"model_id": model, **place}, scorer_identity("hf", model)


def build_scorer(a: argparse.Namespace) -> Any:
    """The ``--judge`` backend (a VLM loads its weights here: call after every input check)."""
    from evals.vqascore import make_scorer

    name, kwargs, _ = scorer_spec(a)
    return make_scorer(name, **kwargs)


def check_resume(out_dir: Path, name: str, identity: dict[str, Any]) -> None:
    """Before a judge loads: the cache ``out_dir/name`` may only be resumed by the same judge."""
    from evals.cache import check_judge

    check_judge(out_dir, identity, read_rows(Path(out_dir) / name), name, record=False)


def _main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from evals.cache import lock_folder

    a = parser().parse_args(argv)
    check_args(a)
    with lock_folder(a.out):  # one run per --out, taken before any image is generated or judge loads
        return _run_command(a)


def _run_command(a: argparse.Namespace) -> dict[str, Any]:
    """The command once ``--out`` is locked."""
    if a.human_correlation is not None:
        load_human_ratings(a.human_correlation)  # a bad ratings file fails before any model loads
        if a.scores is not None:
            result = human_correlation_run(a.human_correlation, a.out, scores_path=a.scores)
        else:
            if not Path(a.images).is_dir():
                raise FileNotFoundError(f"image folder not found: {a.images} (expected <generator>/<00000>.jpeg)")
            check_resume(a.out, HUMAN_CACHE, scorer_spec(a)[2])
            result = human_correlation_run(a.human_correlation, a.out, a.images, build_scorer(a))
        print(render_human_table(result))
        return result
    prompts, _ = load_benchmark(a.prompt_file)
    if a.judge == "oracle":
        from evals.shapes_prompts import genai_metadata

        genai_metadata(prompts)  # every prompt is a shapes-world one, before any image is read or generated
    if a.images is None:
        from evals import images as layouts

        if not Path(a.ckpt).is_file():
            raise FileNotFoundError(f"checkpoint not found: {a.ckpt}")
        images = a.out / "images"
        layouts.write_folder("genai", layouts.checkpoint_generator(a.ckpt, a.device), prompts, images, 1, a.seed,
                             a.batch_size, generator=f"ckpt:{Path(a.ckpt).resolve()}", rank=0, world=1)
    else:
        images = a.images
    find_images(images, sorted(prompts))  # every prompt's image exists before the judge loads
    check_resume(a.out, SCORES, scorer_spec(a)[2])
    results = run(images, build_scorer(a), a.out, a.prompt_file, a.n_resamples, a.seed)
    print(render_table(results))
    return results


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """CLI entry; returns the results. Input errors exit 2 with one ``error:`` line."""
    from evals.cli import entry

    return entry(_main)(argv)


if __name__ == "__main__":
    main()
