"""One run: train (Lightning), then sample the synthetic GenEval prompts and score them.

    python -m experiments.train --exp conditioning_candidates --run lap [--seed S] [--smoke] [--run-dir DIR]

A run directory (``experiments.run_dir.RunDir``) holds ``config.yaml``, ``checkpoints/last.ckpt`` (resume),
``final.ckpt``, Lightning's CSV log, ``validation.csv`` (held-out validation points, with ``eval.val_every``;
experiments/validation.py), ``eval/`` (each benchmark's images and scores) and ``metrics.csv`` (tidy rows,
docs/DESIGN.md §4); ``DONE`` marks it finished. Every file that other tools read is written atomically.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import pandas as pd
import submitit
import torch
import yaml

from common.cli import fail
from common.files import atomic_write_text
from common.paths import RUNS_DIR
from experiments.evaluation import BENCHMARKS, headline_metrics
from experiments.loggers import extra_loggers, finish, log_image, logger_kind
from experiments.run_dir import RunDir
from experiments.schema import trainer_settings
from models.checkpoints import (
    atomic_checkpoint_io,
    load_module,
    read_checkpoint,
    resume_checkpoint,
    resume_step,
    save_final,
)

METRIC_COLUMNS = ["exp", "run", "candidate", "seed", "step", "metric", "value", "ci_low", "ci_high", "n"]


def config_columns(config: dict[str, Any]) -> dict[str, Any]:
    """The config facts that make a results row self-describing."""
    enc = config["encoder"]
    return {
        "encoder": enc["preset"],
        "layers": "" if enc.get("layers") is None else ",".join(map(str, enc["layers"])),
        "stride": enc.get("stride"),
        "refiner_blocks": config.get("conditioner", {}).get("refiner_blocks", 0),
        "injection": config.get("conditioner", {}).get("injection", "input"),
        "dit_dim": config["dit"]["dim"],
        "dit_depth": config["dit"]["depth"],
        "train_steps": config["train"]["steps"],
        "batch_size": config["train"]["batch_size"],
    }


def trainer_kwargs(config: dict[str, Any], gpu: bool) -> dict[str, Any]:
    """``L.Trainer`` arguments for accelerator, devices, nodes, strategy and precision.

    The defaults give exactly the pre-``trainer`` behaviour: one device, bf16-mixed on GPU, 32-true on CPU.
    """
    t = trainer_settings(config)
    strategy: Any = t["strategy"]
    if strategy == "ddp":
        # The learned null condition only takes part in batches where some caption was dropped (~10% of rows),
        # so in a batch without one its parameter gets no gradient: plain DDP would stop with an error.
        strategy = "ddp_find_unused_parameters_true"
    elif strategy == "fsdp":
        strategy = fsdp_strategy(gpu=gpu)  # without a module: the frozen parts are named once it exists (train)
    precision = t["precision"] if t["precision"] != "auto" else ("bf16-mixed" if gpu else "32-true")
    kw = {"accelerator": "gpu" if gpu else "cpu", "devices": t["devices"], "num_nodes": t["num_nodes"],
          "strategy": strategy, "precision": precision, "accumulate_grad_batches": t["accumulate_grad_batches"] or 1}
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    if SLURMEnvironment.detect():
        # Under srun: ranks come from SLURM, but the requeue is submitit's (Checkpointable.checkpoint); Lightning's
        # own SIGUSR1 requeue would race it and requeue the job twice.
        kw["plugins"] = [SLURMEnvironment(auto_requeue=False)]
    return kw


def fsdp_strategy(module=None, gpu: bool = True):  # noqa: ANN001, ANN201 - UniFusionModule -> FSDPStrategy (lazy)
    """Lightning's FSDP as the paper runs need it (on GPUs with NCCL, and on CPU ranks with gloo).

    - The frozen encoder (bf16 on real models) and the latent VAE stay out of FSDP (``ignored_modules``): whole on
      every rank, as the plan's memory model assumes, and no flat parameter mixes their dtype with the fp32
      trained parts.
    - Units: each DiT block, and the DiT and the conditioner themselves -- the live ones and their EMA copies,
      which have the same classes, so the EMA is sharded exactly like the live weights and its update is a local
      element-wise lerp of matching shards (``UniFusionModule.optimizer_step``).
    - ``use_orig_params=True`` (Lightning's default): the optimizer sees the original parameters.

    On CPU (``gpu=False``: gloo ranks, what the tests run) a subclass: Lightning refuses its own ``FSDPStrategy``
    class on a CPU accelerator (an exact type check), torch's FSDP needs ``device_id=cpu`` spelled out there, and
    Lightning's FSDP precision autocasts on CUDA only; everything else (sharding, state dicts, checkpoints, mixed
    precision) is Lightning's code unchanged.
    """
    from lightning.pytorch.strategies import FSDPStrategy

    if not gpu:
        from lightning.pytorch.plugins.precision import FSDPPrecision

        class CPUFSDPPrecision(FSDPPrecision):
            """Lightning's FSDP precision, autocasting on the CPU (its own ``forward_context`` names CUDA)."""

            def forward_context(self):  # noqa: ANN202
                if "mixed" in self.precision:
                    return torch.autocast("cpu", dtype=torch.bfloat16 if "bf16" in self.precision else torch.float16)
                return super().forward_context()

        base = FSDPStrategy

        class CPUFSDPStrategy(base):
            """Lightning's FSDP strategy on CPU ranks (gloo)."""

            @property
            def precision_plugin(self) -> FSDPPrecision:
                plugin = base.precision_plugin.fget(self)
                if type(plugin) is FSDPPrecision:
                    plugin = self._precision_plugin = CPUFSDPPrecision(plugin.precision)
                return plugin

            @precision_plugin.setter
            def precision_plugin(self, plugin: FSDPPrecision | None) -> None:
                base.precision_plugin.fset(self, plugin)

            def optimizer_state(self, optimizer):  # noqa: ANN001, ANN202 - Lightning's signature
                """Lightning's full optimizer state dict without its CPU offload: torch's gather writes every
                moment of a flat parameter into one reused buffer and copies it out only by ``.cpu()``, a no-op
                on CPU ranks, so with the offload every moment comes back as the last one gathered (``exp_avg``
                as ``exp_avg_sq``). On the CPU the offload has nothing to do; without it torch clones."""
                from lightning.pytorch.core.optimizer import LightningOptimizer
                from torch.distributed.fsdp import (
                    FullOptimStateDictConfig,
                    FullStateDictConfig,
                    OptimStateKeyType,
                    StateDictType,
                )
                from torch.distributed.fsdp import FullyShardedDataParallel as FSDPModule

                if self._state_dict_type != "full":
                    return super().optimizer_state(optimizer)
                if isinstance(optimizer, LightningOptimizer):
                    optimizer = optimizer._optimizer
                with FSDPModule.state_dict_type(self.model, StateDictType.FULL_STATE_DICT,
                                                FullStateDictConfig(offload_to_cpu=False, rank0_only=True),
                                                FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=True)):
                    state = FSDPModule.optim_state_dict(self.model, optimizer)
                    if self.global_rank == 0:  # keyed by parameter index, as Lightning stores it
                        state = FSDPModule.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_ID, self.model)
                return state

            def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
                from torch.distributed.fsdp import FullyShardedDataParallel

                return FullyShardedDataParallel(module=model, cpu_offload=self.cpu_offload,
                                                mixed_precision=self.mixed_precision_config,
                                                sharding_strategy=self.sharding_strategy,
                                                device_id=torch.device("cpu"), **self.kwargs)

        FSDPStrategy = CPUFSDPStrategy  # noqa: N806

    from models.dit import DiT, DiTBlock

    units: set[type] = {DiTBlock, DiT}
    ignored = []
    if module is not None:
        units.add(type(module.conditioner))
        ignored = [m for m in (module.encoder, module.latent) if isinstance(m, torch.nn.Module)
                   and any(True for _ in m.parameters())]
    return FSDPStrategy(auto_wrap_policy=units, ignored_modules=ignored or None)


