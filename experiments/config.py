"""Experiment configs: base.yaml + one YAML per ablation, expanded into named runs.

An ablation YAML:

    description: what the sweep answers
    overrides: {...}            # applied to base.yaml for every run
    runs:                       # named grid points, each an override dict
      lap: {candidate: lap, conditioner: {refiner_blocks: 2}}
    grid: {dit.depth: [4, 8]}   # optional cartesian product applied on top of every run
    smoke: {...}                # overrides for `--smoke` (tiny, for tests), after configs/_smoke.yaml
    smoke_runs: {name: {...}}   # per-run smoke overrides, after the run's own (e.g. stage lengths)
    paper: {overrides: {...}, runs: {name: {...}}}   # `--paper`: real encoders + data, paper hyper-parameters;
                                # overrides after configs/_paper.yaml (the shared paper recipe)
    figure: fig4                # which analysis.figures drawer to use

Loading checks what needs no weights (``check_model_config``: KV fusion's DiT shape, every conditioner option and
head count against its width, naming the key). A run's directory name is ``<name>-<hash>`` where the hash covers
the full resolved config, so re-running a sweep finds finished runs (skip) and unfinished ones (resume) and never
mixes two configs.

Training-seed replicates: ``seeds: [0, 1, 2]`` (base.yaml, ``--set seeds=[0,1,2]``, ``make sweep SEEDS=0,1,2``)
expands every run into one run per training seed. Each replicate is the run's config with ``seed`` set (model
init, data order, training noise) and ``seeds`` back to null, so it is the very config a single-seed sweep with
that ``seed`` would train; its directory is ``<name>-seed<s>-<hash>``. The evaluation prompts and sampling seeds
(``eval.*.seed``) are not touched, so the replicates of two runs are scored on the same prompts and noise.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from experiments.schema import FREE_FORM, HASH_IGNORE, HASH_OMIT_NULL, NULL_SECTIONS, check_values

CONFIG_DIR = Path(__file__).parent / "configs"


class UnknownKeyError(KeyError):
    """A config key that base.yaml does not have; prints as its message (a plain KeyError prints quoted)."""

    def __str__(self) -> str:
        return str(self.args[0])


def available_experiments() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if p.stem != "base" and not p.stem.startswith("_"))


def shared_layer(variant: str) -> dict[str, Any]:
    """The overrides every ablation's ``variant`` (``paper`` | ``smoke``) starts from: ``configs/_<variant>.yaml``."""
    return yaml.safe_load((CONFIG_DIR / f"_{variant}.yaml").read_text()) or {}


def load_base() -> dict[str, Any]:
    return yaml.safe_load((CONFIG_DIR / "base.yaml").read_text())


def merge(base: dict[str, Any], override: dict[str, Any], path: str = "") -> dict[str, Any]:
    """Recursive merge; a key absent from ``base`` raises KeyError naming the valid keys."""
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        where = f"{path}{key}"
        if isinstance(value, dict) and where in NULL_SECTIONS and key in out and out[key] is None:
            out[key] = _section(load_base(), NULL_SECTIONS[where])
        if key not in out and path.rstrip(".") not in FREE_FORM:
            raise UnknownKeyError(f"unknown config key {where!r}; valid keys here: {sorted(out)}")
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in FREE_FORM:
            out[key] = merge(out[key], value, f"{where}.")
        elif isinstance(value, dict) and key in FREE_FORM:
            out[key] = {**(out.get(key) or {}), **copy.deepcopy(value)}
        else:
            out[key] = copy.deepcopy(value)
    return out


def _section(config: dict[str, Any], dotted: str) -> dict[str, Any]:
    out: Any = config
    for part in dotted.split("."):
        out = out[part]
    return copy.deepcopy(out)


def config_hash(config: dict[str, Any]) -> str:
    config = copy.deepcopy(config)
    for keys, only_null in ((HASH_OMIT_NULL, True), (HASH_IGNORE, False)):
        for *parents, key in keys:
            sub = config
            for part in parents:
                sub = sub.get(part) if isinstance(sub, dict) else None
            if isinstance(sub, dict) and key in sub and (sub[key] is None or not only_null):
                del sub[key]
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:8]


@dataclass(frozen=True)
class RunSpec:
    """One run of a sweep. ``replicate``: one of several training-seed replicates of the run ``name`` (they share
    the name; the seed is ``config["seed"]`` and is part of the directory name)."""

    exp: str
    name: str
    config: dict[str, Any]
    replicate: bool = False

    @property
    def seed(self) -> int:
        return int(self.config["seed"])

    @property
    def label(self) -> str:
        """How logs name the run: ``lap``, or ``lap seed 1`` for a replicate."""
        return f"{self.name} seed {self.seed}" if self.replicate else self.name

    @property
    def dirname(self) -> str:
        seed = f"-seed{self.seed}" if self.replicate else ""
        return f"{self.name}{seed}-{config_hash(self.config)}"


