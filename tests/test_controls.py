"""Candidates between the controls: the share of the oracle's gain and the component table, by hand."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis.comparisons import control_table
from analysis.results_readme import control_lines


def rows(run: str, seed: int, overall: float, parts: dict[str, float], step: int = 100) -> list[dict]:
    out = [{"run": run, "seed": seed, "step": 0, "metric": "geneval.overall", "value": 0.0}]  # an earlier eval
    out.append({"run": run, "seed": seed, "step": step, "metric": "geneval.overall", "value": overall})
    out += [{"run": run, "seed": seed, "step": step, "metric": f"geneval.part.{k}", "value": v}
            for k, v in parts.items()]
    return out


def test_control_table_places_each_run_between_floor_and_ceiling() -> None:
    m = pd.DataFrame(rows("untrained", 0, 0.1, {"drawn": 0.2}, step=0)[1:]
                     + rows("oracle", 0, 0.5, {"drawn": 1.0, "color": 0.9})
                     + rows("lap", 0, 0.1, {"drawn": 0.5, "color": 0.2})
                     + rows("lap", 1, 0.3, {"drawn": 0.7, "color": 0.4}))
    t = control_table(m).set_index("run")
    assert list(t.index) == ["untrained", "lap", "oracle"]
    assert t.loc["lap", "overall"] == pytest.approx(0.2) and t.loc["lap", "seeds"] == 2
    assert t.loc["lap", "of_oracle"] == pytest.approx((0.2 - 0.1) / (0.5 - 0.1))
    assert t.loc["oracle", "of_oracle"] == pytest.approx(1.0) and t.loc["untrained", "of_oracle"] == pytest.approx(0.0)
    assert t.loc["lap", "drawn"] == pytest.approx(0.6) and t.loc["lap", "color"] == pytest.approx(0.3)
    assert np.isnan(t.loc["untrained", "color"]) and np.isnan(t.loc["lap", "count"])
    lines = control_lines(m)
    assert any(ln.startswith("| lap | 2 | 0.200 | 0.250 | 0.600 |") for ln in lines), lines


def test_without_an_oracle_above_the_floor_there_is_no_share() -> None:
    m = pd.DataFrame(rows("untrained", 0, 0.3, {"drawn": 0.2}) + rows("oracle", 0, 0.3, {"drawn": 0.2})
                     + rows("lap", 0, 0.4, {"drawn": 0.3}))
    assert control_table(m).of_oracle.isna().all()  # a ceiling at the floor measures nothing
    assert control_table(pd.DataFrame(rows("lap", 0, 0.4, {}))).empty  # no component rows: no table


def test_the_conditioning_gain_at_high_noise_as_a_share_of_the_oracles() -> None:
    gain = "val.cond_gain.s0.85"
    m = pd.DataFrame(rows("untrained", 0, 0.0, {"drawn": 0.1}, step=0)[1:]
                     + rows("oracle", 0, 0.5, {"drawn": 1.0}) + rows("lap", 0, 0.1, {"drawn": 0.5})
                     + rows("lap", 1, 0.2, {"drawn": 0.5})
                     + [{"run": "oracle", "seed": 0, "step": 100, "metric": gain, "value": 0.004},
                        {"run": "lap", "seed": 0, "step": 100, "metric": gain, "value": 0.001},
                        {"run": "lap", "seed": 1, "step": 100, "metric": gain, "value": 0.002},
                        {"run": "lap", "seed": 0, "step": 50, "metric": gain, "value": 0.9}])  # not the last step
    t = control_table(m).set_index("run")
    assert t.loc["lap", "gain"] == pytest.approx(0.0015) and t.loc["lap", "gain_of_oracle"] == pytest.approx(0.375)
    assert t.loc["oracle", "gain_of_oracle"] == pytest.approx(1.0) and np.isnan(t.loc["untrained", "gain"])
    assert any(ln.startswith("| lap | 2 | 0.150 |") and ln.endswith("| 0.00150 | 0.375 |") for ln in control_lines(m))
