"""The annotator and admin pages over real HTTP on loopback: tokens, tampering, double votes, blinding."""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path

import httpx
import pytest
from ab_helpers import PAIR_ID_PATTERN, SYSTEMS, running_app, write_system
from sqlalchemy import func, select

from evals.ab.db import Pair, Vote, make_engine, make_sessions
from evals.ab.study import add_annotators, create_study


@pytest.fixture
def study(tmp_path: Path):
    """An edit study (source images shown too) of 4 prompts x 2 seeds, 2 votes per pair, 2 gold pairs."""
    a = write_system(tmp_path, SYSTEMS[0], 4, 2, layout="edit")
    b = write_system(tmp_path, SYSTEMS[1], 4, 2, layout="edit", shift=1)
    db = str(tmp_path / "study.sqlite")
    sessions = make_sessions(make_engine(db))
    made = create_study(sessions, "secret_study_SYSALPHA_vs_SYSBETA", a, b, "edit",
                        ["overall", "identity_preservation"], votes_per_pair=2, name_a=SYSTEMS[0],
                        name_b=SYSTEMS[1], gold_rate=0.25, seed=3)
    tokens = [tok for _, tok in add_annotators(sessions, made.study, 3)]
    return {"db": db, "sessions": sessions, "tokens": tokens, "admin": made.admin_token, "name": made.study,
            "secrets": [*SYSTEMS, str(a), str(b), a.name, b.name, "00000.png", "samples", "source.png", made.study,
                        "SYSALPHA_outputs"]}


def _vote(client: httpx.Client, token: str, pair: str, **choices: str) -> httpx.Response:
    return client.post(f"/a/{token}/vote", data={"pair": pair, **{f"choice_{k}": v for k, v in choices.items()}})


def test_tokens_tampering_and_double_votes(study) -> None:
    with running_app(study["db"]) as url, httpx.Client(base_url=url, timeout=30) as c:
        assert c.get("/a/").status_code == 403
        assert c.get("/a").status_code == 403
        assert c.get("/a/not-a-token").status_code == 403
        assert _vote(c, "not-a-token", "x", overall="left", identity_preservation="tie").status_code == 403
        token = study["tokens"][0]
        page = c.get(f"/a/{token}")
        assert page.status_code == 200
        pair = re.search(PAIR_ID_PATTERN, page.text).group(1)
        assert c.get(f"/a/not-a-token/img/{pair}/left").status_code == 403
        # tampered pair ids: unknown, or a real pair that was not given to this annotator
        tampered = pair[:-1] + ("A" if pair[-1] != "A" else "B")
        assert _vote(c, token, tampered, overall="left", identity_preservation="tie").status_code == 404
        assert c.get(f"/a/{token}/img/{tampered}/left").status_code == 404
        with study["sessions"]() as s:
            other = s.scalar(select(Pair.public_id).where(Pair.public_id != pair).limit(1))
        assert _vote(c, token, other, overall="left", identity_preservation="tie").status_code == 404
        assert c.get(f"/a/{token}/img/{other}/left").status_code == 404
        assert c.get(f"/a/{token}/img/{pair}/elsewhere").status_code == 404
        # a missing aspect or a choice outside left/right/tie stores nothing
        assert _vote(c, token, pair, overall="left").status_code == 422
        assert _vote(c, token, pair, overall="left", identity_preservation="both").status_code == 422
        first = _vote(c, token, pair, overall="left", identity_preservation="tie")
        assert first.status_code == 303
        second = _vote(c, token, pair, overall="right", identity_preservation="right")
        assert second.status_code == 409
        with study["sessions"]() as s:
            stored = s.execute(select(Vote.aspect, Vote.choice).join(Pair, Pair.id == Vote.pair_id)
                               .where(Pair.public_id == pair)).all()
            assert sorted(stored) == [("identity_preservation", "tie"), ("overall", "left")]
            assert s.scalar(select(func.count()).select_from(Vote)) == 2
        # admin routes: no token, a wrong token, an annotator's token -> 403; the admin token works
        for bad in ({}, {"token": "wrong"}, {"token": token}):
            assert c.get(f"/admin/{study['name']}", params=bad).status_code == 403
            assert c.get(f"/admin/{study['name']}/report", params=bad).status_code == 403
            assert c.get(f"/admin/{study['name']}/pairs.csv", params=bad).status_code == 403
            assert c.post(f"/admin/{study['name']}/annotators", params={**bad, "n": 2}).status_code == 403
        assert c.get("/admin/no_such_study", params={"token": study["admin"]}).status_code == 403
        auth = {"Authorization": f"Bearer {study['admin']}"}
        links = c.post(f"/admin/{study['name']}/annotators", params={"n": 2}, headers=auth).json()["links"]
        assert len(links) == 2 and c.get(links[0]["url"].removeprefix(url)).status_code == 200
        assert "overall" in c.get(f"/admin/{study['name']}/report", headers=auth).text
        assert len(c.get(f"/admin/{study['name']}/pairs.csv", headers=auth).text.splitlines()) == 1 + 8 + 2