def apply_model_settings(module, config: dict[str, Any]) -> None:
    """Activation checkpointing and ``torch.compile`` of the trained DiT (never of the EMA copy, used to sample).

    ``nn.Module.compile`` compiles in place, so state-dict keys, checkpoints and the EMA are unchanged.
    """
    t = trainer_settings(config)
    module.dit.activation_checkpointing = t["activation_checkpointing"]
    if t["compile"]:
        module.dit.compile()


def resumable_csv_logger(run_dir: Path, resume_at: int | None, flush_every: int = 100):
    """Lightning's CSVLogger, except that a resumed run keeps its log.

    The stock logger deletes ``logs/metrics.csv`` when the folder exists, so a requeued run would lose every step
    it logged before the interruption. Here the rows of steps the checkpoint covers (step < ``resume_at``) are
    kept and the later ones dropped, since the resumed run logs them again: every step appears exactly once.
    ``flush_every``: steps between writes of the file (the sweep's live progress reads it).
    """
    import csv
    import io

    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.loggers.csv_logs import ExperimentWriter
    from lightning.pytorch.loggers.logger import rank_zero_experiment

    class KeepingWriter(ExperimentWriter):
        def _check_log_dir_exists(self) -> None:
            path = Path(self.metrics_file_path)
            if resume_at is None or not path.is_file():
                return super()._check_log_dir_exists()
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                keys = list(reader.fieldnames or [])
                rows = [r for r in reader if r.get("step") and int(float(r["step"])) < resume_at]
            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
            atomic_write_text(path, buf.getvalue())
            self.metrics_keys = sorted(keys)

    class ResumableCSVLogger(CSVLogger):
        @property
        @rank_zero_experiment  # as the stock logger: under DDP only rank 0 opens (and here rewrites) the log
        def experiment(self) -> ExperimentWriter:
            if self._experiment is None:
                Path(self.root_dir).mkdir(parents=True, exist_ok=True)
                self._experiment = KeepingWriter(log_dir=self.log_dir)
            return self._experiment

    return ResumableCSVLogger(run_dir, name="logs", version="", flush_logs_every_n_steps=flush_every)


