"""The `paper` variant of every ablation YAML resolves to a runnable real-model config (checked without weights),
and real data loads through HF datasets (a local parquet built in the test)."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from experiments.config import available_experiments, load_experiment
from experiments.train import trainer_settings
from models.encoders import ENCODER_PRESETS, select_layers
from models.presets import HUB_SPECS

DATA = ["data.hf.path=parquet", "data.hf.data_files=/data/train-*.parquet"]
PAPER_EXPS = [e for e in available_experiments() if e != "edit_finetune"]


@pytest.mark.parametrize("exp", PAPER_EXPS)
def test_paper_variant_is_consistent(exp: str) -> None:
    _, runs = load_experiment(exp, paper=True, sets=DATA)
    _, tiny = load_experiment(exp)
    assert [r.name for r in runs] == [r.name for r in tiny]
    for r in runs:
        c = r.config
        enc = c["encoder"]
        assert enc["preset"] in HUB_SPECS, f"{exp}/{r.name} still uses {enc['preset']}"
        preset = ENCODER_PRESETS[enc["preset"]]
        if enc["layers"] is None and enc["stride"] is None:
            layers, stride, start = preset.layers, preset.stride, preset.start
        else:
            layers, stride, start = enc["layers"], enc["stride"], enc["start"]
        taps = select_layers(HUB_SPECS[enc["preset"]].num_layers, layers=layers, stride=stride, start=start)
        if c["candidate"] in ("kv_fusion", "hsi"):  # one encoder layer per DiT block
            assert len(taps) == c["dit"]["depth"], (exp, r.name, taps)
        if enc.get("tiles") is not None:
            preset.vision.set_tiles(type("P", (), {"image_processor": type("I", (), {})()})(), enc["tiles"])
        t = trainer_settings(c)
        assert c["train"]["batch_size"] * t["devices"] * t["num_nodes"] == 1024  # the paper's global batch
        assert c["data"]["source"] == "hf" and c["data"]["hf"]["data_files"] == "/data/train-*.parquet"
        assert c["latent"] == "flux-vae" and t["precision"] == "bf16-mixed"


def test_paper_variant_step_budgets() -> None:
    by = {r.name: r.config for r in load_experiment("continued_training", paper=True, sets=DATA)[1]}
    assert by["t5_stage"]["train"]["steps"] + by["continued"]["train"]["steps"] == by["scratch"]["train"]["steps"]
    assert by["continued"]["init"]["from_run"] == "t5_stage"
    assert by["t5_stage"]["encoder"]["preset"] == "t5-v1_1-xxl"
    cc = {r.name: r.config for r in load_experiment("conditioning_candidates", paper=True, sets=DATA)[1]}
    assert cc["lap"]["encoder"]["preset"] == "llama-3.1-8b" and cc["t5"]["encoder"]["preset"] == "t5-v1_1-xxl"


def test_bad_variant_and_set_inputs() -> None:
    with pytest.raises(ValueError, match="has no paper variant"):
        load_experiment("edit_finetune", paper=True)
    with pytest.raises(ValueError, match="dotted.key=value"):
        load_experiment("verifi", sets=["data.size"])
    with pytest.raises(KeyError, match="unknown config key 'data.hf.colour'"):
        load_experiment("verifi", sets=["data.hf.colour=red"])
    assert load_experiment("verifi", sets=["train.steps=7"])[1][0].config["train"]["steps"] == 7


# ------------------------------------------------------------------------------------------------ HF data


def _png(color: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture()
def parquet(tmp_path: Path) -> Path:
    datasets = pytest.importorskip("datasets")
    rows = {
        "image": [{"bytes": _png((10 * i, 0, 0)), "path": None} for i in range(8)],
        "caption": [f"a red circle {i}" for i in range(8)],
        "source": [{"bytes": _png((0, 0, 10 * i)), "path": None} for i in range(8)],
    }
    rows["image"][3] = {"bytes": b"\x89PNG not an image", "path": None}  # corrupt file
    rows["caption"][5] = ""  # empty caption
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string"),
                                  "source": datasets.Image()})
    path = tmp_path / "train.parquet"
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))
    return path


def test_hf_stream_items_skips_and_resume(parquet: Path, caplog: pytest.LogCaptureFixture) -> None:
    from experiments.data.hf import HFStream

    hf = {"path": "parquet", "data_files": str(parquet), "split": "train"}
    stream = HFStream(hf, size=16)
    with caplog.at_level(logging.WARNING):
        items = list(stream)
    assert [it["index"] for it in items] == [0, 1, 2, 4, 6, 7]
    assert stream.skipped == 2
    assert "row 3 skipped" in caplog.text and "row 5 skipped" in caplog.text and "2 skipped so far" in caplog.text
    first = items[1]
    assert first["caption"] == "a red circle 1" and tuple(first["image"].shape) == (3, 16, 16)
    # centre crop + resize of a flat colour keeps the colour: (10, 0, 0) -> -1 + 20/255 in [-1, 1]
    np.testing.assert_allclose(first["image"][0].numpy(), 10 / 127.5 - 1, atol=1e-6)
    resumed = list(HFStream(hf, size=16, start_index=4))
    assert [it["index"] for it in resumed] == [4, 6, 7]
    for a, b in zip(items[3:], resumed, strict=True):
        assert a["caption"] == b["caption"] and np.array_equal(a["image"].numpy(), b["image"].numpy())


def test_hf_stream_edit_pairs_and_reconstruction(parquet: Path) -> None:
    from experiments.data.hf import HFStream
    from models.encoders import Prompt

    hf = {"path": "parquet", "data_files": str(parquet), "source_image_column": "source"}
    edits = list(HFStream(hf, size=16))
    assert all(isinstance(it["caption"], Prompt) and it["caption"].images[0].shape == (30, 40, 3) for it in edits)
    assert edits[0]["caption"].text == "a red circle 0"
    recon = list(HFStream({"path": "parquet", "data_files": str(parquet)}, size=16, batch_size=2,
                          tasks={"t2i": 0.0, "reconstruction": 1.0, "edit": 0.0}))
    for it in recon:
        assert it["caption"].text == ""
        np.testing.assert_array_equal(it["caption"].images[0], ((it["image"].permute(1, 2, 0).numpy() + 1) * 127.5)
                                      .round().astype(np.uint8))
    with pytest.raises(ValueError, match="needs data.hf.path"):
        HFStream({"path": None}, size=16)
    with pytest.raises(ValueError, match=r"unknown data.hf key\(s\) \['colums'\]"):
        HFStream({"path": "parquet", "colums": 1}, size=16)
    with pytest.raises(ValueError, match="source_image_column is not set"):
        HFStream({"path": "parquet"}, size=16, tasks={"t2i": 0.5, "edit": 0.5})
