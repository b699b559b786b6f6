"""Who sees which pair, and recording votes: the transactions behind the annotator pages.

Assignment rules:
- a real pair goes to ``votes_per_pair`` distinct annotators: each takes one numbered slot (unique per pair in the
  database, so two annotators racing for the last slot cannot both get it; the loser moves to another pair);
- an annotator never gets the same pair twice (unique pair x annotator; a pair someone let expire stays theirs
  in the record, so it is not offered to them again);
- pairs that already have votes are offered first (a study accumulates valid pairs early); among equals each
  annotator gets their own order, so concurrent annotators rarely race for the same slot;
- an unanswered pair's slot is released ``lease_s`` seconds after it was handed out, for someone else to take;
- gold pairs are mixed in at the study's gold rate: item k (0-based) of a person is gold when
  ``floor((k + 1) * rate) > floor(k * rate)``, while unseen gold pairs remain. They fill no slot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import and_, exists, func, select, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, aliased, sessionmaker

from evals.ab.db import Annotator, Assignment, Pair, PracticeAnswer, PracticeItem, Study, Vote, utcnow

MAX_TRIES = 20  # transactions retried after a lost race (PostgreSQL) before giving up with an error


class _LostRace(Exception):
    """Another annotator changed what this transaction read; it starts over."""


class AnnotatorError(Exception):
    """A request an annotator page must refuse: ``status`` is the HTTP status, ``message`` says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class ConsentRequired(AnnotatorError):
    """The study has a consent step this annotator has not agreed to yet (the page shows it instead of a pair)."""

    def __init__(self, study: Study) -> None:
        super().__init__(403, "Please read the study information and agree before you start.")
        # plain strings: the study row is gone with the transaction this is raised in
        self.consent, self.instructions = study.consent, study.instructions


def give_consent(sessions: sessionmaker, token: str | None) -> None:
    """Record (once, with the server's time) that this annotator clicked "I agree"."""
    with sessions.begin() as s:
        ann, study = annotator_for(s, token, lock=True)
        if study.consent and ann.consented_at is None:
            ann.consented_at = utcnow()


@dataclass(frozen=True)
class Progress:
    """``done`` items answered of ``total`` (done + the open one + what is left for this person now)."""

    done: int
    total: int


def annotator_for(s: Session, token: str | None, lock: bool = False) -> tuple[Annotator, Study]:
    """The annotator with this token and their study; 403 for a missing or unknown token. ``lock``: hold the
    annotator's row until the transaction ends (PostgreSQL ``SELECT ... FOR UPDATE``; SQLite's ``BEGIN IMMEDIATE``
    already serialises writers), so one person's concurrent page loads take turns."""
    query = select(Annotator).where(Annotator.token == token)
    ann = s.scalar(query.with_for_update() if lock else query) if token else None
    if ann is None:
        raise AnnotatorError(403, "This link is not valid. Please use the personal link you were given.")
    study = s.get(Study, ann.study_id)
    if study.closed_at is not None:
        raise AnnotatorError(410, "This study is closed. Thank you for your help.")
    return ann, study


def check_token(sessions: sessionmaker, token: str | None) -> None:
    """Refuse (403 unknown token, 410 closed study) before anything else is done for a request: a POST's body is
    not read, let alone spooled to disk, for a link that is not valid."""
    with sessions() as s:
        annotator_for(s, token)


def _open(s: Session, ann_id: int) -> Assignment | None:
    return s.scalar(select(Assignment).where(
        Assignment.annotator_id == ann_id, Assignment.completed_at.is_(None), Assignment.released_at.is_(None),
    ).order_by(Assignment.id).limit(1))


def _live_slots(now):  # noqa: ANN001, ANN202 - an SQL condition
    """A slot counts while its assignment is answered, or unanswered and inside its lease."""
    return and_(Assignment.slot.is_not(None), Assignment.released_at.is_(None),
                (Assignment.completed_at.is_not(None)) | (Assignment.expires_at > now))


def _candidates(s: Session, study: Study, ann_id: int, now, limit: int | None):  # noqa: ANN001
    """Real pairs with a free (or expired) slot that this annotator never had: [(pair id, filled slots)]."""
    filled = func.count(Assignment.id)
    had = aliased(Assignment)
    mine = exists().where(had.pair_id == Pair.id, had.annotator_id == ann_id)
    query = (select(Pair.id, filled)
             .outerjoin(Assignment, and_(Assignment.pair_id == Pair.id, _live_slots(now)))
             .where(Pair.study_id == study.id, Pair.gold_answer.is_(None), ~mine)
             .group_by(Pair.id).having(filled < study.votes_per_pair)
             .order_by(filled.desc(), (Pair.id * 7919 + ann_id * 104729) % 1000003))
    return s.execute(query.limit(limit) if limit else query).all()