def training_seeds(config: dict[str, Any]) -> list[int] | None:
    """The ``seeds`` list of a config (None when null); anything but a non-empty list of distinct ints raises
    ValueError."""
    seeds = config.get("seeds")
    if seeds is None:
        return None
    if (not isinstance(seeds, list) or not seeds
            or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds) or len(set(seeds)) != len(seeds)):
        raise ValueError(f"seeds must be a non-empty list of distinct ints (e.g. seeds=[0,1,2]), got {seeds!r}")
    return seeds


def expand_seeds(run: RunSpec) -> list[RunSpec]:
    """One replicate per training seed of ``run.config["seeds"]`` (the run itself when it is null)."""
    seeds = training_seeds(run.config)
    if seeds is None:
        return [run]
    return [RunSpec(run.exp, run.name, merge(run.config, {"seed": s, "seeds": None}), replicate=True) for s in seeds]


def load_experiment(exp: str, smoke: bool = False, paper: bool = False,
                    sets: list[str] | None = None) -> tuple[dict[str, Any], list[RunSpec]]:
    """(experiment YAML, expanded runs). Unknown ``exp`` raises ValueError listing the valid names.

    ``smoke``: the YAML's ``smoke`` overrides (seconds, for tests); ``paper``: its ``paper`` overrides (real
    encoders and data, the paper's hyper-parameters; for clusters); ``sets``: ``"dotted.key=value"`` overrides
    (value parsed as YAML) applied last to every run, e.g. ``data.hf.data_files=/data/*.parquet``.
    """
    path = CONFIG_DIR / f"{exp}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown experiment {exp!r}; valid: {', '.join(available_experiments())}")
    spec = yaml.safe_load(path.read_text())
    base = merge(load_base(), spec.get("overrides") or {})
    if paper:
        if not spec.get("paper"):
            raise ValueError(f"experiment {exp!r} has no paper variant")
        base = merge(merge(base, shared_layer("paper")), spec["paper"].get("overrides") or {})
    if smoke:
        base = merge(merge(base, shared_layer("smoke")), spec.get("smoke") or {})
    paper_runs = (spec.get("paper") or {}).get("runs") or {} if paper else {}
    # runs that exist only in the shapes world (the oracle control reads shapes-world captions word by word)
    dropped = set((spec.get("paper") or {}).get("drop_runs") or []) if paper else set()
    unknown = dropped - set(spec.get("runs") or {})
    if unknown:
        raise ValueError(f"experiment {exp!r}: paper.drop_runs names unknown runs {sorted(unknown)}")
    grid = spec.get("grid") or {}
    runs = []
    for name, override in (spec.get("runs") or {"default": {}}).items():
        if name in dropped:
            continue
        run_cfg = merge(merge(base, override or {}), paper_runs.get(name) or {})
        if smoke:  # runs that set their own length (stages) get a smoke length too
            run_cfg = merge(run_cfg, (spec.get("smoke_runs") or {}).get(name) or {})
        for item in sets or []:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise ValueError(f"--set takes dotted.key=value, got {item!r}")
            run_cfg = merge(run_cfg, set_dotted(key.strip(), yaml.safe_load(value)))
        keys = list(grid)
        for values in itertools.product(*(grid[k] for k in keys)) if keys else [()]:
            cfg, suffix = run_cfg, []
            for k, v in zip(keys, values, strict=True):
                cfg = merge(cfg, set_dotted(k, v))
                suffix.append(f"{k.split('.')[-1]}{v}")
            runs += expand_seeds(RunSpec(exp, "_".join([name, *suffix]), cfg))
    from experiments.validation import val_every

    defaults = load_base()
    for r in runs:
        try:
            check_values(r.config, defaults)
            check_model_config(r.config)
            val_every(r.config)  # held-out validation needs the shapes world (a paper variant must turn it off)
        except ValueError as err:
            raise ValueError(f"{exp} run {r.label!r}: {err}") from None
    return spec, resolve_init(runs)