def datamodule(config: dict[str, Any]) -> Any:
    """The shapes world (default) or an HF dataset (``data.source: hf``, experiments/data/hf.py; edit batches
    from ``data.hf_edit`` when set): a LightningDataModule that resumes at data position
    ``global_step * accumulate_grad_batches * world_size * batch_size``, each training rank reading its own batches."""
    from experiments.data.datamodule import ShapesDataModule

    dcfg, tcfg = config["data"], config["train"]
    source = dcfg.get("source", "shapes")
    if source == "hf":
        from experiments.data.hf import HFDataModule

        return HFDataModule(dcfg["hf"], tcfg["batch_size"], dcfg["size"], tcfg["num_workers"],
                            tasks=dcfg.get("tasks"), seed=config["seed"], hf_edit=dcfg.get("hf_edit"))
    if source != "shapes":
        raise ValueError(f"unknown data.source {source!r}; valid: shapes, hf")
    return ShapesDataModule(
        seed=config["seed"], batch_size=tcfg["batch_size"], size=dcfg["size"],
        long_caption_prob=dcfg["long_caption_prob"], num_workers=tcfg["num_workers"], tasks=dcfg.get("tasks"),
    )


def init_from_run(module, config: dict[str, Any], run_dir: Path) -> None:
    """Copy ``init.keep`` parts (raw and EMA weights) from the ``final.ckpt`` of the run ``init.from_dir`` (a
    sibling directory). A resumed run then overwrites them with its own ``last.ckpt``, so this only shapes step 0.
    """
    init = config.get("init") or {}
    if not init.get("from_run"):
        return
    if not init.get("from_dir"):
        raise ValueError(f"init.from_run={init['from_run']!r} was not resolved; launch runs through the sweep")
    src = RunDir(Path(run_dir).parent / init["from_dir"]).final_ckpt
    if not src.is_file():
        raise FileNotFoundError(f"init.from_run={init['from_run']!r}: {src} does not exist; that run must finish first")
    state = read_checkpoint(src)["state_dict"]
    prefixes = [f"{part}." for part in init["keep"]] + [f"ema.module.{part}." for part in init["keep"]]
    take = {k: v for k, v in state.items() if k.startswith(tuple(prefixes))}
    own = module.state_dict()
    bad = [k for k, v in take.items() if k not in own or own[k].shape != v.shape]
    if bad or not take:
        raise ValueError(f"init from {src}: parts {init['keep']} do not fit this model (e.g. {bad[:3]}); the DiT "
                         "must have the same size and conditioning interface")
    module.load_state_dict(take, strict=False)


