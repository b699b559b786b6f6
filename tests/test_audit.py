"""Judge audit: exact judges are perfect on known-answer probes, a random judge is caught, rates are computed right."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from evals import audit


def test_probes_have_known_answers() -> None:
    probes = audit.geneval_probes(3, seed=1)
    from common.geneval_spec import TASKS

    for task in TASKS:
        mine = [p for p in probes if p["group"] == task]
        assert sum(p["truth"] for p in mine) == 3 and sum(not p["truth"] for p in mine) == 3
    dprobes = audit.dpg_probes(3, seed=1)
    assert any(p["truth"] for p in dprobes) and any(not p["truth"] for p in dprobes)
    # on its own render every question of a scene is true
    own = [p for p in dprobes if p["image"] is dprobes[0]["image"]]
    assert all(p["truth"] for p in own)


def test_rates_by_hand() -> None:
    df = pd.DataFrame({"group": ["a"] * 4 + ["b"] * 2, "truth": [True, True, False, False, True, False],
                       "answer": [True, False, True, False, True, True]})
    r = pd.DataFrame(audit.rates(df, "j", "geneval")).set_index("group")
    assert r.loc["a", "false_yes"] == 0.5 and r.loc["a", "false_no"] == 0.5 and r.loc["a", "accuracy"] == 0.5
    assert r.loc["b", "false_yes"] == 1.0 and r.loc["b", "false_no"] == 0.0
    assert r.loc["all", "false_yes"] == pytest.approx(2 / 3) and r.loc["all", "n_yes"] == 3
    assert r.loc["all", "fy_low"] <= r.loc["all", "false_yes"] <= r.loc["all", "fy_high"]


def test_unparsed_answers_are_counted_apart_never_as_no() -> None:
    # truth yes: yes, no, unparsed; truth no: no, unparsed, unparsed, yes
    df = pd.DataFrame({"group": ["a"] * 7, "truth": [True, True, True, False, False, False, False],
                       "answer": [True, False, None, False, None, None, True]})
    r = pd.DataFrame(audit.rates(df, "j", "dpg")).set_index("group").loc["all"]
    assert r.unparsed == 3 and r.unparsed_rate == pytest.approx(3 / 7)
    assert r.false_yes == pytest.approx(1 / 4) and r.false_no == pytest.approx(1 / 3)  # over all probes of a truth
    assert r.accuracy == pytest.approx(2 / 7)  # counted as "no", the two unparsed no-probes would make it 4 / 7


def test_run_dpg_judge_keeps_unparsed_verdicts() -> None:
    from evals.judges import JudgeResult

    class Stub:
        batch_size = 2

        def judge(self, requests):
            return [JudgeResult(a, "") for a in ["yes", None, "no"][: len(requests)]]

    probes = audit.dpg_probes(2, seed=0)[:3]
    assert audit.run_dpg_judge(Stub(), probes) == [True, None, True]  # batches of 2: yes, None | yes


def test_audit_end_to_end(tmp_path: Path) -> None:
    df = audit.main(["--n", "2", "--hf-tiny", "--out", str(tmp_path)])
    overall = df[df.group == "all"].set_index("judge")
    for exact in ("geneval:shapes", "vqascore:oracle", "dpg:oracle"):
        assert overall.loc[exact, "accuracy"] == 1.0, exact
    # the random tiny judge is not perfect, and the rates describe its answers
    assert overall.loc["dpg:hf-tiny-gemma3", "accuracy"] < 1.0
    assert {"geneval", "dpg"} == set(df.probe)
    saved = pd.read_csv(tmp_path / "audit.csv")
    assert len(saved) == len(df) and "| dpg:oracle | dpg | all |" in (tmp_path / "audit.md").read_text()
    assert np.isfinite(saved.accuracy).all()


def test_an_openai_compatible_judge_that_always_says_yes(tmp_path: Path) -> None:
    """A server answering "yes" to everything: the audit must measure false-yes = 1 and false-no = 0 for it."""
    from local_http import json_server

    def reply(body: dict) -> tuple[int, object]:
        return 200, {"choices": [{"message": {"content": "Looks right.\nAnswer: yes"},
                                  "logprobs": {"content": [{"token": "Yes", "logprob": -0.01,
                                                            "top_logprobs": [{"token": "Yes", "logprob": -0.01}]}]}}]}

    with json_server(reply) as server:
        df = audit.main(["--n", "1", "--n-resamples", "20", "--judge-url", server.url, "--judge-model", "yes-man",
                         "--out", str(tmp_path)])
        assert {s["body"]["model"] for s in server.seen} == {"yes-man"}
    overall = df[df.group == "all"].set_index("judge")
    for name in ("vqascore:openai:yes-man", "dpg:openai:yes-man"):
        assert overall.loc[name, "false_yes"] == 1.0 and overall.loc[name, "false_no"] == 0.0
        assert overall.loc[name, "accuracy"] == pytest.approx(
            overall.loc[name, "n_yes"] / (overall.loc[name, "n_yes"] + overall.loc[name, "n_no"]))
