"""One training process for tests/test_ddp.py: under ``torchrun`` a DDP rank on CPU (gloo), alone a plain process.

    python tests/ddp_rank.py CONFIG_JSON RUN_DIR STOP_AT OUT_DIR [run]

Trains with ``experiments.train.train`` (``STOP_AT`` > 0 stops there, as a preemption would), writes
``final.ckpt`` through ``save_final`` (rank 0 alone), and saves ``OUT_DIR/rank<r>.pt``: the trainable weights, the
world size, and ``[global_step, item indices]`` of every batch this process trained on. ``ENCODER_DTYPE=bfloat16``
in the environment casts the frozen encoder, as real encoders are loaded. With ``run`` it goes
through ``experiments.train.run`` instead, what a SLURM job runs (train, ``final.ckpt``, rank 0 evaluates).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch


def main() -> None:
    config, run_dir, stop_at, out = json.loads(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    import experiments.train
    from experiments.train import train
    from models.checkpoints import save_final
    from models.module import UniFusionModule

    seen: list[list[Any]] = []
    step = UniFusionModule.training_step

    def recording(self: UniFusionModule, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        seen.append([int(self.global_step), batch["index"].tolist()])
        return step(self, batch, batch_idx)

    UniFusionModule.training_step = recording  # records, then runs the real step unchanged
    if os.environ.get("ENCODER_DTYPE"):  # a frozen encoder in bf16, as the real (hub) encoders are loaded
        import models.module

        build, dtype = models.module.build_encoder, getattr(torch, os.environ["ENCODER_DTYPE"])
        models.module.build_encoder = lambda *args, **kwargs: build(*args, **kwargs).to(dtype)
    out.mkdir(parents=True, exist_ok=True)
    if sys.argv[5:] == ["run"]:  # what a SLURM job runs: train, final.ckpt, rank 0 alone evaluates
        experiments.train.run("ddp", "run", config, run_dir)
        torch.save({"seen": seen}, out / f"rank{os.environ.get('RANK', '0')}.pt")
        return
    module = train(config, run_dir, stop_at=stop_at or None)
    save_final(module, run_dir / "final.ckpt")
    state = {k: v for k, v in module.state_dict().items() if not k.startswith("encoder.")}
    world = module._trainer.world_size if module._trainer is not None else 1  # a 0-step run builds no Trainer
    torch.save({"seen": seen, "state": state, "world": world, "step": module.global_step,
                "encoder_dtype": str(next(module.encoder.parameters()).dtype)},
               out / f"rank{module.global_rank}.pt")


if __name__ == "__main__":
    main()
