"""Outsourced studies: export the pairs for a vendor's tool, import the votes it returns.

``export-pairs`` writes ``pair_id, prompt, left, right`` (+ ``source`` for edits), gold pairs mixed in unmarked.
By default every image is copied, metadata stripped, to ``<images>/<pair_id>_<left|right|source>.png``, so the
vendor sees no system name, folder or file name either; ``--original-paths`` writes the original paths instead
(gold images, which live in the database, are still written out).

``import-votes`` reads ``annotator, pair_id, aspect, choice`` (choice: left / right / tie as the pair was shown,
or cant_tell where the study offers it;
other columns are ignored). Every row is checked first; any bad row (unknown pair, aspect or choice, an empty
annotator, a vote repeated in the file or already in the database) rejects the whole file, naming each bad line.
The good file is written in one transaction.
"""

from __future__ import annotations

import csv
import io
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import sessionmaker

from evals.ab.blind import image_png
from evals.ab.db import LABEL_MAX, WEB_PREFIX, Annotator, Pair, Vote
from evals.ab.study import StudyError, get_study

IMPORT_COLUMNS = ("annotator", "pair_id", "aspect", "choice")
MAX_LISTED = 50  # bad lines named in the error message; the count covers all of them


class VoteFileError(StudyError):
    """A votes file that cannot be imported; ``lines`` are its bad lines as ``(line number, reason)``."""

    def __init__(self, path: Path, lines: list[tuple[int, str]], total_rows: int) -> None:
        self.lines = lines
        shown = "; ".join(f"line {n}: {why}" for n, why in lines[:MAX_LISTED])
        more = f"; ... and {len(lines) - MAX_LISTED} more" if len(lines) > MAX_LISTED else ""
        super().__init__(f"{path}: {len(lines)} bad row(s) of {total_rows}, nothing imported: {shown}{more}")


def pairs_table(sessions: sessionmaker, study_name: str, images: Path | None = None,
                original_paths: bool = False) -> pd.DataFrame:
    """The study's pairs for a vendor: ``pair_id, prompt, left, right`` (+ ``source`` for edit studies).

    images: folder for blinded copies (every image, or with ``original_paths`` the gold ones only); without it,
    gold cells read ``(gold image: in the database)``.
    """
    with sessions() as s:
        study = get_study(s, study_name)
        pairs = s.scalars(select(Pair).where(Pair.study_id == study.id).order_by(Pair.public_id)).all()
        edit = study.layout == "edit"
        rows = []
        for p in pairs:
            row = {"pair_id": p.public_id, "prompt": spreadsheet_safe(p.prompt)}
            for which, img in (("left", p.left_image), ("right", p.right_image), ("source", p.source_image)):
                if which == "source" and not edit:
                    continue
                if img is None:
                    row[which] = ""
                elif images is not None and (img.data is not None or not original_paths):
                    dest = images / f"{p.public_id}_{which}.png"
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    dest.write_bytes(image_png(img))
                    row[which] = str(dest.resolve())
                else:
                    row[which] = img.path if img.path is not None else "(gold image: in the database)"
            rows.append(row)
    return pd.DataFrame(rows, columns=["pair_id", "prompt", "left", "right"] + (["source"] if edit else []))


def export_pairs(sessions: sessionmaker, study_name: str, out: str | Path, images: str | Path | None = None,
                 original_paths: bool = False) -> tuple[Path, int]:
    """Write the vendor CSV (images copied to ``images``, default ``<out stem>_images/`` beside it)."""
    out = Path(out)
    table = pairs_table(sessions, study_name, Path(images) if images else out.with_name(out.stem + "_images"),
                        original_paths)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False)
    return out, len(table)


def spreadsheet_safe(text: str) -> str:
    """A cell a spreadsheet shows as text: one starting with ``= + - @`` (or a tab / carriage return) would be
    run as a formula by Excel or LibreOffice, so it gets a leading apostrophe (OWASP's CSV-injection advice)."""
    return f"'{text}" if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def read_csv_text(path: Path) -> str:
    """A CSV file's text (UTF-8, with or without a byte-order mark). A file in another encoding (Excel's "CSV"
    in Windows-1252, say) is a ``StudyError`` naming the file, the line and the data row of the first bad byte."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        row = ""
        try:  # the data row the bad byte is in: the records before it, minus the header
            before = list(csv.reader(io.StringIO(raw[:err.start].decode("utf-8-sig"), newline="")))
            record = len(before) + (1 if raw[:err.start].endswith(b"\n") or not before else 0)
            row = f", data row {record - 1}" if record > 1 else ", the header"
        except csv.Error:
            pass
        raise StudyError(f"{path}: line {line}{row}: byte 0x{raw[err.start]:02x} is not UTF-8; save the file as "
                         "UTF-8 (in Excel: \"CSV UTF-8\")") from None


def csv_problem(path: Path, line: int, row: int, err: csv.Error) -> str:
    """One line on a CSV the reader cannot parse: the file, the line, the data row (0: the header) and why."""
    where = f"line {line}, " + (f"data row {row}" if row else "the header")
    if "field larger than field limit" in str(err):
        return (f"{path}: {where}: a field is longer than {csv.field_size_limit()} characters (the CSV reader's "
                "limit); a votes file has short fields, so this is likely an unclosed quote or the wrong file")
    return f"{path}: {where}: not valid CSV ({err})"


def _line_at(stream: io.StringIO) -> int:
    """The number of the line the reader read last: the reader's own count skips the line it failed on."""
    text, pos = stream.getvalue(), stream.tell()
    return text.count("\n", 0, pos) + (0 if pos and text[pos - 1] == "\n" else 1)


