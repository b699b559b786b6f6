"""Pretraining of the tiny VLM: its weights must not depend on the caller's torch thread count."""

from __future__ import annotations

import copy

import torch

from models import tiny_vlm

SMALL = copy.deepcopy(tiny_vlm.TINY_VLM)
SMALL["text"] = {"hidden_size": 32, "layers": 1, "heads": 2, "kv_heads": 1, "intermediate_size": 64}
SMALL["pretrain"].update(steps=3, batch_size=2, warmup=1)


def test_pretraining_runs_on_fixed_threads_and_restores_the_callers(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("UNIFUSION_CACHE", str(tmp_path))
    seen: list[int] = []
    real = tiny_vlm.pretrain

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(tiny_vlm, "pretrain", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # what a sweep run sets (one thread per parallel run)
    try:
        first = tiny_vlm.pretrained_tiny_vlm(SMALL, progress=False)
        assert seen == [tiny_vlm.PRETRAIN_THREADS]
        assert torch.get_num_threads() == 1
        again = tiny_vlm.pretrained_tiny_vlm(SMALL, progress=False)  # from the cache: no second pretraining
        assert seen == [tiny_vlm.PRETRAIN_THREADS]
    finally:
        torch.set_num_threads(before)
    rec = tiny_vlm.pretraining_record(SMALL)
    assert rec["threads"] == tiny_vlm.PRETRAIN_THREADS and len(rec["losses"]) == 3
    assert all(torch.isfinite(torch.tensor(rec["losses"])))
    a, b = first.state_dict(), again.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # pretraining changed the weights (the cache holds trained, not initial, weights)
    init = tiny_vlm.build_tiny_vlm(SMALL["pretrain"]["seed"], SMALL).state_dict()
    assert any(not torch.equal(a[k], init[k]) for k in a)


def test_the_default_tiny_vlm_loads_the_shipped_weights_without_pretraining(tmp_path, monkeypatch) -> None:
    """A fresh clone (empty cache) gets exactly the weights in the shipped file, read here with safetensors itself."""
    from safetensors.torch import load_file

    monkeypatch.setenv("UNIFUSION_CACHE", str(tmp_path))

    def refuse(*args, **kwargs):
        raise AssertionError("pretrained although the weights ship with the repo")

    monkeypatch.setattr(tiny_vlm, "pretrain", refuse)
    path = tiny_vlm.shipped_path()
    assert path.is_file(), f"{path} is missing: run python -m models.tiny_vlm ship"
    model = tiny_vlm.pretrained_tiny_vlm(progress=False)
    shipped = load_file(str(path))
    state = model.state_dict()
    assert sorted(shipped) == sorted(state)
    assert all(torch.equal(state[k], shipped[k]) for k in state)
    assert not any(tmp_path.iterdir())  # nothing cached: nothing pretrained
    rec = tiny_vlm.pretraining_record()
    assert len(rec["losses"]) == tiny_vlm.TINY_VLM["pretrain"]["steps"] and rec["losses"][-1] < rec["losses"][0] / 4


def test_the_pretraining_code_still_starts_the_shipped_loss_curve() -> None:
    """The shipped weights are what this code pretrains: its first steps repeat the recorded losses (to float32
    round-off across CPUs), so a change of data, tokenizer, init or optimiser that forgets to ship again fails."""
    cfg = tiny_vlm.TINY_VLM
    recorded = tiny_vlm.pretraining_record(cfg)["losses"][:4]
    model = tiny_vlm.build_tiny_vlm(cfg["pretrain"]["seed"], cfg)
    losses = tiny_vlm.pretrain(model, tiny_vlm.tiny_vlm_processor(), cfg, progress=False, stop_after=4)
    assert torch.allclose(torch.tensor(losses), torch.tensor(recorded), rtol=1e-4, atol=1e-5), (losses, recorded)
