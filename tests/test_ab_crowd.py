"""Crowd hand-off over real HTTP: the platform's entry link with Prolific's ids (checked, stored, one annotator per
participant), the completion code or URL at the end of the quota, and the payments CSV."""

from __future__ import annotations

import csv
import re
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from ab_helpers import PAIR_ID_PATTERN, SYSTEMS, running_app, write_system
from sqlalchemy import select

from evals.ab.__main__ import main
from evals.ab.db import Annotator, Assignment, Pair, make_engine, make_sessions, utcnow
from evals.ab.study import add_annotators, create_study

PID_A, PID_B = "5f1e2d3c4b5a69788796a5b4", "60aabbccddeeff0011223344"


def _ids(pid: str, session: str = "sess1") -> dict[str, str]:
    return {"PROLIFIC_PID": pid, "STUDY_ID": "study42", "SESSION_ID": session}


@pytest.fixture
def crowd(tmp_path: Path):
    """4 prompts x 1 seed, 1 vote per pair, 2 real pairs per participant, a gold pair every other item."""
    a = write_system(tmp_path, SYSTEMS[0], 4, 1)
    b = write_system(tmp_path, SYSTEMS[1], 4, 1, shift=1)
    db = str(tmp_path / "s.sqlite")
    sessions = make_sessions(make_engine(db))
    made = create_study(sessions, "crowd", a, b, "geneval", ["overall"], 1, "alpha", "beta", seed=0,
                        per_annotator=2, gold_rate=0.5, crowd=True, completion_code="C0DE42")
    return {"db": db, "sessions": sessions, "entry": f"/p/{made.crowd_token}", "made": made}


def test_entry_link_checks_and_stores_platform_ids(crowd) -> None:
    with running_app(crowd["db"]) as url, httpx.Client(base_url=url, timeout=30) as c:
        for bad in ({"PROLIFIC_PID": "x" * 65}, {"PROLIFIC_PID": "<script>"}, {"PROLIFIC_PID": "{{%PROLIFIC_PID%}}"},
                    {"STUDY_ID": "s"}, {**_ids(PID_A), "SESSION_ID": "a b"}, {}):
            assert c.get(crowd["entry"], params=bad).status_code == 400, bad
        assert c.get("/p/not-the-entry", params=_ids(PID_A)).status_code == 403
        first = c.get(crowd["entry"], params=_ids(PID_A))
        assert first.status_code == 303 and first.headers["location"].startswith("/a/")
        again = c.get(crowd["entry"], params=_ids(PID_A, "sess2"))  # the same participant comes back
        other = c.get(crowd["entry"], params=_ids(PID_B))
        assert again.headers["location"] == first.headers["location"] != other.headers["location"]
        token = first.headers["location"].removeprefix("/a/")
        assert c.get(f"/a/{token}", params=_ids(PID_A)).status_code == 200  # the latest session id is kept
        assert c.get(f"/a/{token}", params=_ids(PID_B)).status_code == 403  # another participant's id
        assert c.get(f"/a/{token}", params={"PROLIFIC_PID": "bad id!"}).status_code == 400
        (_, plain), = add_annotators(crowd["sessions"], "crowd", 1)  # a personal link stores ids it is opened with
        assert c.get(f"/a/{plain}", params=_ids("abc123", "s9")).status_code == 200
    with crowd["sessions"]() as s:
        rows = s.execute(select(Annotator.platform_pid, Annotator.platform_study, Annotator.platform_session)
                         .order_by(Annotator.label)).all()
    assert rows == [(PID_A, "study42", "sess1"), (PID_B, "study42", "sess1"), ("abc123", "study42", "s9")]


def _answer_all(c: httpx.Client, sessions, token: str, seconds: float, gold_right: bool) -> int:
    """Answer every pair, each handed out ``seconds`` before the answer; gold pairs right or wrong. Returns pairs."""
    for n in range(20):  # bounded
        page = c.get(f"/a/{token}", follow_redirects=False)
        if page.status_code != 200 or not re.search(PAIR_ID_PATTERN, page.text):
            return n
        pid = re.search(PAIR_ID_PATTERN, page.text)[1]
        with sessions.begin() as s:
            pair = s.scalar(select(Pair).where(Pair.public_id == pid))
            s.execute(Assignment.__table__.update().where(Assignment.pair_id == pair.id, Assignment.completed_at
                                                          .is_(None)).values(assigned_at=utcnow() - timedelta(
                                                              seconds=seconds)))
            gold = pair.gold_answer
        choice = "left" if gold is None else gold if gold_right else {"left": "right", "right": "left"}[gold]
        assert c.post(f"/a/{token}/vote", data={"pair": pid, "choice_overall": choice}).status_code == 303
    pytest.fail("never finished")