def train(config: dict[str, Any], run_dir: Path, stop_at: int | None = None):
    """Train (or resume) to ``train.steps``; returns the module with its final weights.

    ``stop_at`` stops early at that step as a preemption would (the schedule still targets ``train.steps``); the
    next call resumes from ``checkpoints/last.ckpt``. Used by the exact-resume test.
    """
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from experiments import validation
    from models.module import UniFusionModule

    L.seed_everything(config["seed"], workers=True, verbose=False)
    gpu = torch.cuda.is_available()
    scale = trainer_kwargs(config, gpu)  # validate before building anything
    validating = validation.val_every(config) is not None
    logger_kind(config)
    module = UniFusionModule(config)
    if trainer_settings(config)["strategy"] == "fsdp":
        scale["strategy"] = fsdp_strategy(module, gpu)
    tcfg = config["train"]
    init_from_run(module, config, run_dir)  # before the 0-step exit: a 0-step run can re-evaluate another's weights
    rd = RunDir(run_dir)
    ckpt_dir = rd.checkpoints
    last = resume_checkpoint(ckpt_dir, rd.last_ckpt.name)  # last.ckpt, or the newest intact one if it is damaged
    resume_at = resume_step(last) if last is not None else None
    recorder = validation.ValidationRecorder(rd.validation, resume_at)
    if tcfg["steps"] == 0:
        if validating:  # the untrained model's point of the learning curves
            L.Trainer(**scale, logger=False, callbacks=[recorder], enable_model_summary=False,
                      enable_progress_bar=False, use_distributed_sampler=False).validate(
                module, datamodule=datamodule(config), verbose=False)
        return module
    apply_model_settings(module, config)
    data = datamodule(config)
    callbacks = [ModelCheckpoint(dirpath=ckpt_dir, save_last=True, every_n_train_steps=tcfg["ckpt_every"])]
    if validating:
        callbacks.append(recorder)
    if config["data"].get("source") == "hf":  # report every worker's skipped rows; fail past the limit
        from experiments.data.hf import SkipRate, max_skip_rate

        callbacks.append(SkipRate(max_skip_rate(config["data"]["hf"])))
    env_plugins = scale.pop("plugins", [])  # SLURM's environment, beside the atomic checkpoint writer
    trainer = L.Trainer(
        max_steps=tcfg["steps"] if stop_at is None else stop_at,
        **scale,
        **validation.trainer_options(config, scale["accumulate_grad_batches"]),
        gradient_clip_val=config["optim"]["grad_clip"],
        logger=[resumable_csv_logger(run_dir, resume_at, tcfg["log_every"]),
                *extra_loggers(config, run_dir, rd.path.name)],
        callbacks=callbacks,
        plugins=[*env_plugins, atomic_checkpoint_io()],
        log_every_n_steps=tcfg["log_every"],
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=data, ckpt_path=str(last) if last is not None else None)
    if validating and trainer.global_step == tcfg["steps"] and trainer.global_step not in recorder.steps():
        trainer.validate(module, datamodule=data, verbose=False)  # the last step, when val_every does not divide it
    return module


def evaluate_all(module, config: dict[str, Any], run_dir: Path, exp: str, name: str, step: int) -> pd.DataFrame:
    """Every benchmark in ``eval.tasks`` (``experiments.evaluation.BENCHMARKS``) as tidy metric rows.
    ``eval.verifi`` (null = as trained) switches VERIFI for sampling: a model trained with rewrites can be sampled
    without them (flexible inference)."""
    ecfg = config["eval"]
    tasks = list(ecfg.get("tasks", ["geneval"]))
    bad = sorted(set(tasks) - set(BENCHMARKS))
    if bad:
        raise ValueError(f"eval.tasks {tasks} has unknown entries {bad}; valid: {list(BENCHMARKS)}")
    if not tasks:  # e.g. paper runs: their checkpoints are scored by evals.genai_bench / dpg_refined afterwards
        return pd.DataFrame(columns=METRIC_COLUMNS)
    if ecfg.get("verifi") is not None:
        module.verifi = bool(ecfg["verifi"])
    frames = []
    base = {"exp": exp, "run": name, "candidate": config["candidate"], "seed": config["seed"], "step": step}
    for task in tasks:
        df = pd.DataFrame([{**base, **row} for row in BENCHMARKS[task].run(module, config, run_dir)])
        for key, value in config_columns(config).items():
            df[key] = value
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def validation_metric_rows(exp: str, run: str, config: dict[str, Any], run_dir: Path) -> pd.DataFrame:
    """The run's held-out validation rows (``experiments.validation``: the three curves and the per-level gains) at
    every validated step, and the total
    seconds spent validating (``time.val_s``, at the last step); empty when ``eval.val_every`` is null."""
    from experiments.validation import is_val_metric, read_rows

    rows = read_rows(RunDir(run_dir).validation)
    if rows.empty:
        return pd.DataFrame(columns=METRIC_COLUMNS)
    curve = rows[rows.metric.map(is_val_metric)]
    spent = rows[rows.metric == "time.val_s"]
    total = pd.DataFrame([{"step": int(rows.step.max()), "metric": "time.val_s", "value": float(spent.value.sum()),
                           "n": len(spent)}])
    df = pd.concat([curve, total], ignore_index=True).assign(exp=exp, run=run, candidate=config["candidate"],
                                                             seed=config["seed"])
    df = df[[c for c in METRIC_COLUMNS if c in df.columns]]
    for key, value in config_columns(config).items():
        df[key] = value
    return df


