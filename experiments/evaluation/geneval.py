"""GenEval inside a sweep: sample the shapes world's GenEval prompts, score them with the exact detector.

Writes ``eval/evaluation_metadata.jsonl``, the images in GenEval's layout under ``eval/images/`` (and a grid of
them, ``eval/samples.png``) and the official per-image rows under ``eval/geneval/``; returns the overall score
(95% CI over prompts, resampled within tasks), each task's accuracy (CI over that task's prompts) and the share of
correct images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from common.geneval_spec import TASKS
from experiments.loggers import sample_grid
from experiments.run_dir import RunDir

METRICS: tuple[str, ...] = ("geneval.overall", *(f"geneval.{t}" for t in TASKS))


def run(module: Any, config: dict[str, Any], run_dir: Path) -> list[dict[str, Any]]:
    """Sample ``eval.geneval`` prompts (``n_per_task``, ``n_samples`` images each, ``seed``) and score them."""
    from evals.geneval import evaluate_folder
    from evals.images import generate_geneval_folder
    from world.prompts import write_geneval_metadata

    gcfg = config["eval"]["geneval"]
    rd = RunDir(run_dir)
    metadata = write_geneval_metadata(rd.eval / "evaluation_metadata.jsonl", gcfg["n_per_task"], gcfg["seed"])
    generate_geneval_folder(
        module, metadata, rd.eval / "images", n_samples=gcfg["n_samples"], seed=gcfg["seed"],
        batch_size=config["eval"]["batch_size"],
    )
    sample_grid(rd.eval / "images", rd.sample_grid)
    rows, summary = evaluate_folder(rd.eval / "images", detector="shapes", out_dir=rd.benchmark_dir("geneval"))
    return metric_rows(summary, rows, config["seed"])


def metric_rows(summary: dict[str, Any], rows: list[dict], seed: int) -> list[dict[str, Any]]:
    """Tidy rows of one scored folder: overall (its bootstrap CI), each task (CI over the task's prompts, seeded
    with the run's seed), % correct images (no CI)."""
    from evals.geneval import component_shares, per_prompt_scores, task_ci

    lo, hi = summary["ci95"]["overall"]
    per_prompt = per_prompt_scores(rows)
    out = [{"metric": "geneval.overall", "value": summary["overall"], "ci_low": lo, "ci_high": hi,
            "n": len(per_prompt)}]
    for task, value in summary["tasks"].items():
        tlo, thi = task_ci(per_prompt, task, seed=seed)
        out.append({"metric": f"geneval.{task}", "value": value, "ci_low": tlo, "ci_high": thi,
                    "n": int((per_prompt["tag"] == task).sum())})
    out.append({"metric": "geneval.images", "value": summary["images"], "ci_low": None, "ci_high": None,
                "n": summary["counts"].get("images", len(rows))})
    # where samples fail (evals.geneval.component_outcomes): geneval.part.<component> over all tasks, then
    # geneval.part.<component>.<task>; share of the images where the component applies (n), no CI
    if all("components" in r for r in rows):
        for rec in component_shares(rows).itertuples():
            name = f"geneval.part.{rec.component}" + ("" if rec.task == "all" else f".{rec.task}")
            out.append({"metric": name, "value": float(rec.value), "ci_low": None, "ci_high": None, "n": int(rec.n)})
    return out


def per_prompt(run_dir: Path) -> pd.DataFrame | None:
    """Per-prompt outcomes of a finished run (``evals.geneval.per_prompt_scores``), None when it has none."""
    from evals.geneval import per_prompt_scores, read_results

    path = RunDir(run_dir).geneval_results
    if not path.is_file():
        return None
    rows = read_results(path)
    return per_prompt_scores(rows) if rows else None