def test_completion_code_at_the_end_and_payments_csv(crowd, tmp_path: Path) -> None:
    with running_app(crowd["db"]) as url, httpx.Client(base_url=url, timeout=30) as c:
        tok_a = c.get(crowd["entry"], params=_ids(PID_A)).headers["location"].removeprefix("/a/")
        tok_b = c.get(crowd["entry"], params=_ids(PID_B)).headers["location"].removeprefix("/a/")
        assert "C0DE42" not in c.get(f"/a/{tok_a}").text  # not before the end
        n_a = _answer_all(c, crowd["sessions"], tok_a, 8.0, gold_right=True)
        n_b = _answer_all(c, crowd["sessions"], tok_b, 1.0, gold_right=False)
        done = c.get(f"/a/{tok_a}")
        assert 'id="completion-code">C0DE42<' in done.text
        # a third participant finds every pair taken (4 pairs, 1 vote each, 2 per person): no code
        tok_c = c.get(crowd["entry"], params=_ids("late0001")).headers["location"].removeprefix("/a/")
        late = c.get(f"/a/{tok_c}").text
        assert "C0DE42" not in late and "return the study" in late
    # 2 real + 1 gold each: item k is gold when floor((k+1)/2) > floor(k/2), i.e. k = 1; at k = 3 no real pair is
    # left within the quota, so the person is done after 3 items
    assert (n_a, n_b) == (3, 3)
    out = tmp_path / "pay" / "payments.csv"
    assert main(["export-payments", "--db", crowd["db"], "--study", "crowd", "--out", str(out)]) == 0
    rows = {r["platform_pid"]: r for r in csv.DictReader(open(out))}
    assert list(next(iter(rows.values()))) == ["platform_pid", "platform_study", "platform_session", "annotator",
                                               "consented_at", "pairs", "votes", "gold_accuracy", "median_seconds",
                                               "flagged", "reason"]
    a, b, late_row = rows[PID_A], rows[PID_B], rows["late0001"]
    assert (a["pairs"], a["votes"], float(a["gold_accuracy"]), a["flagged"], a["reason"]) == ("3", "3", 1.0,
                                                                                              "False", "")
    assert (b["pairs"], float(b["gold_accuracy"]), b["flagged"], b["reason"]) == ("3", 0.0, "True", "gold+speed")
    assert float(a["median_seconds"]) == pytest.approx(8.0, abs=1.0)
    assert float(b["median_seconds"]) == pytest.approx(1.0, abs=1.0) and float(b["median_seconds"]) < 3
    assert (late_row["pairs"], late_row["votes"], late_row["gold_accuracy"]) == ("0", "0", "")
    # the admin dashboard: progress per aspect and the same per-participant numbers, and working download links
    with running_app(crowd["db"]) as url, httpx.Client(base_url=url, timeout=30) as c:
        page = c.get("/admin/crowd", params={"token": crowd["made"].admin_token})
        assert page.status_code == 200
        # 4 real pairs, 1 vote each, all answered by A and B (2 each): all 4 valid on overall
        assert re.search(r"<td>overall</td><td>4 of 4</td><td>0</td>", page.text)
        rows = [m.groups() for m in re.finditer(r"<tr><td>(web-\d+)</td><td>(\w*)</td><td>(\d+)</td>\s*"
                                                  r"<td>([^<]*)</td>\s*<td>([^<]*)</td>\s*<td>([^<]*)</td>",
                                                  page.text)]
        by_pid = {g[1]: g[2:] for g in rows}  # platform id -> answered, gold accuracy, median s, flag reason
        assert by_pid[PID_A][0] == "3" and by_pid[PID_A][1] == "1.000 (1/1)" and by_pid[PID_A][3] == ""
        assert by_pid[PID_B][1] == "0.000 (0/1)" and by_pid[PID_B][3] == "gold+speed"
        assert float(by_pid[PID_A][2]) == pytest.approx(8.0, abs=1.0)
        links = re.findall(r'href="(/admin/crowd/[^"]+)"', page.text)
        assert len(links) == 6  # pairs, votes, payments, report page, report.md, win rates
        for link in links:
            assert c.get(link.replace("&amp;", "&")).status_code == 200, link


def test_a_completion_url_redirects_finished_participants(tmp_path: Path) -> None:
    a = write_system(tmp_path, SYSTEMS[0], 1, 1)
    b = write_system(tmp_path, SYSTEMS[1], 1, 1, shift=1)
    db = str(tmp_path / "s.sqlite")
    sessions = make_sessions(make_engine(db))
    target = "https://app.prolific.com/submissions/complete?cc=XYZ"
    made = create_study(sessions, "u", a, b, "geneval", ["overall"], 1, "alpha", "beta", seed=0,
                        completion_url=target)
    with pytest.raises(ValueError, match="--completion-url"):
        create_study(sessions, "v", a, b, "geneval", ["overall"], 1, "alpha", "beta",
                     completion_url="javascript:alert(1)")
    with running_app(db) as url, httpx.Client(base_url=url, timeout=30) as c:
        token = c.get(f"/p/{made.crowd_token}", params=_ids(PID_A)).headers["location"].removeprefix("/a/")
        pid = re.search(PAIR_ID_PATTERN, c.get(f"/a/{token}").text)[1]
        assert c.post(f"/a/{token}/vote", data={"pair": pid, "choice_overall": "tie"}).status_code == 303
        end = c.get(f"/a/{token}")
        assert end.status_code == 303 and end.headers["location"] == target