def test_no_system_name_reaches_an_annotator(study) -> None:
    """Every page, image and header an annotator gets, over a whole study, is free of names, folders, files."""
    seen: list[str] = []
    images = 0
    with running_app(study["db"]) as url, httpx.Client(base_url=url, timeout=30) as c:
        for token in study["tokens"]:
            for _ in range(50):  # bounded: 8 pairs x 2 votes + gold, over 3 people
                page = c.get(f"/a/{token}")
                assert page.status_code == 200
                seen += [page.text, str(page.headers), str(page.url)]
                match = re.search(PAIR_ID_PATTERN, page.text)
                if match is None:
                    assert "Thank you" in page.text
                    break
                srcs = re.findall(r'src="([^"]+)"', page.text)
                assert len(srcs) == 3  # source, left, right
                for src in srcs:
                    img = c.get(src)
                    assert img.status_code == 200 and img.headers["content-type"] == "image/png"
                    seen += [src, str(img.headers), img.content.decode("latin-1")]
                    images += 1
                resp = _vote(c, token, match.group(1), overall="left", identity_preservation="right")
                seen += [resp.text, str(resp.headers)]
                assert resp.status_code == 303
            else:
                pytest.fail("annotator never reached the end")
        seen += [c.get("/a/unknown").text, c.get(f"/a/{token}/img/zzz/left").text]
    with study["sessions"]() as s:
        n_real = s.scalar(select(func.count()).select_from(Pair).where(Pair.gold_answer.is_(None)))
        counts = s.execute(select(func.count()).select_from(Vote).join(Pair, Pair.id == Vote.pair_id)
                           .where(Pair.gold_answer.is_(None)).group_by(Vote.pair_id, Vote.aspect)).scalars().all()
    assert n_real == 8 and counts == [2] * 16  # the walk covered the whole study
    assert images >= 3 * 8 * 2
    text = "\n".join(seen)
    for secret in study["secrets"]:
        assert secret not in text, f"{secret!r} reached an annotator"