def _launch_rank() -> int:
    """Global rank of this process before any Trainer exists (Lightning's reading of RANK / SLURM_PROCID / ...)."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0) or 0)


def run(exp: str, name: str, config: dict[str, Any], run_dir: Path, threads: int = 0) -> Path:
    """Train + evaluate one run into ``run_dir``; a finished run (DONE present) is left untouched.

    ``threads`` > 0 sets torch's CPU threads (the launcher splits the cores between parallel jobs); it is not
    part of the config, so it never changes a run's identity.
    """
    run_dir = Path(run_dir)
    rd = RunDir(run_dir)
    if rd.is_done():
        return run_dir
    if threads > 0:
        torch.set_num_threads(threads)
    if _launch_rank() == 0:  # under DDP/FSDP every rank runs this function; one writes
        atomic_write_text(rd.config, yaml.safe_dump({"exp": exp, "run": name, "config": config}))
    t0 = time.time()
    module = train(config, run_dir)
    t_train = time.time() - t0
    step = int(module.global_step)
    save_final(module, rd.final_ckpt)
    if module.global_rank != 0:
        return run_dir  # the other ranks are done: rank 0 samples and scores alone
    if trainer_settings(config)["strategy"] == "fsdp":
        # FSDP wrapped the module's blocks in place and their forward needs every rank; sample from a fresh
        # unsharded copy of the final weights instead.
        module = load_module(rd.final_ckpt)
    module.eval()
    t1 = time.time()
    df = evaluate_all(module, config, run_dir, exp, name, step)
    t_eval = time.time() - t1
    if module._trainer is not None:
        if rd.sample_grid.is_file():
            log_image(module.loggers, rd.sample_grid, step)
        finish(module.loggers)
    from models.dit import count_parameters

    # model size beside the scores: candidates differ in what they train (KV fusion's DiT copies the encoder's shape)
    facts = (("time.train_s", t_train), ("time.eval_s", t_eval), ("params.dit", count_parameters(module.dit)),
             ("params.trainable", count_parameters(module.dit) + count_parameters(module.conditioner)))
    timing = pd.DataFrame(
        [{"exp": exp, "run": name, "candidate": config["candidate"], "seed": config["seed"], "step": step,
          "metric": m, "value": v, "n": 1} for m, v in facts]
    )
    for key, value in config_columns(config).items():
        timing[key] = value
    df = pd.concat([df, validation_metric_rows(exp, name, config, run_dir), timing], ignore_index=True)
    atomic_write_text(rd.metrics, df.to_csv(index=False))
    headline = df.loc[df["metric"].isin(headline_metrics())]
    atomic_write_text(rd.done, json.dumps({**{m: float(v) for m, v in zip(headline["metric"], headline["value"],
                                                                       strict=True)}, "step": step,
                                        "train_s": round(t_train, 1), "eval_s": round(t_eval, 1)}))
    return run_dir


class RunJob(submitit.helpers.Checkpointable):
    """A submitit job for one run. On timeout/preemption submitit calls ``checkpoint`` (inherited), which
    resubmits the same callable; ``run`` then resumes from ``checkpoints/last.ckpt``."""

    def __init__(self, exp: str, name: str, config: dict[str, Any], run_dir: str, threads: int = 0):
        self.exp, self.name, self.config, self.run_dir, self.threads = exp, name, config, run_dir, threads

    def __call__(self) -> str:
        return str(run(self.exp, self.name, self.config, Path(self.run_dir), self.threads))


def main(argv: list[str] | None = None) -> None:
    from experiments.config import load_experiment

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exp", required=True)
    p.add_argument("--run", required=True)
    p.add_argument("--seed", type=int, help="training seed: one of the run's replicates (default: its first)")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--run-dir", type=Path)
    a = p.parse_args(argv)
    _, runs = load_experiment(a.exp, smoke=a.smoke)
    names = list(dict.fromkeys(r.name for r in runs))
    if a.run not in names:
        fail(f"unknown run {a.run!r} in {a.exp}; valid: {', '.join(names)}")
    replicates = [r for r in runs if r.name == a.run]
    chosen = [r for r in replicates if a.seed is None or r.seed == a.seed]
    if not chosen:
        fail(f"run {a.run!r} has no seed {a.seed}; its seeds: {[r.seed for r in replicates]}")
    spec = chosen[0]
    out = run(spec.exp, spec.name, spec.config, a.run_dir or RUNS_DIR / spec.exp / spec.dirname)
    print(out)


if __name__ == "__main__":
    main()
