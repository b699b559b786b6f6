"""The A/B report against numbers worked out by hand (validity, win / tie / loss, gold flagging, CIs, alpha, BT).

The hand-built study, votes written in system terms (A / B / T = tie), 3 votes make a pair valid:

    overall            visual_quality      prompt
    p1: u1 A u2 A u3 B  u1 B u2 B u3 B       P1
    p2: u1 B u2 T u3 T  u1 A u2 A u3 B       P1
    p3: u1 A u2 B u4 T  u1 T u2 T u4 A       P2
    p4: u1 B u2 B u3 T u4 A   u1 A u2 A u3 A u4 T   P3
    p5: u1 A u2 A       u1 A u2 A u4 A       P3
    gold (overall): u1, u2, u3 right, u4 wrong -> u4 flagged (accuracy 0 < 0.8) and left out by default.

Without u4: overall p1 A wins (2-1-0), p2 tie (ties 2 > B 1), p3 invalid (2 votes), p4 B wins (2 B, 1 tie), p5
invalid -> A: 1 win, 1 tie, 1 loss of 3. visual p1 B, p2 A, p4 A, p3 and p5 invalid -> A: 2 / 0 / 1 of 3.
With u4: overall p3 tie (1-1-1), p4 B wins (B 2 > A 1, tie 1) -> A 1 / 2 / 1 of 4; visual p3 tie (ties 2),
p5 A -> A 3 / 1 / 1 of 5.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.stats
from ab_helpers import SYSTEMS, write_system

from evals.ab.__main__ import main
from evals.ab.db import make_engine, make_sessions
from evals.ab.report import WIN_RATE_COLUMNS, bradley_terry, compute_report, krippendorff_alpha
from evals.ab.study import create_study

VOTES = {  # pair -> aspect -> [(annotator, A|B|T)]
    "p1": {"overall": "u1 A u2 A u3 B", "visual_quality": "u1 B u2 B u3 B"},
    "p2": {"overall": "u1 B u2 T u3 T", "visual_quality": "u1 A u2 A u3 B"},
    "p3": {"overall": "u1 A u2 B u4 T", "visual_quality": "u1 T u2 T u4 A"},
    "p4": {"overall": "u1 B u2 B u3 T u4 A", "visual_quality": "u1 A u2 A u3 A u4 T"},
    "p5": {"overall": "u1 A u2 A", "visual_quality": "u1 A u2 A u4 A"},
}
PROMPT = {"p1": "P1", "p2": "P1", "p3": "P2", "p4": "P3", "p5": "P3"}
ASPECTS = ["overall", "visual_quality"]


def shown(pick: str, a_on_left: bool) -> str:
    """A system-terms vote as the annotator clicked it."""
    return {"T": "tie", "A": "left" if a_on_left else "right", "B": "right" if a_on_left else "left"}[pick]


def hand_tables(a_on_left: dict[str, bool], gold_side: str = "left") -> tuple[pd.DataFrame, pd.DataFrame]:
    pairs = pd.DataFrame([{"pair_id": p, "prompt_key": PROMPT[p], "item_key": p, "prompt": PROMPT[p],
                           "system_a": "alpha", "system_b": "beta", "a_on_left": a_on_left[p], "gold_answer": None}
                          for p in VOTES] + [{"pair_id": "g1", "prompt_key": "gold", "item_key": "g1", "prompt": "g",
                                              "system_a": None, "system_b": None, "a_on_left": None,
                                              "gold_answer": gold_side}])
    rows = []
    for p, by_aspect in VOTES.items():
        for aspect, text in by_aspect.items():
            words = text.split()
            rows += [{"annotator": who, "pair_id": p, "aspect": aspect, "choice": shown(pick, a_on_left[p]),
                      "origin": "test"} for who, pick in zip(words[::2], words[1::2], strict=True)]
    wrong = "right" if gold_side == "left" else "left"
    rows += [{"annotator": u, "pair_id": "g1", "aspect": "overall", "choice": gold_side if u != "u4" else wrong,
              "origin": "test"} for u in ("u1", "u2", "u3", "u4")]
    rows += [{"annotator": "u1", "pair_id": "g1", "aspect": "visual_quality", "choice": wrong, "origin": "test"}]
    return pd.DataFrame(rows), pairs


def counts(table: pd.DataFrame, aspect: str, system: str) -> tuple[int, int, int, int]:
    r = table[(table.aspect == aspect) & (table.system == system)].iloc[0]
    return int(r.wins), int(r.ties), int(r.losses), int(r.valid_pairs)


@pytest.mark.parametrize("sides", ["all_left", "mixed"])
def test_hand_computed_win_tie_loss(sides: str) -> None:
    a_on_left = {p: True for p in VOTES} if sides == "all_left" else {"p1": True, "p2": False, "p3": True,
                                                                       "p4": False, "p5": True}
    votes, pairs = hand_tables(a_on_left)
    rep = compute_report(votes, pairs, "hand", ASPECTS, votes_per_pair=3, threshold=0.8, n_resamples=1000)
    assert list(rep.annotators.flagged) == [False, False, False, True]  # u4: 0 of 1 gold answers right
    assert list(rep.annotators.gold_votes) == [1, 1, 1, 1]  # u1's visual_quality gold answer is not judged
    wr, everyone = rep.win_rates, rep.win_rates_all
    assert counts(wr, "overall", "alpha") == (1, 1, 1, 3)
    assert counts(wr, "overall", "beta") == (1, 1, 1, 3)
    assert counts(wr, "visual_quality", "alpha") == (2, 0, 1, 3)
    assert counts(wr, "visual_quality", "beta") == (1, 0, 2, 3)
    assert counts(everyone, "overall", "alpha") == (1, 2, 1, 4)
    assert counts(everyone, "visual_quality", "alpha") == (3, 1, 1, 5)
    assert counts(everyone, "visual_quality", "beta") == (1, 1, 3, 5)
    row = wr[(wr.aspect == "visual_quality") & (wr.system == "alpha")].iloc[0]
    assert row.win_rate == pytest.approx(2 / 3)
    # CI over prompts: valid pairs per prompt (wins, valid) = P1 (1, 2), P3 (1, 1) -> a resample of 2 prompts
    # gives 2/4 (P1 P1, p = 1/4), 2/3 (P1 P3, p = 1/2) or 1 (P3 P3, p = 1/4): 2.5% / 97.5% quantiles 0.5 and 1
    assert (row.ci_low, row.ci_high) == (pytest.approx(0.5), pytest.approx(1.0))
    # overall, alpha: P1 (1 win, 2 valid), P3 (0, 1): resamples give 0.5, 1/3 or 0
    row = wr[(wr.aspect == "overall") & (wr.system == "alpha")].iloc[0]
    assert (row.ci_low, row.ci_high) == (pytest.approx(0.0), pytest.approx(0.5))
    # keep_flagged swaps the two tables
    kept = compute_report(votes, pairs, "hand", ASPECTS, 3, keep_flagged=True)
    assert counts(kept.win_rates, "overall", "alpha") == (1, 2, 1, 4)
    assert counts(kept.win_rates_all, "overall", "alpha") == (1, 1, 1, 3)


def test_ci_matches_scipy_bootstrap_over_prompts() -> None:
    """On a random study (40 prompts x 2 seeds), the CI equals scipy's paired percentile bootstrap of
    sum(wins) / sum(valid) over prompts with the same seed."""
    rng = np.random.default_rng(5)
    pairs, votes = [], []
    for i in range(80):
        pid, left = f"p{i}", bool(rng.integers(2))
        pairs.append({"pair_id": pid, "prompt_key": f"P{i // 2:03d}", "item_key": pid, "prompt": "x",
                      "system_a": "alpha", "system_b": "beta", "a_on_left": left, "gold_answer": None})
        for u in range(int(rng.integers(2, 5))):  # 2 votes: invalid; 3-4: valid
            votes.append({"annotator": f"u{u}", "pair_id": pid, "aspect": "overall",
                          "choice": ["left", "right", "tie"][rng.choice(3, p=[0.5, 0.3, 0.2])], "origin": "t"})
    votes, pairs = pd.DataFrame(votes), pd.DataFrame(pairs)
    rep = compute_report(votes, pairs, "rand", ["overall"], 3, n_resamples=1000, seed=11)
    # independent tally: per pair, A / B / tie votes, the rule, then per prompt
    merged = votes.merge(pairs, on="pair_id")
    a_votes = np.where(merged.a_on_left, merged.choice == "left", merged.choice == "right")
    b_votes = np.where(merged.a_on_left, merged.choice == "right", merged.choice == "left")
    tally = merged.assign(a=a_votes, b=b_votes, t=merged.choice == "tie").groupby(["prompt_key", "pair_id"])[
        ["a", "b", "t"]].sum()
    tally = tally[tally.sum(axis=1) >= 3]
    tally["win"] = (tally.a > tally.b) & (tally.a > tally.t)
    per_prompt = tally.groupby("prompt_key").win.agg(["sum", "size"])
    row = rep.win_rates.iloc[0]
    assert (row.wins, row.valid_pairs) == (per_prompt["sum"].sum(), per_prompt["size"].sum())
    ref = scipy.stats.bootstrap((per_prompt["sum"].to_numpy(float), per_prompt["size"].to_numpy(float)),
                                lambda w, v: w.sum() / v.sum(), paired=True, vectorized=False, n_resamples=1000,
                                method="percentile", random_state=np.random.default_rng(11))
    assert (row.ci_low, row.ci_high) == (pytest.approx(ref.confidence_interval.low),
                                         pytest.approx(ref.confidence_interval.high))


def test_krippendorff_alpha_by_hand() -> None:
    """Units (L, L), (L, R), (T, T): coincidences o_LL = 2, o_LR = o_RL = 1, o_TT = 2; n_L = 3, n_R = 1, n_T = 2,
    n = 6. D_o = 2 / 6, D_e = 2 (3*1 + 3*2 + 1*2) / (6 * 5) = 22 / 30, alpha = 1 - D_o / D_e = 12 / 22."""
    votes = pd.DataFrame([("a", "p1", "overall", "left"), ("b", "p1", "overall", "left"),
                          ("a", "p2", "overall", "left"), ("b", "p2", "overall", "right"),
                          ("a", "p3", "overall", "tie"), ("b", "p3", "overall", "tie"),
                          ("a", "p4", "overall", "left")],  # one vote: not pairable, left out
                         columns=["annotator", "pair_id", "aspect", "choice"])
    pairs = pd.DataFrame({"pair_id": ["p1", "p2", "p3", "p4"], "gold_answer": [None] * 4})
    alpha, units = krippendorff_alpha(votes, pairs, "overall")
    assert units == 3 and alpha == pytest.approx(12 / 22)
    same = votes.assign(choice="tie")
    assert math.isnan(krippendorff_alpha(same, pairs, "overall")[0])  # one value only: alpha undefined


def test_bradley_terry_recovers_strengths() -> None:
    """Expected outcome counts of strengths 1, 2, 4 (15 games per pair: P(i beats j) = s_i / (s_i + s_j)) satisfy
    the likelihood equations exactly, so the MLE is log(s) centred."""
    wins = np.array([[0, 5, 3], [10, 0, 5], [12, 10, 0]], float)
    expected = np.log([1, 2, 4]) - np.log([1, 2, 4]).mean()
    assert bradley_terry(wins, pseudo_ties=0) == pytest.approx(expected, abs=1e-8)


def test_three_systems_rank_and_opponent_column() -> None:
    """alpha beats beta and gamma on every pair, beta beats gamma: BT ranks alpha > beta > gamma, and the CSV gets
    an ``opponent`` column."""
    pairs, votes = [], []
    for a, b in (("alpha", "beta"), ("alpha", "gamma"), ("beta", "gamma")):
        for i in range(4):
            pid = f"{a}-{b}-{i}"
            pairs.append({"pair_id": pid, "prompt_key": f"P{i}", "item_key": f"{i}", "prompt": "x", "system_a": a,
                          "system_b": b, "a_on_left": True, "gold_answer": None})
            votes += [{"annotator": u, "pair_id": pid, "aspect": "overall", "choice": "left" if u != "u3" or i
                       else "right", "origin": "t"} for u in ("u1", "u2", "u3")]
    rep = compute_report(pd.DataFrame(votes), pd.DataFrame(pairs), "three", ["overall"], 3)
    assert dict(zip(rep.bt.system, rep.bt["rank"], strict=True)) == {"alpha": 1, "beta": 2, "gamma": 3}
    header = rep.win_rates_csv().splitlines()[0].split(",")
    assert header == [*WIN_RATE_COLUMNS, "opponent"]
    assert counts(rep.win_rates[rep.win_rates.opponent == "gamma"], "overall", "alpha") == (4, 0, 0, 4)


def test_report_cli_on_imported_votes(tmp_path: Path, capsys) -> None:
    """The same hand table through the database: create, import-votes (vendor CSV), report -> win_rates.csv."""
    a = write_system(tmp_path, SYSTEMS[0], 3, 2)
    b = write_system(tmp_path, SYSTEMS[1], 3, 2, shift=1)
    db = str(tmp_path / "s.sqlite")
    sessions = make_sessions(make_engine(db))
    create_study(sessions, "hand", a, b, "geneval", ASPECTS, 3, "alpha", "beta", gold_rate=0.1, seed=1)
    from evals.ab.report import load_votes

    _, pairs = load_votes(sessions, "hand")
    real = pairs[pairs.gold_answer.isna()].set_index("item_key")
    ids = {"p1": "00000/00000", "p2": "00000/00001", "p3": "00001/00000", "p4": "00002/00000", "p5": "00002/00001"}
    a_on_left = {p: bool(real.loc[key, "a_on_left"]) for p, key in ids.items()}
    gold = pairs[pairs.gold_answer.notna()].iloc[0]
    votes, _ = hand_tables(a_on_left, gold.gold_answer)
    votes["pair_id"] = votes.pair_id.map({**{p: real.loc[k, "pair_id"] for p, k in ids.items()},
                                         "g1": gold.pair_id})
    votes[["annotator", "pair_id", "aspect", "choice"]].to_csv(tmp_path / "votes.csv", index=False)
    assert main(["import-votes", "--db", db, "--study", "hand", "--csv", str(tmp_path / "votes.csv")]) == 0
    assert main(["report", "--db", db, "--study", "hand", "--out", str(tmp_path / "rep")]) == 0
    with open(tmp_path / "rep" / "win_rates.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == WIN_RATE_COLUMNS
    got = {(r["aspect"], r["system"]): (int(r["wins"]), int(r["ties"]), int(r["losses"]), int(r["valid_pairs"]))
           for r in rows}
    assert got == {("overall", "alpha"): (1, 1, 1, 3), ("overall", "beta"): (1, 1, 1, 3),
                   ("visual_quality", "alpha"): (2, 0, 1, 3), ("visual_quality", "beta"): (1, 0, 2, 3)}
    assert float(rows[2]["win_rate"]) == pytest.approx(2 / 3)
    assert (float(rows[2]["ci_low"]), float(rows[2]["ci_high"])) == (pytest.approx(0.5), pytest.approx(1.0))
    for name in ("report.md", "win_rates.png", "annotators.csv", "win_rates_all_annotators.csv"):
        assert (tmp_path / "rep" / name).stat().st_size > 0
    assert "| u4 | 6 | 1 | 0.000 | yes |" in (tmp_path / "rep" / "report.md").read_text()


# Speeders and gold failures, one flagged set. votes_per_pair 2, A always on the left, time per pair in seconds:
#   overall   u1 (5 6 7 4)  u2 (8 9 10 8)  u3 (1 1 2 1)  u4 (6 6 - 6)
#   p1          A             A              B              B
#   p2          B             A              B              B
#   p3          A             T              A              -
#   g1 (left)   left          left           left           right
# medians: u1 5.5, u2 8.5, u3 1.0 (< 3: speeder), u4 6.0; u4's gold accuracy 0 (< 0.8: flagged on gold).
SPEED_VOTES = {"p1": "u1 A u2 A u3 B u4 B", "p2": "u1 B u2 A u3 B u4 B", "p3": "u1 A u2 T u3 A"}
SPEED_SECONDS = {"u1": [5, 6, 7, 4], "u2": [8, 9, 10, 8], "u3": [1, 1, 2, 1], "u4": [6, 6, None, 6]}


def speed_tables() -> tuple[pd.DataFrame, pd.DataFrame]:
    pairs = pd.DataFrame([{"pair_id": p, "prompt_key": p, "item_key": p, "prompt": p, "system_a": "alpha",
                           "system_b": "beta", "a_on_left": True, "gold_answer": None} for p in SPEED_VOTES]
                         + [{"pair_id": "g1", "prompt_key": "gold", "item_key": "g1", "prompt": "g", "system_a": None,
                             "system_b": None, "a_on_left": None, "gold_answer": "left"}])
    rows = []
    for k, (p, text) in enumerate(SPEED_VOTES.items()):
        words = text.split()
        rows += [{"annotator": who, "pair_id": p, "aspect": "overall", "choice": shown(pick, True),
                  "origin": "web", "seconds": SPEED_SECONDS[who][k]} for who, pick in zip(words[::2], words[1::2],
                                                                                          strict=True)]
    rows += [{"annotator": u, "pair_id": "g1", "aspect": "overall", "choice": "right" if u == "u4" else "left",
              "origin": "web", "seconds": SPEED_SECONDS[u][3]} for u in ("u1", "u2", "u3", "u4")]
    return pd.DataFrame(rows), pairs


def test_speeders_and_gold_failures_are_one_flagged_set_hand_computed() -> None:
    votes, pairs = speed_tables()
    rep = compute_report(votes, pairs, "speed", ["overall"], 2, threshold=0.8, n_resamples=200, min_seconds=3.0)
    ann = rep.annotators.set_index("annotator")
    assert ann.median_seconds.tolist() == [5.5, 8.5, 1.0, 6.0]
    assert ann.reason.tolist() == ["", "", "speed", "gold"] and ann.flagged.tolist() == [False, False, True, True]
    # kept u1, u2: p1 A A -> A; p2 B A -> tie; p3 A T -> tie: alpha 1 win, 2 ties, 0 losses of 3
    assert counts(rep.win_rates, "overall", "alpha") == (1, 2, 0, 3)
    assert rep.win_rates.set_index("system").win_rate["alpha"] == pytest.approx(1 / 3)
    # everyone: p1 A A B B -> tie; p2 B A B B -> B; p3 A T A -> A: 1 / 1 / 1
    assert counts(rep.win_rates_all, "overall", "alpha") == (1, 1, 1, 3)
    text = rep.markdown
    assert "median time per pair < 3 s): 2 (left out of the main table)" in text
    assert "## Win rates with the flagged annotators" in text and "| u3 | 4 | 1 | 1.000 | yes | speed | 1.0 |" in text
    # the speed check off: only u4 (gold) is left out -> p1 A A B -> A; p2 B A B -> B; p3 A T A -> A: 2 / 0 / 1
    gold_only = compute_report(votes, pairs, "speed", ["overall"], 2, threshold=0.8, n_resamples=200)
    assert counts(gold_only.win_rates, "overall", "alpha") == (2, 0, 1, 3)
    # the gold check off: only u3 (speed) is left out -> p1 A A B -> A; p2 B A B -> B; p3 A T -> tie: 1 / 1 / 1
    speed_only = compute_report(votes, pairs, "speed", ["overall"], 2, threshold=0.0, n_resamples=200,
                                min_seconds=3.0)
    assert counts(speed_only.win_rates, "overall", "alpha") == (1, 1, 1, 3)
    assert speed_only.annotators.reason.tolist() == ["", "", "speed", ""]


def test_cant_tell_counts_for_no_side_and_is_reported() -> None:
    """votes_per_pair 2, A on the left. p1: u1 A, u2 can't tell, u3 A -> 2 counted votes, valid, A wins.
    p2: u1 B, u2 can't tell -> 1 counted vote, not valid. Can't tell: 2 on overall, both by u2."""
    pairs = pd.DataFrame([{"pair_id": p, "prompt_key": p, "item_key": p, "prompt": p, "system_a": "alpha",
                           "system_b": "beta", "a_on_left": True, "gold_answer": None} for p in ("p1", "p2")])
    votes = pd.DataFrame([{"annotator": who, "pair_id": p, "aspect": "overall", "choice": choice, "origin": "web"}
                          for p, who, choice in (("p1", "u1", "left"), ("p1", "u2", "cant_tell"), ("p1", "u3", "left"),
                                                 ("p2", "u1", "right"), ("p2", "u2", "cant_tell"))])
    rep = compute_report(votes, pairs, "ct", ["overall"], 2, n_resamples=100)
    assert counts(rep.win_rates, "overall", "alpha") == (1, 0, 0, 1)
    assert rep.agreement.set_index("aspect").cant_tell["overall"] == 2
    assert rep.annotators.set_index("annotator").cant_tell.tolist() == [0, 2, 0]
    assert "| overall | n/a | 1 | 2 |" in rep.markdown  # alpha undefined: one unit with >= 2 counted votes


def test_a_database_whose_votes_cannot_hold_cant_tell_refuses_such_a_study(tmp_path: Path) -> None:
    """A database made before the answer existed keeps the old CHECK on ab_vote.choice: `create --cant-tell`
    says so instead of failing at the first vote."""
    from sqlalchemy import text

    db = str(tmp_path / "old.sqlite")
    engine = make_engine(db)
    with engine.begin() as conn:
        ddl = conn.execute(text("SELECT sql FROM sqlite_master WHERE name = 'ab_vote'")).scalar_one()
        conn.execute(text("DROP TABLE ab_vote"))
        conn.execute(text(ddl.replace(", 'cant_tell'", "")))
    engine.dispose()
    a, b = write_system(tmp_path, SYSTEMS[0], 2, 1), write_system(tmp_path, SYSTEMS[1], 2, 1, shift=1)
    assert main(["create", "--db", db, "--study", "s", "--a", str(a), "--b", str(b), "--layout", "geneval",
                 "--cant-tell"]) == 2
    assert main(["create", "--db", db, "--study", "s", "--a", str(a), "--b", str(b), "--layout", "geneval"]) == 0