def test_a_changed_image_is_refused_not_served_and_pixels_show_as_a_viewer_shows_them(tmp_path: Path) -> None:
    """Images are pinned at create: a regenerated file is refused (409, no path in the page) even after a restart;
    EXIF orientation, transparency and 16-bit greyscale come out as an image viewer shows them."""
    import io

    import numpy as np
    from PIL import Image

    from evals.ab.blind import png_of

    a = write_system(tmp_path, SYSTEMS[0], 2, 1)
    b = write_system(tmp_path, SYSTEMS[1], 2, 1, shift=1)
    db = str(tmp_path / "s.sqlite")
    sessions = make_sessions(make_engine(db))
    create_study(sessions, "s", a, b, "geneval", ["overall"], name_a="alpha", name_b="beta", seed=0)
    (token,) = [tok for _, tok in add_annotators(sessions, "s", 1)]
    with running_app(db) as url, httpx.Client(base_url=url) as client:
        pair = re.search(PAIR_ID_PATTERN, client.get(f"/a/{token}").text)[1]
        with sessions() as s:
            p = s.scalar(select(Pair).where(Pair.public_id == pair))
            files = {"left": Path(p.left_image.path), "right": Path(p.right_image.path)}
        assert client.get(f"/a/{token}/img/{pair}/left").status_code == 200
        Image.new("RGB", (64, 64), (0, 0, 0)).save(files["right"])  # regenerated after the study was made
        refused = client.get(f"/a/{token}/img/{pair}/right")
        assert refused.status_code == 409 and str(files["right"]) not in refused.text
    with running_app(db) as url, httpx.Client(base_url=url) as client:  # a restarted server refuses it too
        assert client.get(f"/a/{token}/img/{pair}/right").status_code == 409

    def shown(img: Image.Image, **save) -> np.ndarray:
        buf = io.BytesIO()
        img.save(buf, format="PNG" if "exif" not in save else "JPEG", **save)
        return np.asarray(Image.open(io.BytesIO(png_of(buf.getvalue()))))

    grey16 = Image.fromarray(np.full((4, 4), 32768, np.uint16))  # mid grey: convert("RGB") alone clips to white
    assert shown(grey16)[0, 0].tolist() == [128, 128, 128]
    clear = Image.new("RGBA", (4, 4), (0, 0, 0, 0))  # fully transparent: white, as viewers show it, not black
    assert shown(clear)[0, 0].tolist() == [255, 255, 255]
    tall = Image.new("RGB", (8, 4), (200, 0, 0))
    exif = tall.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees on display
    assert shown(tall, exif=exif.tobytes()).shape[:2] == (8, 4)


def test_time_on_task_is_measured_by_the_server_and_exported(study) -> None:
    """votes.csv has each vote's server timestamp and its time-on-task: seconds from when the server handed the
    pair out to the answer. A client cannot shorten or lengthen it (a posted "seconds" field is ignored)."""
    import csv
    import io
    from datetime import timedelta

    from evals.ab.db import Assignment, utcnow

    token = study["tokens"][0]
    with running_app(study["db"]) as url, httpx.Client(base_url=url, timeout=30) as c:
        pair = re.search(PAIR_ID_PATTERN, c.get(f"/a/{token}").text).group(1)
        with study["sessions"].begin() as s:  # the pair was handed out 7 s ago
            p = s.scalar(select(Pair).where(Pair.public_id == pair))
            a = s.scalar(select(Assignment).where(Assignment.pair_id == p.id))
            a.assigned_at = utcnow() - timedelta(seconds=7)
        before = utcnow()
        resp = c.post(f"/a/{token}/vote", data={"pair": pair, "choice_overall": "left",
                                                 "choice_identity_preservation": "tie", "seconds": "600"})
        after = utcnow()
        assert resp.status_code == 303
        table = c.get(f"/admin/{study['name']}/votes.csv", headers={"Authorization": f"Bearer {study['admin']}"})
    rows = list(csv.DictReader(io.StringIO(table.text)))
    assert {"created_at", "seconds"} <= set(rows[0]) and len(rows) == 2
    for r in rows:
        assert 7.0 <= float(r["seconds"]) <= 7.0 + (after - before).total_seconds() + 0.01
        stamp = datetime.fromisoformat(r["created_at"].removesuffix("Z"))
        assert before - timedelta(milliseconds=1) <= stamp <= after + timedelta(milliseconds=1)


