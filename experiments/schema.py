"""What a resolved run config may hold: every key's type and every closed set of values, checked in one place.

``experiments/configs/base.yaml`` holds every key with its default (``merge`` refuses a key it lacks); this module
holds what each value may be, so a sweep is refused when it is loaded (``experiments.config.load_experiment``,
before any job is submitted) rather than inside every job:

- **types**: a key whose base.yaml default is a bool, int, float, string or list keeps that type (an int is a
  float); null only where the default is null or the key is in ``NULLABLE``; a key whose default is null takes
  any type (its own check says more); a null section (``NULL_SECTIONS``) is checked against the section it copies;
- **run identity**: which keys the run hash leaves out (``HASH_OMIT_NULL``, ``HASH_IGNORE``);
- **choices**: the keys with a closed set of values (``CHOICES``, registries included);
- the ``trainer`` section's own rules (``trainer_settings``, also used by the trainer, the launcher and the plan).

Checks that need the model registry's details (conditioner options, head counts, KV fusion's DiT shape) stay in
``experiments.config.check_model_config``; the held-out validation's rule in ``experiments.validation``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

STRATEGIES = ("auto", "ddp", "fsdp")
PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed")
TRAINER_DEFAULTS: dict[str, Any] = {  # = base.yaml's trainer section; configs saved before it existed get these
    "strategy": "auto", "precision": "auto", "devices": 1, "num_nodes": 1, "accumulate_grad_batches": None,
    "activation_checkpointing": False, "compile": False,
}
FREE_FORM = ("conditioner",)  # each candidate takes different options (models.parts.check_config checks them)
# Sections that are null in base.yaml until set; a dict set there merges onto (and is checked against) the keys
# and defaults of another section, so `--set data.hf_edit.path=...` builds a full data.hf-like dict.
NULL_SECTIONS = {"data.hf_edit": "data.hf"}
NULLABLE = ("encoder.stride", "encoder.start")  # non-null defaults that null switches off (explicit layers; k - 1)
# Keys added after runs were made: left out of the hash while null, so existing run directories keep their names.
HASH_OMIT_NULL = (("data", "hf_edit"), ("encoder", "cache"), ("trainer", "accumulate_grad_batches"),
                  ("eval", "val_every"), ("data", "hf", "max_skip_rate"), ("data", "hf_edit", "max_skip_rate"),
                  ("dit", "kv_heads"), ("dit", "head_dim"),
                  ("flow", "prediction"), ("seeds",))
# Keys that never change what a run computes (where it reports to): always left out of the hash.
HASH_IGNORE = (("train", "logger"),)


def _candidates() -> list[str]:
    from models.conditioning import CANDIDATES

    return sorted(CANDIDATES)


def _encoder_presets() -> list[str]:
    from models.encoders import ENCODER_PRESETS

    return sorted(ENCODER_PRESETS)


def _latents() -> list[str]:
    from models.latents import LATENT_PRESETS

    return sorted(LATENT_PRESETS)


def _loggers() -> list[str]:
    from experiments.loggers import LOGGERS

    return list(LOGGERS)


# dotted key -> its allowed values (a tuple, or a function returning a registry's names: imported only when checked)
CHOICES: dict[str, tuple[Any, ...] | Callable[[], list[str]]] = {
    "candidate": _candidates,
    "encoder.preset": _encoder_presets,
    "latent": _latents,
    "flow.prediction": (None, "v", "x"),
    "data.source": ("shapes", "hf"),
    "train.logger": _loggers,
    "trainer.strategy": STRATEGIES,
    "trainer.precision": PRECISIONS,
}


def _leaves(config: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in config.items():
        if isinstance(value, dict) and key not in FREE_FORM:
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _type_ok(default: Any, value: Any) -> bool:
    if default is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, type(default))


_TYPE_NAMES = {bool: "true or false", int: "an int", float: "a number", str: "a string", list: "a list"}


def check_values(config: dict[str, Any], base: dict[str, Any]) -> None:
    """ValueError naming the first key of ``config`` whose value has another type than its ``base`` default, or
    is not one of its ``CHOICES``; then the ``trainer`` section's rules (``trainer_settings``)."""
    defaults = dict(_leaves(base))
    for section, like in NULL_SECTIONS.items():
        defaults.update({f"{section}.{k.removeprefix(like + '.')}": v for k, v in defaults.items()
                         if k.startswith(like + ".")})
    for key, value in _leaves(config):
        default = defaults.get(key)
        if key.startswith("trainer.") or (value is None and key in NULLABLE):
            continue  # trainer_settings checks its section (devices: an int or 'auto')
        if not _type_ok(default, value) or (value is None and default is not None):
            raise ValueError(f"{key} must be {_TYPE_NAMES.get(type(default), type(default).__name__)}"
                             f"{', not null' if value is None else ''}, got {value!r}")
    flat = dict(_leaves(config))
    for key, allowed in CHOICES.items():
        if key not in flat:
            continue
        valid = allowed() if callable(allowed) else allowed
        if flat[key] not in valid:
            raise ValueError(f"unknown {key} {flat[key]!r}; valid: {', '.join(map(str, valid))}")
    trainer_settings(config)


def trainer_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The validated ``trainer`` section (defaults filled in); bad values raise ValueError naming valid ones."""
    t = {**TRAINER_DEFAULTS, **(config.get("trainer") or {})}
    unknown = sorted(set(t) - set(TRAINER_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown trainer option(s) {unknown}; valid: {sorted(TRAINER_DEFAULTS)}")
    if t["strategy"] not in STRATEGIES:
        raise ValueError(f"unknown trainer.strategy {t['strategy']!r}; valid: {', '.join(STRATEGIES)}")
    if t["precision"] not in PRECISIONS:
        raise ValueError(f"unknown trainer.precision {t['precision']!r}; valid: {', '.join(PRECISIONS)}")
    if t["devices"] != "auto" and (isinstance(t["devices"], bool) or not isinstance(t["devices"], int)
                                   or t["devices"] < 1):
        raise ValueError(f"trainer.devices must be a positive int or 'auto', got {t['devices']!r}")
    if isinstance(t["num_nodes"], bool) or not isinstance(t["num_nodes"], int) or t["num_nodes"] < 1:
        raise ValueError(f"trainer.num_nodes must be a positive int, got {t['num_nodes']!r}")
    acc = t["accumulate_grad_batches"]
    if acc is not None and (isinstance(acc, bool) or not isinstance(acc, int) or acc < 1):
        raise ValueError(f"trainer.accumulate_grad_batches must be a positive int or null, got {acc!r}")
    for flag in ("activation_checkpointing", "compile"):
        if not isinstance(t[flag], bool):
            raise ValueError(f"trainer.{flag} must be true or false, got {t[flag]!r}")
    return t
