"""Rectified-flow matching, in diffusers' convention (docs/DESIGN.md §2).

    x_s = (1 - s) * x0 + s * eps        s = 1 is pure noise, s = 0 is data
    v   = eps - x0                      what the network predicts (d x_s / d s)

Training timesteps are logit-normal (SD3) with an optional shift; sampling is Euler from s = 1 to s = 0 with
diffusers' ``FlowMatchEulerDiscreteScheduler`` (the same shift formula), and classifier-free guidance against a
learned null condition.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling


def shift_sigmas(s: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3 time shift: s' = shift * s / (1 + (shift - 1) * s). shift > 1 spends more steps at high noise."""
    if shift == 1.0:
        return s
    return shift * s / (1 + (shift - 1) * s)


def sample_sigmas(
    n: int,
    generator: torch.Generator | None = None,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    shift: float = 1.0,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """(n,) training noise levels in (0, 1): sigmoid(N(mean, std)), then shifted."""
    u = compute_density_for_timestep_sampling(
        "logit_normal", n, logit_mean=logit_mean, logit_std=logit_std, device=device, generator=generator
    )
    return shift_sigmas(u, shift)


def interpolate(x0: torch.Tensor, eps: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x0, eps (B, ...), s (B,) -> x_s (B, ...)."""
    s = s.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1 - s) * x0 + s * eps


def velocity_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The regression target v = eps - x0 (constant along the straight path)."""
    return eps - x0


def flow_matching_loss(
    velocity_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    eps: torch.Tensor,
    s: torch.Tensor,
    per_item: bool = False,
) -> torch.Tensor:
    """Mean squared error between velocity_fn(x_s, s) and eps - x0: a scalar, or (B,) per item with ``per_item``
    (the mean over each item's elements; their mean over B is the scalar)."""
    pred = velocity_fn(interpolate(x0, eps, s), s)
    sq = (pred.float() - velocity_target(x0, eps).float()) ** 2
    return sq.flatten(1).mean(1) if per_item else torch.mean(sq)


PREDICTIONS = ("v", "x")
X_PRED_MIN_SIGMA = 0.05  # x-prediction's velocity divides by s; clamped as JiT (Li & He 2025) clamps 1 - t


def velocity_from_output(out: torch.Tensor, x: torch.Tensor, s: torch.Tensor, prediction: str = "v") -> torch.Tensor:
    """The velocity a network output stands for: ``v`` = the output itself; ``x`` = the output is the clean image
    x0_hat, so v = (x_s - x0_hat) / s (s clamped at ``X_PRED_MIN_SIGMA``). x-prediction (JiT, Li & He 2025) keeps
    the flow-matching loss on v but lets a narrow network predict the low-dimensional clean image instead of
    full-dimensional noise, which matters in pixel space where a patch (p*p*C values) is as wide as the model.
    out, x (B, C, H, W), s (B,) -> v (B, C, H, W)."""
    if prediction == "v":
        return out
    if prediction == "x":
        return (x - out) / s.clamp(min=X_PRED_MIN_SIGMA).view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    raise ValueError(f"unknown flow.prediction {prediction!r}; valid: {', '.join(PREDICTIONS)}")


def cfg_velocity(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: v_u + scale * (v_c - v_u). scale = 1 is the plain conditional model."""
    return v_uncond + scale * (v_cond - v_uncond)


@torch.no_grad()
def euler_sample(
    velocity_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise: torch.Tensor,
    steps: int,
    shift: float = 1.0,
    progress: bool = False,
) -> torch.Tensor:
    """Integrate dx/ds = v(x, s) from s = 1 (``noise``) to s = 0 with ``steps`` Euler steps.

    velocity_fn(x (B, ...), s (B,)) -> v (B, ...). Uses diffusers' FlowMatchEulerDiscreteScheduler so the sigma
    schedule and update rule are exactly diffusers' (x <- x + (s_next - s) * v).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    scheduler.set_timesteps(steps, device=noise.device)
    x = noise
    timesteps = scheduler.timesteps
    if progress:
        from tqdm.auto import tqdm

        timesteps = tqdm(timesteps, desc="sampling", leave=False)
    for t in timesteps:
        s = (t / scheduler.config.num_train_timesteps).expand(x.shape[0]).to(x.dtype)
        x = scheduler.step(velocity_fn(x, s), t, x, return_dict=False)[0]
    return x
