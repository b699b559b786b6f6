"""The study report: win / tie / loss per aspect, bootstrap CIs over prompts, agreement, Bradley-Terry, figure.

Rules (paper App. A.4 "at least 3 votes"), per aspect and per compared pair of systems A, B:
- a pair is *valid* when it has at least ``votes_per_pair`` votes on that aspect (from kept annotators);
- A wins it when A's votes exceed both B's votes and the tie votes; B likewise; otherwise it is a tie;
- ``win_rate = wins / valid_pairs`` (ties and losses beside it), with a 95% percentile bootstrap CI that resamples
  prompts (all seeds of a prompt move together; only prompts with a valid pair take part).
Annotators whose gold accuracy is below the threshold, or whose median time-on-task per pair is below the study's
minimum (speeders), are *flagged* and left out by default; the report gives the numbers with them too. Gold
accuracy counts the aspects where the gold pair's better image is known to be better (``overall`` and
``prompt_adherence``; else the study's first aspect); a tie counts as wrong.
"Can't tell" answers count for no side and not toward validity; they are counted per aspect (agreement table) and
per annotator; a gold pair answered "can't tell" counts as wrong, like a tie.
Agreement: Krippendorff's alpha (nominal: left / tie / right) per aspect over the real pairs. With more than two
systems, a Bradley-Terry ranking per aspect from the pairs' outcomes (a tie = half a win each).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sqlalchemy import select
from sqlalchemy.orm import aliased, sessionmaker

from common.files import atomic_write_text
from common.stats import bootstrap_ci
from evals.ab.db import CANT_TELL, Annotator, Pair, PracticeAnswer, PracticeItem, System, Vote
from evals.ab.study import get_study

WIN_RATE_COLUMNS = ["aspect", "system", "wins", "ties", "losses", "valid_pairs", "win_rate", "ci_low", "ci_high"]
GOLD_ASPECTS = ("overall", "prompt_adherence")
VOTE_COLUMNS = ["annotator", "pair_id", "aspect", "choice", "origin", "created_at", "seconds"]
PRACTICE_COLUMNS = ["annotator", "practice_answered", "practice_correct", "practice_accuracy"]
ANNOTATOR_COLUMNS = ["annotator", "gold_votes", "gold_correct", "gold_accuracy", "flagged", "votes",
                     "median_seconds", "speeder", "reason", "cant_tell"]


# ------------------------------------------------------------------------------------------------ loading
def load_votes(sessions: sessionmaker, study_name: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(votes, pairs) of a study as tables.

    pairs: ``pair_id`` (public), ``prompt_key``, ``item_key``, ``prompt``, ``system_a``, ``system_b``,
    ``a_on_left`` (None for gold), ``gold_answer`` (None for real pairs).
    votes: ``annotator`` (label), ``pair_id``, ``aspect``, ``choice`` (left / right / tie as shown), ``origin``,
    ``created_at`` (the server's UTC time of the answer, ISO 8601), ``seconds`` (time-on-task, server-measured
    from when the pair was handed to the annotator; empty for imported votes).
    """
    with sessions() as s:
        study = get_study(s, study_name)
        sa, sb = aliased(System), aliased(System)
        pairs = pd.DataFrame(s.execute(
            select(Pair.public_id.label("pair_id"), Pair.prompt_key, Pair.item_key, Pair.prompt,
                   sa.name.label("system_a"), sb.name.label("system_b"), Pair.a_on_left, Pair.gold_answer)
            .outerjoin(sa, sa.id == Pair.system_a_id).outerjoin(sb, sb.id == Pair.system_b_id)
            .where(Pair.study_id == study.id).order_by(Pair.id)).all(),
            columns=["pair_id", "prompt_key", "item_key", "prompt", "system_a", "system_b", "a_on_left",
                     "gold_answer"])
        votes = pd.DataFrame(s.execute(
            select(Annotator.label, Pair.public_id, Vote.aspect, Vote.choice, Vote.origin, Vote.created_at,
                   Vote.seconds)
            .join(Pair, Pair.id == Vote.pair_id).join(Annotator, Annotator.id == Vote.annotator_id)
            .where(Pair.study_id == study.id).order_by(Vote.id)).all(),
            columns=VOTE_COLUMNS)
    votes["created_at"] = pd.to_datetime(votes.created_at).dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    votes["seconds"] = votes.seconds.astype(float).round(3)
    return votes, pairs


