"""Creating studies, assigning pairs, and the vendor CSV path (export, all-or-nothing import)."""

from __future__ import annotations

import csv
from datetime import timedelta
from pathlib import Path

import pytest
from ab_helpers import SYSTEMS, write_system
from PIL import Image
from sqlalchemy import func, select, update

from evals.ab.__main__ import main
from evals.ab.assign import AnnotatorError, next_pair, record_vote
from evals.ab.db import Assignment, Pair, Vote, make_engine, make_sessions, utcnow
from evals.ab.study import add_annotators, create_study


def _study(tmp_path: Path, n_prompts: int = 3, n_seeds: int = 2, **kw):
    a = write_system(tmp_path, SYSTEMS[0], n_prompts, n_seeds)
    b = write_system(tmp_path, SYSTEMS[1], n_prompts, n_seeds, shift=1)
    db = str(tmp_path / "s.sqlite")
    sessions = make_sessions(make_engine(db))
    create_study(sessions, "s", a, b, "geneval", ["overall", "visual_quality"], name_a="alpha", name_b="beta",
                 **{"seed": 0, **kw})
    return db, sessions, a, b


def test_pairs_sides_and_validation(tmp_path: Path) -> None:
    db, sessions, a, b = _study(tmp_path, n_prompts=5, n_seeds=2)
    with sessions() as s:
        pairs = s.scalars(select(Pair).order_by(Pair.item_key)).all()
        assert [p.item_key for p in pairs] == [f"{i:05d}/{k:05d}" for i in range(5) for k in range(2)]
        assert sum(p.a_on_left for p in pairs) == 5  # sides balanced exactly
        for p in pairs:  # A's image is on the stored side
            a_img = p.left_image if p.a_on_left else p.right_image
            assert Path(a_img.path).is_relative_to(a) and p.prompt == f"prompt number {p.prompt_key.lstrip('0') or 0}"
        assert len({p.public_id for p in pairs}) == 10 and not any("0000" in p.public_id for p in pairs)
    # the same comparison twice, or a study created differently, is refused
    with pytest.raises(ValueError, match="already compares"):
        create_study(sessions, "s", a, b, "geneval", ["overall", "visual_quality"], name_a="alpha", name_b="beta")
    with pytest.raises(ValueError, match="same"):
        create_study(sessions, "s", a, b, "geneval", ["overall"], name_a="x", name_b="y")
    # folders that do not cover the same prompts and seeds
    (b / "00004" / "samples" / "00001.png").unlink()
    with pytest.raises(ValueError, match="1 only in alpha"):
        create_study(sessions, "t", a, b, "geneval", ["overall"], name_a="alpha", name_b="beta")
    # CLI: a bad folder is one error line and exit 2
    assert main(["create", "--db", db, "--study", "u", "--a", str(a), "--b", str(tmp_path / "nope"),
                 "--layout", "geneval"]) == 2


def test_assignment_leases_and_no_repeats(tmp_path: Path) -> None:
    """One vote per pair, two pairs X and Y: a pair someone holds is not handed out again until its lease runs
    out; then its slot goes to the next person, the first holder's late vote is refused, and they never get X
    again."""
    _, sessions, _, _ = _study(tmp_path, n_prompts=2, n_seeds=1, votes_per_pair=1)
    t0, t1 = (t for _, t in add_annotators(sessions, "s", 2))
    x, _, progress = next_pair(sessions, t0)
    assert (progress.done, progress.total) == (0, 2)
    assert next_pair(sessions, t0)[0].id == x.id  # an open pair is shown until answered
    y, _, _ = next_pair(sessions, t1)
    assert y.id != x.id  # X's only slot is held by t0
    record_vote(sessions, t1, y.public_id, {"overall": "left", "visual_quality": "tie"})
    assert next_pair(sessions, t1)[0] is None
    with sessions.begin() as s:  # t0's lease runs out
        s.execute(update(Assignment).where(Assignment.completed_at.is_(None))
                  .values(expires_at=utcnow() - timedelta(seconds=1)))
    again, _, progress = next_pair(sessions, t1)
    assert again.id == x.id and (progress.done, progress.total) == (1, 2)
    with pytest.raises(AnnotatorError, match="given to someone else") as err:
        record_vote(sessions, t0, x.public_id, {"overall": "left", "visual_quality": "left"})
    assert err.value.status == 409
    assert next_pair(sessions, t0)[0] is None  # X stays on t0's record; Y is full
    record_vote(sessions, t1, x.public_id, {"overall": "right", "visual_quality": "right"})
    with sessions() as s:
        votes = s.execute(select(Vote.pair_id, Vote.annotator_id, Vote.aspect)).all()
        assert len(votes) == 4 and {p for p, _, _ in votes} == {x.id, y.id}
        assert s.scalar(select(func.count()).select_from(Assignment)) == 3  # t0-X (released), t1-Y, t1-X


