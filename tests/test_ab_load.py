"""Load on loopback: 20 concurrent simulated annotators finish a 64-pair study over HTTP, on SQLite and on a real
PostgreSQL (a throwaway cluster started here). Every pair must end with exactly votes_per_pair votes per aspect
from distinct people, and the database must hold exactly the votes the server acknowledged: none lost, none
duplicated. Each annotator's loop is bounded and ends by itself."""

from __future__ import annotations

import os
import random
import re
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from ab_helpers import PAIR_ID_PATTERN, SYSTEMS, postgres_bin, require, running_app, write_system
from sqlalchemy import func, select

from evals.ab.db import Annotator, Pair, Vote, make_engine, make_sessions
from evals.ab.study import add_annotators, create_study

N_ANNOTATORS, N_PROMPTS, N_SEEDS, VOTES_PER_PAIR = 20, 32, 2, 3
ASPECTS = ["overall", "prompt_adherence"]


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """A PostgreSQL cluster in a temporary folder on 127.0.0.1 (as the ``postgres`` user when run as root)."""
    initdb = require(postgres_bin("initdb"), "PostgreSQL (initdb)", "apt-get install -y postgresql")
    pg_ctl = require(postgres_bin("pg_ctl"), "PostgreSQL (pg_ctl)", "apt-get install -y postgresql")
    root = Path(tempfile.mkdtemp(prefix="ab-pg-"))
    root.chmod(0o755)
    as_user: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root
        shutil.chown(root, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = root / "data"
    subprocess.run([*as_user, initdb, "-D", str(data), "-U", "ab", "-A", "trust", "--no-sync"], check=True,
                   capture_output=True, timeout=120)
    opts = f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off -c max_connections=100"
    subprocess.run([*as_user, pg_ctl, "-D", str(data), "-l", str(root / "log"), "-o", opts, "-w", "-t", "60",
                    "start"], check=True, capture_output=True, timeout=120)
    try:
        yield f"postgresql://ab@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True,
                       timeout=60)
        shutil.rmtree(root, ignore_errors=True)


def annotator(base: str, token: str, seed: int, acknowledged: list, errors: list) -> None:
    """Answer pairs until the done page (at most 200 rounds); record every vote the server acknowledged."""
    rng = random.Random(seed)
    with httpx.Client(base_url=base, timeout=120) as c:
        for _ in range(200):
            page = c.get(f"/a/{token}")
            if page.status_code != 200:
                errors.append(("page", page.status_code, page.text[:200]))
                return
            match = re.search(PAIR_ID_PATTERN, page.text)
            if match is None:
                if "Thank you" not in page.text:
                    errors.append(("no pair and not done", page.text[:200]))
                return
            choices = {a: rng.choice(["left", "right", "tie"]) for a in ASPECTS}
            resp = c.post(f"/a/{token}/vote", data={"pair": match.group(1),
                                                    **{f"choice_{a}": v for a, v in choices.items()}})
            if resp.status_code != 303:
                errors.append(("vote", resp.status_code, resp.text[:200]))
                return
            acknowledged += [(token, match.group(1), a, v) for a, v in choices.items()]
        errors.append(("did not finish within 200 rounds", token))


