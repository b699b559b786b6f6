"""The study database: SQLAlchemy tables and the engine (a SQLite file by default, PostgreSQL by URL).

Integrity lives in the schema, not in the application's good behaviour:
- one vote per annotator x pair x aspect (``uq_vote``), so a resubmitted form or a duplicated import row fails;
- a real pair has ``votes_per_pair`` numbered slots, and a slot belongs to one assignment (``uq_assignment_slot``),
  so concurrent annotators can never hand out a fourth copy of a 3-vote pair;
- an annotator gets a pair at most once (``uq_assignment_person``).
Writers catch ``IntegrityError`` and retry or reject; nothing is checked-then-written without the constraint.

SQLite runs every transaction as ``BEGIN IMMEDIATE`` (one writer at a time, others wait up to ``timeout``), WAL
mode, and enforces foreign keys; PostgreSQL runs READ COMMITTED and relies on the same constraints.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import (
    CheckConstraint,
    DateTime,
    Engine,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, sessionmaker

CHOICES: tuple[str, ...] = ("left", "right", "tie")
CANT_TELL = "cant_tell"  # "can't tell / broken image": offered when the study asks for it; never a preference
DEFAULT_MIN_SECONDS = 3.0  # median seconds per pair below which an annotator is flagged as a speeder


def utcnow() -> datetime:
    """Timezone-naive UTC (both backends store it the same way)."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class Study(Base):
    """One study: a layout, the aspects asked, and how many votes make a pair valid."""

    __tablename__ = "ab_study"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    layout: Mapped[str] = mapped_column(String(20))
    aspects: Mapped[str] = mapped_column(String(500))  # comma-separated, in the order the page asks them
    votes_per_pair: Mapped[int] = mapped_column(Integer)
    gold_rate: Mapped[float] = mapped_column(Float)
    gold_threshold: Mapped[float] = mapped_column(Float)
    per_annotator: Mapped[int | None] = mapped_column(Integer, nullable=True)  # cap on real pairs per person
    lease_s: Mapped[int] = mapped_column(Integer)  # an unanswered pair goes back to the pool after this long
    admin_token_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    closed_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)  # set: no more pairs or votes
    # median time-on-task (seconds per pair) below which an annotator is flagged; NULL (a database from before
    # the column existed) means DEFAULT_MIN_SECONDS, 0 turns the check off
    min_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    cant_tell: Mapped[bool | None] = mapped_column(nullable=True)  # offer the "can't tell / broken image" answer
    # crowd hand-off (evals/ab/crowd.py): the one entry link given to a platform, and what a finished participant
    # gets back (a code to paste, or the platform's completion URL)
    crowd_token: Mapped[str | None] = mapped_column(String(64), nullable=True)
    completion_code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    completion_url: Mapped[str | None] = mapped_column(Text, nullable=True)
    # from the study file (evals/ab/study.py read_study_file): Markdown instructions and consent text, and the
    # question asked per aspect as JSON {aspect: text}
    instructions: Mapped[str | None] = mapped_column(Text, nullable=True)
    consent: Mapped[str | None] = mapped_column(Text, nullable=True)
    questions: Mapped[str | None] = mapped_column(Text, nullable=True)

    @property
    def aspect_list(self) -> list[str]:
        return self.aspects.split(",")

    @property
    def question_map(self) -> dict[str, str]:
        """{aspect: question} the study file set (aspects not in it keep the built-in question)."""
        import json

        return json.loads(self.questions) if self.questions else {}

    @property
    def choices(self) -> tuple[str, ...]:
        """The answers this study accepts per aspect."""
        return CHOICES + ((CANT_TELL,) if self.cant_tell else ())

    @property
    def speed_limit(self) -> float:
        """Seconds per pair: annotators whose median time-on-task is below it are flagged (0: no check)."""
        return DEFAULT_MIN_SECONDS if self.min_seconds is None else self.min_seconds