def practice_table(sessions: sessionmaker, study_name: str) -> pd.DataFrame:
    """Per annotator who answered practice pairs (``PRACTICE_COLUMNS``): how many, how many matched the expected
    answer, and the share. Practice answers live in their own table; they are never votes."""
    with sessions() as s:
        study = get_study(s, study_name)
        rows = s.execute(select(Annotator.label, PracticeAnswer.correct)
                         .join(PracticeAnswer, PracticeAnswer.annotator_id == Annotator.id)
                         .join(PracticeItem, PracticeItem.id == PracticeAnswer.practice_id)
                         .where(PracticeItem.study_id == study.id)).all()
    answers = pd.DataFrame(rows, columns=["annotator", "correct"])
    out = [{"annotator": who, "practice_answered": len(g), "practice_correct": int(g.correct.astype(bool).sum()),
            "practice_accuracy": float(g.correct.astype(bool).mean())}
           for who, g in sorted(answers.groupby("annotator"), key=lambda kv: kv[0])]
    return pd.DataFrame(out, columns=PRACTICE_COLUMNS)


# ------------------------------------------------------------------------------------------------ statistics
def annotator_flags(votes: pd.DataFrame, pairs: pd.DataFrame, aspects: list[str], threshold: float,
                    min_seconds: float = 0.0) -> pd.DataFrame:
    """Per annotator (``ANNOTATOR_COLUMNS``): gold accuracy, median time-on-task, and whether they are *flagged*,
    the one set of annotators the report leaves out (``reason``: ``gold``, ``speed`` or ``gold+speed``).

    Gold: accuracy on the gold pairs below ``threshold``; annotators without gold answers have accuracy NaN and
    are not flagged on it (there is nothing to judge them by). Speed: the median over the annotator's answered
    pairs of ``seconds`` (one time per pair, the same on each of its aspects) below ``min_seconds`` (0: no
    check); annotators without timed votes (imported) have NaN and are not flagged on it."""
    checked = [a for a in aspects if a in GOLD_ASPECTS] or aspects[:1]
    gold = votes.merge(pairs[pairs.gold_answer.notna()][["pair_id", "gold_answer"]], on="pair_id")
    gold = gold[gold.aspect.isin(checked)]
    seconds = votes.seconds if "seconds" in votes else pd.Series(math.nan, index=votes.index)
    per_pair = votes.assign(seconds=seconds.astype(float)).groupby(["annotator", "pair_id"]).seconds.first()
    rows = []
    for who in sorted(votes.annotator.unique()):
        mine = gold[gold.annotator == who]
        n, ok = len(mine), int((mine.choice == mine.gold_answer).sum())
        acc = ok / n if n else math.nan
        times = per_pair.loc[who].dropna()
        median = float(times.median()) if len(times) else math.nan
        bad_gold = bool(n and acc < threshold)
        speeder = bool(min_seconds > 0 and len(times) and median < min_seconds)
        reason = "+".join(r for r, hit in (("gold", bad_gold), ("speed", speeder)) if hit)
        rows.append({"annotator": who, "gold_votes": n, "gold_correct": ok, "gold_accuracy": acc,
                     "flagged": bad_gold or speeder, "votes": int((votes.annotator == who).sum()),
                     "median_seconds": median, "speeder": speeder, "reason": reason,
                     "cant_tell": int(((votes.annotator == who) & (votes.choice == CANT_TELL)).sum())})
    return pd.DataFrame(rows, columns=ANNOTATOR_COLUMNS)


def pair_outcomes(votes: pd.DataFrame, pairs: pd.DataFrame, votes_per_pair: int) -> pd.DataFrame:
    """One row per real pair x aspect with votes: ``pair_id, aspect, prompt_key, system_a, system_b, a, b, tie,
    valid, outcome`` (outcome ``a`` / ``b`` / ``tie`` by the module's rule; only meaningful when valid)."""
    real = pairs[pairs.gold_answer.isna()]
    v = votes.merge(real[["pair_id", "prompt_key", "system_a", "system_b", "a_on_left"]], on="pair_id")
    a_side = np.where(v.a_on_left.astype(bool), "left", "right")
    b_side = np.where(v.a_on_left.astype(bool), "right", "left")
    v = v.assign(a=(v.choice == a_side).astype(int), b=(v.choice == b_side).astype(int),
                 tie=(v.choice == "tie").astype(int))
    out = v.groupby(["pair_id", "aspect", "prompt_key", "system_a", "system_b"], sort=False)[["a", "b", "tie"]].sum()
    out = out.reset_index()
    out["valid"] = (out.a + out.b + out.tie) >= votes_per_pair
    out["outcome"] = np.select([(out.a > out.b) & (out.a > out.tie), (out.b > out.a) & (out.b > out.tie)],
                               ["a", "b"], "tie")
    return out


