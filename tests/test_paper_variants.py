"""The `paper` variant of every ablation YAML resolves to a runnable real-model config (checked without weights),
and real data loads through HF datasets (a local parquet built in the test)."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from experiments.config import available_experiments, load_experiment
from experiments.schema import trainer_settings
from models.conditioning import encoder_features
from models.encoders import ENCODER_PRESETS, select_layers
from models.encoders.hub import HUB_SPECS

DATA = ["data.hf.path=parquet", "data.hf.data_files=/data/train-*.parquet"]
EDIT_DATA = ["data.hf_edit.path=parquet", "data.hf_edit.data_files=/data/edit-*.parquet"]
PAPER_EXPS = available_experiments()


@pytest.mark.parametrize("exp", PAPER_EXPS)
def test_paper_variant_is_consistent(exp: str) -> None:
    _, runs = load_experiment(exp, paper=True, sets=DATA)
    _, tiny = load_experiment(exp)
    # the oracle control reads shapes-world captions word by word: it has no real-model counterpart
    assert [r.name for r in runs] == [r.name for r in tiny if r.name != "oracle"]
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
        if encoder_features(c["candidate"], c["conditioner"]) == "kv":  # every encoder layer's keys/values
            assert HUB_SPECS[enc["preset"]].num_layers == c["dit"]["depth"], (exp, r.name)
        elif c["candidate"] in ("kv_fusion", "hsi"):  # one encoder layer per DiT block
            assert len(taps) == c["dit"]["depth"], (exp, r.name, taps)
        if enc.get("tiles") is not None:
            preset.vision.set_tiles(type("P", (), {"image_processor": type("I", (), {})()})(), enc["tiles"])
        t = trainer_settings(c)
        global_batch = c["train"]["batch_size"] * t["devices"] * t["num_nodes"] * (t["accumulate_grad_batches"] or 1)
        assert global_batch == 1024  # the paper's global batch
        assert c["data"]["source"] == "hf" and c["data"]["hf"]["data_files"] == "/data/train-*.parquet"
        assert c["latent"] == "flux-vae" and t["precision"] == "bf16-mixed"


@pytest.mark.parametrize("exp", PAPER_EXPS)
def test_paper_variant_dit_has_the_papers_size(exp: str) -> None:
    """Sec. 2.2: "a 5B-parameter ... DiT" for the ablations; Sec. 4: "the DiT parameters to 8B" (within 5%), built
    on the meta device exactly as the run builds it. KV fusion on the encoder's own keys and values is the exception
    the method forces: its DiT copies the encoder's attention shape (Llama-3.1-8B's: 8.9B with adaLN-zero blocks)."""
    import torch

    from models.meta_step import tapped_layers
    from models.parts import build_parts, encoder_width

    target = 8.0e9 if exp in ("final", "edit_finetune") else 5.0e9
    for r in load_experiment(exp, paper=True, sets=DATA)[1]:
        c = r.config
        if encoder_features(c["candidate"], c["conditioner"]) == "kv":
            shape = ENCODER_PRESETS[c["encoder"]["preset"]].attention
            want = (shape.layers, shape.hidden, shape.heads, shape.kv_heads)
            assert (c["dit"]["depth"], c["dit"]["dim"], c["dit"]["heads"], c["dit"]["kv_heads"]) == want
            continue
        taps = tapped_layers(c, HUB_SPECS[c["encoder"]["preset"]].num_layers)
        with torch.device("meta"):
            _, dit = build_parts(c, enc_dim=encoder_width(c["encoder"]["preset"]), num_layers=len(taps),
                                 latent_channels=16, latent_size=c["data"]["size"] // 8)
        n = sum(p.numel() for p in dit.parameters())
        assert abs(n - target) <= 0.05 * target, (exp, r.name, n)


def test_paper_variants_follow_the_papers_figures() -> None:
    def runs(exp: str) -> dict:
        return {r.name: r.config for r in load_experiment(exp, paper=True, sets=DATA + EDIT_DATA)[1]}

    # Fig. 4: no refiner in any candidate (App. A.1.2: the refiner came later and closed the gap, Fig. 22)
    for name, c in runs("conditioning_candidates").items():
        assert c["conditioner"].get("refiner_blocks", 0) == 0, name
    # Fig. 22: penultimate layer + refiner and LAP + refiner, against their no-refiner controls
    ref = runs("refiner")
    assert {n: c["conditioner"].get("refiner_blocks", 0) for n, c in ref.items()} == {
        "t5": 0, "penultimate": 0, "penultimate_refiner": 2, "lap": 0, "lap_refiner": 2}
    assert all(c["train"]["steps"] == 250000 for c in ref.values())  # "Comparison at 250k training steps"
    # Sec. 4: InternVL3-8B, every third layer, VERIFI, up to 10 tiles, mixed base tasks, ~10k steps of instructions
    for exp in ("final", "edit_finetune"):
        by = runs(exp)
        base = by["base"]
        enc = base["encoder"]
        assert (enc["preset"], enc["verifi"], enc["tiles"], enc["stride"]) == ("internvl3-8b", True, 10, None)
        assert ENCODER_PRESETS["internvl3-8b"].stride == 3 and base["data"]["size"] == 1024
        assert all(base["data"]["tasks"][t] > 0 for t in ("t2i", "reconstruction", "edit"))
        assert base["conditioner"]["lap_blocks"] == 2 and base["conditioner"]["refiner_blocks"] == 2
        tuned = by["instruct"] if exp == "final" else by["edit_finetune"]
        assert tuned["init"]["from_run"] == "base" and tuned["train"]["steps"] == 10000
        assert tuned["data"]["tasks"]["edit"] > 0


def test_paper_variant_step_budgets() -> None:
    by = {r.name: r.config for r in load_experiment("continued_training", paper=True, sets=DATA)[1]}
    assert by["t5_stage"]["train"]["steps"] + by["continued"]["train"]["steps"] == by["scratch"]["train"]["steps"]
    assert by["continued"]["init"]["from_run"] == "t5_stage"
    assert by["t5_stage"]["encoder"]["preset"] == "t5-v1_1-xxl"
    cc = {r.name: r.config for r in load_experiment("conditioning_candidates", paper=True, sets=DATA)[1]}
    assert cc["lap"]["encoder"]["preset"] == "llama-3.1-8b" and cc["t5"]["encoder"]["preset"] == "t5-v1_1-xxl"


def test_edit_finetune_paper_variant_two_sources() -> None:
    """Sec. 4 / Tab. 2: the final model's base, then ~10k steps of editing (or t2i, the control) fine-tuning from its
    weights; edit batches (the base's joined image + text samples, the fine-tune's edits) read data.hf_edit; every
    run's data config builds its data module."""
    from experiments.data.hf import HFDataModule
    from experiments.train import datamodule

    runs = load_experiment("edit_finetune", paper=True, sets=DATA + EDIT_DATA)[1]
    by = {r.name: r for r in runs}
    assert by["base"].config["init"]["from_run"] is None
    for name in ("t2i_continue", "edit_finetune"):
        init = by[name].config["init"]
        assert init["from_run"] == "base" and init["from_dir"] == by["base"].dirname
        assert init["keep"] == ["dit", "conditioner"]
    steps = {name: r.config["train"]["steps"] for name, r in by.items()}
    assert steps == {"base": 810000, "t2i_continue": 10000, "edit_finetune": 10000}  # 830M samples; Sec. 4 ~10k
    edit = by["edit_finetune"].config["data"]
    assert edit["tasks"]["edit"] > 0 and edit["tasks"]["t2i"] > 0 and edit["hf"]["source_image_column"] is None
    assert edit["hf_edit"]["path"] == "parquet" and edit["hf_edit"]["data_files"] == "/data/edit-*.parquet"
    assert edit["hf_edit"]["source_image_column"] and edit["hf_edit"]["split"] == "train"  # base.yaml's data.hf
    assert by["t2i_continue"].config["data"]["tasks"] == {"t2i": 1.0, "reconstruction": 0.0, "edit": 0.0}
    for r in runs:  # validates both sources' keys (no data is read)
        assert isinstance(datamodule(r.config), HFDataModule)
    # without the edit data the runs with edit batches say what is missing before anything is launched
    bare = {r.name: r.config for r in load_experiment("edit_finetune", paper=True, sets=DATA)[1]}
    datamodule(bare["t2i_continue"])
    for name in ("base", "edit_finetune"):
        with pytest.raises(ValueError, match="data.hf_edit needs path"):
            datamodule(bare[name])