def test_cant_tell_and_changing_the_last_answer(tmp_path: Path) -> None:
    """A study with the "can't tell" answer takes it; the back page shows the last pair with its stored answers;
    a change replaces the stored rows (no duplicate); only the last answered pair can be changed; a study without
    the answer refuses it (422)."""
    a = write_system(tmp_path, SYSTEMS[0], 3, 1)
    b = write_system(tmp_path, SYSTEMS[1], 3, 1, shift=1)
    db = str(tmp_path / "s.sqlite")
    sessions = make_sessions(make_engine(db))
    create_study(sessions, "ct", a, b, "geneval", ["overall", "visual_quality"], 1, "alpha", "beta", seed=0,
                 cant_tell=True)
    create_study(sessions, "plain", a, b, "geneval", ["overall"], 1, "alpha", "beta", seed=0)
    (_, token), = add_annotators(sessions, "ct", 1)
    (_, plain), = add_annotators(sessions, "plain", 1)

    def stored(pair: str) -> list[tuple[str, str]]:
        with sessions() as s:
            return sorted(s.execute(select(Vote.aspect, Vote.choice).join(Pair, Pair.id == Vote.pair_id)
                                    .where(Pair.public_id == pair)).all())

    with running_app(db) as url, httpx.Client(base_url=url, timeout=30) as c:
        page = c.get(f"/a/{plain}").text
        assert 'value="cant_tell"' not in page
        assert _vote(c, plain, re.search(PAIR_ID_PATTERN, page)[1], overall="cant_tell").status_code == 422
        page = c.get(f"/a/{token}").text
        assert 'value="cant_tell"' in page and "/back" not in page  # nothing to go back to yet
        first = re.search(PAIR_ID_PATTERN, page)[1]
        assert _vote(c, token, first, overall="cant_tell", visual_quality="left").status_code == 303
        page = c.get(f"/a/{token}").text
        second = re.search(PAIR_ID_PATTERN, page)[1]
        assert second != first and f"/a/{token}/back" in page
        back = c.get(f"/a/{token}/back").text
        assert re.search(PAIR_ID_PATTERN, back)[1] == first and 'name="replace" value="1"' in back
        assert re.search(r'value="cant_tell" required checked', back)  # the stored answer is preselected
        changed = c.post(f"/a/{token}/vote", data={"pair": first, "replace": "1", "choice_overall": "right",
                                                    "choice_visual_quality": "left"})
        assert changed.status_code == 303
        assert stored(first) == [("overall", "right"), ("visual_quality", "left")]
        # without replace a second answer is still refused; the open pair cannot be "changed" before it is answered
        assert _vote(c, token, first, overall="tie", visual_quality="tie").status_code == 409
        assert c.post(f"/a/{token}/vote", data={"pair": second, "replace": "1", "choice_overall": "tie",
                                                "choice_visual_quality": "tie"}).status_code == 409
        assert _vote(c, token, second, overall="tie", visual_quality="cant_tell").status_code == 303
        # now the first pair is no longer the last answered one
        assert c.post(f"/a/{token}/vote", data={"pair": first, "replace": "1", "choice_overall": "left",
                                                "choice_visual_quality": "left"}).status_code == 409
    assert stored(first) == [("overall", "right"), ("visual_quality", "left")]
    assert stored(second) == [("overall", "tie"), ("visual_quality", "cant_tell")]
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(Vote).join(Pair, Pair.id == Vote.pair_id)
                        .where(Pair.public_id.in_([first, second]))) == 4
        changed_at = s.scalars(select(Vote.changed_at).join(Pair, Pair.id == Vote.pair_id)
                               .where(Pair.public_id == first, Vote.aspect == "overall")).one()
        assert changed_at is not None


