"""UniFusionModule: training step, NaN guard, checkpoints without the encoder, sampling determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from experiments.config import load_base, merge
from models.module import NonFiniteLossError, UniFusionModule

PROMPTS = ["a photo of a red circle", "a photo of two squares", "a photo of a blue triangle left of a circle"]


def tiny_config(candidate: str = "lap", **extra) -> dict:
    cfg = merge(load_base(), {"candidate": candidate, "dit": {"dim": 32, "depth": 4, "heads": 2, "patch": 8},
                              "encoder": {"preset": "tiny-llama", "stride": 3, "start": None},
                              "sample": {"steps": 3}, "train": {"steps": 10}})
    cfg = merge(cfg, {"conditioner": {"heads": 2}})
    return merge(cfg, extra)


def perturb(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.05)


def batch(b: int = 3) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"image": torch.rand(b, 3, 32, 32, generator=g) * 2 - 1, "caption": PROMPTS[:b], "index": torch.arange(b)}


# kv_fusion on tiny-llama's own keys/values: the DiT copies its 12 layers x 64, 4 query / 2 KV heads
KV_ENCODER = {"conditioner": {"kv_source": "encoder"}, "dit": {"dim": 64, "depth": 12, "heads": 4, "kv_heads": 2}}


CANDIDATE_CASES = {"last_layer": ("last_layer", {}),
                   "kv_fusion_hidden": ("kv_fusion", {"conditioner": {"kv_source": "hidden"}}),
                   "kv_fusion_encoder": ("kv_fusion", KV_ENCODER), "hsi": ("hsi", {}), "lap": ("lap", {})}


@pytest.mark.parametrize("candidate,extra", list(CANDIDATE_CASES.values()), ids=list(CANDIDATE_CASES))
def test_training_step_gives_finite_loss_and_gradients(candidate: str, extra: dict) -> None:
    torch.manual_seed(0)
    m = UniFusionModule(tiny_config(candidate, **extra))
    perturb(m.dit)  # adaLN-zero: at init the DiT ignores its condition, so no gradient could reach it
    loss = m.training_step(batch(), 0)
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    # the frozen encoder gets no gradient; the conditioner does (it reaches the loss through the DiT)
    assert all(p.grad is None for p in m.encoder.parameters())
    grads = [p.grad for p in m.conditioner.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


def test_nan_loss_stops_the_run() -> None:
    m = UniFusionModule(tiny_config())
    with torch.no_grad():
        next(m.dit.parameters()).fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match="non-finite loss"):
        m.training_step(batch(), 0)


def test_checkpoint_drops_encoder_and_round_trips(tmp_path) -> None:
    m = UniFusionModule(tiny_config())
    perturb(m.dit)
    ckpt = {"state_dict": m.state_dict()}
    m.on_save_checkpoint(ckpt)
    assert not any(k.startswith("encoder.") for k in ckpt["state_dict"])
    assert any(k.startswith("ema.") for k in ckpt["state_dict"])
    torch.manual_seed(123)  # a fresh module has different trainable weights...
    m2 = UniFusionModule(tiny_config())
    perturb(m2.dit)
    a = m.generate(PROMPTS[:2], [1, 2], use_ema=False)
    assert not np.array_equal(a, m2.generate(PROMPTS[:2], [1, 2], use_ema=False))
    m2.on_load_checkpoint(ckpt)
    m2.load_state_dict(ckpt["state_dict"], strict=False)
    b = m2.generate(PROMPTS[:2], [1, 2], use_ema=False)
    np.testing.assert_array_equal(a, b)  # ...until loaded; the rebuilt encoder is identical by construction
    broken = {"state_dict": {k: v for k, v in ckpt["state_dict"].items() if not k.startswith("dit.final")}}
    with pytest.raises(KeyError, match="lacks"):
        m2.on_load_checkpoint(broken)


def test_a_checkpoint_refuses_an_encoder_with_other_weights(tmp_path) -> None:
    """The encoder is rebuilt on load, not stored: a rebuild with other weights (here: one weight nudged before
    saving, as a tiny VLM pretrained again elsewhere would differ) must not load silently."""
    from models.checkpoints import load_module, save_final

    m = UniFusionModule(tiny_config())
    good = save_final(m, tmp_path / "good.ckpt")
    assert torch.load(good, weights_only=False)["encoder_fingerprint"] == m.encoder_fingerprint()
    load_module(good, device="cpu")  # the same encoder rebuilds: loads
    with torch.no_grad():
        next(m.encoder.model.parameters()).view(-1)[0] += 1e-3
    del m._encoder_fp  # the checksum is taken once per module; this test changed the weights behind its back
    other = save_final(m, tmp_path / "other.ckpt")
    with pytest.raises(RuntimeError, match="trained against encoder"):
        load_module(other, device="cpu")


def test_generate_is_per_image_deterministic() -> None:
    torch.manual_seed(0)
    m = UniFusionModule(tiny_config())
    perturb(m.ema.module["dit"])  # the zero-initialised output layer would make every image the same
    both = m.generate(PROMPTS[:2], [7, 8])
    alone = m.generate(PROMPTS[1:2], [8])
    assert both.dtype == np.uint8 and both.shape == (2, 32, 32, 3)
    np.testing.assert_array_equal(both[1], alone[0])  # an image does not depend on its batch-mates
    other_seed = m.generate(PROMPTS[1:2], [9])
    assert not np.array_equal(alone, other_seed)


def test_generate_guides_against_the_null_condition() -> None:
    """generate's classifier-free guidance against an Euler loop written here: separate conditional and null
    forwards, v = (1 - w) v_null + w v_cond, diffusers' sigma schedule. Without its unconditional branch
    (v = w v_cond) the images differ."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    torch.manual_seed(0)
    m = UniFusionModule(tiny_config())
    perturb(m.ema.module)  # the null condition and the DiT's zero-initialised layers now matter
    w, steps, seeds = 3.0, 3, [4, 5]
    got = m.generate(PROMPTS[:2], seeds, steps=steps, cfg_scale=w)
    enc = m.encode(PROMPTS[:2])
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    sched.set_timesteps(steps)
    sig = sched.sigmas.tolist()

    def sample(guided: bool) -> np.ndarray:
        x = torch.stack([torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(sd)) for sd in seeds])
        for i in range(steps):
            s = torch.full((2,), sig[i])
            with torch.no_grad():
                vc = m.velocity(x, s, enc.features, enc.mask, torch.zeros(2, dtype=torch.bool), ema=True)
                vu = m.velocity(x, s, enc.features, enc.mask, torch.ones(2, dtype=torch.bool), ema=True)
            v = (1 - w) * vu + w * vc if guided else w * vc
            x = x + (sig[i + 1] - sig[i]) * v
        return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()

    want = sample(guided=True)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1  # float round-off may flip a pixel's rounding
    assert np.abs(got.astype(int) - sample(guided=False).astype(int)).mean() > 5


def test_layer_dropout_is_temporary_and_lap_only() -> None:
    m = UniFusionModule(tiny_config())
    m.generate(PROMPTS[:1], [0], layer_dropout=[0, 1])
    assert m.ema.module["conditioner"].layer_dropout == ()
    k = UniFusionModule(tiny_config("last_layer", encoder={"layers": [-1], "stride": None}))
    with pytest.raises(ValueError, match="LAP"):
        k.generate(PROMPTS[:1], [0], layer_dropout=[0])
