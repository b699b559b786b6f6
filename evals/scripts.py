"""Console commands for the evaluation tools, installed with the package (``pip install unifusion-harness``).

Each runs the same ``main`` as its ``python -m evals.<tool>`` (the documented interface), with the same flags,
messages and exit codes: ``unifusion-generate`` = ``python -m evals.generate``, ``unifusion-geneval``,
``unifusion-dpg`` (``evals.dpg_refined``), ``unifusion-genai-bench``, ``unifusion-eval-all`` (``evals.all``),
``unifusion-audit``, ``unifusion-ab`` (``evals.ab``). A console script exits with what its function returns: the
tools' ``main`` return their results (dicts, tables) for Python callers, so these wrappers return 0 for those.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

TOOLS = {"generate": "evals.generate", "geneval": "evals.geneval", "dpg": "evals.dpg_refined",
         "genai_bench": "evals.genai_bench", "eval_all": "evals.all", "audit": "evals.audit", "ab": "evals.ab.__main__"}


def _command(module: str) -> Callable[[], int]:
    def run() -> int:
        out = importlib.import_module(module).main()
        return out if isinstance(out, int) and not isinstance(out, bool) else 0

    run.__doc__ = f"``python -m {module.removesuffix('.__main__')}`` as a console command."
    return run


generate, geneval, dpg, genai_bench, eval_all, audit, ab = (_command(TOOLS[k]) for k in TOOLS)