def test_hf_edit_set_merges_onto_data_hf_keys_and_keeps_old_hashes() -> None:
    from experiments.config import config_hash, load_base, merge

    cfg = merge(load_base(), {"data": {"hf_edit": {"path": "parquet"}}})
    assert set(cfg["data"]["hf_edit"]) == set(load_base()["data"]["hf"])
    assert cfg["data"]["hf_edit"]["caption_column"] == "caption" and cfg["data"]["hf_edit"]["path"] == "parquet"
    one = load_experiment("verifi", sets=EDIT_DATA)[1][0].config["data"]["hf_edit"]  # two --set on a null key
    assert one["path"] == "parquet" and one["data_files"] == "/data/edit-*.parquet"
    with pytest.raises(KeyError, match="unknown config key 'data.hf_edit.colour'"):
        load_experiment("verifi", sets=["data.hf_edit.path=p", "data.hf_edit.colour=red"])
    # a null hf_edit leaves the hash of every run made before it existed unchanged
    base = load_base()
    assert base["data"]["hf_edit"] is None
    old = {**base, "data": {k: v for k, v in base["data"].items() if k != "hf_edit"}}
    assert config_hash(base) == config_hash(old) and config_hash(cfg) != config_hash(base)


def test_bad_variant_and_set_inputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    import experiments.config as config

    shutil.copy(config.CONFIG_DIR / "base.yaml", tmp_path / "base.yaml")
    (tmp_path / "nopaper.yaml").write_text("runs: {a: {}}\n")
    monkeypatch.setattr(config, "CONFIG_DIR", tmp_path)
    with pytest.raises(ValueError, match="has no paper variant"):
        load_experiment("nopaper", paper=True)
    monkeypatch.undo()
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


