"""Architecture configs of the hub presets, shipped without weights: ``<preset>/config.json`` (SOURCE.md says
where each one comes from).

    encoder_config("internvl3-8b")  -> transformers PretrainedConfig (InternVLConfig, LlamaConfig, T5Config, ...)
    vae_config("flux-vae")          -> dict, the diffusers AutoencoderKL config of a latent preset
    text_width(config)              -> hidden size of the text stack (what the conditioner receives)

They let the cost planner (``experiments/plan.py``) build every paper-scale model on the meta device, and let the
config loader check head counts against the real encoder width, on machines without the weights.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

HUB_CONFIG_DIR = Path(__file__).parent


def available() -> list[str]:
    """Names with a shipped config.json (encoder and latent presets)."""
    return sorted(p.parent.name for p in HUB_CONFIG_DIR.glob("*/config.json"))


def _path(name: str) -> Path:
    path = HUB_CONFIG_DIR / name / "config.json"
    if not path.is_file():
        raise ValueError(f"no shipped architecture config for {name!r}; shipped: {', '.join(available())}")
    return path


@cache
def encoder_config(name: str) -> Any:
    """The transformers config of encoder preset ``name`` (read offline from the shipped config.json)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(_path(name).parent))


def vae_config(name: str) -> dict[str, Any]:
    """The diffusers ``AutoencoderKL`` config dict of latent preset ``name`` (keys starting with ``_`` dropped)."""
    return {k: v for k, v in json.loads(_path(name).read_text()).items() if not k.startswith("_")}


def text_config(config: Any) -> Any:
    """The config of the text stack: ``text_config`` of a VLM, the config itself otherwise."""
    return getattr(config, "text_config", None) or config


def text_width(config: Any) -> int:
    """Hidden size D of the text stack's hidden states (T5: d_model)."""
    text = text_config(config)
    return int(getattr(text, "hidden_size", None) or text.d_model)


def text_layers(config: Any) -> int:
    """Number of transformer blocks of the text stack (T5: encoder layers)."""
    text = text_config(config)
    return int(getattr(text, "num_hidden_layers", None) or text.num_layers)
