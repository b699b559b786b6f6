"""SLURM profiles: ``slurm/profiles/<NAME>.yaml``, validated (slurm/README.md documents the keys).

    load_profile("h100-8gpu") -> {"partition": ..., "gpus_per_node": 8, "gpu": "h100-80gb", ...}

Read by the launcher (submitit parameters, the checks before submitting) and by the cost plan (the GPU model).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

SLURM_PROFILES = Path(__file__).resolve().parents[1] / "slurm" / "profiles"


# profile key -> (type, what it means); slurm/README.md documents the same table
PROFILE_KEYS: dict[str, tuple[type | tuple[type, ...], str]] = {
    "partition": (str, "SLURM partition (sinfo lists them)"),
    "account": (str, "--account"),
    "qos": (str, "--qos"),
    "constraint": (str, "--constraint, e.g. a100|h100"),
    "nodes": (int, "nodes per run"),
    "gpus_per_node": (int, "GPUs per node = tasks per node = Trainer(devices); 0 for CPU"),
    "cpus_per_task": (int, "CPU cores per task"),
    "mem_gb": ((int, float), "memory per node in GB"),
    "time_min": (int, "time limit per job in minutes (a timed-out run checkpoints and requeues)"),
    "array_parallelism": (int, "at most this many runs of the job array at once"),
    "signal_delay_s": (int, "SIGUSR2 this many seconds before the time limit"),
    "max_requeue": (int, "at most this many timeout requeues per run (submitit's slurm_max_num_timeout)"),
    "gpu": (str, "GPU model for `make plan` and a paper sweep's check: a100-40gb | a100-80gb | h100-80gb | h200-141gb"),
}


def load_profile(profile: str | None) -> dict[str, Any]:
    """The validated YAML of ``slurm/profiles/<profile>.yaml``.

    Raises ValueError for an unknown profile (listing the valid ones), an unknown key (listing the valid keys),
    a wrongly typed value, or a non-positive count.
    """
    valid = sorted(p.stem for p in SLURM_PROFILES.glob("*.yaml"))
    if profile is None:
        raise ValueError(f"--cluster slurm needs --profile; valid profiles: {', '.join(valid) or '(none)'}")
    path = SLURM_PROFILES / f"{profile}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown SLURM profile {profile!r}; valid: {', '.join(valid) or '(none)'}")
    prof = yaml.safe_load(path.read_text()) or {}
    if not isinstance(prof, dict):
        raise ValueError(f"{path}: expected a mapping of keys {sorted(PROFILE_KEYS)}")
    unknown = sorted(set(prof) - set(PROFILE_KEYS))
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; valid keys: {sorted(PROFILE_KEYS)}")
    for key, value in prof.items():
        kind = PROFILE_KEYS[key][0]
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, kind):
            raise ValueError(f"{path}: {key} must be {getattr(kind, '__name__', 'a number')}, got {value!r}")
        minimum = 0 if key == "gpus_per_node" else 1
        if key not in ("partition", "account", "qos", "constraint", "gpu") and value < minimum:
            raise ValueError(f"{path}: {key} must be >= {minimum}, got {value!r}")
    return prof