def test_items_carry_the_rows_their_worker_skipped(parquet: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import experiments.data.hf as hf_data
    from experiments.data.hf import HFStream

    hf = {"path": "parquet", "data_files": str(parquet)}
    items = list(HFStream(hf, size=16))
    # rows 3 (corrupt) and 5 (empty caption) are reported with the next item read
    assert [(it["index"], it["skipped"]) for it in items] == [(0, 0), (1, 0), (2, 0), (4, 1), (6, 1), (7, 0)]
    # any other error is no bad row: the run stops with it
    monkeypatch.setattr(hf_data, "square", lambda img, size: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        list(HFStream(hf, size=16))


def test_skips_of_every_worker_reach_the_batches(split_sources) -> None:
    from torch.utils.data import DataLoader

    from experiments.data.datamodule import collate
    from experiments.data.hf import HFStream

    hf, _ = split_sources  # row 4 corrupt; two files, read by two worker processes
    loader = DataLoader(HFStream(hf, size=16, batch_size=2), batch_size=2, num_workers=2, collate_fn=collate)
    batches = list(loader)
    assert sum(int(b["skipped"].sum()) for b in batches) == 1
    assert sum(len(b["index"]) for b in batches) == N_ROWS - 1


def test_hf_training_reports_skips_and_fails_past_the_limit(parquet: Path, tmp_path: Path, caplog) -> None:
    from experiments.config import load_base, merge
    from experiments.train import train

    cfg = merge(load_base(), {
        "data": {"source": "hf", "hf": {"path": "parquet", "data_files": str(parquet)}},
        "dit": {"dim": 32, "depth": 4, "heads": 2, "patch": 8}, "conditioner": {"heads": 2},
        "train": {"steps": 3, "batch_size": 2, "ckpt_every": 10, "log_every": 1}, "optim": {"warmup_steps": 1},
    })
    # 3 steps x 2 items read rows 0-7: rows 3 and 5 skipped, 2 of 8 = 25%, over the default limit of 1%
    with pytest.raises(RuntimeError, match=r"data: 2 of 8 rows read skipped \(25.00%\).*max_skip_rate = 0.01"):
        train(cfg, tmp_path / "strict")
    with caplog.at_level(logging.WARNING):
        module = train(merge(cfg, {"data": {"hf": {"max_skip_rate": 0.3}}}), tmp_path / "lenient")
    assert module.global_step == 3 and "data: 2 of 8 rows read skipped (25.00%)" in caplog.text


def test_max_skip_rate_config() -> None:
    from experiments.config import config_hash, load_base, merge
    from experiments.data.hf import max_skip_rate

    base = load_base()
    assert base["data"]["hf"]["max_skip_rate"] is None and max_skip_rate(base["data"]["hf"]) == 0.01
    old = merge(base, {})
    del old["data"]["hf"]["max_skip_rate"]
    assert config_hash(base) == config_hash(old)  # runs made before the key keep their directories
    edit = merge(base, {"data": {"hf_edit": {"path": "parquet"}}})
    assert edit["data"]["hf_edit"]["max_skip_rate"] is None
    old_edit = merge(edit, {})
    del old_edit["data"]["hf_edit"]["max_skip_rate"], old_edit["data"]["hf"]["max_skip_rate"]
    assert config_hash(edit) == config_hash(old_edit)
    assert max_skip_rate({"max_skip_rate": 0.2}) == 0.2
    for bad in (-0.1, 1.5, "1%", True):
        with pytest.raises(ValueError, match="max_skip_rate must be a fraction in"):
            max_skip_rate({"max_skip_rate": bad})


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


# ------------------------------------------------------------------------------------------------ two HF sources

MIX = {"t2i": 0.4, "reconstruction": 0.2, "edit": 0.4}
N_ROWS = 12


@pytest.fixture()
def two_sources(tmp_path: Path) -> tuple[dict, dict]:
    """Image-caption rows ("t2i r", red 10r) and edit pairs ("edit r": source blue 10r -> target green 10r),
    with one corrupt file in each source."""
    t2i = {"image": [{"bytes": _png((10 * i, 0, 0)), "path": None} for i in range(N_ROWS)],
           "caption": [f"t2i {i}" for i in range(N_ROWS)]}
    t2i["image"][4] = {"bytes": b"\x89PNG not an image", "path": None}
    edit = {"target": [{"bytes": _png((0, 10 * i, 0)), "path": None} for i in range(N_ROWS)],
            "instruction": [f"edit {i}" for i in range(N_ROWS)],
            "source": [{"bytes": _png((0, 0, 10 * i)), "path": None} for i in range(N_ROWS)]}
    edit["source"][3] = {"bytes": b"\x89PNG not an image", "path": None}
    img, text = datasets.Image(), datasets.Value("string")
    t2i_features = datasets.Features({"image": img, "caption": text})
    edit_features = datasets.Features({"target": img, "instruction": text, "source": img})
    datasets.Dataset.from_dict(t2i, features=t2i_features).to_parquet(str(tmp_path / "t2i.parquet"))
    datasets.Dataset.from_dict(edit, features=edit_features).to_parquet(str(tmp_path / "e.parquet"))
    hf = {"path": "parquet", "data_files": str(tmp_path / "t2i.parquet")}
    hf_edit = {"path": "parquet", "data_files": str(tmp_path / "e.parquet"), "image_column": "target",
               "caption_column": "instruction", "source_image_column": "source"}
    return hf, hf_edit


BAD_ROWS = {("hf", 4), ("hf_edit", 3)}  # the corrupt files of two_sources


def _expected(seed: int, batch_size: int, rank: int = 0, world: int = 1, share: dict[str, list[int]] | None = None,
              two: bool = True) -> list[tuple[int, str, str, int]]:
    """(data position, task, source, dataset row) of rank ``rank``'s stream from step 0 (its t-th batch is global
    batch t * world + rank), from the task draw alone (rng [seed, batch, 2], as the shapes world draws it) and the
    rows of its ``share`` (default: all), until a source runs out. One source (``two=False``): every batch t2i."""
    from experiments.data.sharding import draw_task

    share = share or {src: list(range(N_ROWS)) for src in ("hf", "hf_edit")}
    out, nxt, t = [], {"hf": 0, "hf_edit": 0}, 0
    while True:
        g = t * world + rank
        task = draw_task(MIX, np.random.default_rng([seed, g, 2])) if two else "t2i"
        src = "hf_edit" if task == "edit" else "hf"
        for k in range(batch_size):
            if nxt[src] == len(share[src]):
                return out
            out.append((g * batch_size + k, task, src, share[src][nxt[src]]))
            nxt[src] += 1
        t += 1


def _good(expected: list[tuple[int, str, str, int]]) -> list[tuple[int, str, int]]:
    """(data position, source, row) of the expected items whose rows are not corrupt."""
    return [(i, src, row) for i, _, src, row in expected if (src, row) not in BAD_ROWS]


def _key(item: dict) -> tuple:
    cap = item["caption"]
    text, imgs = (cap, ()) if isinstance(cap, str) else (cap.text, tuple(np.asarray(i) for i in cap.images))
    return item["index"], item["source"], item["row"], type(cap).__name__, text, item["image"].numpy().tobytes(), \
        tuple(i.tobytes() for i in imgs)


def test_two_sources_edit_batches_read_hf_edit_in_drawn_order(two_sources, caplog) -> None:
    from experiments.data.hf import HFStream
    from models.encoders import Prompt

    hf, hf_edit = two_sources
    seed, bs = 0, 2
    expected = _expected(seed, bs)
    tasks = [t for _, t, _, _ in expected[::bs]]
    assert {"t2i", "reconstruction", "edit"} <= set(tasks[:6]), tasks  # the seed mixes all three early on
    stream = HFStream(hf, size=16, batch_size=bs, tasks=MIX, seed=seed, hf_edit=hf_edit)
    with caplog.at_level(logging.WARNING):
        items = list(stream)
    want = [e for e in expected if (e[2], e[3]) not in BAD_ROWS]
    assert [(it["index"], it["source"], it["row"]) for it in items] == [(i, s, r) for i, _, s, r in want]
    assert stream.skipped_by == {"hf": 1, "hf_edit": 1} and stream.skipped == 2
    assert "data.hf row 4 skipped" in caplog.text and "data.hf_edit row 3 skipped" in caplog.text
    for it, (_, task, _, row) in zip(items, want, strict=True):
        cap, img = it["caption"], it["image"].numpy()
        if task == "t2i":
            assert cap == f"t2i {row}"
            np.testing.assert_allclose(img[0], 10 * row / 127.5 - 1, atol=1e-6)
        elif task == "reconstruction":
            assert isinstance(cap, Prompt) and cap.text == "" and cap.images[0].shape == (16, 16, 3)
            np.testing.assert_allclose(img[0], 10 * row / 127.5 - 1, atol=1e-6)
        else:  # target green, the instruction with the full-size blue source image
            assert isinstance(cap, Prompt) and cap.text == f"edit {row}"
            assert cap.images[0].shape == (30, 40, 3) and (cap.images[0][..., 2] == 10 * row).all()
            np.testing.assert_allclose(img[1], 10 * row / 127.5 - 1, atol=1e-6)
            assert (img[0] == -1).all()


@pytest.mark.parametrize("step", [1, 3, 6])
def test_two_sources_exact_resume_and_worker_split(two_sources, step: int, monkeypatch) -> None:
    from types import SimpleNamespace

    import experiments.data.hf as hfmod
    from experiments.data.hf import HFStream, source_rows

    hf, hf_edit = two_sources
    seed, bs = 0, 2
    full = list(HFStream(hf, size=16, batch_size=bs, tasks=MIX, seed=seed, hf_edit=hf_edit))
    expected = _expected(seed, bs)
    before = [e for e in expected if e[0] < step * bs]
    assert source_rows(MIX, seed, step, bs) == {s: sum(e[2] == s for e in before) for s in ("hf", "hf_edit")}
    resumed = list(HFStream(hf, size=16, start_index=step * bs, batch_size=bs, tasks=MIX, seed=seed,
                            hf_edit=hf_edit))
    tail = [it for it in full if it["index"] >= step * bs]
    assert len(tail) >= 4 and [_key(it) for it in resumed] == [_key(it) for it in tail]
    # two DataLoader workers from the same step: worker k takes batches step + k, step + k + 2, ...
    per_worker = []
    for wid in (0, 1):
        monkeypatch.setattr(hfmod, "get_worker_info", lambda wid=wid: SimpleNamespace(id=wid, num_workers=2))
        got = list(HFStream(hf, size=16, start_index=step * bs, batch_size=bs, tasks=MIX, seed=seed,
                            hf_edit=hf_edit))
        assert got and all((it["index"] // bs - step) % 2 == wid for it in got)
        per_worker += got
    assert sorted(_key(it) for it in per_worker) == sorted(_key(it) for it in tail)


def test_two_sources_datamodule_resumes_at_the_trainer_step(two_sources) -> None:
    from types import SimpleNamespace

    from experiments.config import load_base, merge
    from experiments.train import datamodule

    hf, hf_edit = two_sources
    cfg = merge(load_base(), {"seed": 0, "train": {"batch_size": 2},
                              "data": {"source": "hf", "size": 16, "tasks": MIX, "hf": hf, "hf_edit": hf_edit}})
    dm = datamodule(cfg)
    expected = _expected(0, 2)
    first = next(iter(dm.train_dataloader()))
    assert first["index"].tolist() == [0, 1] and tuple(first["image"].shape) == (2, 3, 16, 16)
    def trainer(step: int, rank: int = 0, world: int = 1) -> SimpleNamespace:
        return SimpleNamespace(global_step=step, global_rank=rank, world_size=world, accumulate_grad_batches=1)

    dm.trainer = trainer(6)  # rows 4, 5 of data.hf_edit
    batch = next(iter(dm.train_dataloader()))
    assert batch["index"].tolist() == [12, 13] and expected[12][1:] == ("edit", "hf_edit", 4)
    assert [c.text for c in batch["caption"]] == ["edit 4", "edit 5"]
    for rank in (0, 1):  # DDP: step 3 = global batches 6 (rank 0) and 7 (rank 1), each from the rank's rows
        dm.trainer = trainer(3, rank, 2)
        batch = next(iter(dm.train_dataloader()))
        assert batch["index"].tolist() == [12 + 2 * rank, 13 + 2 * rank]
        share = {src: list(range(rank, N_ROWS, 2)) for src in ("hf", "hf_edit")}  # one file each: every 2nd row
        want = [e for e in _good(_expected(0, 2, rank, 2, share)) if e[0] >= 12]
        got = [_source_row({"image": img, "caption": c, "index": int(i)})
               for img, c, i in zip(batch["image"], batch["caption"], batch["index"], strict=True)]
        assert got == want[:2]


def test_two_sources_errors(two_sources) -> None:
    from experiments.data.hf import HFStream

    hf, hf_edit = two_sources
    with pytest.raises(ValueError, match="source_image_column is not set and there is no data.hf_edit"):
        HFStream(hf, size=16, tasks=MIX)
    with pytest.raises(ValueError, match="data.hf_edit needs source_image_column"):
        HFStream(hf, size=16, tasks=MIX, hf_edit={**hf_edit, "source_image_column": None})
    with pytest.raises(ValueError, match=r"unknown data.hf_edit key\(s\) \['colour'\]; valid: \['path', 'name'"):
        HFStream(hf, size=16, tasks=MIX, hf_edit={**hf_edit, "colour": "red"})
    with pytest.raises(ValueError, match="data.hf_edit needs path"):
        HFStream(hf, size=16, tasks=MIX, hf_edit={**hf_edit, "path": None})
    with pytest.raises(ValueError, match="unset data.hf.source_image_column"):
        HFStream({**hf, "source_image_column": "image"}, size=16, tasks=MIX, hf_edit=hf_edit)
    with pytest.raises(ValueError, match="start_index 3 is not a multiple of batch_size 2 x world_size 1"):
        HFStream(hf, size=16, start_index=3, batch_size=2, tasks=MIX, hf_edit=hf_edit)
    with pytest.raises(ValueError, match="data.tasks must map"):
        HFStream(hf, size=16, tasks={"t2i": 1.0, "recon": 0.5})
    # hf_edit set but no edit batches: data.hf alone, items as with one source
    items = list(HFStream(hf, size=16, tasks={"t2i": 1.0, "reconstruction": 0.0, "edit": 0.0}, hf_edit=hf_edit))
    assert [it["caption"] for it in items][:3] == ["t2i 0", "t2i 1", "t2i 2"] and "source" not in items[0]


@pytest.fixture()
def split_sources(two_sources, tmp_path: Path) -> tuple[dict, dict]:
    """two_sources' rows with each source split over two parquet files (datasets hands out files per worker)."""
    out = []
    for cfg in two_sources:
        ds = datasets.load_dataset("parquet", data_files=cfg["data_files"], split="train")
        files = []
        for k, (a, b) in enumerate(((0, N_ROWS // 2), (N_ROWS // 2, N_ROWS))):
            files.append(str(tmp_path / f"{Path(cfg['data_files']).stem}-{k}.parquet"))
            ds.select(range(a, b)).to_parquet(files[-1])
        out.append({**cfg, "data_files": files})
    return out[0], out[1]


@pytest.mark.parametrize("two", [False, True], ids=["one_source", "two_sources"])
def test_hf_stream_in_real_dataloader_workers_reads_every_row_in_order(split_sources, two: bool) -> None:
    """Real worker processes over a dataset of two files read the items the stream reads without workers.
    (Iterating a datasets stream inside a worker gives it only its share of the files: half the rows were lost.)"""
    from torch.utils.data import DataLoader

    from experiments.data.datamodule import collate
    from experiments.data.hf import HFStream

    hf, hf_edit = split_sources
    kw = {"batch_size": 2, "tasks": MIX, "seed": 0, "hf_edit": hf_edit} if two else {"batch_size": 2}

    def text(cap) -> str:
        return cap if isinstance(cap, str) else cap.text

    ref = [(it["index"], text(it["caption"])) for it in HFStream(hf, size=16, **kw)]
    assert len(ref) >= (16 if two else N_ROWS - 1)
    loader = DataLoader(HFStream(hf, size=16, **kw), batch_size=2, num_workers=2, collate_fn=collate)
    got = [(int(i), text(c)) for b in loader for i, c in zip(b["index"], b["caption"], strict=True)]
    assert sorted(got) == sorted(ref)  # every row once (a skipped bad row lets later items change batches)
    first_bad = next(k for k, (i, _) in enumerate(ref) if i != k)
    assert first_bad >= 4 and got[:first_bad] == ref[:first_bad]  # and the same order up to the first bad row


def _source_row(item: dict) -> tuple[int, str, int]:
    """(index, source, dataset row) of an item of two_sources' data, read off its caption or its pixels."""
    cap, img = item["caption"], item["image"].numpy()
    text = cap if isinstance(cap, str) else cap.text
    if text:
        kind, row = text.split()
        return item["index"], "hf" if kind == "t2i" else "hf_edit", int(row)
    return item["index"], "hf", round((img[0, 0, 0] + 1) * 127.5 / 10)  # reconstruction: red 10 * row


@pytest.mark.parametrize("files", [1, 2], ids=["row_split", "file_split"])
@pytest.mark.parametrize("two", [False, True], ids=["one_source", "two_sources"])
def test_hf_ranks_read_their_own_share_and_resume_in_it(two_sources, split_sources, files: int, two: bool,
                                                        monkeypatch) -> None:
    """Under DDP each rank reads only its share of each source: whole files when they divide among the ranks,
    else every other row. Its batches are global batches rank, rank + 2, ...; resumed at step 1 with two
    DataLoader workers it reads exactly the rest of its stream, each worker its own batches."""
    from types import SimpleNamespace

    import experiments.data.hf as hfmod
    from experiments.data.hf import HFStream

    hf, hf_edit = split_sources if files == 2 else two_sources
    world, bs, seed, step, nw = 2, 2, 0, 1, 2
    kw = {"batch_size": bs, "tasks": MIX, "seed": seed, "hf_edit": hf_edit} if two else {"batch_size": bs}
    covered = []
    for rank in range(world):
        share = {src: [i for i in range(N_ROWS) if (i // (N_ROWS // 2) if files == 2 else i % 2) == rank]
                 for src in ("hf", "hf_edit")}
        want = _good(_expected(seed, bs, rank, world, share, two))
        assert len(want) >= 4
        got = [_source_row(it) for it in HFStream(hf, size=16, rank=rank, world_size=world, **kw)]
        assert got == want
        covered += [(src, row) for _, src, row in got]
        tail = [e for e in want if e[0] >= step * world * bs]
        resumed = []
        for wid in range(nw):
            monkeypatch.setattr(hfmod, "get_worker_info", lambda wid=wid: SimpleNamespace(id=wid, num_workers=nw))
            mine = [_source_row(it) for it in HFStream(hf, size=16, start_index=step * world * bs, rank=rank,
                                                      world_size=world, **kw)]
            assert mine and all(((i // bs - rank) // world - step) % nw == wid for i, _, _ in mine)
            resumed += mine
        monkeypatch.undo()
        assert sorted(resumed) == sorted(tail)
    assert len(covered) == len(set(covered))  # no row read by two ranks
    if not two:  # one source runs to its end: the shares cover every good row
        assert sorted(row for _, row in covered) == [i for i in range(N_ROWS) if ("hf", i) not in BAD_ROWS]
    with pytest.raises(ValueError, match="rank must be in"):
        HFStream(hf, size=16, rank=-1, world_size=2)
    with pytest.raises(ValueError, match="start_index 2 is not a multiple of batch_size 2 x world_size 2"):
        HFStream(hf, size=16, start_index=2, rank=0, world_size=2, **kw)