def check_model_config(config: dict[str, Any]) -> None:
    """What can be checked before building anything: every conditioner option is one the candidate takes and
    every head count fits its width (``models.parts.check_config``; the encoder's width from its architecture),
    and a kv_fusion run on the encoder's own keys and values (``conditioner.kv_source: encoder``) has a DiT shaped
    like the encoder preset's attention (depth, dim, heads, kv_heads, head_dim). ValueError naming the keys
    otherwise."""
    from models.conditioning import encoder_features
    from models.conditioning.kv_fusion import check_dit_shape
    from models.encoders import ENCODER_PRESETS
    from models.parts import check_config

    check_config(config)
    if encoder_features(config["candidate"], config.get("conditioner")) != "kv":
        return
    name = config["encoder"]["preset"]
    if name not in ENCODER_PRESETS:
        raise ValueError(f"unknown encoder.preset {name!r}; valid: {sorted(ENCODER_PRESETS)}")
    shape = ENCODER_PRESETS[name].attention
    if shape is None:
        raise ValueError(f"candidate kv_fusion with conditioner.kv_source=encoder needs a decoder-style encoder whose "
                         f"attention keys/values can be cached; encoder.preset={name!r} has none (use "
                         "conditioner.kv_source: hidden)")
    check_dit_shape(config["dit"], shape, name)


def resolve_init(runs: list[RunSpec]) -> list[RunSpec]:
    """Fill ``init.from_dir`` of runs that start from another run (``init.from_run``) with that run's directory
    name -- the replicate of the same training seed; an unknown or self reference, a source without that seed, a
    chain, or a bad ``keep`` raises ValueError naming the choices."""
    by_key = {(r.name, r.seed): r for r in runs}
    names = {r.name for r in runs}
    out = []
    for r in runs:
        src = r.config.get("init", {}).get("from_run")
        if src is None:
            out.append(r)
            continue
        if src not in names or src == r.name:
            raise ValueError(f"run {r.name!r}: init.from_run={src!r} is not another run of {r.exp}; "
                             f"valid: {sorted(names - {r.name})}")
        source = by_key.get((src, r.seed))
        if source is None:
            have = sorted(s for n, s in by_key if n == src)
            raise ValueError(f"run {r.name!r} (seed {r.seed}) starts from {src!r}, which has no seed {r.seed}; "
                             f"its seeds: {have}")
        if source.config.get("init", {}).get("from_run") is not None:
            raise ValueError(f"run {r.name!r} starts from {src!r}, which starts from another run; chains are not "
                             "supported (one stage of dependency)")
        keep = r.config["init"].get("keep") or []
        if not keep or set(keep) - {"dit", "conditioner"}:
            raise ValueError(f"run {r.name!r}: init.keep={keep} must list some of ['dit', 'conditioner']")
        cfg = merge(r.config, {"init": {"from_dir": source.dirname}})
        out.append(RunSpec(r.exp, r.name, cfg, r.replicate))
    return out


def set_dotted(key: str, value: Any) -> dict[str, Any]:
    """'train.steps', 5 -> {'train': {'steps': 5}}."""
    out: dict[str, Any] = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def main(argv: list[str] | None = None) -> None:
    """``python -m experiments.config EXP [--run NAME] [--paper] [--smoke] [--set K=V]``: each run's resolved
    config as a YAML document headed by its run folder (``<run>[-seed<s>]-<hash>``), nothing trained."""
    import argparse

    from common.cli import fail

    p = argparse.ArgumentParser(prog="python -m experiments.config", description=main.__doc__)
    p.add_argument("exp", help=f"one of: {', '.join(available_experiments())}")
    p.add_argument("--run", action="append", dest="only", metavar="NAME", help="only this run (repeatable)")
    p.add_argument("--paper", action="store_true", help="the paper variant")
    p.add_argument("--smoke", action="store_true", help="the smoke variant (tests)")
    p.add_argument("--set", action="append", dest="sets", default=[], metavar="KEY=VALUE")
    a = p.parse_args(argv)
    try:
        _, runs = load_experiment(a.exp, smoke=a.smoke, paper=a.paper, sets=a.sets)
    except (ValueError, KeyError) as err:
        fail(str(err))
    names = sorted({r.name for r in runs})
    unknown = sorted(set(a.only or []) - set(names))
    if unknown:
        fail(f"unknown run(s) {', '.join(unknown)} of {a.exp}; valid: {', '.join(names)}")
    chosen = [r for r in runs if not a.only or r.name in a.only]
    print("\n---\n".join(f"# {a.exp} run {r.label}: {r.dirname}\n"
                         + yaml.safe_dump(r.config, sort_keys=False, default_flow_style=None, width=116).rstrip()
                         for r in chosen))


if __name__ == "__main__":
    main()
