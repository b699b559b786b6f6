"""Experiment configs: merging, validation, run naming, bad names."""

from __future__ import annotations

import pytest

from experiments.config import available_experiments, config_hash, load_base, load_experiment, merge


def test_unknown_key_is_an_error_naming_valid_keys():
    with pytest.raises(KeyError, match="unknown config key 'dit.width'.*'depth'"):
        merge(load_base(), {"dit": {"width": 3}})
    with pytest.raises(KeyError, match="unknown config key 'trian'"):
        merge(load_base(), {"trian": {}})


def test_conditioner_options_are_free_form_and_merge():
    cfg = merge(load_base(), {"conditioner": {"refiner_blocks": 2}})
    assert cfg["conditioner"] == {"heads": 4, "refiner_blocks": 2}
    assert merge(cfg, {"conditioner": {"heads": 8}})["conditioner"] == {"heads": 8, "refiner_blocks": 2}


def test_unknown_experiment_lists_valid_names():
    with pytest.raises(ValueError, match="conditioning_candidates"):
        load_experiment("no_such_sweep")
    assert "conditioning_candidates" in available_experiments()


def test_conditioning_candidates_grid():
    spec, runs = load_experiment("conditioning_candidates")
    names = [r.name for r in runs]
    assert names == ["t5", "last_layer", "kv_fusion", "kv_fusion_hidden", "hsi", "lap", "untrained"]
    by = {r.name: r.config for r in runs}
    assert by["t5"]["encoder"]["preset"] == "tiny-t5"
    assert by["lap"]["encoder"]["preset"] == "tiny-vlm" and by["lap"]["conditioner"]["refiner_blocks"] == 2
    assert by["lap"]["encoder"]["stride"] == 1 and by["lap"]["encoder"]["start"] == 1  # all 4 tiny-VLM layers
    assert by["untrained"]["train"]["steps"] == 0
    # same config -> same directory; any change -> a new one
    assert len({r.dirname for r in runs}) == len(runs)
    assert config_hash(by["lap"]) == config_hash(load_experiment("conditioning_candidates")[1][5].config)


def test_smoke_overrides_apply():
    _, runs = load_experiment("conditioning_candidates", smoke=True)
    assert all(r.config["train"]["steps"] in (0, 8) for r in runs)


@pytest.mark.parametrize("exp", available_experiments())
def test_every_ablation_builds_every_run(exp: str) -> None:
    """Each YAML's every grid point (full and smoke) is a valid config: the module builds, the encoder taps what
    the YAML asks, and the figure it names exists. A typo in any ablation fails here, not hours into a sweep."""
    from analysis.figures import FIGURES
    from models.encoders import select_layers
    from models.module import UniFusionModule

    spec, runs = load_experiment(exp)
    assert spec.get("figure") in FIGURES and spec.get("description")
    assert len({r.dirname for r in runs}) == len(runs)
    _, smoke = load_experiment(exp, smoke=True)
    assert [r.name for r in smoke] == [r.name for r in runs]
    for run in runs:
        module = UniFusionModule(run.config)
        enc = run.config["encoder"]
        if module.encoder.features == "kv":  # KV fusion on the encoder's own keys/values: every layer's attention
            assert module.encoder.layer_ids == tuple(range(module.encoder.num_layers))
        else:
            assert module.encoder.layer_ids == select_layers(
                module.encoder.num_layers, layers=enc["layers"], stride=enc["stride"], start=enc["start"])
        assert module.config["candidate"] == run.config["candidate"]


def test_ablation_grids_vary_what_they_claim() -> None:
    by = {r.name: r.config for r in load_experiment("layer_stride")[1]}
    assert {n: c["encoder"]["stride"] for n, c in by.items()} == {"stride1": 1, "stride2": 2, "stride3": 3,
                                                                   "stride6": 6}
    inj = {r.name: r.config["conditioner"]["injection"] for r in load_experiment("injection")[1]}
    assert inj == {"input": "input", "per_layer": "per_layer"}
    ref = {r.name: r.config for r in load_experiment("refiner")[1]}
    assert ref["penultimate"]["encoder"]["layers"] == [-2] and "refiner_blocks" not in ref["penultimate"]["conditioner"]
    assert ref["penultimate_refiner"]["conditioner"]["refiner_blocks"] == 2