def test_study_file_instructions_consent_and_questions(tmp_path: Path) -> None:
    """A study file's instructions and consent are shown with their HTML escaped (Markdown subset rendered); no
    pair is handed out, and no vote taken, before "I agree", whose time is recorded; custom questions replace the
    built-in text; a bad study file is one error line."""
    from evals.ab.__main__ import main
    from evals.ab.db import Annotator, Assignment, utcnow

    a = write_system(tmp_path, SYSTEMS[0], 2, 1)
    b = write_system(tmp_path, SYSTEMS[1], 2, 1, shift=1)
    db = str(tmp_path / "s.sqlite")
    study_file = tmp_path / "study.yaml"
    study_file.write_text("instructions: |\n  # How to judge\n\n  Look at **both** images.<script>alert(1)</script>\n"
                          "  <img src=x onerror=alert(2)>\n\n  - first point\n  - second point\n"
                          "consent: |\n  You agree that your answers are stored. [Privacy](https://example.org/p)\n"
                          "questions:\n  sharpness: Which image is sharper?\n")
    assert main(["create", "--db", db, "--study", "s", "--a", str(a), "--b", str(b), "--layout", "geneval",
                 "--aspects", "overall,sharpness", "--votes-per-pair", "1", "--study-file", str(study_file),
                 "--annotators", "1"]) == 0
    sessions = make_sessions(make_engine(db))
    with sessions() as s:
        token = s.scalar(select(Annotator.token))
    with running_app(db) as url, httpx.Client(base_url=url, timeout=30) as c:
        intro = c.get(f"/a/{token}")
        assert intro.status_code == 200 and 'id="agree"' in intro.text and "pair" not in intro.text.lower()
        assert "<h2>How to judge</h2>" in intro.text and "<strong>both</strong>" in intro.text
        assert "<li>first point</li><li>second point</li>" in intro.text
        assert "<script>alert" not in intro.text and "&lt;script&gt;alert(1)&lt;/script&gt;" in intro.text
        assert "<img src=x" not in intro.text and 'href="https://example.org/p"' in intro.text
        with sessions() as s:
            assert s.scalar(select(func.count()).select_from(Assignment)) == 0  # nothing handed out yet
            some_pair = s.scalar(select(Pair.public_id).limit(1))
        assert _vote(c, token, some_pair, overall="left", sharpness="left").status_code == 404
        before = utcnow()
        assert c.post(f"/a/{token}/consent").status_code == 303
        page = c.get(f"/a/{token}").text
        assert re.search(PAIR_ID_PATTERN, page) and "Which image is sharper?" in page
        assert "Overall, which image do you prefer?" in page and 'id="instructions"' in page
    with sessions() as s:
        consented = s.scalar(select(Annotator.consented_at))
    assert consented is not None and before <= consented <= utcnow()
    for body, why in (("colour: x\n", "unknown key(s) colour"), ("questions:\n  nope: Why?\n", "nope"),
                      ("- a list\n", "expected a mapping"), ("consent: ''\n", "consent must be non-empty")):
        study_file.write_text(body)
        assert main(["create", "--db", db, "--study", "t", "--a", str(a), "--b", str(b), "--layout", "geneval",
                     "--study-file", str(study_file)]) == 2, why