def _ratio_ci(per_prompt: np.ndarray, n_resamples: int, seed: int) -> tuple[float, float]:
    """CI of sum(wins) / sum(valid) over resampled prompts; per_prompt: (P, 2) [wins, valid], P >= 1."""
    return bootstrap_ci(per_prompt, lambda x: float(x[:, 0].sum() / x[:, 1].sum()), n_resamples=n_resamples,
                        seed=seed)


def win_rates(outcomes: pd.DataFrame, comparisons: list[tuple[str, str]], aspects: list[str],
              n_resamples: int = 1000, seed: int = 0) -> pd.DataFrame:
    """``WIN_RATE_COLUMNS`` + ``opponent``: two rows (A's side, B's side) per compared pair of systems
    ``(A, B)`` x aspect; a comparison without valid pairs gets zero counts and NaN rates."""
    rows = []
    for sys_a, sys_b in comparisons:
        for aspect in aspects:
            o = outcomes[(outcomes.system_a == sys_a) & (outcomes.system_b == sys_b) & (outcomes.aspect == aspect)
                         & outcomes.valid]
            for system, opponent, mine, theirs in ((sys_a, sys_b, "a", "b"), (sys_b, sys_a, "b", "a")):
                wins, losses, valid = int((o.outcome == mine).sum()), int((o.outcome == theirs).sum()), len(o)
                lo = hi = rate = math.nan
                if valid:
                    rate = wins / valid
                    per_prompt = (o.outcome == mine).groupby(o.prompt_key).agg(["sum", "size"])
                    lo, hi = _ratio_ci(per_prompt.to_numpy(float), n_resamples, seed)
                rows.append({"aspect": aspect, "system": system, "wins": wins, "ties": valid - wins - losses,
                             "losses": losses, "valid_pairs": valid, "win_rate": rate, "ci_low": lo, "ci_high": hi,
                             "opponent": opponent})
    return pd.DataFrame(rows, columns=[*WIN_RATE_COLUMNS, "opponent"])


def krippendorff_alpha(votes: pd.DataFrame, pairs: pd.DataFrame, aspect: str) -> tuple[float, int]:
    """(alpha, units): nominal Krippendorff's alpha of left / tie / right over the real pairs with >= 2 votes on
    ``aspect``; NaN when fewer than two units or only one value was ever given (alpha is undefined)."""
    import krippendorff

    real = set(pairs.pair_id[pairs.gold_answer.isna()])
    v = votes[(votes.aspect == aspect) & votes.pair_id.isin(real)]
    counts = pd.crosstab(v.pair_id, v.choice).reindex(columns=["left", "tie", "right"], fill_value=0)
    counts = counts[counts.sum(axis=1) >= 2]
    if len(counts) < 2 or (counts.sum(axis=0) > 0).sum() < 2:
        return math.nan, len(counts)
    return float(krippendorff.alpha(value_counts=counts.to_numpy(), level_of_measurement="nominal")), len(counts)


def bradley_terry(wins: np.ndarray, pseudo_ties: float = 0.5, iters: int = 10_000, tol: float = 1e-12) -> np.ndarray:
    """Bradley-Terry log-strengths (mean 0) from ``wins`` (n, n): ``wins[i, j]`` = times i beat j (ties counted as
    half a win each way). Minorise-maximise updates (Hunter 2004). ``pseudo_ties`` adds that many virtual ties to
    every compared pair, so a system that never wins keeps a finite score; 0 gives the plain MLE. A system with no
    comparison gets NaN. Scores of systems in separate comparison groups (never linked by any comparison) are
    not on a common scale."""
    w = np.asarray(wins, float)
    n = w + w.T  # comparisons per pair of systems
    w = w + pseudo_ties * 0.5 * (n > 0)
    n = w + w.T
    out = np.full(len(w), np.nan)
    active = np.flatnonzero(n.sum(axis=1) > 0)
    if not len(active):
        return out
    w, n = w[np.ix_(active, active)], n[np.ix_(active, active)]
    p = np.ones(len(w))
    for _ in range(iters):
        new = w.sum(axis=1) / (n / (p[:, None] + p[None, :])).sum(axis=1)
        new /= np.exp(np.log(new).mean())
        done = np.max(np.abs(new - p)) < tol
        p = new
        if done:
            break
    out[active] = np.log(p) - np.log(p).mean()
    return out