class System(Base):
    """A compared system: its name and folder are for reports only, never shown to annotators."""

    __tablename__ = "ab_system"
    __table_args__ = (UniqueConstraint("study_id", "name", name="uq_system_name"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("ab_study.id"))
    name: Mapped[str] = mapped_column(String(200))
    folder: Mapped[str] = mapped_column(Text)


class Image(Base):
    """An image file (``path``, pinned by the ``sha256`` of its bytes when the study was created) or, for gold
    renders, its PNG bytes (``data``)."""

    __tablename__ = "ab_image"
    __table_args__ = (CheckConstraint("(path IS NULL) <> (data IS NULL)", name="ck_image_one_source"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("ab_study.id"))
    path: Mapped[str | None] = mapped_column(Text, nullable=True)
    data: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)


class Pair(Base):
    """Two images of one prompt and seed, with the side system A is shown on (randomised per pair).

    ``public_id`` is the only id an annotator or vendor sees (random, carries no order or name). Gold pairs have
    no systems and a known ``gold_answer`` side.
    """

    __tablename__ = "ab_pair"
    __table_args__ = (
        UniqueConstraint("study_id", "system_a_id", "system_b_id", "item_key", name="uq_pair_item"),
        CheckConstraint("gold_answer IS NULL OR gold_answer IN ('left', 'right')", name="ck_pair_gold"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    public_id: Mapped[str] = mapped_column(String(40), unique=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("ab_study.id"), index=True)
    prompt_key: Mapped[str] = mapped_column(String(200))  # the prompt's id: the unit CIs resample
    item_key: Mapped[str] = mapped_column(String(300))  # prompt and seed
    prompt: Mapped[str] = mapped_column(Text)
    system_a_id: Mapped[int | None] = mapped_column(ForeignKey("ab_system.id"), nullable=True)
    system_b_id: Mapped[int | None] = mapped_column(ForeignKey("ab_system.id"), nullable=True)
    a_on_left: Mapped[bool | None] = mapped_column(nullable=True)
    left_image_id: Mapped[int] = mapped_column(ForeignKey("ab_image.id"))
    right_image_id: Mapped[int] = mapped_column(ForeignKey("ab_image.id"))
    source_image_id: Mapped[int | None] = mapped_column(ForeignKey("ab_image.id"), nullable=True)
    gold_answer: Mapped[str | None] = mapped_column(String(5), nullable=True)
    left_image: Mapped[Image] = relationship(foreign_keys=[left_image_id])
    right_image: Mapped[Image] = relationship(foreign_keys=[right_image_id])
    source_image: Mapped[Image | None] = relationship(foreign_keys=[source_image_id])

    @property
    def is_gold(self) -> bool:
        return self.gold_answer is not None


WEB_PREFIX = "web-"  # labels of personal web links (web-001, ...); imported vendor ids may not use it
LABEL_MAX = 200  # one limit for every backend (PostgreSQL enforces the column's length, SQLite does not)


class Annotator(Base):
    """A person with a personal link (web) or a vendor's annotator id (imported votes)."""

    __tablename__ = "ab_annotator"
    __table_args__ = (UniqueConstraint("study_id", "label", name="uq_annotator_label"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("ab_study.id"), index=True)
    token: Mapped[str] = mapped_column(String(64), unique=True)
    label: Mapped[str] = mapped_column(String(LABEL_MAX))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    # a crowd platform's ids of this participant (Prolific: PROLIFIC_PID, STUDY_ID, SESSION_ID), from the link
    platform_pid: Mapped[str | None] = mapped_column(String(64), nullable=True)
    platform_study: Mapped[str | None] = mapped_column(String(64), nullable=True)
    platform_session: Mapped[str | None] = mapped_column(String(64), nullable=True)
    consented_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)  # clicked "I agree"


class Assignment(Base):
    """Pair -> annotator. Real pairs fill numbered ``slot``s (0 .. votes_per_pair - 1); gold pairs have none.
    A released assignment (its lease ran out unanswered) keeps its row without a slot: the record that this
    person had the pair."""

    __tablename__ = "ab_assignment"
    __table_args__ = (
        UniqueConstraint("pair_id", "slot", name="uq_assignment_slot"),
        UniqueConstraint("pair_id", "annotator_id", name="uq_assignment_person"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    pair_id: Mapped[int] = mapped_column(ForeignKey("ab_pair.id"), index=True)
    annotator_id: Mapped[int] = mapped_column(ForeignKey("ab_annotator.id"), index=True)
    slot: Mapped[int | None] = mapped_column(Integer, nullable=True)
    assigned_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime)
    completed_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    released_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)  # lease ran out, slot given on


class Vote(Base):
    """One choice on one aspect of one pair, as the annotator saw it (``left`` / ``right`` / ``tie``, or
    ``cant_tell`` where the study offers it). Changing the last answer updates the row (``changed_at``)."""

    __tablename__ = "ab_vote"
    __table_args__ = (
        UniqueConstraint("annotator_id", "pair_id", "aspect", name="uq_vote"),
        CheckConstraint("choice IN ('left', 'right', 'tie', 'cant_tell')", name="ck_vote_choice"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    pair_id: Mapped[int] = mapped_column(ForeignKey("ab_pair.id"), index=True)
    annotator_id: Mapped[int] = mapped_column(ForeignKey("ab_annotator.id"))
    aspect: Mapped[str] = mapped_column(String(100))
    choice: Mapped[str] = mapped_column(String(10))  # 10: room for cant_tell (an older database has 5)
    origin: Mapped[str] = mapped_column(String(300))  # "web" or "import:<file name>"
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)  # the server's clock at the answer
    # time-on-task: seconds from when the server handed the pair to this annotator (the assignment) to the
    # answer, measured on the server; NULL for imported votes
    seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    changed_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)  # the annotator went back


class PracticeItem(Base):
    """A practice pair from the study file: shown after consent and before the real pairs, with a known
    ``answer`` on one ``aspect`` and an optional Markdown ``explanation`` shown after the annotator answers.
    Practice lives in its own tables: it never takes a slot, never becomes a vote and never enters a win rate."""

    __tablename__ = "ab_practice"
    __table_args__ = (
        UniqueConstraint("study_id", "position", name="uq_practice_position"),
        CheckConstraint("answer IN ('left', 'right', 'tie')", name="ck_practice_answer"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("ab_study.id"), index=True)
    position: Mapped[int] = mapped_column(Integer)  # 1, 2, ... in the order of the study file
    prompt: Mapped[str] = mapped_column(Text)
    aspect: Mapped[str] = mapped_column(String(100))
    answer: Mapped[str] = mapped_column(String(5))
    explanation: Mapped[str | None] = mapped_column(Text, nullable=True)
    left_image_id: Mapped[int] = mapped_column(ForeignKey("ab_image.id"))
    right_image_id: Mapped[int] = mapped_column(ForeignKey("ab_image.id"))
    source_image_id: Mapped[int | None] = mapped_column(ForeignKey("ab_image.id"), nullable=True)
    left_image: Mapped[Image] = relationship(foreign_keys=[left_image_id])
    right_image: Mapped[Image] = relationship(foreign_keys=[right_image_id])
    source_image: Mapped[Image | None] = relationship(foreign_keys=[source_image_id])


class PracticeAnswer(Base):
    """An annotator's answer to a practice pair (one per person and item) and whether it matched."""

    __tablename__ = "ab_practice_answer"
    __table_args__ = (UniqueConstraint("annotator_id", "practice_id", name="uq_practice_answer"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    practice_id: Mapped[int] = mapped_column(ForeignKey("ab_practice.id"), index=True)
    annotator_id: Mapped[int] = mapped_column(ForeignKey("ab_annotator.id"), index=True)
    choice: Mapped[str] = mapped_column(String(10))
    correct: Mapped[bool] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


def database_url(db: str) -> str:
    """A SQLAlchemy URL from ``--db``: a plain path is a SQLite file; ``postgresql://`` uses psycopg 3."""
    if "://" not in db:
        return f"sqlite:///{Path(db).expanduser().resolve()}"
    for prefix in ("postgresql://", "postgres://"):
        if db.startswith(prefix):
            return "postgresql+psycopg://" + db[len(prefix):]
    return db


def make_engine(db: str, timeout_s: float = 60.0) -> Engine:
    """The engine for ``db`` with the study tables created if missing."""
    url = database_url(db)
    if url.startswith("sqlite"):
        # hide_parameters: a database error's message would print bound values, annotators' tokens among them
        engine = create_engine(url, connect_args={"timeout": timeout_s, "check_same_thread": False},
                               pool_size=10, max_overflow=10, hide_parameters=True)

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_conn, _record) -> None:  # noqa: ANN001 - DB-API objects
            dbapi_conn.isolation_level = None  # SQLAlchemy issues BEGIN itself (below), not the sqlite3 module
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn) -> None:  # noqa: ANN001
            # IMMEDIATE takes the write lock up front: a deferred transaction that reads and then writes can fail
            # with "database is locked" without waiting when another writer got there first
            conn.exec_driver_sql("BEGIN IMMEDIATE")
    else:
        engine = create_engine(url, pool_size=20, max_overflow=20, pool_pre_ping=True, hide_parameters=True)
    Base.metadata.create_all(engine)
    add_missing_columns(engine)
    return engine


def add_missing_columns(engine: Engine) -> list[str]:
    """Add the nullable columns a study database made by an earlier version of these tables lacks (``ALTER TABLE
    ... ADD COLUMN``, on SQLite and PostgreSQL alike); returns ``table.column`` of each one added."""
    from sqlalchemy import inspect, text

    added = []
    have = inspect(engine)
    for table in Base.metadata.sorted_tables:
        present = {c["name"] for c in have.get_columns(table.name)}
        for column in table.columns:
            if column.name not in present and column.nullable:
                kind = column.type.compile(dialect=engine.dialect)
                with engine.begin() as conn:
                    conn.execute(text(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}'))
                added.append(f"{table.name}.{column.name}")
    return added


def stores_cant_tell(engine: Engine) -> bool:
    """Whether ``ab_vote`` accepts ``cant_tell``: a database made before that answer existed keeps its older CHECK
    constraint and a 5-character ``choice`` column (``add_missing_columns`` adds columns, it does not rewrite
    constraints or types)."""
    from sqlalchemy import inspect

    checks = [c.get("sqltext") or "" for c in inspect(engine).get_check_constraints("ab_vote")]
    return all(CANT_TELL in text for text in checks if "choice" in text)


def make_sessions(engine: Engine) -> sessionmaker:
    """Sessions that keep loaded attributes after commit (pages render after the transaction ends)."""
    return sessionmaker(engine, expire_on_commit=False)