def test_practice_round_with_feedback_comes_between_consent_and_pairs_and_is_never_a_vote(tmp_path: Path,
                                                                                           capsys) -> None:
    """A study file's practice pairs are shown after consent and before any real pair is handed out; each answer
    gets feedback (matched or not, the expected answer, the explanation); the answers are stored apart from the
    votes (not in votes.csv, not in win rates) and the report and admin page show each annotator's practice
    accuracy (here 1 of 2 = 0.500). Bad practice entries stop create with one error line naming the entry."""
    from evals.ab.__main__ import main
    from evals.ab.db import Annotator, Assignment, PracticeAnswer

    a = write_system(tmp_path, SYSTEMS[0], 2, 1)
    b = write_system(tmp_path, SYSTEMS[1], 2, 1, shift=1)
    db = str(tmp_path / "s.sqlite")
    study_file = tmp_path / "study.yaml"
    practice = ("practice:\n"
                f"  - left: {a.name}/00000/samples/00000.png\n    right: {b.name}/00000/samples/00000.png\n"
                "    prompt: a red square\n    answer: left\n"
                f"  - left: {a.name}/00001/samples/00000.png\n    right: {b.name}/00001/samples/00000.png\n"
                "    prompt: a green circle\n    answer: right\n    aspect: sharpness\n"
                "    explanation: The right one is **sharper** at the edges.\n")
    study_file.write_text("consent: |\n  You agree that your answers are stored.\n" + practice)
    assert main(["create", "--db", db, "--study", "s", "--a", str(a), "--b", str(b), "--layout", "geneval",
                 "--aspects", "overall,sharpness", "--votes-per-pair", "1", "--study-file", str(study_file),
                 "--annotators", "1"]) == 0
    admin = re.search(r"admin token \(shown once\): (\S+)", capsys.readouterr().out).group(1)
    sessions = make_sessions(make_engine(db))
    with sessions() as s:
        token = s.scalar(select(Annotator.token))
    with running_app(db) as url, httpx.Client(base_url=url, timeout=30) as c:
        assert 'id="agree"' in c.get(f"/a/{token}").text  # consent comes first
        assert c.post(f"/a/{token}/practice", data={"practice": "1", "choice_overall": "left"}).status_code == 403
        assert c.post(f"/a/{token}/consent").status_code == 303
        dashboard = c.get("/admin/s", headers={"Authorization": f"Bearer {admin}"}).text
        assert "practice (matched / answered)" in dashboard  # the column is there before anyone practised
        first = c.get(f"/a/{token}").text
        assert "Practice 1 of 2" in first and 'name="practice" value="1"' in first
        assert not re.search(PAIR_ID_PATTERN, first) and "a red square" in first
        assert "Overall, which image do you prefer?" in first and "choice_sharpness" not in first
        assert c.get(f"/a/{token}/practice/1/img/left").headers["content-type"] == "image/png"
        assert SYSTEMS[0].encode() not in c.get(f"/a/{token}/practice/1/img/left").content
        answer = c.post(f"/a/{token}/practice", data={"practice": "1", "choice_overall": "left"})
        assert answer.status_code == 303 and answer.headers["location"] == f"/a/{token}/practice/1"
        feedback = c.get(f"/a/{token}/practice/1").text
        assert "That matches." in feedback and 'id="explanation"' not in feedback
        assert re.search(r'id="expected-answer">Left is better<', feedback)
        assert c.post(f"/a/{token}/practice", data={"practice": "1", "choice_overall": "right"}).status_code == 409
        second = c.get(f"/a/{token}/practice/2", follow_redirects=True)  # not answered yet: the page shows it
        assert second.status_code == 200 and "Practice 2 of 2" in second.text and "a green circle" in second.text
        assert c.post(f"/a/{token}/practice", data={"practice": "2", "choice_sharpness": "tie"}).status_code == 303
        feedback = c.get(f"/a/{token}/practice/2").text
        assert "That does not match." in feedback and re.search(r'id="your-answer">About the same<', feedback)
        assert re.search(r'id="expected-answer">Right is better<', feedback)
        assert "<strong>sharper</strong>" in feedback and "the real comparisons start now" in feedback
        assert c.post(f"/a/{token}/practice", data={"practice": "3", "choice_overall": "left"}).status_code == 404
        with sessions() as s:
            assert s.scalar(select(func.count()).select_from(Assignment)) == 0  # no real pair handed out yet
            assert s.scalar(select(func.count()).select_from(Vote)) == 0
            assert sorted(s.execute(select(PracticeAnswer.choice, PracticeAnswer.correct)).all()) == [
                ("left", True), ("tie", False)]
        page = c.get(f"/a/{token}").text
        pair = re.search(PAIR_ID_PATTERN, page).group(1)
        assert "Practice" not in page and "1 of 2" in page
        assert _vote(c, token, pair, overall="right", sharpness="right").status_code == 303
        auth = {"Authorization": f"Bearer {admin}"}
        votes_csv = c.get("/admin/s/votes.csv", headers=auth).text.strip().splitlines()
        assert len(votes_csv) == 3 and all(pair in row for row in votes_csv[1:])  # header + the 2 real answers
        assert "0.500 (1/2)" in c.get("/admin/s", headers=auth).text
        assert "| web-001 | 2 | 1 | 0.500 |" in c.get("/admin/s/report.md", headers=auth).text
    from evals.ab.report import build_report

    rates = build_report(sessions, "s", n_resamples=10, min_seconds=0).win_rates  # a fast test is no speeder
    assert rates.valid_pairs.tolist() == [1, 1, 1, 1]  # per aspect and side: the one real pair only
    # bad practice sections: one error line naming the entry, exit 2
    for entry, why in ((f"  - left: {a.name}/00000/samples/00000.png\n    right: nope.png\n    prompt: p\n"
                        "    answer: left\n", "practice entry 1: right image not found"),
                       (f"  - left: {a.name}/00000/samples/00000.png\n    right: {a.name}/00000/samples/00000.png\n"
                        "    prompt: p\n    answer: up\n", "practice entry 1: answer must be one of left, right, tie"),
                       ("  - {left: a.png, colour: red}\n", "practice entry 1: unknown key(s) colour"),
                       (f"  - left: {a.name}/00000/samples/00000.png\n    right: {a.name}/00000/samples/00000.png\n"
                        "    prompt: p\n    answer: left\n    aspect: colour\n", "aspect 'colour' is not asked"),
                       ("  - left: study.yaml\n    right: study.yaml\n    prompt: p\n    answer: left\n",
                        "practice entry 1: left:")):
        study_file.write_text("practice:\n" + entry)
        assert main(["create", "--db", db, "--study", "t", "--a", str(a), "--b", str(b), "--layout", "geneval",
                     "--aspects", "overall,sharpness", "--study-file", str(study_file)]) == 2, why
        err = capsys.readouterr().err
        assert why in err and err.count("\n") == 1, err