def bt_table(outcomes: pd.DataFrame, systems: list[str], aspects: list[str]) -> pd.DataFrame:
    """``aspect, system, score, rank`` (rank 1 = strongest; NaN without valid pairs) from the valid pairs'
    outcomes."""
    index = {name: i for i, name in enumerate(systems)}
    rows = []
    for aspect in aspects:
        w = np.zeros((len(systems), len(systems)))
        for r in outcomes[(outcomes.aspect == aspect) & outcomes.valid].itertuples():
            i, j = index[r.system_a], index[r.system_b]
            if r.outcome == "a":
                w[i, j] += 1
            elif r.outcome == "b":
                w[j, i] += 1
            else:
                w[i, j] += 0.5
                w[j, i] += 0.5
        scores = bradley_terry(w)
        rank = pd.Series(scores).rank(ascending=False, method="min").to_numpy()
        rows += [{"aspect": aspect, "system": s, "score": scores[index[s]], "rank": rank[index[s]]} for s in systems]
    return pd.DataFrame(rows, columns=["aspect", "system", "score", "rank"])


# ------------------------------------------------------------------------------------------------ report
@dataclass
class Report:
    """Everything ``report`` writes; ``win_rates`` leaves flagged annotators out unless asked to keep them."""

    study: str
    aspects: list[str]
    votes_per_pair: int
    systems: list[str]
    win_rates: pd.DataFrame
    win_rates_all: pd.DataFrame
    agreement: pd.DataFrame
    bt: pd.DataFrame | None
    annotators: pd.DataFrame
    n_pairs: int
    n_gold: int
    threshold: float
    keep_flagged: bool
    n_resamples: int
    seed: int
    note: str | None = None
    min_seconds: float = 0.0
    practice: pd.DataFrame | None = None  # PRACTICE_COLUMNS; None or empty: no practice answers

    def win_rates_csv(self, table: pd.DataFrame | None = None) -> str:
        """The CSV: exactly ``WIN_RATE_COLUMNS``; a study of more than two systems adds ``opponent``."""
        table = self.win_rates if table is None else table
        cols = WIN_RATE_COLUMNS + (["opponent"] if len(self.systems) > 2 else [])
        return table[cols].to_csv(index=False)

    @property
    def markdown(self) -> str:
        ann = self.annotators
        flagged = int(ann.flagged.sum())
        no_gold = int((ann.gold_votes == 0).sum())
        lines = [f"# A/B study `{self.study}`", ""]
        if self.note:
            lines += [f"> {self.note}", ""]
        lines += [f"- systems: {', '.join(self.systems)}; aspects: {', '.join(self.aspects)}",
                  f"- {self.n_pairs} pairs (+ {self.n_gold} gold); a pair is valid on an aspect with at least "
                  f"{self.votes_per_pair} votes",
                  f"- annotators: {len(ann)}; flagged (gold accuracy < {self.threshold:.2f}"
                  + (f", or median time per pair < {self.min_seconds:g} s" if self.min_seconds > 0 else "")
                  + f"): {flagged}"
                  f"{' (kept in the main table)' if self.keep_flagged else ' (left out of the main table)'}; "
                  f"without gold answers: {no_gold}",
                  f"- CIs: 95% percentile bootstrap over prompts ({self.n_resamples} resamples, seed {self.seed})",
                  "", "## Win rates" + ("" if self.keep_flagged or not flagged else " (flagged annotators left out)"),
                  "", _table(self.win_rates, len(self.systems) > 2), ""]
        lines += ["## Agreement", "", "| aspect | Krippendorff's α (nominal) | pairs with ≥ 2 votes | can't tell |",
                  "|---|---:|---:|---:|"]
        lines += [f"| {r.aspect} | {_num(r.alpha)} | {r.units} | {r.cant_tell} |" for r in self.agreement.itertuples()]
        if self.bt is not None:
            lines += ["", "## Bradley–Terry ranking (log-strength, mean 0; ties = half a win)", "",
                      "| aspect | rank | system | score |", "|---|---:|---|---:|"]
            lines += [f"| {r.aspect} | {_num(r.rank, '.0f')} | {r.system} | {_num(r.score, '+.3f')} |"
                      for r in self.bt.sort_values(["aspect", "rank"]).itertuples()]
        if flagged:
            other = "with" if not self.keep_flagged else "without"
            lines += ["", f"## Win rates {other} the flagged annotators", "",
                      _table(self.win_rates_all, len(self.systems) > 2)]
        lines += ["", "## Annotators", "",
                  "| annotator | votes | gold answers | gold accuracy | flagged | why | median s per pair "
                  "| can't tell |",
                  "|---|---:|---:|---:|---|---|---:|---:|"]
        lines += [f"| {r.annotator} | {r.votes} | {r.gold_votes} | {_num(r.gold_accuracy)} | "
                  f"{'yes' if r.flagged else ''} | {r.reason} | {_num(r.median_seconds, '.1f')} | {r.cant_tell} |"
                  for r in ann.itertuples()]
        if self.practice is not None and len(self.practice):
            lines += ["", "## Practice round (not counted in any number above)", "",
                      "| annotator | practice answers | matched the expected answer | practice accuracy |",
                      "|---|---:|---:|---:|"]
            lines += [f"| {r.annotator} | {r.practice_answered} | {r.practice_correct} | "
                      f"{_num(r.practice_accuracy)} |" for r in self.practice.itertuples()]
        return "\n".join(lines) + "\n"