def _take_slot(s: Session, study: Study, pair_id: int, ann_id: int, now) -> bool:  # noqa: ANN001
    """Give this pair's lowest free slot to the annotator (inside a savepoint); False if the race was lost."""
    held = s.execute(select(Assignment.id, Assignment.slot, Assignment.completed_at, Assignment.expires_at)
                     .where(Assignment.pair_id == pair_id, Assignment.slot.is_not(None))).all()
    taken = {row.slot for row in held}
    free = [k for k in range(study.votes_per_pair) if k not in taken]
    expired = [row for row in held if row.completed_at is None and row.expires_at <= now]
    try:
        with s.begin_nested():
            if free:
                slot = free[0]
            elif expired:
                slot = expired[0].slot
                released = s.execute(update(Assignment).where(
                    Assignment.id == expired[0].id, Assignment.completed_at.is_(None),
                    Assignment.released_at.is_(None)).values(slot=None, released_at=now))
                if released.rowcount != 1:
                    raise _LostRace  # rolls the savepoint back
            else:
                return False
            s.add(Assignment(pair_id=pair_id, annotator_id=ann_id, slot=slot, assigned_at=now,
                             expires_at=now + timedelta(seconds=study.lease_s)))
            s.flush()
        return True
    except (IntegrityError, _LostRace):
        return False


def _gold_due(study: Study, k: int) -> bool:
    rate = study.gold_rate
    return rate > 0 and math.floor((k + 1) * rate) > math.floor(k * rate)


def _assign(s: Session, study: Study, ann: Annotator, now) -> Assignment | None:  # noqa: ANN001
    k = s.scalar(select(func.count()).select_from(Assignment).where(Assignment.annotator_id == ann.id))
    if _gold_due(study, k):
        seen = exists().where(Assignment.pair_id == Pair.id, Assignment.annotator_id == ann.id)
        gold = s.scalar(select(Pair.id).where(Pair.study_id == study.id, Pair.gold_answer.is_not(None), ~seen)
                        .order_by((Pair.id * 7919 + ann.id * 104729) % 1000003).limit(1))
        if gold is not None and _real_left(s, study, ann, now) > 0:
            a = Assignment(pair_id=gold, annotator_id=ann.id, slot=None, assigned_at=now,
                           expires_at=now + timedelta(seconds=study.lease_s))
            s.add(a)
            s.flush()
            return a
    if _real_left(s, study, ann, now) <= 0:
        return None
    for pair_id, _ in _candidates(s, study, ann.id, now, limit=10):
        if _take_slot(s, study, pair_id, ann.id, now):
            return _open(s, ann.id)
    raise _LostRace  # every candidate was taken meanwhile


def _real_left(s: Session, study: Study, ann: Annotator, now) -> int:  # noqa: ANN001
    """Real pairs this annotator could still get now (capped by the per-annotator quota)."""
    left = len(_candidates(s, study, ann.id, now, limit=None))
    if study.per_annotator is not None:
        had = s.scalar(select(func.count()).select_from(Assignment).where(
            Assignment.annotator_id == ann.id, Assignment.slot.is_not(None)))
        left = min(left, max(0, study.per_annotator - had))
    return left


def _progress(s: Session, study: Study, ann: Annotator, now, has_open: bool) -> Progress:  # noqa: ANN001
    done = s.scalar(select(func.count()).select_from(Assignment).where(
        Assignment.annotator_id == ann.id, Assignment.completed_at.is_not(None)))
    k = s.scalar(select(func.count()).select_from(Assignment).where(Assignment.annotator_id == ann.id))
    seen = exists().where(Assignment.pair_id == Pair.id, Assignment.annotator_id == ann.id)
    gold_left = s.scalar(select(func.count()).select_from(Pair).where(
        Pair.study_id == study.id, Pair.gold_answer.is_not(None), ~seen))
    real_left, coming = _real_left(s, study, ann, now), 0
    while real_left > 0:  # replay the gold schedule over what is left
        if gold_left and _gold_due(study, k):
            gold_left -= 1
        else:
            real_left -= 1
        k, coming = k + 1, coming + 1
    return Progress(done, done + int(has_open) + coming)