def test_report_page_renders_the_markdown_and_embeds_the_figure(tmp_path: Path) -> None:
    """/admin/<study>/report is an HTML page: every table row of report.md is a row of the page, text (a system
    name with markup) is escaped, and the embedded figure is the PNG that win_rates.png serves; report.md is the
    Markdown. All three need the admin token."""
    import base64
    import io

    from PIL import Image as PILImage

    from evals.ab.assign import next_pair, record_vote
    from evals.ab.report import build_report

    a = write_system(tmp_path, SYSTEMS[0], 3, 1)
    b = write_system(tmp_path, SYSTEMS[1], 3, 1, shift=1)
    db = str(tmp_path / "s.sqlite")
    sessions = make_sessions(make_engine(db))
    made = create_study(sessions, "rep", a, b, "geneval", ["overall"], 1, "<i>alpha</i>", "beta", seed=0)
    (_, token), = add_annotators(sessions, "rep", 1)
    for choice in ("left", "right", "tie"):
        pair, _, _ = next_pair(sessions, token)
        record_vote(sessions, token, pair.public_id, {"overall": choice})
    markdown = build_report(sessions, "rep").markdown
    table_rows = [ln for ln in markdown.splitlines() if ln.startswith("|") and not set(ln) <= set("|-: ")]
    auth = {"Authorization": f"Bearer {made.admin_token}"}
    with running_app(db) as url, httpx.Client(base_url=url, timeout=60) as c:
        for route in ("report", "report.md", "win_rates.png"):
            assert c.get(f"/admin/rep/{route}").status_code == 403
        page = c.get("/admin/rep/report", headers=auth)
        assert c.get("/admin/rep/report.md", headers=auth).text == markdown
        served_png = c.get("/admin/rep/win_rates.png", headers=auth)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.text.count("<tr>") == len(table_rows) > 5
    assert "<i>alpha</i>" not in page.text and "&lt;i&gt;alpha&lt;/i&gt;" in page.text
    assert "<h2>A/B study <code>rep</code></h2>" in page.text
    embedded = base64.b64decode(re.search(r'id="figure" src="data:image/png;base64,([^"]+)"', page.text).group(1))
    assert served_png.headers["content-type"] == "image/png"
    with PILImage.open(io.BytesIO(embedded)) as fig, PILImage.open(io.BytesIO(served_png.content)) as served:
        assert fig.format == "PNG" and fig.size == served.size and fig.size[0] > 500


def test_the_root_page_says_what_the_server_is_and_serve_help_shows_defaults(study, capsys) -> None:
    from evals.ab.__main__ import main

    with running_app(study["db"]) as url, httpx.Client(base_url=url, timeout=30) as c:
        home = c.get("/")
    assert home.status_code == 200 and "blind A/B studies" in home.text
    assert not any(secret in home.text for secret in [*study["tokens"], study["admin"], *study["secrets"]])
    with pytest.raises(SystemExit) as done:
        main(["serve", "--help"])
    assert done.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "(default: 127.0.0.1, this machine only)" in help_text and "(default: 8000)" in help_text
    assert "database URL (required)" in help_text


