"""Creating a study: pair two systems' images, randomise and store the sides, mix in gold pairs, make links.

A study may compare more than two systems: run ``create`` once per pair of systems with the same study name
(same layout, aspects and votes per pair); the report then adds a Bradley-Terry ranking.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import random
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session, sessionmaker

from evals.ab.db import (
    DEFAULT_MIN_SECONDS,
    WEB_PREFIX,
    Annotator,
    Image,
    Pair,
    PracticeItem,
    Study,
    System,
    stores_cant_tell,
    utcnow,
)
from evals.ab.layouts import pair_items, read_folder

ASPECT_RE = re.compile(r"^[a-z][a-z0-9_]{0,49}$")
# What each known aspect asks; any other aspect name is asked as "Which image is better for <name>?"
ASPECT_QUESTIONS: dict[str, str] = {
    "overall": "Overall, which image do you prefer?",
    "prompt_adherence": "Which image follows the text better?",
    "visual_quality": "Which image looks better (detail, artifacts, realism), ignoring the text?",
    "identity_preservation": "Which edit keeps the parts of the source image that should not change?",
}


class StudyError(ValueError):
    """A request the study cannot honour; the message says why (the CLI prints it as ``error: ...``)."""


def question(aspect: str, custom: dict[str, str] | None = None) -> str:
    """The question asked for ``aspect``: the study file's (``custom``), else the built-in one."""
    if custom and aspect in custom:
        return custom[aspect]
    return ASPECT_QUESTIONS.get(aspect, f"Which image is better for {aspect.replace('_', ' ')}?")


STUDY_FILE_KEYS = ("instructions", "consent", "questions", "practice")
TEXT_MAX, QUESTION_MAX, PROMPT_MAX = 20_000, 300, 2_000
PRACTICE_KEYS = ("left", "right", "source", "answer", "prompt", "aspect", "explanation")
PRACTICE_ANSWERS = ("left", "right", "tie")
PRACTICE_MAX = 20  # a practice round is a warm-up; a longer one is a study of its own


@dataclass(frozen=True)
class PracticeEntry:
    """One practice pair of a study file: two image files (and a source image for edits), the expected ``answer``
    (left / right / tie) on ``aspect``, the ``prompt`` shown and an optional Markdown ``explanation``."""

    left: Path
    right: Path
    answer: str
    prompt: str
    aspect: str
    explanation: str | None = None
    source: Path | None = None


@dataclass(frozen=True)
class StudyText:
    """What a study file gives annotators: Markdown ``instructions`` and ``consent`` (None: not shown / no consent
    step), ``questions`` {aspect: question} and the ``practice`` pairs shown before the real ones."""

    instructions: str | None = None
    consent: str | None = None
    questions: dict[str, str] | None = None
    practice: tuple[PracticeEntry, ...] = ()


