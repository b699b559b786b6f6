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
    assert names == ["t5", "last_layer", "kv_fusion", "hsi", "lap", "untrained", "oracle"]
    by = {r.name: r.config for r in runs}
    assert by["oracle"]["encoder"]["preset"] == "oracle"  # the positive control: a condition that names the scene
    assert by["t5"]["encoder"]["preset"] == "tiny-t5"
    assert by["lap"]["encoder"]["preset"] == "tiny-vlm" and by["lap"]["conditioner"]["refiner_blocks"] == 2
    assert by["lap"]["encoder"]["stride"] == 1 and by["lap"]["encoder"]["start"] == 1  # all 4 tiny-VLM layers
    assert by["untrained"]["train"]["steps"] == 0
    # same config -> same directory; any change -> a new one
    assert len({r.dirname for r in runs}) == len(runs)
    again = {r.name: r.config for r in load_experiment("conditioning_candidates")[1]}
    assert config_hash(by["lap"]) == config_hash(again["lap"]) != config_hash(by["untrained"])


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


# ---------------------------------------------------------------- training-seed replicates
# Directory names of default (single-seed) runs, computed by the code before `seeds` existed: adding the key must
# not rename a run, or every finished run would train again. (Experiments whose YAML changed since are not listed:
# a deliberate config change renames its runs.)
DEFAULT_DIRNAMES = {
    "continued_training": ["t5_stage-17292f35", "continued-851a613e", "scratch-d7c18b48"],
}


@pytest.mark.parametrize("exp", sorted(DEFAULT_DIRNAMES))
def test_default_single_seed_run_directories_keep_their_names(exp: str) -> None:
    assert [r.dirname for r in load_experiment(exp)[1]] == DEFAULT_DIRNAMES[exp]


@pytest.mark.parametrize("exp", available_experiments())
def test_a_null_seeds_key_changes_no_run_hash(exp: str) -> None:
    """Every run of every experiment hashes as if the key did not exist while it is null; set, it counts."""
    for run in load_experiment(exp)[1]:
        assert run.config["seeds"] is None
        without = {k: v for k, v in run.config.items() if k != "seeds"}
        assert config_hash(run.config) == config_hash(without)
        assert config_hash({**run.config, "seeds": [0, 1]}) != config_hash(without)


def test_committed_checkpoint_config_keeps_its_run_directory_hash() -> None:
    """The config stored in the committed LAP checkpoint (a seed-0 replicate: it holds a null `seeds`) hashes to the
    folder the default single-seed sweep gives that run, with or without the null `seeds` key."""
    from pathlib import Path

    import torch

    ckpt = Path(__file__).resolve().parents[1] / "results" / "conditioning_candidates" / "checkpoints" / "lap.ckpt"
    stored = torch.load(ckpt, map_location="cpu", weights_only=False)["hyper_parameters"]["config"]
    assert stored.get("seeds") is None
    without = {k: v for k, v in stored.items() if k != "seeds"}
    lap = {r.name: r for r in load_experiment("conditioning_candidates")[1]}["lap"]
    assert lap.dirname == f"lap-{config_hash(stored)}" == f"lap-{config_hash(without)}"


def test_seeds_expand_every_run_into_one_replicate_per_seed() -> None:
    _, single = load_experiment("conditioning_candidates")
    _, runs = load_experiment("conditioning_candidates", sets=["seeds=[0,1,2]"])
    assert [(r.name, r.seed) for r in runs] == [(r.name, s) for r in single for s in (0, 1, 2)]
    assert len({r.dirname for r in runs}) == len(runs)
    by = {(r.name, r.seed): r for r in runs}
    assert by[("lap", 1)].dirname.startswith("lap-seed1-") and by[("lap", 1)].label == "lap seed 1"
    for name in {r.name for r in single}:
        reps = [by[(name, s)].config for s in (0, 1, 2)]
        # only the training seed differs: the evaluation prompts and sampling seeds are shared, so runs pair
        assert all({k: v for k, v in c.items() if k != "seed"} == {k: v for k, v in reps[0].items() if k != "seed"}
                   for c in reps)
        assert [c["seed"] for c in reps] == [0, 1, 2] and all(c["seeds"] is None for c in reps)
        assert all(c["eval"] == reps[0]["eval"] for c in reps)
    # a replicate is exactly the single-seed run with that seed: same config, same hash
    seed1 = {r.name: r for r in load_experiment("conditioning_candidates", sets=["seed=1"])[1]}
    assert by[("lap", 1)].config == seed1["lap"].config
    assert by[("lap", 1)].dirname == f"lap-seed1-{config_hash(seed1['lap'].config)}"


