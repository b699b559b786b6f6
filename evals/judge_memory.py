"""``python -m evals.judge_memory MODEL_ID ...``: parameters and weight memory of each model, from its config alone
(no weights read), to size a judge's GPU before downloading it. A command of its own so that ``evals.runtime`` stays
below ``evals.cli`` (whose ``--device`` type checks devices there)."""

from __future__ import annotations

import torch

from evals import cli
from evals.runtime import parameter_count, weights_gib


def main(argv: list[str] | None = None) -> None:
    """Parameters and weight memory (bf16, fp32) of each model, counted on the meta device."""
    p = cli.Parser(prog="python -m evals.judge_memory", description=main.__doc__)
    p.add_argument("models", nargs="+", help="hub ids or local folders holding a config.json")
    a = p.parse_args(argv)
    print(f"{'model':<48} {'params':>10} {'bf16 GiB':>9} {'fp32 GiB':>9}")
    for model_id in a.models:
        n = parameter_count(model_id)
        print(f"{model_id:<48} {n / 1e9:>9.3f}B {weights_gib(n, torch.bfloat16):>9.1f} "
              f"{weights_gib(n, torch.float32):>9.1f}")


if __name__ == "__main__":
    cli.entry(main)()