def _practice_entries(path: Path, value: object, aspects: list[str]) -> tuple[PracticeEntry, ...]:
    """Check a study file's ``practice`` list; any problem is a ``StudyError`` naming the file and the entry.
    Image paths are relative to the study file's folder (or absolute); each must decode as an image."""
    from evals.ab.blind import png_of

    if not isinstance(value, list) or not value or len(value) > PRACTICE_MAX:
        raise StudyError(f"{path}: practice must be a list of 1 to {PRACTICE_MAX} pairs (each with left, right, "
                         "answer, prompt)")
    out = []
    for k, entry in enumerate(value, 1):
        where = f"{path}: practice entry {k}"
        if not isinstance(entry, dict):
            raise StudyError(f"{where}: expected a mapping with left, right, answer, prompt (and optionally "
                             "aspect, explanation, source)")
        unknown = sorted(set(map(str, entry)) - set(PRACTICE_KEYS))
        if unknown:
            raise StudyError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(PRACTICE_KEYS)})")
        files: dict[str, Path | None] = {}
        for key in ("left", "right", "source"):
            name = entry.get(key)
            if name is None and key == "source":
                files[key] = None
                continue
            if not isinstance(name, str) or not name.strip():
                raise StudyError(f"{where}: {key} must be the path of an image file")
            file = Path(name).expanduser()
            file = (file if file.is_absolute() else path.parent / file).resolve()
            if not file.is_file():
                raise StudyError(f"{where}: {key} image not found: {file}")
            try:
                png_of(file.read_bytes(), file)
            except ValueError as err:
                raise StudyError(f"{where}: {key}: {err}") from None
            files[key] = file
        answer = entry.get("answer")
        if answer not in PRACTICE_ANSWERS:
            raise StudyError(f"{where}: answer must be one of {', '.join(PRACTICE_ANSWERS)}, got {answer!r}")
        prompt = entry.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip() or len(prompt) > PROMPT_MAX:
            raise StudyError(f"{where}: prompt must be non-empty text of at most {PROMPT_MAX} characters")
        aspect = entry.get("aspect", aspects[0])
        if aspect not in aspects:
            raise StudyError(f"{where}: aspect {aspect!r} is not asked in this study (aspects: {', '.join(aspects)})")
        explanation = entry.get("explanation")
        if explanation is not None and (not isinstance(explanation, str) or not explanation.strip()
                                        or len(explanation) > TEXT_MAX):
            raise StudyError(f"{where}: explanation must be non-empty text of at most {TEXT_MAX} characters")
        out.append(PracticeEntry(files["left"], files["right"], answer, prompt.strip(), aspect, explanation,
                                 files["source"]))
    return tuple(out)


def read_study_file(path: str | Path, aspects: list[str]) -> StudyText:
    """Read and check a study file (YAML, or JSON, which YAML reads too): a mapping with any of ``instructions``
    (Markdown), ``consent`` (Markdown; annotators must agree before their first pair), ``questions`` (aspect ->
    question text, for aspects of the study) and ``practice`` (pairs with a known answer, shown first with
    feedback). Anything else is a ``StudyError`` naming the file (and the practice entry)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise StudyError(f"study file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise StudyError(f"{path}: not YAML or JSON ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict) or not data:
        raise StudyError(f"{path}: expected a mapping with any of {', '.join(STUDY_FILE_KEYS)}")
    unknown = sorted(set(map(str, data)) - set(STUDY_FILE_KEYS))
    if unknown:
        raise StudyError(f"{path}: unknown key(s) {', '.join(unknown)} (known: {', '.join(STUDY_FILE_KEYS)})")
    texts = {}
    for key in ("instructions", "consent"):
        value = data.get(key)
        if value is not None and (not isinstance(value, str) or not value.strip() or len(value) > TEXT_MAX):
            raise StudyError(f"{path}: {key} must be non-empty text of at most {TEXT_MAX} characters")
        texts[key] = value
    questions = data.get("questions")
    if questions is not None:
        if not isinstance(questions, dict):
            raise StudyError(f"{path}: questions must map aspect names to question text")
        extra = sorted(set(map(str, questions)) - set(aspects))
        if extra:
            raise StudyError(f"{path}: questions for aspect(s) the study does not ask: {', '.join(extra)} "
                             f"(aspects: {', '.join(aspects)})")
        bad = [k for k, v in questions.items() if not isinstance(v, str) or not v.strip() or len(v) > QUESTION_MAX]
        if bad:
            raise StudyError(f"{path}: question(s) for {', '.join(map(str, bad))} must be non-empty text of at most "
                             f"{QUESTION_MAX} characters")
        questions = {str(k): v.strip() for k, v in questions.items()}
    practice = _practice_entries(path, data["practice"], aspects) if "practice" in data else ()
    return StudyText(texts["instructions"], texts["consent"], questions, practice)


def parse_aspects(text: str) -> list[str]:
    aspects = [a.strip() for a in text.split(",") if a.strip()]
    bad = [a for a in aspects if not ASPECT_RE.match(a)]
    if not aspects or bad or len(set(aspects)) != len(aspects):
        raise StudyError(f"aspects must be distinct lower_case names separated by commas, got {text!r}")
    return aspects


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def admin_ok(study: Study, token: str | None) -> bool:
    """Constant-time check of an admin token against the study's stored digest."""
    return bool(token) and hmac.compare_digest(token_digest(token), study.admin_token_sha256)


