"""`make plan EXP=<name> PAPER=1 [PROFILE=<slurm profile>]`: what every run of a sweep costs, before it runs.

    python -m experiments.plan EXP [--paper] [--profile NAME] [--gpu h100-80gb] [--hfu 0.4] [--text-tokens 256]
                                   [--set KEY=VALUE ...] [--out results/plan]
    python -m experiments.plan --summary        # results/plan/summary.md from every results/plan/<EXP>.csv

For every run, one training step on meta tensors (``models/meta_step.py``) at the run's batch size and sequence
lengths, for every task of its data mix. Reported per run: parameters (frozen encoder, trained conditioner and
DiT), FLOPs per optimizer step split by part, memory per GPU under the run's strategy and activation
checkpointing (and the alternatives), whether it fits the GPU and with how much headroom, the step time and
GPU-hours of the whole run at a stated hardware FLOPs utilisation, and the model FLOPs utilisation that implies.
A run that cannot be built or stepped gets ``status=error`` with the message, one that does not fit
``status=oom``, one that fits with less than ``MIN_HEADROOM`` to spare ``fits=tight``. Writes
``results/plan/<EXP>.csv`` and ``.md``. A paper sweep (``make sweep ... PAPER=1``) runs
the same checks first and submits nothing unless every run is ``ok``.

Assumptions (stated in every .md): padded sequence lengths (every token counted as real); user text of
``--text-tokens`` tokens (captions; edit instructions); chat templates at ~4 characters per token; VERIFI rewrites
of the preset's ``max_new_tokens``; one square image per image task; a task mix's FLOPs weighted by its
``data.tasks`` weights and its memory the largest task's.

Utilisation: ``--hfu`` is the share of the GPUs' bf16 peak spent on every FLOP they execute -- the model's
forward and backward *and* activation checkpointing's recomputed forward (hardware FLOPs utilisation). MFU (the
``mfu_pct`` column, PaLM's definition) counts the model's FLOPs only; with checkpointing it is lower than the HFU
by the recompute's share (``flops_recompute``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from common.cli import fail
from common.files import atomic_write_text
from common.paths import RESULTS_DIR
from experiments.config import RunSpec, load_experiment

PLAN_DIR = RESULTS_DIR / "plan"
GIB = 2**30


@dataclass(frozen=True)
class GPU:
    """bf16 dense tensor-core peak and memory bandwidth (NVIDIA datasheets, SXM parts), memory as ``nvidia-smi``
    reports it."""

    tflops: float
    hbm_tbs: float
    mem_gib: float


GPUS: dict[str, GPU] = {
    "a100-40gb": GPU(312.0, 1.555, 40.0),
    "a100-80gb": GPU(312.0, 2.039, 80.0),
    "h100-80gb": GPU(989.0, 3.35, 79.6),  # 81559 MiB
    "h200-141gb": GPU(989.0, 4.8, 140.4),  # 143771 MiB
}
DEFAULT_GPU = "h100-80gb"
# Memory a run cannot use. Fixed: the CUDA context with its loaded kernels (~0.5-1 GiB on CUDA 12), NCCL's
# channel buffers (NCCL_BUFFSIZE, 4 MiB, per channel and peer: 1-3 GiB at 32-256 ranks) and cuBLAS/cuDNN workspaces.
# A fraction: the caching allocator's fragmentation (reserved minus allocated is typically 5-15% on long runs with
# varying shapes). A run that fits with less than MIN_HEADROOM of the usable memory to spare is flagged ``tight``:
# one longer caption batch or allocator drift away from an out-of-memory crash.
RESERVED_GIB, USABLE_FRACTION, MIN_HEADROOM = 4.0, 0.90, 0.10
CHARS_PER_TOKEN = 4  # BPE tokenizers on English text; only used for the chat templates around the content

COLUMNS = ["exp", "run", "status", "error", "params_encoder", "params_conditioner", "params_dit", "flops_step",
           "mem_gib_per_gpu", "headroom_pct", "fits", "est_step_s", "mfu_pct", "gpu_hours"]


@dataclass(frozen=True)
class Assumptions:
    """What the plan assumes where the config does not say."""

    gpu: str = DEFAULT_GPU
    hfu: float = 0.40  # hardware FLOPs utilisation: executed FLOPs (recompute included) / bf16 peak
    text_tokens: int = 256
    # VERIFI's rewrite as HF `generate` decodes it: one token of the whole batch per step, at a latency that the
    # weight reads only bound from below (kernel launches, sampling and the cache add to it); an assumed range for
    # an 8B VLM at small batch, not a measurement: replace it with one from your cluster (--decode-ms)
    decode_ms: tuple[float, float] = (15.0, 35.0)


# ------------------------------------------------------------------------------------------------ shapes


def task_shapes(config: dict[str, Any], text_tokens: int) -> dict[str, tuple[float, Any]]:
    """{task: (weight, StepShape)} for the tasks of ``data.tasks`` with weight > 0; a task the encoder cannot
    take (images on a text-only preset) raises ValueError naming it."""
    from models.encoders import ENCODER_PRESETS
    from models.meta_step import StepShape, square_tiles

    enc = config["encoder"]
    preset = ENCODER_PRESETS[enc["preset"]]
    tasks = {k: float(v) for k, v in (config["data"].get("tasks") or {"t2i": 1.0}).items() if v}
    verifi = bool(enc.get("verifi"))
    if verifi and preset.verifi is None:
        raise ValueError(f"encoder.verifi=true needs a generative VLM preset; {enc['preset']!r} cannot rewrite")
    template = preset.verifi.template if verifi else preset.template
    shapes = {}
    for task, weight in tasks.items():
        tiles = 0
        if task in ("reconstruction", "edit"):
            if preset.vision is None:
                raise ValueError(f"data.tasks.{task} needs image inputs; encoder {enc['preset']!r} takes none")
            n = enc.get("tiles") or preset.vision.default_tiles
            tiles = square_tiles(n) if preset.vision.set_tiles is not None else 1
        shapes[task] = (weight / sum(tasks.values()), StepShape(
            batch=config["train"]["batch_size"],
            text_tokens=0 if task == "reconstruction" else text_tokens,
            tiles=tiles,
            rewrite_tokens=preset.verifi.max_new_tokens if verifi else 0,
            template_tokens=math.ceil(len(template.replace("{}", "")) / CHARS_PER_TOKEN),
            image_size=config["data"]["size"],
        ))
    return shapes


# ------------------------------------------------------------------------------------------------ memory


def memory_bytes(cost: Any, strategy: str, checkpointing: bool, world: int) -> dict[str, float]:
    """Bytes per GPU by kind for one micro-batch step under ``strategy`` (ddp | fsdp | single).

    Frozen encoder in bf16 and VAE in fp32 (as the presets load them), replicated. Trained parameters in fp32 with
    fp32 gradients, AdamW's two moments and an fp32 EMA copy. DDP keeps its gradient buckets beside the gradients
    (``gradient_as_bucket_view`` off, the default). FSDP (each DiT block one unit, the rest -- encoder, VAE,
    conditioner, the DiT's embeddings and EMA -- in the root unit, as ``experiments/train.py`` wraps it) shards
    parameters, gradients, moments and EMA over the ranks; gathered in bf16 at a time: two blocks (current +
    prefetched) and every trained parameter outside the blocks (an upper bound: ``experiments/train.py`` makes the
    conditioner and the DiT's own layers separate units, gathered one after the other). Activations: the measured
    peak of the step (with every DiT block checkpointed when ``checkpointing``), or the frozen forward's if larger
    (the two do not overlap: the encoder runs before the trained forward, under no grad).
    """
    p = cost.params
    trained = p["conditioner"] + p["dit"]
    frozen = 2 * p["encoder"] + 4 * p["latent"]
    act = cost.act_bytes_ac if checkpointing else cost.act_bytes
    if strategy == "fsdp" and world > 1:
        root = trained - p["dit_blocks"]
        block = p["dit_blocks"] / max(1, cost.dit_depth)
        # The measured step casts fp32 weights to bf16 under autocast and keeps the copies for backward; FSDP's
        # mixed precision gathers bf16 weights instead (counted under weights), so those copies are taken out.
        act = max(act - 2 * trained, 0)
        return {"weights": frozen + 4 * trained / world + 2 * (root + 2 * block),
                "grads": 4 * trained / world + 2 * (root + block),
                "optimizer": 8 * trained / world, "ema": 4 * trained / world,
                "activations": max(act, cost.frozen_bytes)}
    buckets = 4 * trained if strategy == "ddp" and world > 1 else 0
    return {"weights": frozen + 4 * trained, "grads": 4 * trained + buckets, "optimizer": 8 * trained,
            "ema": 4 * trained, "activations": max(act, cost.frozen_bytes)}


def usable_gib(gpu: str) -> float:
    return GPUS[gpu].mem_gib * USABLE_FRACTION - RESERVED_GIB


# ------------------------------------------------------------------------------------------------ one run


def _cost_key(config: dict[str, Any], shape: Any) -> str:
    keys = ("candidate", "encoder", "conditioner", "dit", "latent")
    return json.dumps({**{k: config.get(k) for k in keys}, "precision": config.get("trainer", {}).get("precision"),
                       "shape": shape.__dict__}, sort_keys=True, default=str)


_COSTS: dict[str, Any] = {}


def step_cost(config: dict[str, Any], shape: Any) -> Any:
    """``measure_step`` of (config, shape), computed once per process for the parts that decide it."""
    from models.meta_step import measure_step

    key = _cost_key(config, shape)
    if key not in _COSTS:
        _COSTS[key] = measure_step(config, shape)
    return _COSTS[key]


def plan_run(run: RunSpec, assume: Assumptions, debug: bool = False) -> dict[str, Any]:
    """One row of the plan (``COLUMNS`` first, then the details); never raises for a bad run: status says
    (``debug``: and its traceback is printed)."""
    from experiments.schema import trainer_settings

    row: dict[str, Any] = {"exp": run.exp, "run": run.name, "status": "ok", "error": ""}
    try:
        t = trainer_settings(run.config)
        devices = t["devices"] if isinstance(t["devices"], int) else 8  # "auto": assumed 8 GPUs per node
        world, acc = devices * t["num_nodes"], t["accumulate_grad_batches"] or 1
        strategy = t["strategy"] if t["strategy"] != "auto" else ("ddp" if world > 1 else "single")
        ac = t["activation_checkpointing"]
        shapes = task_shapes(run.config, assume.text_tokens)
        costs = {task: (w, step_cost(run.config, shape)) for task, (w, shape) in shapes.items()}
    except Exception as err:  # noqa: BLE001 - any build/step failure is this run's result, reported with its message
        row.update(status="error", error=" ".join(f"{type(err).__name__}: {err}".split())[:500])
        if debug:
            traceback.print_exc()
        return row
    gpu = GPUS[assume.gpu]
    first = next(iter(costs.values()))[1]
    mix = {part: sum(w * c.flops.get(part, 0) for w, c in costs.values())
           for part in ("encoder", "rewrite", "latent", "conditioner", "dit")}
    micro = sum(mix.values())
    recompute = sum(w * c.flops_recompute for w, c in costs.values()) if ac else 0
    rate = gpu.tflops * 1e12 * assume.hfu
    # VERIFI decodes its rewrite token by token: each step reads every encoder weight, a bandwidth bound that
    # FLOPs at any utilisation miss. The rewrite takes the longer of the two.
    rewrite_tokens = max(shape.rewrite_tokens for _, shape in shapes.values())
    decode_s = rewrite_tokens * 2 * first.params["encoder"] / (gpu.hbm_tbs * 1e12)
    rest_s = (micro - mix["rewrite"] + recompute) / rate

    def step_with_rewrite(decode: float) -> float:
        return (rest_s + (max(mix["rewrite"] / rate, decode) if mix["rewrite"] else 0.0)) * acc

    step_s = step_with_rewrite(decode_s)
    # the same step with the rewrite decoded at the assumed per-token latencies (the floor when it is slower)
    step_lo, step_hi = (step_with_rewrite(max(decode_s, rewrite_tokens * ms / 1000)) for ms in assume.decode_ms)
    steps = run.config["train"]["steps"]
    mem = {s_ac: max((memory_bytes(c, s_ac[0], s_ac[1], world) for _, c in costs.values()),
                     key=lambda m: sum(m.values()))
           for s_ac in [(s, a) for s in ("ddp", "fsdp", strategy) for a in (False, True)]}
    mine = mem[(strategy, ac)]
    total = sum(mine.values()) / GIB
    usable = usable_gib(assume.gpu)
    headroom = (usable - total) / usable
    fits = "no" if headroom < 0 else "tight" if headroom < MIN_HEADROOM else "yes"
    row.update({
        "params_encoder": first.params["encoder"],
        "params_conditioner": first.params["conditioner"],
        "params_dit": first.params["dit"],
        "flops_step": micro * acc * world,
        "mem_gib_per_gpu": round(total, 1),
        "headroom_pct": round(100 * headroom, 1),
        "fits": fits,
        "est_step_s": round(step_s, 3),
        "mfu_pct": round(100 * micro * acc / (step_s * gpu.tflops * 1e12), 1),
        "gpu_hours": round(steps * step_s * world / 3600),
        "gpu_hours_decode_lo": round(steps * step_lo * world / 3600),
        "gpu_hours_decode_hi": round(steps * step_hi * world / 3600),
        "encoder": run.config["encoder"]["preset"], "gpu": assume.gpu, "gpus": world,
        "batch_per_gpu": run.config["train"]["batch_size"],
        "accumulate": acc, "global_batch": run.config["train"]["batch_size"] * world * acc, "steps": steps,
        "strategy": strategy, "checkpointing": ac, "tasks": ",".join(costs),
        "tokens_encoder": max(c.tokens["encoder"] for _, c in costs.values()),
        "tokens_condition": max(c.tokens["condition"] for _, c in costs.values()),
        "tokens_image": first.tokens["image"],
        **{f"flops_{k}": v * acc * world for k, v in mix.items()},
        "flops_recompute": recompute * acc * world,
        "conditioner_share_pct": round(100 * mix["conditioner"] / mix["dit"], 2) if mix["dit"] else None,
        **{f"mem_gib_{k}": round(v / GIB, 1) for k, v in mine.items()},
        **{f"mem_gib_{s}{'_ac' if a else ''}": round(sum(m.values()) / GIB, 1)
           for (s, a), m in mem.items() if s in ("ddp", "fsdp")},
        "params_latent": first.params["latent"],
        "rewrite_decode_s": round(decode_s * acc, 3) if mix["rewrite"] else 0.0,
        "rewrite_tokens": rewrite_tokens if mix["rewrite"] else 0,
        "decode_ms": "-".join(f"{ms:g}" for ms in assume.decode_ms),
    })
    if fits == "no":
        options = [f"{s}{' + activation checkpointing' if a else ''} ({sum(m.values()) / GIB:.0f} GiB)"
                   for (s, a), m in mem.items() if sum(m.values()) / GIB <= usable_gib(assume.gpu)]
        row.update(status="oom", error=(
            f"needs {total:.1f} GiB per GPU ({strategy}{', checkpointing' if ac else ''}: "
            + ", ".join(f"{k} {v / GIB:.0f}" for k, v in mine.items())
            + f") but {assume.gpu} leaves {usable:.1f} GiB; "
            + (f"fits with {' or '.join(options)}" if options else "lower train.batch_size (keep the global batch "
               "with trainer.accumulate_grad_batches)")))
    return row


# ------------------------------------------------------------------------------------------------ tables


def plan_experiment(exp: str, paper: bool = True, sets: list[str] | None = None,
                    assume: Assumptions = Assumptions(), runs: list[RunSpec] | None = None,
                    debug: bool = False) -> pd.DataFrame:
    """The plan table of every run of ``exp`` (its paper variant by default)."""
    if assume.gpu not in GPUS:
        raise ValueError(f"unknown GPU {assume.gpu!r}; valid: {', '.join(GPUS)}")
    if not 0 < assume.hfu <= 1:
        raise ValueError(f"--hfu must be in (0, 1], got {assume.hfu}")
    if runs is None:
        runs = load_experiment(exp, paper=paper, sets=sets)[1]
    rows = [plan_run(r, assume, debug) for r in runs]
    df = pd.DataFrame(rows)
    return df[[*COLUMNS, *[c for c in df.columns if c not in COLUMNS]]]


def _fmt(value: Any, kind: str) -> str:
    if value is None or value == "" or (isinstance(value, float) and math.isnan(value)):
        return ""
    if kind == "B":
        return f"{value / 1e9:.2f}B"
    if kind == "P":
        return f"{value / 1e15:,.1f}"
    if kind == "H":
        return f"{value:,.0f}"
    if kind == "I":  # an int column holding NaN for an error row reads back as float
        return str(int(value))
    return str(value)


def markdown(df: pd.DataFrame, exp: str, assume: Assumptions) -> str:
    """The .md of a plan table: assumptions, one row per run, errors in full."""
    gpu = GPUS[assume.gpu]
    head = (f"# Plan: `{exp}` (paper variant)\n\n"
            f"One training step per run and task on meta tensors (`make plan EXP={exp} PAPER=1`). GPU "
            f"{assume.gpu}: {gpu.tflops:.0f} TFLOP/s bf16 dense, {gpu.mem_gib} GiB, of which "
            f"{usable_gib(assume.gpu):.1f} usable ({USABLE_FRACTION:.0%} less {RESERVED_GIB} GiB for the CUDA "
            f"context, NCCL and workspaces; `fits` is `tight` below {MIN_HEADROOM:.0%} headroom), {gpu.hbm_tbs} "
            f"TB/s; step time at {assume.hfu:.0%} hardware FLOPs utilisation (every executed FLOP, activation "
            f"checkpointing's recomputed forward included; `MFU %` counts the model's FLOPs only; VERIFI's "
            f"token-by-token rewrite at least its weight reads at full bandwidth; `GPU-hours, decode` prices it at "
            f"{assume.decode_ms[0]:g}-{assume.decode_ms[1]:g} ms per generated token, an assumed range for HF "
            f"`generate`, `--decode-ms` to replace it). User text {assume.text_tokens} "
            f"tokens per prompt (padded), chat templates at "
            f"{CHARS_PER_TOKEN} characters per token, VERIFI rewrites at the preset's max_new_tokens, one square "
            f"image per image task; a task mix's FLOPs are weighted by `data.tasks`, its memory is the largest "
            f"task's. FLOPs per optimizer step (global batch) in PFLOP; memory per GPU in GiB.\n\n")
    cols = ["run", "status", "encoder", "params_encoder", "params_conditioner", "params_dit", "gpus", "strategy",
            "flops_step", "flops_conditioner", "flops_dit", "conditioner_share_pct", "mem_gib_per_gpu",
            "mem_gib_activations", "headroom_pct", "fits", "est_step_s", "mfu_pct", "steps", "gpu_hours",
            "gpu_hours_decode"]
    kinds = {"params_encoder": "B", "params_conditioner": "B", "params_dit": "B", "flops_step": "P",
             "flops_conditioner": "P", "flops_dit": "P", "gpu_hours": "H", "gpus": "I", "steps": "I"}
    names = {"params_encoder": "encoder (frozen)", "params_conditioner": "conditioner", "params_dit": "DiT",
             "flops_step": "PFLOP/step", "flops_conditioner": "cond. PFLOP", "flops_dit": "DiT PFLOP",
             "conditioner_share_pct": "cond./DiT %", "mem_gib_per_gpu": "GiB/GPU", "mem_gib_activations": "act. GiB",
             "est_step_s": "s/step", "gpu_hours": "GPU-hours", "headroom_pct": "headroom %", "mfu_pct": "MFU %",
             "gpu_hours_decode": "GPU-hours, decode"}
    lines = ["| " + " | ".join(names.get(c, c) for c in cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        vals = {**r.to_dict(), "encoder": r.get("encoder", ""), "gpu_hours_decode": hour_span(*run_hours(r)[1:])}
        if r["status"] == "error":
            vals = {c: (vals[c] if c in ("run", "status") else "") for c in cols}
        lines.append("| " + " | ".join(_fmt(vals.get(c), kinds.get(c, "")) for c in cols) + " |")
    errors = [f"- `{r['run']}` ({r['status']}): {r['error']}" for _, r in df.iterrows() if r["status"] != "ok"]
    total = df["gpu_hours"].fillna(0).sum() if "gpu_hours" in df else 0
    tail = f"\nTotal: {total:,.0f} GPU-hours for the sweep's {len(df)} runs"
    lo, hi = (sum(run_hours(r)[i] for r in df.to_dict("records")) for i in (1, 2))
    if hour_span(lo, hi) != f"{total:,.0f}":
        tail += f"; {hour_span(lo, hi)} with VERIFI decoded at {assume.decode_ms[0]:g}-{assume.decode_ms[1]:g} ms/token"
    tail += ".\n"
    if errors:
        tail += "\nNot ok:\n" + "\n".join(errors) + "\n"
    tight = [r for _, r in df.iterrows() if r.get("fits") == "tight"]
    if tight:
        tail += (f"\nTight (fits with less than {MIN_HEADROOM:.0%} of the usable memory to spare; lower "
                 "train.batch_size and raise trainer.accumulate_grad_batches to keep the global batch):\n"
                 + "\n".join(f"- `{r['run']}`: {r['mem_gib_per_gpu']} GiB, {r['headroom_pct']}% headroom"
                              for r in tight) + "\n")
    return head + "\n".join(lines) + "\n" + tail


def write_plan(exp: str, df: pd.DataFrame, assume: Assumptions, out: Path = PLAN_DIR) -> Path:
    """``<out>/<exp>.csv`` and ``.md``; returns the csv path."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / f"{exp}.csv", df.to_csv(index=False))
    atomic_write_text(out / f"{exp}.md", markdown(df, exp, assume))
    return out / f"{exp}.csv"


def run_identities(exp: str) -> dict[str, str]:
    """Run name -> identity (seed + config hash, the run folder's tail) of a sweep's paper variant: two runs with
    one identity are one training (the launcher adopts the finished one, ``experiments.run_dir.adopt_identical``)."""
    from experiments.config import load_experiment

    _, runs = load_experiment(exp, paper=True)
    return {r.name: r.dirname[len(r.name):] for r in runs}


def run_hours(row: Any) -> tuple[float, float, float]:
    """(GPU-hours, low, high) of one plan row: the high/low price VERIFI's rewrite at the assumed decode latencies;
    a run without a rewrite, or a plan written before those columns existed, has its GPU-hours for all three."""
    plain = row.get("gpu_hours")
    plain = 0.0 if plain is None or pd.isna(plain) else float(plain)
    lo, hi = (row.get(k) for k in ("gpu_hours_decode_lo", "gpu_hours_decode_hi"))
    return (plain, plain, plain) if lo is None or pd.isna(lo) or pd.isna(hi) else (plain, float(lo), float(hi))


def hour_span(lo: float, hi: float) -> str:
    """``"1,500 - 2,500"``, or one number when both round alike."""
    return f"{lo:,.0f}" if round(lo) == round(hi) else f"{lo:,.0f} - {hi:,.0f}"


def summary(out: Path = PLAN_DIR) -> str:
    """Markdown: GPU-hours and status of every planned sweep (from the committed ``<exp>.csv`` files), and the total
    over unique runs: a run that another sweep also configures identically (same seed and config hash) trains once,
    so it counts once; the shared ones are listed with who shares them. Beside each number, the range with VERIFI's
    rewrite decoded at the plan's assumed per-token latencies (``Assumptions.decode_ms``, ``run_hours``)."""
    from experiments.config import available_experiments

    ms, rows, total = "", [], [0.0, 0.0, 0.0]
    owners: dict[str, list[tuple[str, str, tuple[float, float, float]]]] = {}  # identity -> [(sweep, run, hours)]
    for path in [out / f"{exp}.csv" for exp in available_experiments() if (out / f"{exp}.csv").is_file()]:
        df = pd.read_csv(path)
        records = df.to_dict("records")
        h = [sum(run_hours(r)[i] for r in records) for i in range(3)]
        total = [t + x for t, x in zip(total, h, strict=True)]
        if not ms and "decode_ms" in df and df["decode_ms"].notna().any():
            ms = str(df["decode_ms"].dropna().iloc[0])
        gpus = ", ".join(str(int(g)) for g in sorted(df["gpus"].dropna().unique())) if "gpus" in df else ""
        gpu = ", ".join(sorted(df["gpu"].dropna().unique())) if "gpu" in df else ""
        rows.append(f"| `{path.stem}` | {len(df)} | {int((df['status'] == 'ok').sum())} | {gpus} | {gpu} | "
                    f"{h[0]:,.0f} | {hour_span(h[1], h[2])} |")
        ids = run_identities(path.stem)
        for row in records:
            key = ids.get(row["run"], f"{path.stem}/{row['run']}")  # a run the YAML no longer has: its own identity
            owners.setdefault(key, []).append((path.stem, row["run"], run_hours(row)))
    unique = [sum(group[0][2][i] for group in owners.values()) for i in range(3)]
    decode = f"GPU-hours, VERIFI decoded at {ms} ms/token" if ms else "GPU-hours, decode"
    lines = [f"| sweep | runs | ok | GPUs per run | GPU | GPU-hours | {decode} |", "|---|---|---|---|---|---|---|",
             *rows,
             f"| all, as configured | | | | | {total[0]:,.0f} | {hour_span(total[1], total[2])} |",
             f"| all, unique runs | | | | | {unique[0]:,.0f} | {hour_span(unique[1], unique[2])} |"]
    shared = [group for group in owners.values() if len(group) > 1]
    if shared:
        lines += ["", "Runs configured identically in more than one sweep (trained once, counted once above):", ""]
        for group in sorted(shared, key=lambda g: -g[0][2][0]):
            plain, lo, hi = group[0][2]
            decoded = hour_span(lo, hi)
            lines.append(f"- {' = '.join(f'`{e}/{r}`' for e, r, _ in group)}: {plain:,.0f} GPU-hours"
                         + (f" ({decoded} with VERIFI decoded at {ms} ms/token)" if decoded != f"{plain:,.0f}"
                            else ""))
    return "\n".join(lines) + "\n"


# LAP + refiner cost options (README, "LAP + refiner overhead"): (label, conditioner options, chosen)
LAP_OPTIONS: list[tuple[str, dict[str, Any]]] = [
    ("LAP at the encoder width (the paper does not give it)", {"lap_dim": None}),
    ("LAP 2048 wide", {"lap_dim": 2048}),
    ("LAP 1024 wide", {"lap_dim": 1024}),
    ("LAP 512 wide (chosen)", {"lap_dim": 512}),
    ("LAP at the encoder width, 1 block", {"lap_dim": None, "lap_blocks": 1}),
    ("LAP 512 wide, no refiner", {"lap_dim": 512, "refiner_blocks": 0}),
]
OVERHEAD_RUNS = [("refiner", "lap_refiner"), ("final", "base")]  # the ablations' LAP + refiner; the final model


def lap_overhead(assume: Assumptions = Assumptions()) -> pd.DataFrame:
    """FLOPs of the conditioner (LAP, its projection, the refiner) against the DiT's, forward + backward per sample,
    for each of ``LAP_OPTIONS`` at the proportions of each of ``OVERHEAD_RUNS`` (its task mix, weighted)."""
    from experiments.config import merge
    from models.parts import encoder_width

    rows = []
    for exp, name in OVERHEAD_RUNS:
        run = {r.name: r for r in load_experiment(exp, paper=True)[1]}[name]
        width = encoder_width(run.config["encoder"]["preset"])
        for label, options in LAP_OPTIONS:
            lap_dim = options.get("lap_dim")
            heads = (lap_dim or width) // 128  # head dim 128 at every width
            cfg = merge(run.config, {"conditioner": {**options, "lap_heads": heads}})
            shapes = task_shapes(cfg, assume.text_tokens)
            costs = [(w, step_cost(cfg, shape), shape.batch) for w, shape in shapes.values()]
            cond = sum(w * c.flops["conditioner"] / b for w, c, b in costs)
            dit = sum(w * c.flops["dit"] / b for w, c, b in costs)
            first = costs[0][1]
            rows.append({"exp": exp, "run": name, "option": label, "lap_dim": lap_dim or width,
                         "lap_blocks": cfg["conditioner"].get("lap_blocks", 2),
                         "refiner_blocks": cfg["conditioner"].get("refiner_blocks", 0), "taps": first.taps,
                         "tasks": ", ".join(f"{t} {w:.0%}" for t, (w, _) in shapes.items()),
                         "tokens_condition": "/".join(str(c.tokens["condition"]) for _, c, _ in costs),
                         "tokens_image": first.tokens["image"], "params_conditioner": first.params["conditioner"],
                         "tflops_conditioner": cond / 1e12, "tflops_dit": dit / 1e12,
                         "overhead_pct": 100 * cond / dit})
    return pd.DataFrame(rows)


def overhead_markdown(df: pd.DataFrame) -> str:
    """The LAP + refiner options table: TFLOP per sample (forward + backward) and the share of the DiT's."""
    lines = ["| proportions | option | LAP width | LAP blocks | refiner blocks | taps | tasks | condition / image "
             "tokens | conditioner params | conditioner TFLOP/sample | DiT TFLOP/sample | conditioner / DiT |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in df.itertuples():
        lines.append(f"| `{r.exp}/{r.run}` | {r.option} | {r.lap_dim} | {r.lap_blocks} | {r.refiner_blocks} | {r.taps} "
                     f"| {r.tasks} | {r.tokens_condition} / {r.tokens_image} | {r.params_conditioner / 1e6:,.0f}M "
                     f"| {r.tflops_conditioner:.2f} | {r.tflops_dit:.1f} | {r.overhead_pct:.1f}% |")
    return "\n".join(lines) + "\n"


def check_plan(exp: str, runs: list[RunSpec], profile: str | None = None) -> pd.DataFrame:
    """Before a paper sweep submits: every run builds, steps and fits, else ValueError with the plan's message."""
    df = plan_experiment(exp, runs=runs, assume=Assumptions(gpu=profile_gpu(profile)))
    bad = df[df.status != "ok"]
    if len(bad):
        lines = "; ".join(f"{r.run}: {r.status}: {r.error}" for r in bad.itertuples())
        raise ValueError(f"the plan of {exp} (paper) refuses {len(bad)} run(s): {lines}. "
                         f"See `make plan EXP={exp} PAPER=1`.")
    for r in df[df.fits == "tight"].itertuples():
        print(f"[plan] warning: {exp}/{r.run} fits with {r.headroom_pct}% headroom ({r.mem_gib_per_gpu} GiB per "
              f"GPU, below {MIN_HEADROOM:.0%}): an out-of-memory crash is close", file=sys.stderr)
    return df


def profile_gpu(profile: str | None) -> str:
    """The GPU of a SLURM profile (its ``gpu`` key), or the default without a profile."""
    if profile is None:
        return DEFAULT_GPU
    from experiments.profiles import load_profile

    gpu = load_profile(profile).get("gpu")
    if gpu is None:
        raise ValueError(f"profile {profile!r} names no gpu (one of {', '.join(GPUS)}); the plan needs it")
    if gpu not in GPUS:
        raise ValueError(f"profile {profile!r}: unknown gpu {gpu!r}; valid: {', '.join(GPUS)}")
    return gpu


def parse_decode_ms(text: str) -> tuple[float, float]:
    """``"15-35"`` -> (15.0, 35.0); ValueError unless 0 < LO <= HI."""
    try:
        lo, hi = (float(v) for v in text.split("-"))
    except ValueError:
        raise ValueError(f"--decode-ms takes LO-HI milliseconds per token, e.g. 15-35; got {text!r}") from None
    if not 0 < lo <= hi:
        raise ValueError(f"--decode-ms needs 0 < LO <= HI, got {text!r}")
    return lo, hi


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("exp", nargs="?")
    p.add_argument("--paper", action="store_true", help="the YAML's paper variant (what the plan is for)")
    p.add_argument("--profile", help="slurm/profiles/<NAME>.yaml: its gpu")
    p.add_argument("--gpu", help=f"GPU model (overrides the profile's): {', '.join(GPUS)}")
    p.add_argument("--hfu", type=float, default=Assumptions.hfu,
                   help="hardware FLOPs utilisation: executed FLOPs, recompute included, over the bf16 peak "
                        "(default 0.40); the plan reports the MFU it implies")
    p.add_argument("--text-tokens", type=int, default=Assumptions.text_tokens,
                   help="user text tokens per prompt, padded (default 256)")
    p.add_argument("--decode-ms", default="-".join(f"{v:g}" for v in Assumptions.decode_ms), metavar="LO-HI",
                   help="VERIFI's rewrite at LO to HI ms per generated token, the GPU-hours range beside the "
                        "bandwidth floor (default %(default)s, assumed; measure yours)")
    p.add_argument("--set", action="append", dest="sets", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", type=Path, default=PLAN_DIR)
    p.add_argument("--summary", action="store_true", help="write <out>/summary.md from the plan CSVs")
    p.add_argument("--lap-overhead", action="store_true",
                   help="write <out>/lap_overhead.{csv,md}: the LAP + refiner cost options at paper proportions")
    p.add_argument("--debug", action="store_true", help="print the traceback of runs that fail")
    a = p.parse_args(argv)
    try:
        if a.summary:
            atomic_write_text(a.out / "summary.md", summary(a.out))
            print(summary(a.out))
            return
        if a.lap_overhead:
            df = lap_overhead(Assumptions(text_tokens=a.text_tokens))
            a.out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(a.out / "lap_overhead.csv", df.to_csv(index=False))
            atomic_write_text(a.out / "lap_overhead.md", overhead_markdown(df))
            print(overhead_markdown(df))
            return
        if a.exp is None:
            raise ValueError("give an experiment name (or --summary, --lap-overhead)")
        if not a.paper:
            raise ValueError("the plan costs a sweep's paper variant (real encoders, paper sizes): add --paper "
                             "(make plan ... PAPER=1)")
        if a.text_tokens < 1:
            raise ValueError(f"--text-tokens must be >= 1, got {a.text_tokens}")
        assume = Assumptions(gpu=a.gpu or profile_gpu(a.profile), hfu=a.hfu, text_tokens=a.text_tokens,
                             decode_ms=parse_decode_ms(a.decode_ms))
        t0 = time.time()
        df = plan_experiment(a.exp, paper=a.paper, sets=a.sets, assume=assume, debug=a.debug)
        path = write_plan(a.exp, df, assume, a.out)
    except (ValueError, KeyError) as err:
        fail(err)
    print(path.with_suffix(".md").read_text() + f"\n(planned in {time.time() - t0:.0f} s)")
    bad = df[df.status != "ok"]
    if len(bad):
        raise SystemExit(f"{len(bad)} run(s) not ok: {', '.join(bad.run)}")


if __name__ == "__main__":
    main()