def next_pair(sessions: sessionmaker, token: str | None,
              now: datetime | None = None) -> tuple[Pair | None, Study, Progress]:
    """The pair this annotator should answer now (their open one, or a newly assigned one); None when done.
    ``now``: the server's clock (default); the demo's simulated annotators pass a simulated one."""
    for _ in range(MAX_TRIES):
        try:
            with sessions.begin() as s:
                # locked: under READ COMMITTED two loads of one link would both see no open pair and both assign
                # one, past --per-annotator
                ann, study = annotator_for(s, token, lock=True)
                if study.consent and ann.consented_at is None:
                    raise ConsentRequired(study)  # no pair is handed out (nor its clock started) before consent
                clock = now or utcnow()
                current = _open(s, ann.id) or _assign(s, study, ann, clock)
                pair = s.get(Pair, current.pair_id) if current else None
                if pair is not None:  # load what the page shows before the session closes
                    _ = (pair.left_image_id, pair.right_image_id, pair.source_image_id)
                return pair, study, _progress(s, study, ann, clock, current is not None)
        except (IntegrityError, OperationalError, _LostRace):
            continue  # a concurrent annotator won a race (or SQLite stayed locked): start over with fresh data
    raise AnnotatorError(503, "The server is busy. Please reload the page in a moment.")


def pair_for(sessions: sessionmaker, token: str | None, public_id: str) -> Pair:
    """A pair this annotator was given (to serve its images); 403 bad token, 404 anything else."""
    with sessions.begin() as s:
        ann, study = annotator_for(s, token)
        pair = s.scalar(select(Pair).where(Pair.public_id == public_id, Pair.study_id == study.id))
        if pair is None or s.scalar(select(Assignment.id).where(
                Assignment.pair_id == pair.id, Assignment.annotator_id == ann.id)) is None:
            raise AnnotatorError(404, "No such comparison.")
        _ = (pair.left_image, pair.right_image, pair.source_image)
        return pair


def _last_answered(s: Session, ann_id: int) -> Assignment | None:
    return s.scalar(select(Assignment).where(Assignment.annotator_id == ann_id, Assignment.completed_at.is_not(None))
                    .order_by(Assignment.completed_at.desc(), Assignment.id.desc()).limit(1))


def last_answer(sessions: sessionmaker, token: str | None) -> tuple[Pair, Study, dict[str, str]] | None:
    """The pair this annotator answered last and their stored answers {aspect: choice} (the "back" page), or
    None before their first answer."""
    with sessions.begin() as s:
        ann, study = annotator_for(s, token)
        last = _last_answered(s, ann.id)
        if last is None:
            return None
        pair = s.get(Pair, last.pair_id)
        _ = (pair.left_image_id, pair.right_image_id, pair.source_image_id)
        stored = dict(s.execute(select(Vote.aspect, Vote.choice).where(
            Vote.annotator_id == ann.id, Vote.pair_id == pair.id)).all())
        return pair, study, stored


def record_vote(sessions: sessionmaker, token: str | None, public_id: str, choices: dict[str, str],
                now: datetime | None = None, replace: bool = False) -> None:
    """Store one choice per aspect for this annotator's pair, all or nothing, with the server's time and the
    time-on-task (seconds since the pair was handed out); ``now`` as in ``next_pair``.

    ``replace``: change the answers of the annotator's LAST answered pair (the "back" button): the stored rows
    are updated (``changed_at`` set; time-on-task stays that of the first answer), never duplicated.

    403: bad token; 404: a pair id this annotator was not given; 409: already answered (without ``replace``), not
    the last answered pair (with it), or released to someone else after its lease; 422: an aspect missing or a
    choice the study does not offer.
    """
    with sessions.begin() as s:
        ann, study = annotator_for(s, token)
        pair = s.scalar(select(Pair).where(Pair.public_id == public_id, Pair.study_id == study.id))
        mine = None if pair is None else s.scalar(select(Assignment).where(
            Assignment.pair_id == pair.id, Assignment.annotator_id == ann.id))
        if mine is None:
            raise AnnotatorError(404, "No such comparison.")
        missing = [a for a in study.aspect_list if a not in choices]
        bad = {a: c for a, c in choices.items() if a in study.aspect_list and c not in study.choices}
        if missing or bad:
            raise AnnotatorError(422, f"Please answer every question (missing: {', '.join(missing) or 'none'}; "
                                      f"invalid: {', '.join(bad) or 'none'}).")
        now = now or utcnow()
        if replace:
            last = _last_answered(s, ann.id)
            if last is None or last.id != mine.id:
                raise AnnotatorError(409, "Only your last answer can be changed.")
            stored = {v.aspect: v for v in s.scalars(select(Vote).where(
                Vote.annotator_id == ann.id, Vote.pair_id == pair.id).with_for_update())}
            for a in study.aspect_list:
                if stored[a].choice != choices[a]:
                    stored[a].choice, stored[a].changed_at = choices[a], now
            return
        done = s.execute(update(Assignment).where(
            Assignment.id == mine.id, Assignment.completed_at.is_(None), Assignment.released_at.is_(None),
        ).values(completed_at=now))
        if done.rowcount != 1:
            s.refresh(mine)
            if mine.completed_at is not None:
                raise AnnotatorError(409, "You have already answered this comparison.")
            raise AnnotatorError(409, "This comparison timed out and was given to someone else.")
        try:
            # time-on-task from the server's own clock: when this pair was handed out to when it was answered
            seconds = (now - mine.assigned_at).total_seconds()
            s.add_all(Vote(pair_id=pair.id, annotator_id=ann.id, aspect=a, choice=choices[a], origin="web",
                           created_at=now, seconds=seconds) for a in study.aspect_list)
            s.flush()
        except IntegrityError as err:
            raise AnnotatorError(409, "You have already answered this comparison.") from err


