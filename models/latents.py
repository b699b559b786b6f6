"""The image space the DiT works in: pixels, or the latents of a frozen VAE (paper Sec. 2.2: a latent DiT).

    encode: images (B, 3, H, W) float in [-1, 1]  ->  x (B, C, H/f, W/f)   what the DiT denoises
    decode: x (B, C, H/f, W/f)                    ->  images (B, 3, H, W), roughly [-1, 1] (not clamped)

``PixelSpace`` is the identity (C = 3, f = 1): the CPU-scale runs train on 32 px pixels directly.
``VAELatentSpace`` wraps a diffusers ``AutoencoderKL`` and normalises its latents the way the model family's
pipelines do, ``(z - shift_factor) * scaling_factor`` with both numbers read from the VAE's config (per-channel
``latents_mean``/``latents_std`` too when the config has them), so a DiT trained here sees latents of roughly
unit scale and a real VAE's decoder gets back exactly what it produced.

Presets: ``build_latent_space(name)``; ``LATENT_PRESETS`` lists them. Hub presets load
``AutoencoderKL.from_pretrained(repo, subfolder="vae")`` (clusters); ``tiny-vae`` is a random, untrained
AutoencoderKL built offline from a config with a fixed seed: it exercises the exact code path of the real ones
on a CPU, but its decoder is not trained, so images decoded from it mean nothing.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

_RANGE_TOL = 1e-3  # images a hair outside [-1, 1] (resampling overshoot) are fine; [0, 255] or [0, 1]-as-uint8 not


def _check_images(images: Tensor, downsample: int) -> None:
    if not isinstance(images, Tensor) or images.ndim != 4:
        got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a (B, 3, H, W) tensor, got {got}")
    if images.shape[1] != 3:
        raise ValueError(f"images must have 3 (RGB) channels in dim 1, got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"images must be float in [-1, 1], got dtype {images.dtype}")
    h, w = images.shape[-2:]
    if h % downsample or w % downsample:
        raise ValueError(f"image size {h}x{w} is not divisible by the latent downsampling factor {downsample}")
    lo, hi = float(images.min()), float(images.max())
    if lo < -1 - _RANGE_TOL or hi > 1 + _RANGE_TOL:
        raise ValueError(f"images must be in [-1, 1], got values in [{lo:.3g}, {hi:.3g}]")


class LatentSpace(nn.Module):
    """Interface: ``encode``/``decode`` plus the geometry the DiT is built from (``channels``, ``downsample``)."""

    @property
    def channels(self) -> int:
        """C, the channel count of what the DiT denoises."""
        raise NotImplementedError

    @property
    def downsample(self) -> int:
        """f, pixels per latent cell along each side."""
        raise NotImplementedError

    def latent_size(self, image_size: int) -> int:
        """Side of the latent of an ``image_size`` square image (the DiT's ``image_size``)."""
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        if image_size % self.downsample:
            raise ValueError(
                f"image_size={image_size} is not divisible by the latent downsampling factor {self.downsample}"
            )
        return image_size // self.downsample

    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        raise NotImplementedError

    def decode(self, latents: Tensor) -> Tensor:
        raise NotImplementedError

    def _check_latents(self, latents: Tensor) -> None:
        if not isinstance(latents, Tensor) or latents.ndim != 4 or latents.shape[1] != self.channels:
            got = tuple(latents.shape) if isinstance(latents, Tensor) else type(latents).__name__
            raise ValueError(f"latents must be (B, {self.channels}, h, w), got {got}")


class PixelSpace(LatentSpace):
    """The identity: the DiT works on the (B, 3, S, S) images in [-1, 1] themselves."""

    @property
    def channels(self) -> int:
        return 3

    @property
    def downsample(self) -> int:
        return 1

    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> the same tensor (no copy)."""
        _check_images(images, 1)
        return images

    def decode(self, latents: Tensor) -> Tensor:
        """(B, 3, H, W) -> the same tensor (no copy)."""
        self._check_latents(latents)
        return latents


class VAELatentSpace(LatentSpace):
    """A frozen diffusers ``AutoencoderKL`` with the family's latent normalisation.

    Args:
        vae: the autoencoder; frozen here (``requires_grad`` False, always in eval mode).
        sample: encode to a draw from the posterior instead of its mean (default False, see ``encode``).
        name: preset name (for messages and records).
    """

    def __init__(self, vae: Any, sample: bool = False, name: str = ""):
        super().__init__()
        cfg = vae.config
        self.vae = vae
        self.sample, self.name = sample, name
        c = int(cfg.latent_channels)
        # Per-channel stats (latents_mean/std, e.g. Playground v2.5) generalise the scalar shift/scale:
        # x = (z - mean) * scaling / std. Flux/SD3 set shift_factor; SD1/SDXL neither (shift 0).
        if getattr(cfg, "latents_mean", None) is not None and getattr(cfg, "latents_std", None) is not None:
            shift = torch.tensor(cfg.latents_mean, dtype=torch.float32)
            scale = cfg.scaling_factor / torch.tensor(cfg.latents_std, dtype=torch.float32)
        else:
            shift = torch.full((c,), float(getattr(cfg, "shift_factor", None) or 0.0))
            scale = torch.full((c,), float(cfg.scaling_factor))
        if shift.shape != (c,) or scale.shape != (c,):
            raise ValueError(f"latents_mean/latents_std must have {c} entries (latent_channels)")
        self.register_buffer("shift", shift.view(1, c, 1, 1), persistent=False)
        self.register_buffer("scale", scale.view(1, c, 1, 1), persistent=False)
        self._channels = c
        self._downsample = 2 ** (len(cfg.block_out_channels) - 1)  # one 2x downsampling per encoder block but the last
        self.vae.requires_grad_(False)
        self.train(False)

    @property
    def channels(self) -> int:
        return self._channels

    @property
    def downsample(self) -> int:
        return self._downsample

    def train(self, mode: bool = True) -> VAELatentSpace:
        """Always eval, whatever Lightning or a caller asks: the VAE is frozen."""
        return super().train(False)

    @property
    def _dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @torch.no_grad()
    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """(B, 3, H, W) float in [-1, 1] -> normalised latents (B, C, H/f, W/f) float32.

        The posterior mean by default: the target is then a deterministic function of the image, so latents can
        be cached and a resumed run sees exactly the targets it would have seen; the posterior std of the trained
        hub VAEs is small next to the flow's noise anyway. ``sample=True`` draws ``mean + std * eps`` (as
        diffusers' training scripts do), with ``generator`` for reproducibility.
        """
        _check_images(images, self.downsample)
        dist = self.vae.encode(images.to(self._dtype)).latent_dist
        z = dist.sample(generator=generator) if self.sample else dist.mean
        return (z.float() - self.shift) * self.scale

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Normalised latents (B, C, h, w) -> images (B, 3, h*f, w*f) float32, not clamped."""
        self._check_latents(latents)
        z = latents.float() / self.scale + self.shift
        return self.vae.decode(z.to(self._dtype)).sample.float()


# ---------------------------------------------------------------------------------------------- presets


@dataclass(frozen=True)
class LatentPreset:
    """One registry entry. Hub presets record what their config must say, so a wrong local copy fails loudly."""

    description: str
    repo: str | None = None  # hub repo holding a diffusers ``vae/`` subfolder; None = built offline
    channels: int | None = None
    downsample: int | None = None
    scaling_factor: float | None = None
    shift_factor: float | None = None
    builder: Callable[[], Any] | None = None  # offline builders (pixel, tiny)


def env_var(name: str) -> str:
    """Environment variable that points hub preset ``name`` at a local folder holding ``vae/``."""
    return "UNIFUSION_" + name.upper().replace("-", "_") + "_PATH"


TINY_SCALING, TINY_SHIFT = 3.12, 0.0079  # 1 / 0.320, 0.0079


def _tiny_vae() -> Any:
    from diffusers import AutoencoderKL

    # 3 encoder blocks -> f = 4 (32 px -> 8x8x4). scaling/shift measured once, as the hub VAEs' were: the mean
    # latents of 512 shapes images (stream seed 0) have mean 0.0079 and std 0.320 under this seed-0 init.
    cfg: dict[str, Any] = dict(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=4, sample_size=32,
        scaling_factor=TINY_SCALING, shift_factor=TINY_SHIFT,
    )
    with torch.random.fork_rng(devices=[]):  # building never shifts the caller's RNG stream
        torch.manual_seed(0)
        return AutoencoderKL(**cfg)


LATENT_PRESETS: dict[str, LatentPreset] = {
    "pixel": LatentPreset("identity: the DiT works on RGB pixels in [-1, 1] (3 channels, f=1)"),
    "tiny-vae": LatentPreset(
        "random untrained AutoencoderKL, 4 latent channels, f=4 (32 px -> 8x8), seed 0; tests and CPU runs",
        channels=4, downsample=4, scaling_factor=TINY_SCALING, shift_factor=TINY_SHIFT, builder=_tiny_vae,
    ),
    "flux-vae": LatentPreset(
        "FLUX.1 VAE (gated repo: accept the license and log in, or point it at a local copy)",
        repo="black-forest-labs/FLUX.1-dev", channels=16, downsample=8, scaling_factor=0.3611, shift_factor=0.1159,
    ),
    "sd3-vae": LatentPreset(
        "Stable Diffusion 3 VAE (gated repo)",
        repo="stabilityai/stable-diffusion-3-medium-diffusers", channels=16, downsample=8,
        scaling_factor=1.5305, shift_factor=0.0609,
    ),
    "sdxl-vae": LatentPreset(
        "SDXL VAE (overflows in fp16; keep fp32 or bf16)",
        repo="stabilityai/stable-diffusion-xl-base-1.0", channels=4, downsample=8, scaling_factor=0.13025,
        shift_factor=None,
    ),
}


def build_latent_space(
    name: str, source: str | os.PathLike | None = None, dtype: str = "float32", sample: bool = False
) -> LatentSpace:
    """Build preset ``name`` (see ``LATENT_PRESETS``).

    ``source`` (hub presets only) replaces the hub repo: another repo id, or a local folder holding the
    diffusers ``vae/`` subfolder; without it the preset's env var (``UNIFUSION_<NAME>_PATH``, e.g.
    ``UNIFUSION_FLUX_VAE_PATH``) is used when set. ``dtype`` is the VAE's weight dtype (hub presets);
    latents always come back float32. ``sample`` encodes to posterior draws instead of the mean.
    """
    if name not in LATENT_PRESETS:
        raise ValueError(f"unknown latent space {name!r}; valid: {sorted(LATENT_PRESETS)}")
    preset = LATENT_PRESETS[name]
    if name == "pixel":
        if source is not None:
            raise ValueError("the 'pixel' latent space takes no source")
        return PixelSpace()
    if preset.builder is not None:
        if source is not None:
            raise ValueError(f"latent preset {name!r} is built offline and takes no source")
        vae = preset.builder()
    else:
        if not hasattr(torch, dtype) or not isinstance(getattr(torch, dtype), torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}; valid e.g. float32, bfloat16, float16")
        vae = _load_hub_vae(name, preset, source, getattr(torch, dtype))
    _check_config(name, preset, vae.config)
    return VAELatentSpace(vae, sample=sample, name=name)


def _load_hub_vae(name: str, preset: LatentPreset, source: str | os.PathLike | None, dtype: torch.dtype) -> Any:
    from diffusers import AutoencoderKL

    where = str(source) if source is not None else os.environ.get(env_var(name)) or preset.repo
    try:
        return AutoencoderKL.from_pretrained(where, subfolder="vae", torch_dtype=dtype)
    except (OSError, ValueError) as e:  # hub/offline/gated errors are OSErrors; a bad repo id a ValueError
        raise OSError(
            f"cannot load the VAE of latent preset {name!r} from {where!r} (subfolder 'vae'): {e}\n"
            f"Download it on a machine with internet (huggingface-cli download {preset.repo} --include 'vae/*' "
            f"--local-dir DIR), then point the preset at it: build_latent_space({name!r}, source='DIR') "
            f"or export {env_var(name)}=DIR (DIR must hold vae/config.json and the vae weights)."
        ) from e


def _check_config(name: str, preset: LatentPreset, cfg: Any) -> None:
    """A local copy of the wrong model (or a changed hub config) fails here, not as silently bad latents."""
    got = {
        "channels": int(cfg.latent_channels),
        "downsample": 2 ** (len(cfg.block_out_channels) - 1),
        "scaling_factor": float(cfg.scaling_factor),
        "shift_factor": None if getattr(cfg, "shift_factor", None) is None else float(cfg.shift_factor),
    }
    want = {k: getattr(preset, k) for k in got}
    if got != want:
        raise ValueError(f"the VAE loaded for latent preset {name!r} does not match it: expected {want}, got {got}")
