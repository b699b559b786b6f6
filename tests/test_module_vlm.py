"""UniFusionModule with a VLM encoder: image-conditioned training, VERIFI caching, the zero-shot edit schedule."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from experiments.config import load_base, merge
from experiments.data.datamodule import collate
from experiments.data.shapes import ShapesStream
from models.encoders import Prompt
from models.module import UniFusionModule
from world.scene import render, sample_scene


def vlm_config(**extra) -> dict:
    cfg = merge(load_base(), {"candidate": "lap", "encoder": {"preset": "tiny-vlm-random"},
                              "dit": {"dim": 32, "depth": 4, "heads": 2, "patch": 8},
                              "conditioner": {"heads": 2}, "sample": {"steps": 10, "cfg_scale": 1.0}})
    return merge(cfg, extra)


@pytest.fixture(scope="module")
def module() -> UniFusionModule:
    torch.manual_seed(0)
    m = UniFusionModule(vlm_config())
    with torch.no_grad():  # adaLN-zero: at init the DiT ignores its condition; perturb so conditions matter
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
        m.ema.module.load_state_dict(torch.nn.ModuleDict({"conditioner": m.conditioner, "dit": m.dit}).state_dict())
    m.encoder.verifi = type(m.encoder.verifi)(template=m.encoder.verifi.template, stop=m.encoder.verifi.stop,
                                              max_new_tokens=5)
    return m.eval()


def img(seed: int) -> np.ndarray:
    return render(sample_scene(np.random.default_rng(seed)))


@pytest.mark.parametrize("p, k", [(0.2, 2), (0.0, 0), (1.0, 10), (0.15, 2)])
def test_zero_shot_edit_switches_at_the_configured_step(module: UniFusionModule, p: float, k: int) -> None:
    trace: list[str] = []
    module.generate([Prompt("make the red circle blue .", (img(0),))], [0], image_steps=p, trace=trace)
    assert trace == ["image"] * k + ["text"] * (10 - k)


def test_edit_schedule_uses_image_then_text_conditions(module: UniFusionModule) -> None:
    prompt = Prompt("a photo of a blue circle", (img(1),))
    mixed = module.generate([prompt], [3], image_steps=0.3)
    text_only = module.generate([prompt.text], [3])
    image_only = module.generate([Prompt("", prompt.images)], [3])
    assert not np.array_equal(mixed, text_only) and not np.array_equal(mixed, image_only)
    assert np.array_equal(module.generate([prompt], [3], image_steps=0.0), text_only)
    with pytest.raises(ValueError, match="needs every prompt to carry an image"):
        module.generate(["a circle"], [0], image_steps=0.2)
    with pytest.raises(ValueError, match=r"fraction in \[0, 1\]"):
        module.generate([prompt], [0], image_steps=1.5)


def test_multi_reference_generation_runs(module: UniFusionModule) -> None:
    wide, tall = np.full((16, 40, 3), 230, np.uint8), np.full((40, 24, 3), 20, np.uint8)
    out = module.generate([Prompt("add a red circle .", (wide, tall)), "a photo of a square"], [0, 1])
    assert out.shape == (2, 32, 32, 3) and out.dtype == np.uint8


def test_verifi_rewrites_are_generated_once_and_cached(module: UniFusionModule) -> None:
    calls: list[int] = []
    real = module.encoder.generate_rewrites

    def counting(prompts, seed=0):
        calls.append(len(prompts))
        return real(prompts, seed)

    module.encoder.generate_rewrites = counting
    try:
        module._rewrites.clear()
        prompts = ["a photo of a circle", "a photo of a circle", Prompt("remove it", (img(2),))]
        first = module.encode(prompts, verifi=True)
        again = module.encode(prompts, verifi=True)
    finally:
        module.encoder.generate_rewrites = real
    assert calls == [2]  # two distinct prompts, generated in one batch, never again
    torch.testing.assert_close(first.features, again.features)
    assert first.rewrites[0] == first.rewrites[1]


def test_edit_and_reconstruction_batches_train() -> None:
    cfg = vlm_config(data={"tasks": {"t2i": 0.0, "reconstruction": 1.0, "edit": 1.0}})
    stream = iter(ShapesStream(seed=0, batch_size=4, tasks=cfg["data"]["tasks"]))
    items = [next(stream) for _ in range(40)]
    assert {("recon" if not it["caption"].text else "edit") for it in items} == {"recon", "edit"}
    for it in items:
        assert isinstance(it["caption"], Prompt) and len(it["caption"].images) == 1
        if not it["caption"].text:  # reconstruction: the target is the input image
            src = torch.from_numpy(it["caption"].images[0]).permute(2, 0, 1).float() / 127.5 - 1
            torch.testing.assert_close(it["image"], src)
    # a whole batch is one task (batches pad to their longest sequence)
    assert all(len({bool(it["caption"].text) for it in items[i: i + 4]}) == 1 for i in range(0, 40, 4))
    m = UniFusionModule(cfg)
    with torch.no_grad():  # adaLN-zero: no gradient reaches the conditioner until the DiT's gates open
        for p in m.dit.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    batch = collate(items[:4])
    loss = m.training_step(batch, 0)
    assert torch.isfinite(loss)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.conditioner.parameters())


def test_verifi_config_needs_a_generative_preset() -> None:
    with pytest.raises(ValueError, match="cannot rewrite"):
        UniFusionModule(vlm_config(encoder={"preset": "tiny-llama", "verifi": True}))