# ------------------------------------------------------------------------------------------------ practice round
@dataclass(frozen=True)
class PracticeStep:
    """A practice pair to show (``item``, number ``position`` of ``total``) and, once answered, the annotator's
    ``choice`` and whether it matched the expected answer."""

    item: PracticeItem
    total: int
    choice: str | None = None
    correct: bool | None = None


def _practice_items(s: Session, study: Study) -> list[PracticeItem]:
    items = s.scalars(select(PracticeItem).where(PracticeItem.study_id == study.id)
                      .order_by(PracticeItem.position)).all()
    for item in items:  # load what the page shows before the session closes
        _ = (item.left_image, item.right_image, item.source_image)
    return list(items)


def next_practice(sessions: sessionmaker, token: str | None) -> PracticeStep | None:
    """The first practice pair this annotator has not answered yet, or None when the study has none left for
    them. Raises ``ConsentRequired`` before consent: practice comes after it, like every pair."""
    with sessions.begin() as s:
        ann, study = annotator_for(s, token)
        if study.consent and ann.consented_at is None:
            raise ConsentRequired(study)
        items = _practice_items(s, study)
        if not items:
            return None
        answered = set(s.scalars(select(PracticeAnswer.practice_id).where(PracticeAnswer.annotator_id == ann.id)))
        todo = [item for item in items if item.id not in answered]
        return PracticeStep(todo[0], len(items)) if todo else None


def practice_step(sessions: sessionmaker, token: str | None, position: int) -> PracticeStep:
    """Practice pair number ``position`` of this annotator's study with their answer (if given); 404 if none."""
    with sessions.begin() as s:
        ann, study = annotator_for(s, token)
        items = _practice_items(s, study)
        item = next((i for i in items if i.position == position), None)
        if item is None:
            raise AnnotatorError(404, "No such practice pair.")
        answer = s.scalar(select(PracticeAnswer).where(PracticeAnswer.practice_id == item.id,
                                                      PracticeAnswer.annotator_id == ann.id))
        return PracticeStep(item, len(items), answer.choice if answer else None, answer.correct if answer else None)


def record_practice(sessions: sessionmaker, token: str | None, position: int, choice: str,
                    now: datetime | None = None) -> PracticeStep:
    """Store this annotator's answer to practice pair ``position`` (once) and return it with its feedback.
    Practice answers go to their own table, never to the votes. 404: no such practice pair; 409: answered
    already; 422: a choice the study does not offer; 403 before consent."""
    with sessions.begin() as s:
        ann, study = annotator_for(s, token)
        if study.consent and ann.consented_at is None:
            raise ConsentRequired(study)
        items = _practice_items(s, study)
        item = next((i for i in items if i.position == position), None)
        if item is None:
            raise AnnotatorError(404, "No such practice pair.")
        if choice not in study.choices:
            raise AnnotatorError(422, "Please answer the question.")
        correct = choice == item.answer
        try:
            with s.begin_nested():
                s.add(PracticeAnswer(practice_id=item.id, annotator_id=ann.id, choice=choice, correct=correct,
                                     created_at=now or utcnow()))
                s.flush()
        except IntegrityError:
            raise AnnotatorError(409, "You have already answered this practice pair.") from None
        return PracticeStep(item, len(items), choice, correct)