def test_posts_from_another_site_are_refused(study) -> None:
    """A vote or consent POST whose Origin (or, without one, Referer) is another site gets 403 and stores nothing;
    the server's own origin, and a client that sends neither header (scripts, tests), are accepted; Origin "null"
    is refused; an origin named with --allowed-origin (a proxy that rewrites Host) is accepted."""
    from fastapi.testclient import TestClient

    from evals.ab.web import create_app

    token = study["tokens"][0]
    choices = {"choice_overall": "left", "choice_identity_preservation": "tie"}
    with running_app(study["db"]) as url, httpx.Client(base_url=url, timeout=30) as c:
        pair = re.search(PAIR_ID_PATTERN, c.get(f"/a/{token}").text).group(1)
        refused = [{"Origin": "http://evil.example"}, {"Origin": "null"},
                   {"Origin": url.replace("127.0.0.1", "localhost")},  # same machine, another origin
                   {"Referer": "http://evil.example/page"}, {"Origin": "https://evil.example", "Referer": url + "/"}]
        for headers in refused:
            resp = c.post(f"/a/{token}/vote", data={"pair": pair, **choices}, headers=headers)
            assert resp.status_code == 403 and "another site" in resp.text, headers
            assert c.post(f"/a/{token}/consent", headers=headers).status_code == 403
            assert c.post(f"/admin/{study['name']}/annotators", params={"token": study["admin"]},
                          headers=headers).status_code == 403
        with study["sessions"]() as s:
            assert s.scalar(select(func.count()).select_from(Vote)) == 0
        assert c.post(f"/a/{token}/vote", data={"pair": pair, **choices}, headers={"Origin": url}).status_code == 303
        pair = re.search(PAIR_ID_PATTERN, c.get(f"/a/{token}").text).group(1)
        assert c.post(f"/a/{token}/vote", data={"pair": pair, **choices},
                      headers={"Referer": f"{url}/a/{token}"}).status_code == 303
        pair = re.search(PAIR_ID_PATTERN, c.get(f"/a/{token}").text).group(1)
        assert c.post(f"/a/{token}/vote", data={"pair": pair, **choices}).status_code == 303  # no header at all
    with study["sessions"]() as s:
        assert s.scalar(select(func.count()).select_from(Vote)) == 6
    behind_proxy = TestClient(create_app(study["db"], ["https://ab.my-lab.org"]))
    other = study["tokens"][1]
    pair = re.search(PAIR_ID_PATTERN, behind_proxy.get(f"/a/{other}").text).group(1)
    for origin, status in (("https://evil.example", 403), ("https://ab.my-lab.org", 303)):
        resp = behind_proxy.post(f"/a/{other}/vote", data={"pair": pair, **choices}, headers={"Origin": origin},
                                 follow_redirects=False)
        assert resp.status_code == status, origin


def test_an_upload_to_a_bad_link_is_refused_before_its_body_is_spooled(study, monkeypatch) -> None:
    """A multipart POST (a 3 MB file part) to the vote or practice route of an unknown token gets 403 and no
    temporary file is made for it; the same upload with a valid token is spooled (the probe sees it) and the vote
    is stored, so the probe is watching the right place."""
    import starlette.formparsers

    spooled = []
    real = starlette.formparsers.SpooledTemporaryFile

    def probe(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        spooled.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(starlette.formparsers, "SpooledTemporaryFile", probe)
    upload = {"junk": ("big.bin", b"\0" * 3_000_000, "application/octet-stream")}
    fields = {"pair": "x", "choice_overall": "left", "choice_identity_preservation": "tie"}
    with running_app(study["db"]) as url, httpx.Client(base_url=url, timeout=60) as c:
        for route in ("vote", "practice"):
            resp = c.post(f"/a/not-a-token/{route}", data=fields, files=upload)
            assert spooled == [] and resp.status_code == 403, route
        token = study["tokens"][0]
        fields["pair"] = re.search(PAIR_ID_PATTERN, c.get(f"/a/{token}").text).group(1)
        assert c.post(f"/a/{token}/vote", data=fields, files=upload).status_code == 303
    assert spooled
    with study["sessions"]() as s:
        assert s.scalar(select(func.count()).select_from(Vote)) == 2