def run_study(db: str, tmp_path: Path) -> None:
    a = write_system(tmp_path, SYSTEMS[0], N_PROMPTS, N_SEEDS)
    b = write_system(tmp_path, SYSTEMS[1], N_PROMPTS, N_SEEDS, shift=1)
    engine = make_engine(db)
    sessions = make_sessions(engine)
    create_study(sessions, "load", a, b, "geneval", ASPECTS, VOTES_PER_PAIR, "alpha", "beta", seed=0)
    tokens = [t for _, t in add_annotators(sessions, "load", N_ANNOTATORS)]
    acknowledged: list[tuple[str, str, str, str]] = []
    errors: list = []
    with running_app(db) as base:
        threads = [threading.Thread(target=annotator, args=(base, t, k, acknowledged, errors))
                   for k, t in enumerate(tokens)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert not any(t.is_alive() for t in threads), "an annotator hung"
    assert errors == []
    with sessions() as s:
        stored = s.execute(select(Annotator.token, Pair.public_id, Vote.aspect, Vote.choice)
                           .join(Annotator, Annotator.id == Vote.annotator_id)
                           .join(Pair, Pair.id == Vote.pair_id)).all()
        per_pair = s.execute(select(Vote.pair_id, Vote.aspect, func.count(), func.count(func.distinct(
            Vote.annotator_id))).group_by(Vote.pair_id, Vote.aspect)).all()
        n_pairs = s.scalar(select(func.count()).select_from(Pair))
    engine.dispose()
    assert n_pairs == N_PROMPTS * N_SEEDS >= 60
    assert sorted(stored) == sorted(acknowledged)  # nothing lost, nothing extra
    assert len(per_pair) == n_pairs * len(ASPECTS)
    assert {(n, people) for _, _, n, people in per_pair} == {(VOTES_PER_PAIR, VOTES_PER_PAIR)}
    assert len({tok for tok, *_ in acknowledged}) > 1  # the work was shared


def test_load_sqlite(tmp_path: Path) -> None:
    run_study(str(tmp_path / "load.sqlite"), tmp_path)


def test_load_postgresql(postgres_url: str, tmp_path: Path) -> None:
    run_study(postgres_url, tmp_path)


def concurrent_loads_of_one_link(db: str, tmp_path: Path) -> int:
    """30 simultaneous page loads with one annotator's link (cap 2 pairs): how many pairs they were given."""
    from concurrent.futures import ThreadPoolExecutor

    from evals.ab.assign import next_pair
    from evals.ab.db import Assignment

    a = write_system(tmp_path, SYSTEMS[0], 8, 2)
    b = write_system(tmp_path, SYSTEMS[1], 8, 2, shift=1)
    engine = make_engine(db)
    sessions = make_sessions(engine)
    create_study(sessions, "cap", a, b, "geneval", ["overall"], 1, "alpha", "beta", per_annotator=2, seed=0)
    (token,) = [t for _, t in add_annotators(sessions, "cap", 1)]
    barrier = threading.Barrier(30)

    def load(_: int) -> None:
        barrier.wait(timeout=60)
        next_pair(sessions, token)

    with ThreadPoolExecutor(30) as pool:
        list(pool.map(load, range(30)))
    with sessions() as s:
        given = s.scalar(select(func.count()).select_from(Assignment).join(
            Annotator, Annotator.id == Assignment.annotator_id).where(Annotator.token == token))
    engine.dispose()
    return given


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_one_links_concurrent_page_loads_get_one_pair(backend: str, tmp_path: Path, request) -> None:
    """A person who opens their link in many tabs at once holds one open pair, never more than --per-annotator."""
    db = str(tmp_path / "cap.sqlite") if backend == "sqlite" else request.getfixturevalue("postgres_url")
    assert concurrent_loads_of_one_link(db, tmp_path) == 1


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_crowd_entry_cant_tell_and_new_columns_on_both_backends(backend: str, tmp_path: Path, request) -> None:
    """20 simultaneous first visits of one Prolific participant make one annotator; a "can't tell" answer and a
    changed answer are stored; the columns added for timing, crowd and study files come back when an older
    database (columns dropped) is opened."""
    from concurrent.futures import ThreadPoolExecutor

    from sqlalchemy import inspect, text

    from evals.ab.assign import next_pair, record_vote
    from evals.ab.crowd import enter
    from evals.ab.db import stores_cant_tell

    db = str(tmp_path / "crowd.sqlite") if backend == "sqlite" else request.getfixturevalue("postgres_url")
    a = write_system(tmp_path, SYSTEMS[0], 2, 1)
    b = write_system(tmp_path, SYSTEMS[1], 2, 1, shift=1)
    engine = make_engine(db)
    sessions = make_sessions(engine)
    assert stores_cant_tell(engine)
    made = create_study(sessions, "crowdrace", a, b, "geneval", ["overall"], 1, "alpha", "beta", seed=0,
                        cant_tell=True, crowd=True)
    barrier = threading.Barrier(20)
    ids = {"PROLIFIC_PID": "pid0001", "STUDY_ID": "st", "SESSION_ID": "se"}

    def visit(_: int) -> str:
        barrier.wait(timeout=60)
        return enter(sessions, made.crowd_token, ids)

    with ThreadPoolExecutor(20) as pool:
        tokens = set(pool.map(visit, range(20)))
    assert len(tokens) == 1
    (token,) = tokens
    first, _, _ = next_pair(sessions, token)
    record_vote(sessions, token, first.public_id, {"overall": "cant_tell"})
    record_vote(sessions, token, first.public_id, {"overall": "left"}, replace=True)
    with sessions() as s:
        study_id = s.scalar(select(Pair.study_id).where(Pair.public_id == first.public_id))
        assert s.scalar(select(func.count()).select_from(Annotator).where(Annotator.study_id == study_id)) == 1
        assert s.execute(select(Vote.choice, Vote.changed_at.is_not(None)).where(Vote.pair_id == first.id)).all() \
            == [("left", True)]
    new = {"ab_study": ["min_seconds", "cant_tell", "crowd_token", "completion_code", "completion_url",
                        "instructions", "consent", "questions"],
           "ab_vote": ["seconds", "changed_at"],
           "ab_annotator": ["platform_pid", "platform_study", "platform_session", "consented_at"]}
    with engine.begin() as conn:
        for table, columns in new.items():
            for column in columns:
                conn.execute(text(f'ALTER TABLE {table} DROP COLUMN "{column}"'))
    engine.dispose()
    engine = make_engine(db)
    for table, columns in new.items():
        assert set(columns) <= {c["name"] for c in inspect(engine).get_columns(table)}, table
    engine.dispose()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_concurrent_admin_link_requests_all_succeed_with_distinct_labels(backend: str, tmp_path: Path,
                                                                          request) -> None:
    """10 simultaneous POSTs to the admin "new links" route (2 links each) all answer 200, and the 20 links carry
    the labels web-001 .. web-020, each once, each a working link."""
    from concurrent.futures import ThreadPoolExecutor

    db = str(tmp_path / "links.sqlite") if backend == "sqlite" else request.getfixturevalue("postgres_url")
    a = write_system(tmp_path, SYSTEMS[0], 2, 1)
    b = write_system(tmp_path, SYSTEMS[1], 2, 1, shift=1)
    engine = make_engine(db)
    sessions = make_sessions(engine)
    made = create_study(sessions, f"links_{backend}", a, b, "geneval", ["overall"], 1, "alpha", "beta", seed=0)
    barrier = threading.Barrier(10)
    with running_app(db) as base:
        def post(_: int) -> httpx.Response:
            with httpx.Client(base_url=base, timeout=120) as c:
                barrier.wait(timeout=60)
                return c.post(f"/admin/{made.study}/annotators", params={"n": 2},
                              headers={"Authorization": f"Bearer {made.admin_token}"})

        with ThreadPoolExecutor(10) as pool:
            answers = list(pool.map(post, range(10)))
        assert [r.status_code for r in answers] == [200] * 10, [r.text[:200] for r in answers]
        links = [link for r in answers for link in r.json()["links"]]
        assert sorted(link["label"] for link in links) == [f"web-{k:03d}" for k in range(1, 21)]
        with httpx.Client(timeout=60) as c:
            assert all(c.get(link["url"]).status_code == 200 for link in links[:3])
    from evals.ab.db import Study

    with sessions() as s:
        labels = s.scalars(select(Annotator.label).join(Study, Study.id == Annotator.study_id)
                           .where(Study.name == made.study)).all()
    engine.dispose()
    assert sorted(labels) == [f"web-{k:03d}" for k in range(1, 21)]  # stored once each, nothing extra
