"""Zero-shot editing inside a sweep (``evals.zero_shot_edit``, paper Fig. 15b): held-out edits (``eval.image``)
sampled with the source image's tokens for the first p of the steps and the target's description after, for
every p of ``evals.zero_shot_edit.FRACTIONS``; exact edit check, target change present, PSNR of the untouched
pixels and PSNR to the target, each with a 95% bootstrap CI over the items."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from experiments.run_dir import RunDir


def run(module: Any, config: dict[str, Any], run_dir: Path) -> list[dict[str, Any]]:
    from evals import zero_shot_edit

    ecfg = config["eval"]
    return zero_shot_edit.evaluate(module, RunDir(run_dir).benchmark_dir("zero_shot_edit"), n=ecfg["image"]["n"],
                                   seed=ecfg["image"]["seed"], batch_size=ecfg["batch_size"])