def _num(x: float | None, fmt: str = ".3f") -> str:
    return "n/a" if x is None or math.isnan(x) else format(x, fmt)


def _table(wr: pd.DataFrame, with_opponent: bool) -> str:
    head = "| aspect | system |" + (" vs |" if with_opponent else "") + \
        " win rate [95% CI] | wins | ties | losses | valid pairs |"
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in wr.itertuples():
        rate = "n/a" if r.valid_pairs == 0 else f"{r.win_rate:.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}]"
        out.append(f"| {r.aspect} | {r.system} |" + (f" {r.opponent} |" if with_opponent else "") +
                   f" {rate} | {r.wins} | {r.ties} | {r.losses} | {r.valid_pairs} |")
    return "\n".join(out)


def build_report(sessions: sessionmaker, study_name: str, n_resamples: int = 1000, seed: int = 0,
                 gold_threshold: float | None = None, keep_flagged: bool = False, note: str | None = None,
                 min_seconds: float | None = None) -> Report:
    """The report of a study, from its database (``gold_threshold`` / ``min_seconds``: override the study's)."""
    with sessions() as s:
        study = get_study(s, study_name)
        aspects, vpp = study.aspect_list, study.votes_per_pair
        threshold = study.gold_threshold if gold_threshold is None else gold_threshold
        speed = study.speed_limit if min_seconds is None else min_seconds
    votes, pairs = load_votes(sessions, study_name)
    report = compute_report(votes, pairs, study_name, aspects, vpp, threshold, keep_flagged, n_resamples, seed,
                            note, speed)
    report.practice = practice_table(sessions, study_name)
    return report


def compute_report(votes: pd.DataFrame, pairs: pd.DataFrame, study: str, aspects: list[str], votes_per_pair: int,
                   threshold: float = 0.8, keep_flagged: bool = False, n_resamples: int = 1000, seed: int = 0,
                   note: str | None = None, min_seconds: float = 0.0) -> Report:
    """The report from vote and pair tables (``load_votes``' format; ``seconds`` may be absent: no speed check)."""
    annotators = annotator_flags(votes, pairs, aspects, threshold, min_seconds)
    kept = votes[~votes.annotator.isin(set(annotators.annotator[annotators.flagged]))]
    real = pairs[pairs.gold_answer.isna()]
    systems = list(dict.fromkeys([*real.system_a, *real.system_b]))
    comparisons = list(dict.fromkeys(zip(real.system_a, real.system_b, strict=True)))
    all_rates = win_rates(pair_outcomes(votes, pairs, votes_per_pair), comparisons, aspects, n_resamples, seed)
    kept_rates = win_rates(pair_outcomes(kept, pairs, votes_per_pair), comparisons, aspects, n_resamples, seed)
    main = votes if keep_flagged else kept
    real_votes = main[main.pair_id.isin(set(real.pair_id))]
    agreement = pd.DataFrame([(a, *krippendorff_alpha(main, pairs, a),
                               int(((real_votes.aspect == a) & (real_votes.choice == CANT_TELL)).sum()))
                              for a in aspects], columns=["aspect", "alpha", "units", "cant_tell"])
    bt = bt_table(pair_outcomes(main, pairs, votes_per_pair), systems, aspects) if len(systems) > 2 else None
    return Report(study, aspects, votes_per_pair, systems, all_rates if keep_flagged else kept_rates,
                  kept_rates if keep_flagged else all_rates, agreement, bt, annotators, len(real),
                  len(pairs) - len(real), threshold, keep_flagged, n_resamples, seed, note, min_seconds)


