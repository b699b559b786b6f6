"""Latent spaces: pixel identity, the VAE's normalisation against diffusers itself, presets, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL

from models.latents import LATENT_PRESETS, PixelSpace, VAELatentSpace, build_latent_space


def _images(b: int = 2, h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _small_vae(**cfg) -> AutoencoderKL:
    torch.manual_seed(1)
    base = dict(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                block_out_channels=(8, 8), norm_num_groups=4, latent_channels=4)
    return AutoencoderKL(**{**base, **cfg})


def test_pixel_space_is_the_exact_identity() -> None:
    space = build_latent_space("pixel")
    assert isinstance(space, PixelSpace) and (space.channels, space.downsample, space.latent_size(32)) == (3, 1, 32)
    x = _images()
    assert space.encode(x) is x and space.decode(x) is x


def test_tiny_vae_round_trip_shapes_and_frozen() -> None:
    space = build_latent_space("tiny-vae")
    assert (space.channels, space.downsample, space.latent_size(32), space.latent_size(64)) == (4, 4, 8, 16)
    for h, w in [(32, 32), (32, 16)]:
        z = space.encode(_images(h=h, w=w))
        assert z.shape == (2, 4, h // 4, w // 4) and z.dtype == torch.float32
        assert space.decode(z).shape == (2, 3, h, w)
    assert not any(p.requires_grad for p in space.parameters())
    space.train()
    assert not space.training and not space.vae.training
    # the seed is fixed and building it leaves the caller's RNG alone
    torch.manual_seed(5)
    before = torch.rand(1)
    torch.manual_seed(5)
    again = build_latent_space("tiny-vae")
    assert torch.equal(torch.rand(1), before)
    assert all(torch.equal(a, b) for a, b in zip(space.state_dict().values(), again.state_dict().values(), strict=True))


def test_tiny_vae_latents_are_roughly_unit_scale_on_shapes_images() -> None:
    """The measured shift/scale must keep the DiT's inputs at the scale of the flow's unit noise."""
    from experiments.data.shapes import stream_item

    x = build_latent_space("tiny-vae").encode(torch.stack([stream_item(3, i)["image"] for i in range(64)]))
    assert abs(float(x.mean())) < 0.2 and 0.7 < float(x.std()) < 1.4


def test_normalisation_matches_diffusers_and_decode_inverts_it() -> None:
    space = build_latent_space("tiny-vae")
    vae, cfg = space.vae, space.vae.config
    x = _images(seed=3)
    mean = vae.encode(x).latent_dist.mean
    ref = (mean - cfg.shift_factor) * cfg.scaling_factor  # what Flux/SD3 pipelines feed their transformer
    torch.testing.assert_close(space.encode(x), ref, rtol=0, atol=1e-6)
    z = torch.randn(2, 4, 8, 8)
    want = vae.decode(z / cfg.scaling_factor + cfg.shift_factor).sample  # what the pipelines decode
    torch.testing.assert_close(space.decode(z), want, rtol=0, atol=1e-6)
    # decode(encode(x)) is exactly the VAE's own reconstruction from the posterior mean
    torch.testing.assert_close(space.decode(space.encode(x)), vae.decode(mean).sample, rtol=0, atol=1e-5)


def test_sampling_draws_from_the_posterior_with_the_generator() -> None:
    vae = build_latent_space("tiny-vae").vae
    space = VAELatentSpace(vae, sample=True)
    x = _images()
    a = space.encode(x, generator=torch.Generator().manual_seed(7))
    b = space.encode(x, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert not torch.equal(a, space.encode(x, generator=torch.Generator().manual_seed(8)))
    z = vae.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a, (z - vae.config.shift_factor) * vae.config.scaling_factor, rtol=0, atol=1e-6)


def test_per_channel_latent_stats_follow_the_diffusers_formula() -> None:
    mean, std = [0.1, -0.2, 0.3, 0.0], [0.5, 1.0, 2.0, 4.0]
    vae = _small_vae(latents_mean=mean, latents_std=std, scaling_factor=0.5)
    space = VAELatentSpace(vae)
    x = _images(h=16, w=16)
    m, s = torch.tensor(mean).view(1, 4, 1, 1), torch.tensor(std).view(1, 4, 1, 1)
    z = vae.encode(x).latent_dist.mean
    torch.testing.assert_close(space.encode(x), (z - m) * 0.5 / s, rtol=0, atol=1e-6)  # SDXL pipeline's formula
    lat = torch.randn(1, 4, 8, 8)
    torch.testing.assert_close(space.decode(lat), vae.decode(lat * s / 0.5 + m).sample, rtol=0, atol=1e-6)


def _save_flux_like(root: Path, scaling: float = 0.3611, shift: float = 0.1159) -> None:
    vae = _small_vae(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                     block_out_channels=(8, 8, 8, 8), latent_channels=16, scaling_factor=scaling,
                     shift_factor=shift, use_quant_conv=False, use_post_quant_conv=False)
    vae.save_pretrained(root / "vae")


def test_hub_preset_loads_a_local_copy_and_checks_its_config(tmp_path: Path, monkeypatch) -> None:
    _save_flux_like(tmp_path / "flux")
    space = build_latent_space("flux-vae", source=tmp_path / "flux")
    assert (space.channels, space.downsample, space.latent_size(256)) == (16, 8, 32)
    x = _images(h=16, w=16)
    z = space.vae.encode(x).latent_dist.mean
    torch.testing.assert_close(space.encode(x), (z - 0.1159) * 0.3611, rtol=0, atol=1e-6)
    monkeypatch.setenv("UNIFUSION_FLUX_VAE_PATH", str(tmp_path / "flux"))  # the env var route
    assert build_latent_space("flux-vae").channels == 16
    _save_flux_like(tmp_path / "other", scaling=1.5305, shift=0.0609)  # an SD3-like config is not Flux
    with pytest.raises(ValueError, match="does not match.*0.3611"):
        build_latent_space("flux-vae", source=tmp_path / "other")


def test_missing_hub_model_says_how_to_point_the_preset_at_a_local_path(tmp_path: Path) -> None:
    with pytest.raises(OSError, match=r"(?s)sdxl-vae.*source='DIR'.*UNIFUSION_SDXL_VAE_PATH"):
        build_latent_space("sdxl-vae", source=tmp_path / "not-there")


def test_bad_input_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"unknown latent space 'flux'.*'flux-vae'.*'pixel'.*'tiny-vae'"):
        build_latent_space("flux")
    assert {"pixel", "tiny-vae", "flux-vae", "sd3-vae", "sdxl-vae"} <= set(LATENT_PRESETS)
    for space in (build_latent_space("tiny-vae"), PixelSpace()):
        with pytest.raises(ValueError, match=r"3 \(RGB\) channels"):
            space.encode(torch.zeros(1, 4, 32, 32))
        with pytest.raises(ValueError, match=r"\[-1, 1\]"):
            space.encode(torch.full((1, 3, 32, 32), 255.0))
        with pytest.raises(ValueError, match="float"):
            space.encode(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
        with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
            space.encode(torch.zeros(3, 32, 32))
        with pytest.raises(ValueError, match=rf"latents must be \(B, {space.channels}, h, w\)"):
            space.decode(torch.zeros(1, 7, 8, 8))
    vae_space = build_latent_space("tiny-vae")
    with pytest.raises(ValueError, match="30x30 is not divisible by the latent downsampling factor 4"):
        vae_space.encode(_images(h=30, w=30))
    with pytest.raises(ValueError, match="image_size=30 is not divisible"):
        vae_space.latent_size(30)
    with pytest.raises(ValueError, match="takes no source"):
        build_latent_space("tiny-vae", source="somewhere")
