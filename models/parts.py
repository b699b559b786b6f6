"""The trained parts of a run built from its config, and the config checks that need no weights.

    build_parts(config, enc_dim=, num_layers=, latent_channels=, latent_size=) -> (conditioner, DiT)
    check_config(config)            head counts of every attention against its width, naming the config key
    encoder_width(preset)           the encoder's hidden size D_enc without its weights

``UniFusionModule`` and the cost planner (``experiments/plan.py``) both build the conditioner and DiT here, so
the model the plan costs is the model that trains.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import torch

from models.conditioning import Conditioner, build_conditioner, candidate_options, check_heads
from models.dit import DiT

# Presets whose weights come from pretraining: their architecture is that of the named random preset.
_SAME_ARCHITECTURE = {"tiny-vlm": "tiny-vlm-random"}


@cache
def encoder_width(preset: str) -> int:
    """Hidden size of encoder preset ``preset``: hub presets from their shipped config.json, tiny presets from
    their architecture built on the meta device (no weights, no pretraining). Unknown presets: ValueError."""
    from models import hub_configs
    from models.encoders import ENCODER_PRESETS

    if preset not in ENCODER_PRESETS:
        raise ValueError(f"unknown encoder preset {preset!r}; valid: {sorted(ENCODER_PRESETS)}")
    if preset in hub_configs.available():
        return hub_configs.text_width(hub_configs.encoder_config(preset))
    arch = ENCODER_PRESETS[_SAME_ARCHITECTURE.get(preset, preset)]
    with torch.device("meta"):
        model, _ = arch.builder(arch.seed)
    return int(model.get_input_embeddings().weight.shape[-1])


def check_config(config: dict[str, Any], enc_dim: int | None = None) -> None:
    """Every conditioner option is one the candidate takes and every head count fits its width, else ValueError
    naming the key (``dit.heads``, ``conditioner.lap_heads``, ...). ``enc_dim`` defaults to
    ``encoder_width(config.encoder.preset)``."""
    dit = config["dit"]
    if isinstance(dit["heads"], bool) or not isinstance(dit["heads"], int) or dit["heads"] < 1:
        raise ValueError(f"dit.heads must be an int >= 1, got {dit['heads']!r}")
    if dit.get("head_dim") is None and dit["dim"] % dit["heads"]:  # an explicit head_dim decouples the two
        raise ValueError(f"dit.heads={dit['heads']} does not divide dit.dim={dit['dim']}")
    options = config.get("conditioner") or {}
    unknown = sorted(set(options) - set(candidate_options(config["candidate"])) - {"refiner_blocks"})
    if unknown:
        raise ValueError(f"conditioner option(s) {unknown} unknown to candidate {config['candidate']!r}; valid: "
                         f"{', '.join(candidate_options(config['candidate']))}")
    enc_dim = encoder_width(config["encoder"]["preset"]) if enc_dim is None else enc_dim
    check_heads(config["candidate"], enc_dim=enc_dim, dit_dim=dit["dim"], **options)


def build_parts(config: dict[str, Any], *, enc_dim: int, num_layers: int, latent_channels: int,
                latent_size: int) -> tuple[Conditioner, DiT]:
    """The run's conditioner (over ``num_layers`` taps of width ``enc_dim``) and DiT (over a
    (latent_channels, latent_size, latent_size) latent), as configured."""
    dit_cfg = config["dit"]
    conditioner = build_conditioner(
        config["candidate"],
        enc_dim=enc_dim,
        num_layers=num_layers,
        dit_dim=dit_cfg["dim"],
        dit_depth=dit_cfg["depth"],
        **(config.get("conditioner") or {}),
    )
    dit = DiT(
        in_channels=latent_channels,
        image_size=latent_size,
        patch=dit_cfg["patch"],
        dim=dit_cfg["dim"],
        depth=dit_cfg["depth"],
        heads=dit_cfg["heads"],
        mlp_ratio=dit_cfg.get("mlp_ratio", 4.0),
        kv_context=conditioner.kv_context,
        kv_heads=dit_cfg.get("kv_heads"),  # absent in configs saved before the key existed: = heads
        head_dim=dit_cfg.get("head_dim"),
    )
    return conditioner, dit
