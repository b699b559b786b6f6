"""Score one generator on every benchmark whose image folder is there, and write one combined table.

    python -m evals.all --images-root DIR --out OUT                     (each benchmark's default judge)
    python -m evals.all --images-root DIR --judge offline --out OUT     (the shapes world's exact judges)

``DIR`` holds one folder per benchmark, named as ``python -m evals.generate --benchmark`` names them: ``geneval/``,
``dpg/``, ``genai/`` (any subset). Each is scored by its own tool into ``OUT/<benchmark>/`` (the ``evals.outputs``
files: summary.json, items.jsonl, table.md, judge.json, plus the benchmark's own), exactly as running that tool
alone would; then ``OUT/summary.json`` and ``OUT/table.md`` hold one row per benchmark scored: its headline score,
95% CI, n and judge, read back from that benchmark's own summary.json.

Prompt sets: a GenEval folder carries its own metadata; DPG and GenAI-Bench take ``--dpg-prompt-file`` /
``--genai-prompt-file`` when given, else the folder's own ``dpg_bench.csv`` / ``genai_image.json`` (what
``--prompts shapes`` writes there), else each tool's default (DPG: the hub dataset; GenAI-Bench: the shipped 1600
prompts).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from evals import cli, outputs
from evals.images import BENCHMARKS

OFFLINE_JUDGES: dict[str, str] = {"geneval": "shapes", "dpg": "oracle", "genai": "oracle"}


def _judge_choices() -> dict[str, list[str]]:
    """Each benchmark's ``--judge`` names (from its own registry, so a judge added there is accepted here)."""
    from evals.detectors import DETECTORS
    from evals.dpg_refined import JUDGE_CHOICES
    from evals.vqascore import SCORERS

    return {"geneval": sorted(DETECTORS), "dpg": list(JUDGE_CHOICES), "genai": sorted(SCORERS)}


def parser() -> cli.Parser:
    p = cli.Parser(prog="python -m evals.all", description=__doc__.split("\n\n")[0] + "\n\n"
                   "  python -m evals.all --images-root DIR --out OUT   (DIR: geneval/, dpg/, genai/ of "
                   "python -m evals.generate)")
    p.add_argument("--images-root", required=True, type=Path,
                   help="a folder holding geneval/, dpg/ and/or genai/ image folders")
    cli.add_out(p, help="OUT/<benchmark>/ (each tool's files) and the combined summary.json, table.md")
    p.add_argument("--judge", choices=("default", "offline"), default="default",
                   help="default: each benchmark's real judge; offline: the shapes world's exact judges (geneval "
                        "shapes, dpg oracle, genai oracle), for folders of python -m evals.generate --prompts shapes")
    for bench in BENCHMARKS:
        p.add_argument(f"--{bench}-judge", default=None, metavar="NAME",
                       help=f"{bench}: this judge instead (a name its own --judge takes)")
    p.add_argument("--dpg-prompt-file", type=Path, default=None,
                   help="dpg: the questions CSV (default: DIR/dpg/dpg_bench.csv when there, else the hub dataset)")
    p.add_argument("--genai-prompt-file", type=Path, default=None,
                   help="genai: a genai_image.json or its folder (default: DIR/genai/genai_image.json when there, "
                        "else the shipped prompts)")
    cli.add_placement(p)
    cli.add_n_resamples(p)
    return p


def plan(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """``[(benchmark, its tool's argv)]`` for the benchmark folders under ``--images-root``; raises (before
    anything is scored) on a missing root, a root without any benchmark folder, or an unknown judge name."""
    root = Path(args.images_root)
    if not root.is_dir():
        raise FileNotFoundError(f"--images-root {root} is not a folder")
    present = [b for b in BENCHMARKS if (root / b).is_dir()]
    if not present:
        found = sorted(p.name for p in root.iterdir())[:5]
        raise ValueError(f"{root} holds none of the benchmark folders {', '.join(f'{b}/' for b in BENCHMARKS)} "
                         f"(found: {found or 'nothing'}); write them with python -m evals.generate --benchmark B "
                         f"--out {root}/B")
    choices = _judge_choices()
    runs = []
    for bench in present:
        judge = getattr(args, f"{bench}_judge") or (OFFLINE_JUDGES[bench] if args.judge == "offline" else None)
        if judge is not None and judge not in choices[bench]:
            raise ValueError(f"--{bench}-judge {judge!r} is not a {bench} judge; valid: {', '.join(choices[bench])}")
        folder = root / bench
        argv = ["--images", str(folder), "--out", str(Path(args.out) / bench), "--n-resamples", str(args.n_resamples),
                "--device", args.device, "--dtype", args.dtype]
        if args.device_map is not None:
            argv += ["--device-map", args.device_map]
        if judge is not None:
            argv += ["--judge", judge]
        prompt_file = {"dpg": folder / "dpg_bench.csv", "genai": folder / "genai_image.json"}.get(bench)
        if prompt_file is not None:
            given = getattr(args, f"{bench}_prompt_file")  # an explicit flag wins over the folder's own file
            if given is not None:
                argv += [cli.PROMPT_FILE, str(given)]
            elif prompt_file.is_file():
                argv += [cli.PROMPT_FILE, str(prompt_file)]
        runs.append((bench, argv))
    return runs


def combined_row(bench: str, summary: dict[str, Any]) -> dict[str, Any]:
    """One row of the combined table: the benchmark's headline, as its own summary.json holds it."""
    head = summary["headline"]
    return {"benchmark": bench, "score": head["name"], "value": head["value"], "ci95": head["ci95"], "n": head["n"],
            "judge": summary["judge"], "generator": summary.get("generator"),
            "counts": {k: summary["counts"][k] for k in outputs.COUNT_KEYS}}


def _main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    import importlib

    from evals.cache import lock_folder

    args = parser().parse_args(argv)
    runs = plan(args)
    tools = {"geneval": "evals.geneval", "dpg": "evals.dpg_refined", "genai": "evals.genai_bench"}
    with lock_folder(args.out):  # one combined run per --out (each tool also locks its own subfolder)
        rows = []
        for bench, bench_argv in runs:
            print(f"== {bench}: python -m {tools[bench]} {' '.join(bench_argv)}", file=sys.stderr)
            importlib.import_module(tools[bench]).main(bench_argv)
            rows.append(combined_row(bench, outputs.read_summary(Path(args.out) / bench)))
        absent = [b for b in BENCHMARKS if b not in dict(runs)]
        combined = outputs.write_combined(args.out, rows, absent)
    print(outputs.render_combined_table(combined))
    return combined


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """CLI entry; returns the combined summary. Input errors exit 2 with one ``error:`` line."""
    return cli.entry(_main)(argv)


if __name__ == "__main__":
    main()