def test_export_and_all_or_nothing_import(tmp_path: Path, capsys) -> None:
    db, sessions, a, b = _study(tmp_path, gold_rate=0.2)
    out = tmp_path / "vendor" / "pairs.csv"
    assert main(["export-pairs", "--db", db, "--study", "s", "--out", str(out)]) == 0
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["pair_id", "prompt", "left", "right"]
    assert len(rows) == 6 + 2  # 3 prompts x 2 seeds + ceil(0.2 * 6) gold pairs, unmarked
    text = out.read_text()
    for secret in (*SYSTEMS, "samples", "alpha", "beta"):
        assert secret not in text
    for r in rows:  # blinded copies: pixels only, no text chunk naming the system
        for side in ("left", "right"):
            with Image.open(r[side]) as img:
                assert not img.info and img.size == (64, 64)
    ids = [r["pair_id"] for r in rows]
    good = tmp_path / "good.csv"
    good.write_text("annotator,pair_id,aspect,choice,seconds\n"
                    f"v1,{ids[0]},overall,left,3\nv1,{ids[0]},visual_quality,TIE,4\nv2,{ids[1]},overall,right,2\n")
    bad = tmp_path / "bad.csv"
    bad.write_text("annotator,pair_id,aspect,choice\n"
                   f"v3,{ids[2]},overall,left\n"  # fine
                   f"v3,NOPE,overall,left\n"  # line 3: unknown pair
                   f"v3,{ids[2]},color,left\n"  # line 4: unknown aspect
                   f"v3,{ids[3]},overall,both\n"  # line 5: unknown choice
                   f"v3,{ids[2]},overall,right\n"  # line 6: repeats line 2
                   f"v1,{ids[0]},overall,left\n"  # line 7: already in the database (after the good import)
                   f",{ids[4]},overall,left\n")  # line 8: no annotator
    assert main(["import-votes", "--db", db, "--study", "s", "--csv", str(good)]) == 0
    with sessions() as s:
        before = s.scalar(select(func.count()).select_from(Vote))
    assert before == 3
    capsys.readouterr()
    assert main(["import-votes", "--db", db, "--study", "s", "--csv", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "6 bad row(s) of 7, nothing imported" in err
    for line, why in ((3, "unknown pair_id 'NOPE'"), (4, "unknown aspect 'color'"), (5, "unknown choice 'both'"),
                      (6, "repeats the vote of line 2"), (8, "empty annotator"),
                      (7, "this annotator's vote on this pair and aspect is already in the database")):
        assert f"line {line}: {why}" in err
    assert "line 2:" not in err
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(Vote)) == before  # line 2 was not imported either
    missing = tmp_path / "cols.csv"
    missing.write_text("who,pair_id,aspect,choice\nv1,x,overall,left\n")
    assert main(["import-votes", "--db", db, "--study", "s", "--csv", str(missing)]) == 2
    assert "missing column(s) annotator" in capsys.readouterr().err
    assert main(["report", "--db", db, "--study", "nope", "--out", str(tmp_path / "r")]) == 2
    assert "no study named 'nope'" in capsys.readouterr().err


def test_genai_and_dpg_layouts(tmp_path: Path) -> None:
    """Image-only layouts take their prompts from a prompts file; DPG's per-seed form pairs item x seed."""
    from evals.ab.layouts import LayoutError, read_folder

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"item_id": "0", "prompt": "zero"}\n{"item_id": "7", "prompt": "seven"}\n')
    genai = tmp_path / "genai"
    genai.mkdir()
    for stem in ("00000", "00007"):
        Image.new("RGB", (8, 8)).save(genai / f"{stem}.png")
    items = read_folder(genai, "genai", prompts)
    assert {k: (i.prompt_key, i.prompt) for k, i in items.items()} == {"00000": ("00000", "zero"),
                                                                       "00007": ("00007", "seven")}
    dpg = tmp_path / "dpg"
    (dpg / "7").mkdir(parents=True)
    for k in range(2):
        Image.new("RGB", (8, 8)).save(dpg / "7" / f"{k}.png")
    Image.new("RGB", (8, 8)).save(dpg / "0.png")
    items = read_folder(dpg, "dpg", prompts)
    assert sorted((k, i.prompt) for k, i in items.items()) == [("0", "zero"), ("7/0", "seven"), ("7/1", "seven")]
    Image.new("RGB", (8, 8)).save(genai / "00003.png")
    with pytest.raises(LayoutError, match="no prompt with id '00003'"):
        read_folder(genai, "genai", prompts)


