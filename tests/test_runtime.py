"""Device, dtype and device_map placement of judges; missing weights; parameter counts from configs alone."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from evals import judge_memory, runtime


def test_pick_device_and_dtype(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runtime.pick_device("auto") == "cpu" and runtime.pick_device("cuda:3") == "cuda:3"
    assert runtime.pick_dtype("auto", "cpu") == torch.float32 and runtime.pick_dtype("auto", "cuda") == torch.bfloat16
    assert runtime.pick_dtype("float16", "cpu") == torch.float16
    with pytest.raises(ValueError, match="unknown dtype 'half'"):
        runtime.pick_dtype("half", "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "3")  # torchrun's process 3 on a 2-GPU node
    assert runtime.pick_device("auto") == "cuda:1"


@pytest.fixture(scope="module")
def gemma_folder(tmp_path_factory):
    from evals.tiny_models import tiny_gemma3

    model, proc = tiny_gemma3()
    folder = tmp_path_factory.mktemp("gemma")
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    return str(folder), model


def test_device_map_loads_the_same_judge(gemma_folder, monkeypatch) -> None:
    pytest.importorskip("accelerate")
    from transformers import AutoModelForImageTextToText

    from evals.judges import HFJudge
    from evals.vqascore import HFVQAScore

    folder, _ = gemma_folder
    seen = []
    real = AutoModelForImageTextToText.from_pretrained.__func__

    def spy(cls, model_id, **kwargs):
        seen.append(kwargs)
        return real(cls, model_id, **kwargs)

    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", classmethod(spy))
    images = [Image.new("RGB", (28, 28), c) for c in ("red", "blue", "green")]
    texts = ["a red circle", "two squares", "a green triangle"]
    whole = HFVQAScore(model_id=folder, answer="yes", device="cpu").score(images, texts)
    mapped = HFVQAScore(model_id=folder, answer="yes", device="cpu", device_map="auto").score(images, texts)
    torch.testing.assert_close(mapped, whole, rtol=0, atol=0)
    assert [k.get("device_map") for k in seen] == [None, "auto"] and seen[0]["dtype"] == torch.float32
    judge = HFJudge(model_id=folder, mode="direct", device="cpu", device_map="auto", dtype="float32")
    assert seen[-1]["device_map"] == "auto" and judge.device == torch.device("cpu")


def test_missing_weights_and_bad_device_map(tmp_path) -> None:
    from transformers import AutoModel

    with pytest.raises(runtime.WeightsNotFound, match="no such folder .*hf download"):
        runtime.from_pretrained(AutoModel, str(tmp_path / "nothing"))
    with pytest.raises(ValueError, match="unknown --device-map 'gpu0'"):
        runtime.check_device_map("gpu0")


def test_parameter_count_from_the_config_alone(gemma_folder, capsys) -> None:
    folder, model = gemma_folder
    n = sum(p.numel() for p in model.parameters())
    assert runtime.parameter_count(folder) == n
    assert runtime.weights_gib(n, torch.bfloat16) == pytest.approx(2 * n / 2**30)
    judge_memory.main([folder])
    assert f"{n / 1e9:.3f}B" in capsys.readouterr().out