def get_study(session: Session, name: str) -> Study:
    study = session.scalar(select(Study).where(Study.name == name))
    if study is None:
        known = session.scalars(select(Study.name).order_by(Study.name)).all()
        raise StudyError(f"no study named {name!r} in this database (studies: {', '.join(known) or 'none'})")
    return study


@dataclass(frozen=True)
class Created:
    """What ``create_study`` did: ``admin_token`` is set only when the study was new (shown once, stored hashed)."""

    study: str
    pairs: int
    gold: int
    admin_token: str | None
    crowd_token: str | None = None  # set: the study has a crowd entry link (evals/ab/crowd.py)
    completion_code: str | None = None


def _image_size(path: Path) -> int:
    from PIL import Image as PILImage

    with PILImage.open(path) as img:
        return min(img.size)


def pin_images(paths: list[Path]) -> dict[Path, str]:
    """Decode every image completely and return the SHA-256 of each file's bytes; refuse (``StudyError``, files
    named) when any does not decode: a broken image would be served as an error while votes on its pair count."""
    from tqdm.auto import tqdm

    from evals.ab.blind import digest, png_of

    pinned, bad = {}, []
    for path in tqdm(sorted(set(paths)), desc="check images", unit="img", leave=False):
        data = path.read_bytes()
        try:
            png_of(data, path)
        except ValueError as err:
            bad.append(str(err))
            continue
        pinned[path] = digest(data)
    if bad:
        raise StudyError(f"{len(bad)} image(s) cannot be decoded, e.g. {'; '.join(bad[:3])}")
    return pinned


# what a platform id or a completion code may hold: safe in a page, a URL and a spreadsheet cell
ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def check_completion(code: str | None, url: str | None) -> None:
    """Refuse a completion code or URL that a participant's page could not show safely."""
    if code is not None and not ID_RE.match(code):
        raise StudyError(f"--completion-code must be 1 to 64 letters, digits, '_' or '-', got {code!r}")
    if url is not None and not re.match(r"^https?://[^\s<>\"']+$", url):
        raise StudyError(f"--completion-url must be an http(s) URL without spaces or quotes, got {url!r}")


def new_crowd_token() -> str:
    """The secret part of a crowd study's entry link."""
    return secrets.token_urlsafe(12)