def test_two_stage_runs_start_from_the_replicate_of_their_own_seed() -> None:
    _, runs = load_experiment("continued_training", sets=["seeds=[3,4]"])
    by = {(r.name, r.seed): r for r in runs}
    for s in (3, 4):
        assert by[("continued", s)].config["init"]["from_dir"] == by[("t5_stage", s)].dirname


@pytest.mark.parametrize("bad", ["seeds=[]", "seeds=[1,1]", "seeds=3", "seeds=[0,x]", "seeds=[true]"])
def test_bad_seeds_are_an_error(bad: str) -> None:
    with pytest.raises(ValueError, match="seeds must be a non-empty list of distinct ints"):
        load_experiment("injection", sets=[bad])


def test_training_seeds_change_init_and_data_order_but_not_the_evaluation() -> None:
    """What a training seed reaches, through the same entry points a run uses: the model's initial weights and
    the data stream differ between seeds and repeat for one seed (the training noise is drawn from the same
    ``seed``, models/module.py); the GenEval prompts and the sampling noise do not depend on it."""
    import tempfile
    from pathlib import Path

    import torch

    from experiments.train import datamodule, train
    from world.prompts import write_geneval_metadata

    small = ["dit.dim=32", "dit.depth=1", "dit.heads=2", "encoder.preset=tiny-llama", "encoder.stride=12",
             "train.steps=0", "train.batch_size=4"]
    _, runs = load_experiment("injection", sets=[*small, "seeds=[0,1]"])
    r0, r1 = [r for r in runs if r.name == "input"]
    with tempfile.TemporaryDirectory() as tmp:
        w0, w0_again, w1 = (train(r.config, Path(tmp) / r.dirname).dit.state_dict() for r in (r0, r0, r1))
    assert all(torch.equal(w0[k], w0_again[k]) for k in w0)
    assert any(not torch.equal(w0[k], w1[k]) for k in w0)

    def first_batch(cfg):
        return next(iter(datamodule(cfg).train_dataloader()))

    b0, b0_again, b1 = first_batch(r0.config), first_batch(r0.config), first_batch(r1.config)
    assert torch.equal(b0["image"], b0_again["image"]) and not torch.equal(b0["image"], b1["image"])
    g0, g1 = r0.config["eval"]["geneval"], r1.config["eval"]["geneval"]
    assert g0 == g1  # prompts: write_geneval_metadata(n_per_task, seed); sampling: seed + 1000 i + k per image
    with tempfile.TemporaryDirectory() as tmp:
        assert write_geneval_metadata(Path(tmp) / "a.jsonl", 2, g0["seed"]) == write_geneval_metadata(
            Path(tmp) / "b.jsonl", 2, g1["seed"])


@pytest.mark.parametrize("exp", available_experiments())
def test_every_variant_passes_the_checks_a_job_makes_when_it_starts(exp: str) -> None:
    """Loading a sweep runs the checks training would make at its first step, for the plain, smoke and paper
    variants alike, so a cluster job cannot fail on a config its sweep was allowed to submit (the held-out
    validation loss needs the shapes world; a paper variant on real data must turn it off)."""
    for kwargs in ({}, {"smoke": True}, {"paper": True}):
        try:
            load_experiment(exp, **kwargs)
        except ValueError as err:
            if "no paper variant" not in str(err):
                raise
    if exp == "injection":
        with pytest.raises(ValueError, match="injection run 'input': eval.val_every needs data.source: shapes"):
            load_experiment(exp, paper=True, sets=["eval.val_every=130"])


