"""What every analysis shares: checkpoints, the LAP check, default prompts, atomic CSV and figure writing, the CLI.

An analysis is a module ``python -m analysis.<name> --ckpt CKPT ... --out DIR`` that writes the CSV it computed
and a figure (PNG + PDF) drawn from that CSV alone, so the figure can be redrawn without the model.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from common.cli import fail


def load_checkpoint(ckpt: str | Path | Any, device: str = "cpu"):
    """A ``UniFusionModule`` in eval mode from a checkpoint path (a module passes through), on the CPU by default."""
    from models.checkpoints import load_module

    return load_module(ckpt, device)


def require_lap(module, analysis: str, ema: bool = True):
    """The module's LAP conditioner (the EMA copy by default: what sampling uses).

    Raises ValueError naming the checkpoint's candidate when it has no LAP (``last_layer``, ``kv_fusion``, ``hsi``).
    """
    from models.conditioning.lap import LAPConditioner

    cond = module.ema.module["conditioner"] if ema else module.conditioner
    if not isinstance(cond, LAPConditioner):
        raise ValueError(f"{analysis} needs a checkpoint with a LAP conditioner (candidate 'lap'); this checkpoint's "
                         f"candidate is {module.config['candidate']!r}, which has no layerwise attention pooling")
    return cond


def default_prompts(out_dir: Path, n_per_task: int = 2, seed: int = 1234) -> list[dict[str, Any]]:
    """Shapes-world GenEval prompts (``n_per_task`` of each task), also written to ``out_dir/prompts.jsonl``."""
    from world.prompts import write_geneval_metadata

    return write_geneval_metadata(Path(out_dir) / "prompts.jsonl", n_per_task, seed)


def write_csv(df: pd.DataFrame, path: Path) -> Path:
    """Atomic CSV write (tmp + rename), no index column."""
    from common.files import atomic_write_text

    return atomic_write_text(path, df.to_csv(index=False))


def save_figure(fig: plt.Figure, out_dir: Path, name: str) -> Path:
    """``out_dir/<name>.png`` (150 dpi) and ``.pdf``; closes the figure; returns the PNG path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / f"{name}.png"
    fig.savefig(png, dpi=150, bbox_inches="tight")
    fig.savefig(out_dir / f"{name}.pdf", bbox_inches="tight", metadata={"CreationDate": None})  # reproducible bytes
    plt.close(fig)
    return png


def run_cli(main: Callable[[], Any]) -> None:
    """``python -m analysis.<name>``: print what ``main`` returns (the figure's path); bad input (an unknown
    checkpoint, a candidate without LAP, ...) exits with a one-line ``error: ...`` instead of a traceback."""
    try:
        print(main())
    except (ValueError, FileNotFoundError) as err:
        fail(err)
