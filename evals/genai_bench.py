"""GenAI-Bench (1600 prompts) scored with VQAScore, aggregated exactly as t2v_metrics' ``genai_bench/evaluate.py``.

    python -m evals.genai_bench --images DIR --model hf --model-id Qwen/Qwen2.5-VL-7B-Instruct --out OUT
    python -m evals.genai_bench --ckpt CKPT --model hf --model-id ... --out OUT    (generates OUT/images first)

Images: ``DIR/<00000>.(png|jpeg|jpg)``, one per prompt index (the official layout); a missing or undecodable
image is an error naming it (the official script asserts every file exists). Scores are cached per image in
``OUT/scores.jsonl`` (``{"index", "score", "backend"}``): a restarted run scores only what is missing, and a
cache from another backend is refused. Outputs ``OUT/results.json`` and ``OUT/table.md``, both labelled with the
backend that produced the numbers.

Aggregation (``aggregate``), as the official ``show_performance_per_skill``: per prompt the score (mean over its
images); per skill tag of ``genai_skills.json`` the mean over its prompt list; ``basic`` and ``advanced`` are plain
means over their own lists (not means of skill means); ``all`` is the mean over the *union* of every tag's list,
1593 prompts (the 7 untagged prompts are excluded). We add percentile bootstrap 95% CIs over prompts.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from evals.files import atomic_write_text, open_rgb

DATA = Path(__file__).parent / "data" / "genai_bench"
BASIC_SKILLS = ("attribute", "scene", "spatial relation", "action relation", "part relation")
ADVANCED_SKILLS = ("counting", "comparison", "differentiation", "negation", "universal")
IMAGE_EXTS = (".png", ".jpeg", ".jpg")


def load_benchmark(data_dir: Path = DATA) -> tuple[dict[int, str], dict[str, list[int]]]:
    """({prompt index: prompt}, {skill tag: [prompt indices]}) from genai_image.json + genai_skills.json."""
    images = json.loads((Path(data_dir) / "genai_image.json").read_text())
    skills = json.loads((Path(data_dir) / "genai_skills.json").read_text())
    prompts = {int(k): v["prompt"] for k, v in images.items()}
    return prompts, {tag: [int(i) for i in idx] for tag, idx in skills.items()}


def _mean_ci(values: np.ndarray, n_resamples: int, seed: int) -> dict[str, Any]:
    from evals.stats import bootstrap_ci

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


def read_cache(path: Path, backend: str) -> dict[int, float]:
    """Cached per-image scores; a truncated last line (killed run) is ignored, another backend's cache refused."""
    if not path.is_file():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("backend") != backend:
            raise ValueError(f"{path} holds scores of backend {row.get('backend')!r}, not {backend!r}: "
                             "use another --out")
        out[int(row["index"])] = float(row["score"])
    return out


def score_folder(images_dir: Path, prompts: dict[int, str], scorer: Any, out_dir: Path,
                 progress: bool = True) -> dict[int, float]:
    """Score every prompt's image (resumable through ``out_dir/scores.jsonl``); returns {index: score}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache_path = out_dir / "scores.jsonl"
    paths = find_images(images_dir, sorted(prompts))
    scores = read_cache(cache_path, scorer.name)
    todo = [i for i in sorted(prompts) if i not in scores]
    bs = max(1, getattr(scorer, "batch_size", 16))
    for start in tqdm(range(0, len(todo), bs), desc="VQAScore", disable=not progress or not todo):
        chunk = todo[start: start + bs]
        values = scorer.score([open_rgb(paths[i]) for i in chunk], [prompts[i] for i in chunk])
        with open(cache_path, "a") as f:
            for i, v in zip(chunk, values.tolist(), strict=True):
                f.write(json.dumps({"index": i, "score": v, "backend": scorer.name}) + "\n")
                scores[i] = v
            f.flush()
            os.fsync(f.fileno())
    return scores


def render_table(results: dict[str, Any]) -> str:
    """Markdown in the official print order: basic skills + basic, advanced skills + advanced, overall."""
    def cell(r: dict) -> str:
        return f"{r['mean']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] (n={r['n']})"

    lines = [f"GenAI-Bench VQAScore, backend `{results['backend']}`", "", "| group | skill | score [95% CI] |",
             "|---|---|---:|"]
    for group, names in (("basic", BASIC_SKILLS), ("advanced", ADVANCED_SKILLS)):
        for name in names:
            if name in results["skills"]:  # a custom --data may hold fewer skills
                lines.append(f"| {group} | {name} | {cell(results['skills'][name])} |")
        lines.append(f"| {group} | **{group}** | {cell(results[group])} |")
    lines.append(f"| overall | **all** | {cell(results['all'])} |")
    return "\n".join(lines) + "\n"


def run(images_dir: Path, scorer: Any, out_dir: Path, data_dir: Path = DATA, n_resamples: int = 1000,
        seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Score + aggregate + write results.json / table.md; returns the results dict."""
    prompts, skills = load_benchmark(data_dir)
    scores = score_folder(images_dir, prompts, scorer, out_dir, progress)
    results = {"backend": scorer.name, "prompts": len(prompts), "counts": dict(getattr(scorer, "counts", {})),
               **aggregate(scores, skills, n_resamples, seed)}
    atomic_write_text(Path(out_dir) / "results.json", json.dumps(results, indent=1))
    atomic_write_text(Path(out_dir) / "table.md", render_table(results))
    return results


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from evals.vqascore import SCORERS, make_scorer

    p = argparse.ArgumentParser(prog="python -m evals.genai_bench", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", type=Path, help="folder of <00000>.png|jpeg, one per prompt")
    src.add_argument("--ckpt", help="checkpoint of this harness: generate OUT/images first (seed 42 + index)")
    p.add_argument("--model", default="hf", choices=sorted(SCORERS), help="VQAScore backend")
    p.add_argument("--model-id", help="hf: hub id or local path of the VLM, e.g. Qwen/Qwen2.5-VL-7B-Instruct; "
                   "openai: the served model name")
    p.add_argument("--url", help="openai: API base of an OpenAI-compatible server, e.g. http://host:8000/v1")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="openai: env var holding the key")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--data", type=Path, default=DATA, help="folder with genai_image.json + genai_skills.json")
    p.add_argument("--n-resamples", type=int, default=1000)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    if a.model == "oracle":
        raise ValueError("--model oracle cannot judge GenAI-Bench's natural-language prompts; use hf or openai")
    if a.model == "openai":
        if not a.url or not a.model_id:
            raise ValueError("--model openai needs --url (API base) and --model-id (the served model name)")
        scorer = make_scorer("openai", url=a.url, model=a.model_id, batch_size=a.batch_size,
                             api_key=os.environ.get(a.api_key_env))
    else:
        scorer = make_scorer("hf", model_id=a.model_id, batch_size=a.batch_size)
    if a.images is None:
        from evals.images import generate_genai_folder

        images = generate_genai_folder(a.ckpt, load_benchmark(a.data)[0], a.out / "images")
    else:
        images = a.images
    results = run(images, scorer, a.out, a.data, a.n_resamples)
    print(render_table(results))
    return results


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None
