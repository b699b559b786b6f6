"""VERIFI rewrite faithfulness of an encoder: does the VLM's rewrite keep the user's intent?

    python -m analysis.rewrite_faithfulness --encoder tiny-vlm --out results/verifi [--n-per-task 40]

Short prompts: the GenEval-shapes prompts (``write_geneval_metadata``, a seed the eval sweeps also use); a rewrite
is faithful when its objects, counts, colours and relation match the prompt (``edits.rewrite_faithful``; what the
prompt leaves open, e.g. free colours and places, the rewrite may choose). Edits: image + instruction; a rewrite is
faithful when it lists exactly the edited scene's coloured objects. Greedy decoding, so the numbers are exact
functions of the encoder.

Writes ``faithfulness.csv`` (``kind, task, n, faithful, rate, ci_low, ci_high``; 95% Wilson intervals),
``rewrites.jsonl`` (every prompt with its rewrite and verdict) and ``faithfulness.png/.pdf``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis.common import run_cli, save_figure, write_csv

GOAL = 0.9


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n."""
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return float(mid - half), float(mid + half)


def _scene_groups(scene: Any) -> dict[tuple[str, str], int]:
    out: dict[tuple[str, str], int] = {}
    for o in scene.objects:
        out[(o.color, o.cls)] = out.get((o.color, o.cls), 0) + 1
    return out


def measure(encoder: Any, n_per_task: int = 40, n_edits: int = 100, seed: int = 1234,
            batch_size: int = 64) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """Faithfulness table and per-prompt records (see module docstring)."""
    import tempfile

    from tqdm.auto import tqdm

    from common.prompt import Prompt
    from world.edits import parse_description, random_edit, rewrite_faithful
    from world.prompts import write_geneval_metadata
    from world.scene import render

    with tempfile.TemporaryDirectory() as tmp:
        metas = write_geneval_metadata(Path(tmp) / "m.jsonl", n_per_task, seed)
    records: list[dict[str, Any]] = []
    for i in tqdm(range(0, len(metas), batch_size), desc="rewrites (prompts)"):
        chunk = metas[i: i + batch_size]
        for meta, text in zip(chunk, encoder.rewrite([m["prompt"] for m in chunk]), strict=True):
            records.append({"kind": "prompt", "task": meta["tag"], "input": meta["prompt"], "rewrite": text,
                            "faithful": rewrite_faithful(meta, text)})
    rng = np.random.default_rng([seed, 7])
    edits = [random_edit(rng) for _ in range(n_edits)]
    for i in tqdm(range(0, len(edits), batch_size), desc="rewrites (edits)"):
        chunk = edits[i: i + batch_size]
        prompts = [Prompt(ins, (render(src),)) for src, ins, _ in chunk]
        for (_, ins, tgt), text in zip(chunk, encoder.rewrite(prompts), strict=True):
            parsed = parse_description(text)
            ok = parsed is not None and parsed["groups"] == _scene_groups(tgt)
            records.append({"kind": "edit", "task": ins.split()[0], "input": ins, "rewrite": text, "faithful": ok})
    df = pd.DataFrame(records)
    rows = []
    groups = list(df.groupby(["kind", "task"])) + [((kind, "all"), g) for kind, g in df.groupby("kind")]
    for (kind, task), g in groups:
        k, n = int(g["faithful"].sum()), len(g)
        lo, hi = wilson(k, n)
        rows.append({"kind": kind, "task": task, "n": n, "faithful": k, "rate": k / n, "ci_low": lo, "ci_high": hi})
    table = pd.DataFrame(rows)
    table["encoder"] = getattr(encoder, "name", "")
    return table, records


def plot(table: pd.DataFrame, out_dir: Path) -> Path:
    """Bars of the faithful fraction per task with Wilson CIs and the 90% goal line."""
    import matplotlib.pyplot as plt

    t = table.reset_index(drop=True)
    fig, ax = plt.subplots(figsize=(8, 3.2))
    x = np.arange(len(t))
    colors = ["tab:blue" if k == "prompt" else "tab:orange" for k in t["kind"]]
    err = np.clip([t["rate"] - t["ci_low"], t["ci_high"] - t["rate"]], 0, None)  # Wilson bounds at 0/1: rounding
    ax.bar(x, t["rate"], color=colors, yerr=err, capsize=3)
    ax.axhline(GOAL, color="k", ls="--", lw=1, label=f"goal {GOAL:.0%}")
    ax.set_xticks(x, [f"{k}\n{task}" if task == "all" else task for k, task in zip(t["kind"], t["task"],
                                                                                  strict=True)],
                  rotation=45, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("faithful rewrites")
    ax.set_title(f"VERIFI rewrite faithfulness ({t['encoder'].iloc[0]}; blue: short prompts, orange: edits)",
                 fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    return save_figure(fig, out_dir, "faithfulness")


def main(argv: list[str] | None = None) -> Path:
    from common.files import atomic_write_text
    from models.encoders import build_encoder

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", default="tiny-vlm",
                    help="encoder preset with VERIFI (models.encoders.ENCODER_PRESETS)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--n-per-task", type=int, default=40)
    ap.add_argument("--n-edits", type=int, default=120)
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args(argv)
    encoder = build_encoder(args.encoder)
    table, records = measure(encoder, args.n_per_task, args.n_edits, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(table, args.out / "faithfulness.csv")
    atomic_write_text(args.out / "rewrites.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    return plot(table, args.out)


if __name__ == "__main__":
    run_cli(main)