def plot_win_rates(report: Report, path: Path) -> Path:
    """Stacked win / tie / loss bars per aspect, one panel per compared pair (paper Figs. 9 and 11)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wr = report.win_rates
    firsts = wr.iloc[::2]  # A's side of each comparison x aspect
    comparisons = list(dict.fromkeys(zip(firsts.system, firsts.opponent, strict=True)))
    height = 0.9 + (0.55 * len(report.aspects) + 0.4) * len(comparisons) + (0.5 if report.note else 0)
    fig, axes = plt.subplots(len(comparisons), 1, squeeze=False, figsize=(7.5, height))
    colors = ("#2a7ab0", "#c9c9c9", "#d9763b")
    for ax, (sys_a, sys_b) in zip(axes[:, 0], comparisons, strict=True):
        rows = firsts[(firsts.system == sys_a) & (firsts.opponent == sys_b)].iloc[::-1]
        n = rows.valid_pairs.clip(lower=1).to_numpy(float)
        parts = [rows.wins.to_numpy() / n, rows.ties.to_numpy() / n, rows.losses.to_numpy() / n]
        left = np.zeros(len(rows))
        labels = [f"{sys_a} wins", "tie", f"{sys_b} wins"]
        for frac, color, label in zip(parts, colors, labels, strict=True):
            bars = ax.barh(range(len(rows)), frac, left=left, color=color, label=label, height=0.6)
            for bar, f in zip(bars, frac, strict=True):
                if f >= 0.07:
                    ax.text(bar.get_x() + bar.get_width() / 2, bar.get_y() + bar.get_height() / 2, f"{f:.0%}",
                            ha="center", va="center", fontsize=9)
            left += frac
        ax.set_yticks(range(len(rows)), [f"{a.replace('_', ' ')}\n(n={v})" for a, v in
                                          zip(rows.aspect, rows.valid_pairs, strict=True)])
        ax.set_xlim(0, 1)
        ax.xaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
        ax.legend(ncol=3, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False, fontsize=9,
                  title=f"{sys_a} vs {sys_b}", title_fontsize=11)
    if report.note:  # e.g. "SIMULATED annotators, not people": stays with the figure wherever it goes
        fig.suptitle(report.note.split(":")[0], color="#b00020", fontsize=11, fontweight="bold")
    fig.tight_layout(rect=(0, 0, 1, 0.93) if report.note else (0, 0, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return path


def figure_png(report: Report) -> bytes:
    """``win_rates.png`` of the report as bytes (the report page embeds it)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="ab-figure-") as tmp:
        return plot_win_rates(report, Path(tmp) / "win_rates.png").read_bytes()


def write_report(report: Report, out: str | Path) -> list[Path]:
    """``win_rates.csv``, ``win_rates_all_annotators.csv`` (or ``..._without_flagged`` with --keep-flagged),
    ``report.md``, ``win_rates.png``, ``annotators.csv``, ``agreement.csv``, ``bradley_terry.csv`` with more
    than two systems, and ``practice.csv`` when annotators answered practice pairs."""
    out = Path(out)
    other = "win_rates_without_flagged.csv" if report.keep_flagged else "win_rates_all_annotators.csv"
    written = [atomic_write_text(out / "win_rates.csv", report.win_rates_csv()),
               atomic_write_text(out / other, report.win_rates_csv(report.win_rates_all)),
               atomic_write_text(out / "report.md", report.markdown),
               atomic_write_text(out / "annotators.csv", report.annotators.to_csv(index=False)),
               atomic_write_text(out / "agreement.csv", report.agreement.to_csv(index=False))]
    if report.bt is not None:
        written.append(atomic_write_text(out / "bradley_terry.csv", report.bt.to_csv(index=False)))
    if report.practice is not None and len(report.practice):
        written.append(atomic_write_text(out / "practice.csv", report.practice.to_csv(index=False)))
    written.append(plot_win_rates(report, out / "win_rates.png"))
    return written
