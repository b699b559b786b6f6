"""``python -m evals.ab``: create a study, serve it, move pairs and votes to and from a vendor, report.

    python -m evals.ab create --db study.sqlite --study NAME --a DIR_A --b DIR_B --layout geneval \\
        --aspects overall,prompt_adherence,visual_quality --votes-per-pair 3 --gold-rate 0.1 --annotators 20
    python -m evals.ab serve --db study.sqlite --host 127.0.0.1 --port 8000
    python -m evals.ab report --db study.sqlite --study NAME --out results/NAME
    python -m evals.ab export-payments --db study.sqlite --study NAME --out payments.csv   # crowd (--crowd) studies

``--db`` is a SQLite file path or a database URL (``postgresql://user@host/db``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from evals.ab.db import DEFAULT_MIN_SECONDS
from evals.ab.layouts import LAYOUTS, LayoutError
from evals.ab.study import StudyError, get_study


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m evals.ab", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def cmd(name: str, text: str, study: bool = True) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=text, description=text)
        c.add_argument("--db", required=name != "demo",
                       help="SQLite file path or database URL" + (" (required)" if name != "demo" else
                                                                   " (default: a temporary SQLite file)"))
        if study:
            c.add_argument("--study", required=True, help="study name")
        return c

    c = cmd("create", "pair two systems' images of the same prompts and seeds into a study (new, or one more "
                      "comparison in an existing study)")
    c.add_argument("--a", required=True, help="folder of system A's images")
    c.add_argument("--b", required=True, help="folder of system B's images")
    c.add_argument("--name-a", help="system A's name in reports (default: its folder's name)")
    c.add_argument("--name-b", help="system B's name in reports (default: its folder's name)")
    c.add_argument("--layout", required=True, choices=LAYOUTS, help="folder layout (see evals/ab/layouts.py)")
    c.add_argument("--aspects", default="overall,prompt_adherence,visual_quality",
                   help="comma-separated questions asked per pair (default: %(default)s)")
    c.add_argument("--votes-per-pair", type=int, default=3, help="votes that make a pair valid (default: 3)")
    c.add_argument("--gold-rate", type=float, default=0.0, help="share of gold pairs mixed in (e.g. 0.1)")
    c.add_argument("--gold-threshold", type=float, default=0.8,
                   help="annotators below this gold accuracy are flagged (default: 0.8)")
    c.add_argument("--per-annotator", type=int, help="at most this many real pairs per annotator")
    c.add_argument("--lease-minutes", type=float, default=30.0,
                   help="an unanswered pair goes back to the pool after this long (default: 30)")
    c.add_argument("--min-seconds", type=float, default=DEFAULT_MIN_SECONDS,
                   help="annotators whose median time per pair (server-measured) is below this are flagged as "
                        "speeders; 0 turns the check off (default: %(default)s)")
    c.add_argument("--cant-tell", action="store_true",
                   help="offer a \"can't tell / broken image\" answer (counted apart, not in win rates)")
    c.add_argument("--crowd", action="store_true",
                   help="make one entry link for a crowd platform (Prolific ids in its query string) and a "
                        "completion code shown at the end (see docs/ab_studies.md)")
    c.add_argument("--completion-code", help="the platform's completion code to show at the end (implies --crowd; "
                                             "default: generated)")
    c.add_argument("--completion-url", help="send finished participants to this URL instead (implies --crowd), "
                                            "e.g. https://app.prolific.com/submissions/complete?cc=CODE")
    c.add_argument("--study-file", type=Path,
                   help="YAML or JSON with instructions (Markdown), consent (Markdown; annotators must agree first) "
                        "and questions (aspect: question text); see docs/ab_studies.md")
    c.add_argument("--prompts", type=Path, help="prompts file for the genai / dpg layouts (default: the shipped one)")
    c.add_argument("--seed", type=int, help="seed of the left/right sides and gold pairs (default: random)")
    c.add_argument("--annotators", type=int, default=0, help="also make this many annotator links")
    c.add_argument("--base-url", default="http://127.0.0.1:8000", help="server address used in printed links")

    c = cmd("links", "make more annotator links")
    c.add_argument("--n", type=int, required=True, help="how many")
    c.add_argument("--base-url", default="http://127.0.0.1:8000", help="server address used in printed links")

    cmd("close", "close a study: no more pairs or votes (410 on every link); the votes stay for the report")

    c = cmd("serve", "serve every study of the database to annotators", study=False)
    c.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; 0.0.0.0 for every interface (default: %(default)s, this machine only)")
    c.add_argument("--port", type=int, default=8000, help="port to listen on (default: %(default)s)")
    c.add_argument("--allowed-origin", action="append", default=[], metavar="URL",
                   help="also accept form posts from pages of this origin, e.g. https://ab.my-lab.org, when a proxy "
                        "in front rewrites the Host header (repeatable; default: none, only the address the "
                        "request was sent to)")

    c = cmd("export-pairs", "write the pairs for a vendor: pair_id, prompt, left, right (+ source)")
    c.add_argument("--out", required=True, type=Path, help="CSV to write")
    c.add_argument("--images", type=Path, help="folder for blinded image copies (default: <out stem>_images/)")
    c.add_argument("--original-paths", action="store_true", help="write the original image paths instead")

    c = cmd("import-votes", "import a vendor's votes: annotator, pair_id, aspect, choice (all rows or none)")
    c.add_argument("--csv", required=True, type=Path)

    c = cmd("export-payments", "write one row per crowd participant for approval and payment: platform ids, "
                               "label, pairs, votes, gold accuracy, median time, flagged, reason")
    c.add_argument("--out", required=True, type=Path, help="CSV to write")

    c = cmd("report", "win / tie / loss per aspect with CIs, agreement, figure")
    c.add_argument("--out", required=True, type=Path)
    c.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (default: 1000)")
    c.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: 0)")
    c.add_argument("--gold-threshold", type=float, help="override the study's gold accuracy threshold")
    c.add_argument("--min-seconds", type=float, help="override the study's minimum median seconds per pair")
    c.add_argument("--keep-flagged", action="store_true", help="keep flagged annotators in the main table")
    c.add_argument("--note", help="a line printed at the top of report.md")

    c = cmd("demo", "the demo study with SIMULATED annotators on committed shapes-world images", study=False)
    c.add_argument("--out", type=Path, default=Path("results/ab_demo"))
    c.add_argument("--make-floor", action="store_true",
                   help="first draw the demo's untrained system again into results/ab_demo/systems/untrained "
                        "(builds the model; a few seconds)")
    return p


def _links(made: list[tuple[str, str]], base_url: str) -> None:
    for label, token in made:
        print(f"{label}\t{base_url.rstrip('/')}/a/{token}")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from sqlalchemy.exc import SQLAlchemyError

    try:
        return _run(args)
    except (StudyError, LayoutError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except SQLAlchemyError as err:
        print(f"error: database: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from evals.ab.db import make_engine, make_sessions

    if args.command == "demo":
        from evals.ab.demo import make_floor, run_demo

        if args.make_floor:
            print(f"untrained system's images in {make_floor()}")
        print(f"demo report (simulated annotators) in {run_demo(args.out, args.db)}")
        return 0
    engine = make_engine(args.db)
    if args.command == "serve":
        from evals.ab.web import origin_list, serve

        try:
            origin_list(args.allowed_origin)
        except ValueError as err:
            raise StudyError(f"--allowed-origin: {err}") from None
        print(f"serving on http://{args.host}:{args.port}/a/<token>  (Ctrl-C stops)", flush=True)
        serve(engine, args.host, args.port, args.allowed_origin)
        return 0
    sessions = make_sessions(engine)
    if args.command == "create":
        from evals.ab.study import add_annotators, create_study, parse_aspects, read_study_file

        aspects = parse_aspects(args.aspects)
        text = read_study_file(args.study_file, aspects) if args.study_file else None
        made = create_study(sessions, args.study, args.a, args.b, args.layout, aspects,
                            args.votes_per_pair, args.name_a, args.name_b, args.gold_rate, args.gold_threshold,
                            args.per_annotator, round(args.lease_minutes * 60), args.prompts, args.seed,
                            args.min_seconds, args.cant_tell, args.crowd, args.completion_code,
                            args.completion_url, text)
        print(f"study {made.study}: {made.pairs} pairs + {made.gold} gold pairs")
        if made.admin_token:
            print(f"admin token (shown once): {made.admin_token}")
        if made.crowd_token:
            from evals.ab.crowd import crowd_link

            with sessions() as s:
                print(f"crowd link (the platform's study URL): {crowd_link(get_study(s, args.study), args.base_url)}")
            print(f"completion code: {made.completion_code}" if made.completion_code else
                  f"finished participants go to: {args.completion_url}")
        if args.annotators:
            _links(add_annotators(sessions, args.study, args.annotators), args.base_url)
    elif args.command == "links":
        from evals.ab.study import add_annotators

        _links(add_annotators(sessions, args.study, args.n), args.base_url)
    elif args.command == "close":
        from evals.ab.study import close_study

        print(f"study {args.study}: {'closed' if close_study(sessions, args.study) else 'was already closed'}")
    elif args.command == "export-pairs":
        from evals.ab.vendor import export_pairs

        out, n = export_pairs(sessions, args.study, args.out, args.images, args.original_paths)
        print(f"{n} pairs -> {out}")
    elif args.command == "import-votes":
        from evals.ab.vendor import import_votes

        done = import_votes(sessions, args.study, args.csv)
        print(f"imported {done.votes} votes ({done.new_annotators} new annotators)")
    elif args.command == "export-payments":
        from evals.ab.crowd import export_payments

        out, n = export_payments(sessions, args.study, args.out)
        print(f"{n} participants -> {out}")
    elif args.command == "report":
        from evals.ab.report import build_report, write_report

        if args.resamples < 1:
            raise StudyError(f"--resamples must be >= 1, got {args.resamples}")
        if args.min_seconds is not None and args.min_seconds < 0:
            raise StudyError(f"--min-seconds must be >= 0, got {args.min_seconds}")
        report = build_report(sessions, args.study, args.resamples, args.seed, args.gold_threshold,
                              args.keep_flagged, args.note, args.min_seconds)
        for path in write_report(report, args.out):
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
