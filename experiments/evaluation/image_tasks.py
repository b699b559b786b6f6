"""Reconstruction and editing inside a sweep (``evals.reconstruction``): PSNR, SSIM and, for edits, the exact
check of the edited objects, each with a 95% bootstrap CI over the held-out items (``eval.image``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from experiments.run_dir import RunDir


def _rows(kind: str, module: Any, config: dict[str, Any], run_dir: Path) -> list[dict[str, Any]]:
    from evals import reconstruction

    ecfg = config["eval"]
    icfg = ecfg["image"]
    summ = reconstruction.evaluate(module, kind, RunDir(run_dir).benchmark_dir(kind), n=icfg["n"], seed=icfg["seed"],
                                   batch_size=ecfg["batch_size"])
    out = []
    for key in ("psnr", "ssim", "correct"):
        if key in summ:
            lo, hi = summ[f"{key}_ci"]
            out.append({"metric": f"{kind}.{key}", "value": summ[key], "ci_low": lo, "ci_high": hi, "n": summ["n"]})
    return out


def reconstruction(module: Any, config: dict[str, Any], run_dir: Path) -> list[dict[str, Any]]:
    """The VLM sees a held-out render as its only input; the sample is compared with that render."""
    return _rows("reconstruction", module, config, run_dir)


def edit(module: Any, config: dict[str, Any], run_dir: Path) -> list[dict[str, Any]]:
    """The VLM sees a held-out render and an edit instruction; the sample is compared with the edited render."""
    return _rows("edit", module, config, run_dir)