def _leaves(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict) and k != "conditioner":
            out.update(_leaves(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _get(config: dict, dotted: str):
    for part in dotted.split("."):
        config = config[part]
    return config


@pytest.mark.parametrize("variant", ["paper", "smoke"])
def test_every_variant_starts_from_the_shared_layer_and_states_only_its_deviations(variant: str) -> None:
    """configs/_<variant>.yaml reaches every run of every ablation's variant, except where the ablation's own
    variant section or that run's own entry sets the key; an ablation that repeats a shared value is refused."""
    import yaml

    from experiments.config import CONFIG_DIR

    shared = _leaves(yaml.safe_load((CONFIG_DIR / f"_{variant}.yaml").read_text()))
    assert shared and "_paper" not in available_experiments() and "_smoke" not in available_experiments()
    for exp in available_experiments():
        spec = yaml.safe_load((CONFIG_DIR / f"{exp}.yaml").read_text())
        own = (spec.get("paper") or {}).get("overrides") if variant == "paper" else spec.get("smoke")
        own = _leaves(own)
        repeated = {k for k, v in own.items() if k in shared and shared[k] == v}
        assert not repeated, f"{exp}: its {variant} section repeats the shared layer's {sorted(repeated)}"
        run_entries = (spec.get("paper") or {}).get("runs") if variant == "paper" else spec.get("smoke_runs")
        for run in load_experiment(exp, **{variant: True})[1]:
            later = {**own, **_leaves((run_entries or {}).get(run.name)), **_leaves(spec["runs"].get(run.name))}
            for key, value in shared.items():
                if key not in later:
                    assert _get(run.config, key) == value, (exp, run.name, key)


def test_typos_in_values_are_refused_before_anything_is_submitted(tmp_path) -> None:
    """`make sweep ... SET=...` with a bad value exits 2 with one line naming the key and what it takes, before a
    run folder exists or a job is started."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "UNIFUSION_RUNS": str(tmp_path / "runs")}
    cases = {
        "trainer.precision=bf16": "unknown trainer.precision 'bf16'; valid: auto, 32-true, bf16-mixed, 16-mixed",
        "dit.dimm=4": "unknown config key 'dit.dimm'; valid keys here: ['depth', 'dim',",
        "dit.dim=ninety": "dit.dim must be an int, got 'ninety'",
        "train.steps=null": "train.steps must be an int, not null",
        "latent=pixels": "unknown latent 'pixels'; valid: flux-vae, pixel,",
        "trainer.devices=0": "trainer.devices must be a positive int or 'auto', got 0",
    }
    for item, message in cases.items():
        out = subprocess.run([sys.executable, "-m", "experiments.launch", "injection", "--set", item], cwd=root,
                             env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 2, (item, out.stderr[-500:])
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (item, lines)
    assert not (tmp_path / "runs").exists()


def test_the_config_command_prints_each_run_as_it_is_hashed(tmp_path) -> None:
    """`make config` prints every run's resolved config; each document hashes to the folder its header names."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-m", "experiments.config", "injection", "--paper", "--set",
                          "train.steps=7"], cwd=root, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "UNIFUSION_RUNS": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-500:]
    docs = out.stdout.split("\n---\n")
    assert len(docs) == 2
    for doc in docs:
        header = doc.splitlines()[0]
        config = yaml.safe_load(doc)
        name, folder = header.removeprefix("# injection run ").split(": ")
        assert folder == f"{name}-{config_hash(config)}"
        assert config["train"]["steps"] == 7 and config["dit"]["dim"] == 2944  # the --set; the shared paper DiT
    per_layer = yaml.safe_load(docs[1])
    assert per_layer["conditioner"]["lap_dim"] == 48 and per_layer["trainer"]["accumulate_grad_batches"] == 4
    bad = subprocess.run([sys.executable, "-m", "experiments.config", "injection", "--run", "nope"], cwd=root,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown run(s) nope of injection; valid: input, per_layer" in bad.stderr
