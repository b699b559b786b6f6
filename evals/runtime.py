"""Where judge and generator weights go: device, dtype, ``device_map``, and the one place models are loaded from
the hub or a local folder (so a missing download is one clear message, and tests can assert nothing loads).

- ``pick_device("auto")``: ``cuda`` when available (``cuda:$LOCAL_RANK`` under torchrun), else ``cpu``;
- ``pick_dtype("auto", device)``: bfloat16 on GPU, float32 on CPU;
- ``from_pretrained(cls, model_id, ...)``: ``cls.from_pretrained`` either whole onto one device, or, with
  ``device_map`` (``auto`` / ``balanced`` / ``sequential`` / a dict), spread over the visible GPUs by accelerate,
  layer by layer, spilling to CPU when they are full. A model id that is neither a local folder nor in the hub
  cache, with the hub unreachable, raises ``WeightsNotFound`` saying how to get the weights;
- ``parameter_count(model_id)``: a model's parameters from its config alone (no weights read), for the memory a
  judge needs (``python -m evals.judge_memory google/gemma-3-27b-it`` prints parameters and GiB per dtype).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class WeightsNotFound(FileNotFoundError):
    """A model's weights are neither a local folder nor downloadable from here."""


def pick_device(device: str | None = "auto") -> str:
    """``auto``/None -> ``cuda`` (``cuda:$LOCAL_RANK`` when launched by torchrun) if a GPU is visible, else
    ``cpu``; anything else is returned as given (``cpu``, ``cuda:1``, ``mps``)."""
    if device not in (None, "auto"):
        return device
    if torch.cuda.is_available():
        local = os.environ.get("LOCAL_RANK")
        return f"cuda:{int(local) % torch.cuda.device_count()}" if local is not None else "cuda"
    return "cpu"


def check_device(device: str) -> str:
    """``device`` if this machine has it (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``), else ValueError
    naming it: an unknown name (``gpu``) or a GPU that is not there fails before any weights load."""
    if device == "auto":
        return device
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; valid: auto, cpu, cuda, cuda:N, mps") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: CUDA is not available on this machine (torch "
                             f"{torch.__version__}); use --device cpu or auto")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    elif parsed.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device {device!r}: MPS (Apple GPU) is not available on this machine; use --device "
                             "cpu or auto")
    elif parsed.type != "cpu":
        raise ValueError(f"device {device!r} is not supported; valid: auto, cpu, cuda, cuda:N, mps")
    return device


def pick_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """``auto``/None -> bfloat16 on a GPU, float32 elsewhere; a name of ``DTYPES`` or a torch dtype as given."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def check_device_map(device_map: str | dict | None) -> None:
    """A ``device_map`` needs accelerate; say so before anything loads."""
    if device_map is None:
        return
    if isinstance(device_map, str) and device_map not in ("auto", "balanced", "balanced_low_0", "sequential"):
        raise ValueError(f"unknown --device-map {device_map!r}; valid: auto, balanced, balanced_low_0, sequential")
    try:
        import accelerate  # noqa: F401
    except ImportError:
        raise ValueError("--device-map needs the accelerate package: pip install accelerate (or the project's "
                         "'eval' extra)") from None


def looks_like_path(model_id: str) -> bool:
    """A local folder rather than a hub id ``owner/name``: absolute, relative (``./``, ``../``), ``~``, or deeper."""
    return str(model_id).startswith(("/", "./", "../", "~")) or str(model_id).count("/") > 1


def weights_hint(model_id: str, flag: str = "--judge-model", offline: str | None = None) -> str:
    """How to get ``model_id``'s weights onto a machine without hub access; ``offline``: the judge flag that needs
    no weights (``--judge shapes`` / ``--judge oracle``), named as the way to check a pipeline meanwhile."""
    hint = (f"download them where the hub is reachable (`hf download {model_id} --local-dir DIR`) and pass "
            f"{flag} DIR, or set HF_HOME to a cache that holds them (HF_HUB_OFFLINE=1 skips the hub's retries)")
    return hint + (f". {offline_hint(offline)}" if offline else "")


def offline_hint(flag: str) -> str:
    """One sentence naming the weight-free judge ``flag`` and the prompts it scores."""
    return (f"Without weights, `{flag}` checks the pipeline offline on shapes-world prompts (`python -m "
            "evals.generate --prompts shapes ...`, docs/benchmarks.md)")


def from_pretrained(cls: Any, model_id: str, *, device: str = "cpu", dtype: torch.dtype | None = None,
                    device_map: str | dict | None = None, flag: str = "--judge-model", offline: str | None = None,
                    **kwargs: Any) -> Any:
    """``cls.from_pretrained(model_id, dtype=dtype, ...)`` placed on ``device`` (or by ``device_map``), in eval mode.

    Missing weights (not a local folder, not cached, hub unreachable) raise ``WeightsNotFound`` naming
    ``model_id`` and the way to fetch them; ``flag`` is the CLI option that takes a local folder instead,
    ``offline`` the judge flag that needs no weights (``weights_hint``).
    """
    check_device_map(device_map)
    if looks_like_path(model_id) and not Path(model_id).expanduser().exists():
        raise WeightsNotFound(f"no such folder {model_id!r}; {weights_hint(model_id, flag, offline)}")
    if dtype is not None:
        kwargs["dtype"] = dtype
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        model = cls.from_pretrained(model_id, **kwargs)
    except OSError as err:  # transformers / diffusers raise OSError for unreachable or absent weights
        where = "folder" if Path(model_id).exists() else "hub id"
        raise WeightsNotFound(f"cannot load {model_id!r} ({where}): {str(err).splitlines()[0]}; "
                              f"{weights_hint(model_id, flag, offline)}") from err
    if device_map is None and hasattr(model, "to"):
        model = model.to(device)
    return model.eval() if hasattr(model, "eval") else model


def processor_from_pretrained(cls: Any, model_id: str, flag: str = "--judge-model", offline: str | None = None,
                              **kwargs: Any) -> Any:
    """``cls.from_pretrained`` for tokenizers / processors, with the same missing-weights message."""
    if looks_like_path(model_id) and not Path(model_id).expanduser().exists():
        raise WeightsNotFound(f"no such folder {model_id!r}; {weights_hint(model_id, flag, offline)}")
    try:
        return cls.from_pretrained(model_id, **kwargs)
    except OSError as err:
        raise WeightsNotFound(f"cannot load the processor of {model_id!r}: {str(err).splitlines()[0]}; "
                              f"{weights_hint(model_id, flag, offline)}") from err


def input_device(model: Any, fallback: str = "cpu") -> torch.device:
    """Where a model's inputs go: its first parameter's device (with a device_map: the embedding's GPU)."""
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device(fallback)


def parameter_count(model_id: str | Any) -> int:
    """Parameters of the model described by ``model_id``'s config.json (a hub id, a local folder or a config
    object), counted on PyTorch's meta device: no weights are read or allocated. The image-text-to-text class
    when the config has one, else the base ``AutoModel`` (a detector's task heads are then left out)."""
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

    config = model_id if not isinstance(model_id, str) else AutoConfig.from_pretrained(model_id)
    with torch.device("meta"):
        try:
            model = AutoModelForImageTextToText.from_config(config)
        except ValueError:  # not an image-text-to-text architecture (detectors, CLIP, T5)
            model = AutoModel.from_config(config)
    return sum(p.numel() for p in model.parameters())


def weights_gib(n_params: int, dtype: torch.dtype) -> float:
    """GiB the weights take in ``dtype`` (activations, KV cache and the CUDA context come on top)."""
    return n_params * torch.empty(0, dtype=dtype).element_size() / 2**30
