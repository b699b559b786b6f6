"""Numbers the docs quote about committed results, read back from the committed files they come from."""

from __future__ import annotations

import re

import pandas as pd
from ab_helpers import ROOT


def test_deviations_names_the_sweeps_with_three_training_seeds_as_their_metrics_hold_them() -> None:
    text = " ".join((ROOT / "docs" / "deviations.md").read_text().split())
    three = re.search(r"committed sweeps, ([^.]*?) have 3 training seeds per run", text)
    one = re.search(r"`metrics.csv`\); ([^.]*?) have one, so their CIs", text)
    assert three and one
    named = {"3": set(re.findall(r"`(\w+)`", three.group(1))), "1": set(re.findall(r"`(\w+)`", one.group(1)))}
    seeds = {p.parent.name: pd.read_csv(p, usecols=["seed"]).seed.nunique()
             for p in (ROOT / "results").glob("*/metrics.csv")}
    assert named["3"] == {e for e, n in seeds.items() if n == 3}
    assert named["1"] == {e for e, n in seeds.items() if n == 1}


def test_readme_plan_totals_are_the_committed_summarys() -> None:
    summary = (ROOT / "results" / "plan" / "summary.md").read_text()
    unique = re.search(r"\| all, unique runs \| \| \| \| \| ([\d,]+) \|", summary).group(1)
    configured = re.search(r"\| all, as configured \| \| \| \| \| ([\d,]+) \|", summary).group(1)
    readme = (ROOT / "README.md").read_text()
    assert f"{unique} H100 GPU-hours of unique runs, {configured} as configured" in readme
    decoded = re.search(r"\| all, unique runs \| \| \| \| \| [\d,]+ \| ([\d,]+ - [\d,]+) \|", summary).group(1)
    base = re.search(r"`final/base`: [\d,]+ GPU-hours \(([\d,]+ - [\d,]+) with VERIFI", summary).group(1)
    flat = " ".join(readme.split())
    assert f"the unique runs need {decoded} GPU-hours (the final base alone {base})" in flat
    plans = pd.concat([pd.read_csv(p) for p in (ROOT / "results" / "plan").glob("*.csv") if p.stem != "lap_overhead"])
    assert int(configured.replace(",", "")) == round(plans.gpu_hours.fillna(0).sum())


def test_ab_demo_counts_in_the_docs_are_the_committed_demos() -> None:
    demo = " ".join((ROOT / "results" / "ab_demo" / "README.md").read_text().split())
    lap, pairs, floor = re.search(r"`lap` image for (\d+) of the (\d+) pairs, in the `untrained` one for (\d+)",
                                  demo).groups()
    docs = " ".join((ROOT / "docs" / "ab_studies.md").read_text().split())
    assert f"LAP image for {lap} of {pairs} pairs and {'never' if floor == '0' else floor} in the untrained" in docs
    rates = pd.read_csv(ROOT / "results" / "ab_demo" / "win_rates.csv").set_index(["aspect", "system"])
    assert rates.loc[("overall", "lap"), "wins"] > 0 == rates.loc[("overall", "untrained"), "wins"]
