"""Flow-matching convention (docs/DESIGN.md §2): sigma = 1 is noise, target v = eps - x0, Euler from 1 to 0."""

from __future__ import annotations

import pytest
import torch

from models.flow import (
    cfg_velocity,
    euler_sample,
    flow_matching_loss,
    interpolate,
    sample_sigmas,
    shift_sigmas,
    velocity_from_output,
    velocity_target,
)


def test_path_endpoints_and_target_is_the_path_derivative():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    assert torch.equal(interpolate(x0, eps, torch.zeros(4)), x0)
    assert torch.equal(interpolate(x0, eps, torch.ones(4)), eps)
    s, h = torch.full((4,), 0.3), 1e-3
    finite_diff = (interpolate(x0, eps, s + h) - interpolate(x0, eps, s - h)) / (2 * h)
    torch.testing.assert_close(finite_diff, velocity_target(x0, eps), atol=1e-3, rtol=1e-3)


def test_euler_integrates_a_constant_velocity_field_exactly():
    # dx/ds = c  =>  x(0) = x(1) - c, whatever the number of steps or the shift
    g = torch.Generator().manual_seed(1)
    noise, c = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    for steps, shift in [(1, 1.0), (7, 1.0), (20, 3.0)]:
        out = euler_sample(lambda x, s: c, noise, steps, shift=shift)
        torch.testing.assert_close(out, noise - c, atol=1e-5, rtol=0)


def test_euler_with_the_true_velocity_recovers_the_data_point():
    # Along a straight path from x0 to eps the exact velocity is (x - x0) / s; Euler is exact on it too.
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    v = lambda x, s: (x - x0) / s.view(-1, 1, 1, 1).clamp_min(1e-8)
    torch.testing.assert_close(euler_sample(v, eps, 10), x0, atol=1e-4, rtol=0)


def test_euler_visits_decreasing_sigmas_from_one_to_zero():
    seen = []
    euler_sample(lambda x, s: (seen.append(float(s[0])), torch.zeros_like(x))[1], torch.zeros(1, 1, 2, 2), 5)
    assert seen[0] == 1.0 and all(a > b for a, b in zip(seen, seen[1:], strict=False)) and len(seen) == 5


def test_logit_normal_sigmas_and_shift():
    g = torch.Generator().manual_seed(0)
    s = sample_sigmas(20000, g)
    assert 0 < float(s.min()) and float(s.max()) < 1
    assert abs(float(s.median()) - 0.5) < 0.02  # sigmoid(N(0, 1)) has median 0.5
    shifted = shift_sigmas(torch.tensor([0.0, 0.5, 1.0]), 3.0)
    torch.testing.assert_close(shifted, torch.tensor([0.0, 0.75, 1.0]))  # 3 * .5 / (1 + 2 * .5)


def test_loss_is_zero_for_the_exact_velocity_and_cfg_formula():
    g = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    s = torch.rand(2, generator=g)
    assert flow_matching_loss(lambda x, t: eps - x0, x0, eps, s).item() == 0.0
    # CFG with a non-zero unconditional velocity, against the formula rearranged: (1 - w) v_u + w v_c
    vc, vu = torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g) + 2.0
    for w in (0.0, 1.0, 3.0, 7.5):
        torch.testing.assert_close(cfg_velocity(vc, vu, w), (1 - w) * vu + w * vc)
    torch.testing.assert_close(cfg_velocity(vc, vu, 1.0), vc)  # w = 1: the conditional model
    assert torch.equal(cfg_velocity(vc, vu, 0.0), vu)  # w = 0: the unconditional one
    assert not torch.allclose(cfg_velocity(vc, vu, 3.0), 3 * vc)  # dropping v_u would be caught


def test_x_prediction_of_the_clean_image_gives_the_true_velocity():
    # a network that outputs x0 exactly stands for v = eps - x0 wherever s is above the clamp; v-prediction is the
    # identity; an unknown prediction type is refused
    g = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(5, 3, 4, 4, generator=g), torch.randn(5, 3, 4, 4, generator=g)
    s = torch.tensor([0.05, 0.2, 0.5, 0.9, 1.0])
    xs = interpolate(x0, eps, s)
    torch.testing.assert_close(velocity_from_output(x0, xs, s, "x"), velocity_target(x0, eps), atol=1e-5, rtol=1e-5)
    assert torch.equal(velocity_from_output(eps, xs, s, "v"), eps)
    # below the clamp the division uses 0.05, not s: (x_s - x0) / 0.05 = s / 0.05 * (eps - x0)
    s_small = torch.full((5,), 0.01)
    got = velocity_from_output(x0, interpolate(x0, eps, s_small), s_small, "x")
    torch.testing.assert_close(got, 0.2 * (eps - x0), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="flow.prediction"):
        velocity_from_output(x0, xs, s, "eps")