def csv_rows(path: Path, stream: io.StringIO) -> Iterator[dict[str, str]]:
    """The rows of a CSV text as dicts (header first); a line the CSV reader cannot parse is a ``StudyError``
    (``csv_problem``) naming the file, line and data row."""
    reader = csv.DictReader(stream)
    try:
        header = reader.fieldnames
    except csv.Error as err:
        raise StudyError(csv_problem(path, _line_at(stream), 0, err)) from None
    missing = [c for c in IMPORT_COLUMNS if c not in (header or [])]
    if missing:
        raise StudyError(f"{path}: missing column(s) {', '.join(missing)} (need {', '.join(IMPORT_COLUMNS)})")
    row = 0
    while True:
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            raise StudyError(csv_problem(path, _line_at(stream), row + 1, err)) from None
        row += 1
        yield record


@dataclass(frozen=True)
class Imported:
    votes: int
    new_annotators: int


def import_votes(sessions: sessionmaker, study_name: str, path: str | Path) -> Imported:
    """Check every row of a vendor's votes CSV, then store all of them in one transaction (or none)."""
    path = Path(path)
    if not path.is_file():
        raise StudyError(f"votes file not found: {path}")
    text = read_csv_text(path)
    with sessions.begin() as s:
        study = get_study(s, study_name)
        pair_ids = dict(s.execute(select(Pair.public_id, Pair.id).where(Pair.study_id == study.id)).all())
        annotators = dict(s.execute(select(Annotator.label, Annotator.id).where(
            Annotator.study_id == study.id)).all())
        stored = {(a, p, asp) for a, p, asp in s.execute(
            select(Annotator.label, Pair.public_id, Vote.aspect).join(Annotator, Annotator.id == Vote.annotator_id)
            .join(Pair, Pair.id == Vote.pair_id).where(Pair.study_id == study.id)).all()}
        bad: list[tuple[int, str]] = []
        rows: list[tuple[str, str, str, str]] = []
        first_line: dict[tuple[str, str, str], int] = {}
        stream = io.StringIO(text, newline="")
        n_rows = 0
        for row in csv_rows(path, stream):
            n_rows += 1
            line = _line_at(stream)
            who, pid, aspect, choice = ((row.get(c) or "").strip() for c in IMPORT_COLUMNS)
            choice = choice.lower()
            why = []
            if not who:
                why.append("empty annotator")
            elif who.startswith(WEB_PREFIX):
                why.append(f"annotator {who!r}: labels starting with {WEB_PREFIX!r} belong to web links; "
                           "rename the vendor's ids")
            elif len(who) > LABEL_MAX:
                why.append(f"annotator label longer than {LABEL_MAX} characters")
            if pid not in pair_ids:
                why.append(f"unknown pair_id {pid!r}")
            if aspect not in study.aspect_list:
                why.append(f"unknown aspect {aspect!r} (study asks {study.aspects})")
            if choice not in study.choices:
                why.append(f"unknown choice {choice!r} ({', '.join(study.choices)})")
            key = (who, pid, aspect)
            if not why and key in first_line:
                why.append(f"repeats the vote of line {first_line[key]}")
            if not why and key in stored:
                why.append("this annotator's vote on this pair and aspect is already in the database")
            if why:
                bad.append((line, "; ".join(why)))
            else:
                first_line[key] = line
                rows.append((who, pid, aspect, choice))
        if bad:
            raise VoteFileError(path, bad, n_rows)
        if not rows:
            raise StudyError(f"{path}: no votes in the file")
        new = sorted({who for who, *_ in rows} - set(annotators))
        for who in new:
            ann = Annotator(study_id=study.id, label=who, token=secrets.token_urlsafe(16))
            s.add(ann)
            s.flush()
            annotators[who] = ann.id
        try:
            s.add_all(Vote(pair_id=pair_ids[pid], annotator_id=annotators[who], aspect=aspect, choice=choice,
                           origin=f"import:{path.name}") for who, pid, aspect, choice in rows)
            s.flush()
        except IntegrityError as err:  # a vote stored meanwhile by another writer: the transaction rolls back
            raise StudyError(f"{path}: a vote in the file was stored meanwhile by another writer; nothing imported "
                             f"({err.orig})") from err
    return Imported(len(rows), len(new))