def create_study(sessions: sessionmaker, name: str, a_dir: str | Path, b_dir: str | Path, layout: str,
                 aspects: list[str], votes_per_pair: int = 3, name_a: str | None = None, name_b: str | None = None,
                 gold_rate: float = 0.0, gold_threshold: float = 0.8, per_annotator: int | None = None,
                 lease_s: int = 1800, prompts_file: Path | None = None, seed: int | None = None,
                 min_seconds: float = DEFAULT_MIN_SECONDS, cant_tell: bool = False, crowd: bool = False,
                 completion_code: str | None = None, completion_url: str | None = None,
                 text: StudyText | None = None) -> Created:
    """Pair A's and B's images of every prompt and seed into a (new or existing) study, in one transaction."""
    if votes_per_pair < 1:
        raise StudyError(f"--votes-per-pair must be >= 1, got {votes_per_pair}")
    if not 0.0 <= gold_rate < 1.0:
        raise StudyError(f"--gold-rate must be in [0, 1), got {gold_rate}")
    if not 0.0 <= gold_threshold <= 1.0:
        raise StudyError(f"--gold-threshold must be in [0, 1], got {gold_threshold}")
    if lease_s < 1:
        raise StudyError(f"--lease-minutes must be positive (a lease of {lease_s} s would release every pair at once)")
    if not 0.0 <= min_seconds < 3600:
        raise StudyError(f"--min-seconds must be in [0, 3600) seconds per pair, got {min_seconds}")
    if per_annotator is not None and per_annotator < 1:
        raise StudyError(f"--per-annotator must be >= 1, got {per_annotator}")
    check_completion(completion_code, completion_url)
    crowd = crowd or completion_code is not None or completion_url is not None
    if crowd and completion_code is None and completion_url is None:
        completion_code = secrets.token_hex(4).upper()  # what the participant pastes into the platform
    if cant_tell and not stores_cant_tell(sessions.kw["bind"]):
        raise StudyError("this database was made before the \"can't tell\" answer existed and cannot store it; "
                         "create the study in a new database, or without --cant-tell")
    name_a = name_a or Path(a_dir).resolve().name
    name_b = name_b or Path(b_dir).resolve().name
    if name_a == name_b:
        raise StudyError(f"the two systems need different names (both {name_a!r}); pass --name-a / --name-b")
    matched = pair_items(read_folder(a_dir, layout, prompts_file), read_folder(b_dir, layout, prompts_file),
                         name_a, name_b)
    practice = text.practice if text else ()
    pinned = pin_images([p for ia, ib in matched for p in (ia.image, ib.image, ia.source) if p is not None]
                        + [p for e in practice for p in (e.left, e.right, e.source) if p is not None])
    rng = random.Random(seed) if seed is not None else random.SystemRandom()
    admin_token = None
    with sessions.begin() as s:
        study = s.scalar(select(Study).where(Study.name == name))
        if study is None:
            admin_token = secrets.token_urlsafe(24)
            study = Study(name=name, layout=layout, aspects=",".join(aspects), votes_per_pair=votes_per_pair,
                          gold_rate=gold_rate, gold_threshold=gold_threshold, per_annotator=per_annotator,
                          lease_s=lease_s, admin_token_sha256=token_digest(admin_token), min_seconds=min_seconds,
                          cant_tell=cant_tell, crowd_token=new_crowd_token() if crowd else None,
                          completion_code=completion_code, completion_url=completion_url,
                          instructions=text.instructions if text else None, consent=text.consent if text else None,
                          questions=json.dumps(text.questions) if text and text.questions else None)
            s.add(study)
            s.flush()
        elif (study.layout, study.aspect_list, study.votes_per_pair, bool(study.cant_tell)) != (
                layout, aspects, votes_per_pair, cant_tell):
            raise StudyError(f"study {name!r} exists with layout {study.layout}, aspects {study.aspects}, "
                             f"{study.votes_per_pair} votes per pair, can't-tell answer "
                             f"{'on' if study.cant_tell else 'off'}; a new comparison in it must use the same")
        elif crowd or text is not None:
            raise StudyError(f"study {name!r} exists: its crowd link, completion and study file are set when it is "
                             "first created (leave --crowd / --completion-code / --completion-url / --study-file out)")
        systems = []
        for sys_name, folder in ((name_a, a_dir), (name_b, b_dir)):
            folder = str(Path(folder).resolve())
            system = s.scalar(select(System).where(System.study_id == study.id, System.name == sys_name))
            if system is None:
                system = System(study_id=study.id, name=sys_name, folder=folder)
                s.add(system)
                s.flush()
            elif system.folder != folder:
                raise StudyError(f"system {sys_name!r} is already in study {name!r} with folder {system.folder}")
            systems.append(system)
        sa, sb = systems
        existing = s.scalar(select(func.count()).select_from(Pair).where(
            or_((Pair.system_a_id == sa.id) & (Pair.system_b_id == sb.id),
                (Pair.system_a_id == sb.id) & (Pair.system_b_id == sa.id))))
        if existing:
            raise StudyError(f"study {name!r} already compares {name_a} and {name_b} ({existing} pairs)")
        # exactly balanced sides, shuffled: a position bias of the annotators cannot favour one system
        sides = [True] * (len(matched) // 2) + [False] * (len(matched) - len(matched) // 2)
        rng.shuffle(sides)
        images: dict[Path, Image] = {}

        def image(path: Path) -> Image:
            if path not in images:
                images[path] = Image(study_id=study.id, path=str(path), sha256=pinned[path])
                s.add(images[path])
            return images[path]

        for position, entry in enumerate(practice, 1):
            s.add(PracticeItem(study_id=study.id, position=position, prompt=entry.prompt, aspect=entry.aspect,
                               answer=entry.answer, explanation=entry.explanation, left_image=image(entry.left),
                               right_image=image(entry.right),
                               source_image=image(entry.source) if entry.source else None))
        for (ia, ib), a_left in zip(matched, sides, strict=True):
            left, right = (ia, ib) if a_left else (ib, ia)
            s.add(Pair(public_id=secrets.token_urlsafe(9), study_id=study.id, prompt_key=ia.prompt_key,
                       item_key=ia.item_key, prompt=ia.prompt, system_a_id=sa.id, system_b_id=sb.id,
                       a_on_left=a_left, left_image=image(left.image), right_image=image(right.image),
                       source_image=image(ia.source) if ia.source else None))
        n_gold = math.ceil(gold_rate * len(matched)) if gold_rate > 0 else 0
        if n_gold:
            from evals.ab.shapes_world import gold_pairs

            first_gold = s.scalar(select(func.count()).select_from(Pair).where(
                Pair.study_id == study.id, Pair.gold_answer.is_not(None)))
            size = _image_size(matched[0][0].image)
            # gold sides exactly balanced too: an annotator who always answers one side passes half the checks
            gold_left = [True] * (n_gold // 2) + [False] * (n_gold - n_gold // 2)
            rng.shuffle(gold_left)
            for k, gold in enumerate(gold_pairs(n_gold, layout == "edit", rng.randrange(2**31), size)):
                better_left = gold_left[k]
                better, worse = Image(study_id=study.id, data=gold.better), Image(study_id=study.id, data=gold.worse)
                key = f"gold-{first_gold + k:05d}"
                s.add(Pair(public_id=secrets.token_urlsafe(9), study_id=study.id, prompt_key=key, item_key=key,
                           prompt=gold.prompt, left_image=better if better_left else worse,
                           right_image=worse if better_left else better,
                           source_image=Image(study_id=study.id, data=gold.source) if gold.source else None,
                           gold_answer="left" if better_left else "right"))
        return Created(name, len(matched), n_gold, admin_token, study.crowd_token, study.completion_code)


def close_study(sessions: sessionmaker, study_name: str) -> bool:
    """Close a study: its links get no more pairs and no vote is accepted (410), the stored votes stay for the
    report. Returns False when it was closed already."""
    with sessions.begin() as s:
        study = get_study(s, study_name)
        if study.closed_at is not None:
            return False
        study.closed_at = utcnow()
        return True


def add_annotators(sessions: sessionmaker, study_name: str, n: int) -> list[tuple[str, str]]:
    """``n`` new annotators with personal tokens: [(label, token)], labels ``web-001``, ``web-002``, ..."""
    if n < 1:
        raise StudyError(f"number of annotators must be >= 1, got {n}")
    with sessions.begin() as s:
        study = get_study(s, study_name)
        out = [(label, secrets.token_urlsafe(16)) for label in new_web_labels(s, study, n)]
        s.add_all(Annotator(study_id=study.id, label=label, token=token) for label, token in out)
    return out


def new_web_labels(s: Session, study: Study, n: int) -> list[str]:
    """The next ``n`` free web labels of a study: after the highest number in use (not the count: a gap or a
    foreign web-NNN would repeat a label). The study's row is locked until the transaction ends (PostgreSQL
    ``SELECT ... FOR UPDATE``; SQLite's ``BEGIN IMMEDIATE`` serialises writers already), so concurrent callers
    (admin "new links", crowd entries) number one after the other instead of picking the same label."""
    s.execute(select(Study.id).where(Study.id == study.id).with_for_update())
    labels = s.scalars(select(Annotator.label).where(Annotator.study_id == study.id,
                                                      Annotator.label.like(f"{WEB_PREFIX}%"))).all()
    have = max((int(m[1]) for m in map(re.compile(rf"{WEB_PREFIX}(\d+)$").match, labels) if m), default=0)
    return [f"{WEB_PREFIX}{have + k + 1:03d}" for k in range(n)]