def test_demo_regenerates_committed_outputs(tmp_path: Path) -> None:
    """`python -m evals.ab demo` reproduces the committed tables of results/ab_demo, labelled as simulated."""
    from ab_helpers import ROOT

    assert main(["demo", "--out", str(tmp_path)]) == 0
    for name in ("win_rates.csv", "win_rates_all_annotators.csv", "annotators.csv", "agreement.csv", "report.md",
                 "README.md"):
        assert (tmp_path / name).read_text() == (ROOT / "results" / "ab_demo" / name).read_text(), name
    assert "SIMULATED annotators" in (tmp_path / "report.md").read_text()
    flagged = [r["annotator"] for r in csv.DictReader(open(tmp_path / "annotators.csv")) if r["flagged"] == "True"]
    assert flagged == ["web-007", "web-008"]  # exactly the two careless simulated annotators


def test_more_systems_in_one_study(tmp_path: Path) -> None:
    """A second `create` with the same study name adds a comparison; the report then ranks three systems."""
    db, sessions, a, _ = _study(tmp_path, n_prompts=2, n_seeds=1)
    c = write_system(tmp_path, "SYSGAMMA", 2, 1, shift=2)
    create_study(sessions, "s", a, c, "geneval", ["overall", "visual_quality"], name_a="alpha", name_b="gamma")
    from evals.ab.report import load_votes

    _, pairs = load_votes(sessions, "s")
    assert sorted(set(zip(pairs.system_a, pairs.system_b, strict=True))) == [("alpha", "beta"), ("alpha", "gamma")]
    out = tmp_path / "rep"
    assert main(["report", "--db", db, "--study", "s", "--out", str(out)]) == 0
    with open(out / "win_rates.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[-1] == "opponent" and len(rows) == 2 * 2 * 2  # comparisons x aspects x sides
    assert (out / "bradley_terry.csv").read_text().count("\n") == 1 + 2 * 3


@pytest.mark.parametrize("damage", ["empty", "truncated", "not_an_image"])
def test_create_refuses_an_image_that_does_not_decode_and_names_it(tmp_path: Path, damage: str) -> None:
    """A broken file would be served as an error while the votes on its pair count against its system."""
    a = write_system(tmp_path, SYSTEMS[0], 3, 2)
    b = write_system(tmp_path, SYSTEMS[1], 3, 2, shift=1)
    bad = b / "00001" / "samples" / "00000.png"
    data = bad.read_bytes()
    bad.write_bytes({"empty": b"", "truncated": data[: len(data) // 2], "not_an_image": b"hello " * 50}[damage])
    sessions = make_sessions(make_engine(str(tmp_path / "s.sqlite")))
    with pytest.raises(ValueError, match=r"1 image\(s\) cannot be decoded, e\.g\. .*00001/samples/00000\.png"):
        create_study(sessions, "s", a, b, "geneval", ["overall"], name_a="alpha", name_b="beta", seed=0)
    with sessions() as s:  # nothing of the refused study was stored
        assert s.scalar(select(func.count()).select_from(Pair)) == 0


def test_gold_pairs_have_balanced_sides(tmp_path: Path) -> None:
    """An annotator who always answers "right" passes exactly half the gold checks, whatever the seed."""
    for seed in range(4):
        (tmp_path / str(seed)).mkdir()
        _, sessions, *_ = _study(tmp_path / str(seed), n_prompts=10, n_seeds=2, gold_rate=0.5, seed=seed)
        with sessions() as s:
            answers = s.scalars(select(Pair.gold_answer).where(Pair.gold_answer.is_not(None))).all()
        assert len(answers) == 10 and answers.count("right") == 5, (seed, answers)


def test_database_errors_do_not_print_tokens(tmp_path: Path) -> None:
    """A failing statement's message names no bound value: annotator tokens never reach the server log."""
    from sqlalchemy import text
    from sqlalchemy.exc import SQLAlchemyError

    engine = make_engine(str(tmp_path / "s.sqlite"))
    with pytest.raises(SQLAlchemyError) as err, engine.begin() as conn:
        conn.execute(text("INSERT INTO no_such_table (token) VALUES (:t)"), {"t": "tok-SECRET-123"})
    assert "no_such_table" in str(err.value) and "tok-SECRET-123" not in str(err.value)


def test_vendor_and_web_identities_stay_apart(tmp_path: Path, capsys) -> None:
    """An imported vendor label cannot take a web link's identity (web-001 would then have votes it never cast
    and loop on 409s), labels have one length limit on every backend, and new web links number after the highest
    web label in use, not after their count."""
    from evals.ab.db import LABEL_MAX, Annotator

    db, sessions, *_ = _study(tmp_path)
    (web,) = add_annotators(sessions, "s", 1)
    assert web[0] == "web-001"
    with sessions() as s:
        ids = s.scalars(select(Pair.public_id)).all()
    votes = tmp_path / "v.csv"
    votes.write_text("annotator,pair_id,aspect,choice\n"
                     f"web-001,{ids[0]},overall,left\nweb-006,{ids[1]},overall,left\n"
                     f"{'x' * (LABEL_MAX + 1)},{ids[2]},overall,left\n")
    assert main(["import-votes", "--db", db, "--study", "s", "--csv", str(votes)]) == 2
    err = capsys.readouterr().err
    assert "line 2: annotator 'web-001': labels starting with 'web-' belong to web links" in err
    assert "line 3: annotator 'web-006'" in err and f"line 4: annotator label longer than {LABEL_MAX}" in err
    with sessions.begin() as s:  # a web-numbered label already there (e.g. a link revoked and relabelled)
        study_id = s.scalar(select(Annotator.study_id))
        s.add(Annotator(study_id=study_id, label="web-006", token="t-006"))
    assert [label for label, _ in add_annotators(sessions, "s", 2)] == ["web-007", "web-008"]


def test_create_refuses_leases_and_caps_that_cannot_work(tmp_path: Path) -> None:
    for kw, match in (({"lease_s": 0}, "--lease-minutes must be positive"),
                      ({"lease_s": -60}, "--lease-minutes must be positive"),
                      ({"per_annotator": 0}, "--per-annotator must be >= 1")):
        (tmp_path / str(match[:6]) / str(kw)).mkdir(parents=True)
        with pytest.raises(ValueError, match=match):
            _study(tmp_path / str(match[:6]) / str(kw), **kw)


def test_exported_prompts_cannot_run_as_spreadsheet_formulas() -> None:
    from evals.ab.vendor import spreadsheet_safe

    assert spreadsheet_safe('=HYPERLINK("http://x","click")') == '\'=HYPERLINK("http://x","click")'
    assert [spreadsheet_safe(t) for t in ("+1", "-2", "@SUM(A1)", "a red circle")] == \
        ["'+1", "'-2", "'@SUM(A1)", "a red circle"]


def test_a_closed_study_gives_no_pairs_and_takes_no_votes(tmp_path: Path, capsys) -> None:
    db, sessions, *_ = _study(tmp_path)
    (_, token), = add_annotators(sessions, "s", 1)
    pair, _, _ = next_pair(sessions, token)
    assert main(["close", "--db", db, "--study", "s"]) == 0 and "closed" in capsys.readouterr().out
    for attempt in (lambda: next_pair(sessions, token),
                    lambda: record_vote(sessions, token, pair.public_id, {"overall": "left", "visual_quality": "tie"})):
        with pytest.raises(AnnotatorError) as err:
            attempt()
        assert err.value.status == 410
    assert main(["close", "--db", db, "--study", "s"]) == 0 and "already closed" in capsys.readouterr().out
    assert main(["report", "--db", db, "--study", "s", "--out", str(tmp_path / "r")]) == 0  # still reportable


def test_a_database_from_before_a_column_existed_gets_it_added(tmp_path: Path) -> None:
    """Nullable columns added to the tables later (image pins, study closing) are added to an older database
    when it is opened, instead of every query failing on a missing column."""
    from sqlalchemy import inspect, text

    db, sessions, *_ = _study(tmp_path)
    engine = make_engine(db)
    with engine.begin() as conn:  # what a database made before these columns looks like
        conn.execute(text("ALTER TABLE ab_study DROP COLUMN closed_at"))
        conn.execute(text("ALTER TABLE ab_image DROP COLUMN sha256"))
        conn.execute(text("ALTER TABLE ab_study DROP COLUMN min_seconds"))
        conn.execute(text("ALTER TABLE ab_vote DROP COLUMN seconds"))
        for table, column in (("ab_study", "cant_tell"), ("ab_study", "crowd_token"), ("ab_study", "completion_code"),
                              ("ab_study", "completion_url"), ("ab_vote", "changed_at"),
                              ("ab_annotator", "platform_pid"), ("ab_annotator", "platform_session")):
            conn.execute(text(f"ALTER TABLE {table} DROP COLUMN {column}"))
    engine.dispose()
    engine = make_engine(db)
    assert {"closed_at", "min_seconds"} <= {c["name"] for c in inspect(engine).get_columns("ab_study")}
    assert {"sha256"} <= {c["name"] for c in inspect(engine).get_columns("ab_image")}
    assert {"seconds", "changed_at"} <= {c["name"] for c in inspect(engine).get_columns("ab_vote")}
    assert {"cant_tell", "crowd_token", "completion_code", "completion_url"} <= {
        c["name"] for c in inspect(engine).get_columns("ab_study")}
    assert {"platform_pid", "platform_session"} <= {c["name"] for c in inspect(engine).get_columns("ab_annotator")}
    (_, token), = add_annotators(make_sessions(engine), "s", 1)
    pair = next_pair(make_sessions(engine), token)[0]
    assert pair is not None
    record_vote(make_sessions(engine), token, pair.public_id, {"overall": "left", "visual_quality": "tie"})
    with make_sessions(engine)() as s:  # an older study takes the default minimum; new votes are timed
        from evals.ab.db import DEFAULT_MIN_SECONDS, Study

        assert s.scalar(select(Study)).speed_limit == DEFAULT_MIN_SECONDS
        assert all(t is not None and t >= 0 for t in s.scalars(select(Vote.seconds)))


def test_imported_cant_tell_needs_a_study_that_offers_it(tmp_path: Path, capsys) -> None:
    (tmp_path / "plain").mkdir()
    (tmp_path / "ct").mkdir()
    db, sessions, *_ = _study(tmp_path / "plain")
    db_ct, sessions_ct, *_ = _study(tmp_path / "ct", cant_tell=True)
    for path, sess in ((db, sessions), (db_ct, sessions_ct)):
        with sess() as s:
            pid = s.scalar(select(Pair.public_id).limit(1))
        votes = tmp_path / "v.csv"
        votes.write_text(f"annotator,pair_id,aspect,choice\nv1,{pid},overall,cant_tell\n")
        assert main(["import-votes", "--db", path, "--study", "s", "--csv", str(votes)]) == (0 if sess is
                                                                                             sessions_ct else 2)
    assert "unknown choice 'cant_tell' (left, right, tie)" in capsys.readouterr().err
    with sessions_ct() as s:
        assert s.scalars(select(Vote.choice)).all() == ["cant_tell"]


def test_a_vendor_csv_not_in_utf8_or_with_a_huge_field_is_one_error_line(tmp_path: Path, capsys) -> None:
    """A votes file in Windows-1252 (an "é" in line 3, the 2nd data row) and one whose 4th line (3rd data row)
    holds a field past the CSV reader's 131,072-character limit each stop import-votes with one error line that
    names the file, line and row (exit 2, no traceback); nothing is imported."""
    db, sessions, _, _ = _study(tmp_path)
    with sessions() as s:
        ids = s.scalars(select(Pair.public_id).order_by(Pair.id)).all()
    latin = tmp_path / "latin1.csv"
    latin.write_bytes("annotator,pair_id,aspect,choice\n"
                      f"v1,{ids[0]},overall,left\nRen\u00e9,{ids[1]},overall,left\n".encode("cp1252"))
    huge = tmp_path / "huge.csv"
    huge.write_text("annotator,pair_id,aspect,choice\n"
                    f"v1,{ids[0]},overall,left\nv1,{ids[1]},overall,left\n"
                    f'v1,"{"x" * 140_000}",overall,left\nv1,{ids[2]},overall,left\n')
    capsys.readouterr()
    for path, where in ((latin, "line 3, data row 2: byte 0xe9 is not UTF-8"),
                        (huge, "line 4, data row 3: a field is longer than 131072 characters")):
        assert main(["import-votes", "--db", db, "--study", "s", "--csv", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {path}: {where}") and err.count("\n") == 1, err
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(Vote)) == 0
