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
    assert names == ["t5", "last_layer", "kv_fusion", "hsi", "lap", "untrained"]
    by = {r.name: r.config for r in runs}
    assert by["t5"]["encoder"]["preset"] == "tiny-t5"
    assert by["lap"]["encoder"]["stride"] == 3 and by["lap"]["conditioner"]["refiner_blocks"] == 2
    assert by["untrained"]["train"]["steps"] == 0
    # same config -> same directory; any change -> a new one
    assert len({r.dirname for r in runs}) == len(runs)
    assert config_hash(by["lap"]) == config_hash(load_experiment("conditioning_candidates")[1][4].config)


def test_smoke_overrides_apply():
    _, runs = load_experiment("conditioning_candidates", smoke=True)
    assert all(r.config["train"]["steps"] in (0, 8) for r in runs)
