"""Crowd hand-off (Prolific and platforms like it): one entry link for every participant, their platform ids stored
with their annotator, a completion code (or the platform's completion URL) at the end, and a payments table.

The platform opens ``/p/<crowd token>?PROLIFIC_PID=...&STUDY_ID=...&SESSION_ID=...`` (Prolific fills the
``{{%PROLIFIC_PID%}}`` placeholders). The first visit of a PROLIFIC_PID makes a personal annotator (``web-NNN``)
holding the three ids and redirects to its personal link; a later visit with the same PROLIFIC_PID returns to the
same annotator, so a participant who reloads or comes back continues where they were. A personal link ``/a/<token>``
accepts the same query parameters: the ids are stored the first time, and a link opened with another participant's
PROLIFIC_PID is refused. Ids are checked (1 to 64 characters of ``A-Z a-z 0-9 _ -``); anything else is refused
with 400, so nothing unchecked reaches the database, the pages or the payments CSV.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from pathlib import Path

import pandas as pd
from sqlalchemy import func, select
from sqlalchemy.orm import sessionmaker

from common.files import atomic_write_text
from evals.ab.db import Annotator, Assignment, Study
from evals.ab.study import ID_RE, StudyError, get_study, new_web_labels

PLATFORM_PARAMS = {"PROLIFIC_PID": "platform_pid", "STUDY_ID": "platform_study", "SESSION_ID": "platform_session"}
PAYMENT_COLUMNS = ["platform_pid", "platform_study", "platform_session", "annotator", "consented_at", "pairs",
                   "votes", "gold_accuracy", "median_seconds", "flagged", "reason"]


class BadPlatformIds(StudyError):
    """Platform ids in a link that are missing, too long or carry characters outside ``ID_RE`` (HTTP 400)."""


def platform_ids(query: Mapping[str, str], require_pid: bool = False) -> dict[str, str]:
    """{Annotator column: value} of the platform ids in a link's query string (other parameters are ignored)."""
    out = {}
    for param, column in PLATFORM_PARAMS.items():
        value = query.get(param)
        if value is None:
            continue
        if not ID_RE.match(value):
            raise BadPlatformIds(f"{param} must be 1 to 64 letters, digits, '_' or '-'")
        out[column] = value
    if require_pid and "platform_pid" not in out:
        raise BadPlatformIds("this link needs the participant's PROLIFIC_PID")
    return out


def crowd_link(study: Study, base_url: str) -> str | None:
    """The entry link to give the platform (Prolific's placeholders in it), or None for a study without one."""
    if not study.crowd_token:
        return None
    query = "&".join(f"{p}={{{{%{p}%}}}}" for p in PLATFORM_PARAMS)
    return f"{base_url.rstrip('/')}/p/{study.crowd_token}?{query}"


def enter(sessions: sessionmaker, crowd_token: str, query: Mapping[str, str]) -> str:
    """The personal token of the participant named in ``query`` (made on their first visit). Raises
    ``BadPlatformIds`` for missing or malformed ids, ``AnnotatorError`` 403 for an unknown entry link and 410 for a
    closed study."""
    from evals.ab.assign import AnnotatorError

    ids = platform_ids(query, require_pid=True)
    with sessions.begin() as s:
        # the study row is locked while looking up and adding: two first visits of one participant (a double
        # click) make one annotator, not two
        study = s.scalar(select(Study).where(Study.crowd_token == crowd_token).with_for_update())
        if study is None:
            raise AnnotatorError(403, "This link is not valid.")
        if study.closed_at is not None:
            raise AnnotatorError(410, "This study is closed. Thank you for your help.")
        ann = s.scalar(select(Annotator).where(Annotator.study_id == study.id,
                                               Annotator.platform_pid == ids["platform_pid"]))
        if ann is None:
            (label,) = new_web_labels(s, study, 1)
            ann = Annotator(study_id=study.id, label=label, token=secrets.token_urlsafe(16), **ids)
            s.add(ann)
        else:  # a new session of the same participant: keep the latest study / session ids
            for column, value in ids.items():
                setattr(ann, column, value)
        return ann.token


def bind_ids(sessions: sessionmaker, token: str, query: Mapping[str, str]) -> bool:
    """Store the platform ids of a personal link's query string on its annotator the first time; False when the
    link already belongs to another PROLIFIC_PID (the page refuses it). No ids in the query: nothing to do."""
    ids = platform_ids(query)
    if not ids:
        return True
    with sessions.begin() as s:
        ann = s.scalar(select(Annotator).where(Annotator.token == token))
        if ann is None:
            return True  # the page answers 403 for an unknown token
        if ann.platform_pid is not None and ids.get("platform_pid", ann.platform_pid) != ann.platform_pid:
            return False
        for column, value in ids.items():
            setattr(ann, column, value)
        return True


def payments_table(sessions: sessionmaker, study_name: str) -> pd.DataFrame:
    """One row per participant (``PAYMENT_COLUMNS``): every annotator with platform ids or votes, their answered
    pairs and votes, and the report's gold accuracy, median time per pair, flag and reason (one definition:
    ``report.annotator_flags`` with the study's thresholds)."""
    from evals.ab.report import annotator_flags, load_votes
    from evals.ab.vendor import spreadsheet_safe

    with sessions() as s:
        study = get_study(s, study_name)
        aspects, threshold, speed = study.aspect_list, study.gold_threshold, study.speed_limit
        people = s.execute(select(Annotator.id, Annotator.label, Annotator.platform_pid, Annotator.platform_study,
                                  Annotator.platform_session, Annotator.consented_at)
                           .where(Annotator.study_id == study.id).order_by(Annotator.label)).all()
        answered = dict(s.execute(select(Assignment.annotator_id, func.count(Assignment.id))
                                  .join(Annotator, Annotator.id == Assignment.annotator_id)
                                  .where(Annotator.study_id == study.id, Assignment.completed_at.is_not(None))
                                  .group_by(Assignment.annotator_id)).all())
    votes, pairs = load_votes(sessions, study_name)
    flags = annotator_flags(votes, pairs, aspects, threshold, speed).set_index("annotator")
    rows = []
    for ann_id, label, pid, pstudy, psession, consented in people:
        if pid is None and label not in flags.index:
            continue
        f = flags.loc[label] if label in flags.index else None
        rows.append({"platform_pid": pid or "", "platform_study": pstudy or "", "platform_session": psession or "",
                     "annotator": spreadsheet_safe(label),
                     "consented_at": consented.strftime("%Y-%m-%dT%H:%M:%SZ") if consented else "",
                     "pairs": answered.get(ann_id, 0),
                     "votes": 0 if f is None else int(f.votes),
                     "gold_accuracy": None if f is None else f.gold_accuracy,
                     "median_seconds": None if f is None else f.median_seconds,
                     "flagged": False if f is None else bool(f.flagged), "reason": "" if f is None else f.reason})
    return pd.DataFrame(rows, columns=PAYMENT_COLUMNS)


def export_payments(sessions: sessionmaker, study_name: str, out: str | Path) -> tuple[Path, int]:
    """Write ``payments_table`` as a CSV (atomically); returns (path, rows)."""
    table = payments_table(sessions, study_name)
    return atomic_write_text(Path(out), table.to_csv(index=False)), len(table)
