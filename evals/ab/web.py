"""The study's web app (FastAPI, server-rendered Jinja templates, no build step).

Annotator routes (the token in the path is the only credential; unknown or missing -> 403):
    GET  /p/{crowd token}?PROLIFIC_PID=...&STUDY_ID=...&SESSION_ID=...   a crowd platform's entry link -> 303 to
                                       the participant's own /a/{token} (evals/ab/crowd.py; bad ids -> 400)
    GET  /a/{token}                    the next pair (prompt, two images, one left/right/tie per aspect) or "done"
                                       (with the completion code, or 303 to the study's completion URL)
    POST /a/{token}/vote               the answers for one pair -> 303 back to /a/{token} (``replace=1``: new
                                       answers for the last answered pair, from the back page)
    GET  /a/{token} (consent step)     a study with consent text shows it (and its instructions) until
    POST /a/{token}/consent            "I agree" is clicked (recorded with the server's time)
    GET  /a/{token} (practice step)    after consent, a study file's practice pairs one by one (before any real pair)
    POST /a/{token}/practice           a practice answer (stored apart from votes) -> 303 to its feedback page
    GET  /a/{token}/practice/{k}       whether practice answer k matched the expected one, and its explanation
    GET  /a/{token}/practice/{k}/img/{which}  an image of practice pair k
    GET  /a/{token}/back               the last answered pair with its stored answers, to change them
    GET  /a/{token}/img/{pair}/{which} an image of a pair given to this annotator (which: left, right, source)
Admin routes (``Authorization: Bearer <admin token>`` or ``?token=``; wrong or missing -> 403):
    GET  /admin/{study}                dashboard: progress per aspect, per annotator (answered, gold accuracy, median
                                       time, flag), crowd link, links, downloads
    POST /admin/{study}/annotators?n=K K new annotator links (JSON)
    GET  /admin/{study}/pairs.csv      the pairs (export), GET /admin/{study}/votes.csv the votes,
    GET  /admin/{study}/payments.csv   one row per participant (evals/ab/crowd.py)
    GET  /admin/{study}/report         the report as a page (Markdown rendered, figure embedded); report.md the
                                       Markdown, win_rates.png the figure, /admin/{study}/win_rates.csv its table
Other: GET / says what the server is (200; no study data or tokens on it).
Every POST whose Origin (or Referer) is another site is refused with 403 before its body is read (``same_origin``).

Blinding: annotator pages and image URLs carry only random ids; images are re-encoded on the way out, so no
file name, folder or embedded metadata (e.g. a generator's PNG text chunks) reaches the browser.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import quote, urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from starlette.concurrency import run_in_threadpool

from evals.ab.assign import (
    AnnotatorError,
    ConsentRequired,
    PracticeStep,
    Progress,
    check_token,
    give_consent,
    last_answer,
    next_pair,
    next_practice,
    pair_for,
    practice_step,
    record_practice,
    record_vote,
)
from evals.ab.blind import ImageChanged, image_png
from evals.ab.crowd import BadPlatformIds, bind_ids, crowd_link, enter
from evals.ab.db import (
    CANT_TELL,
    Annotator,
    Assignment,
    Image,
    Pair,
    PracticeItem,
    Study,
    make_engine,
    make_sessions,
)
from evals.ab.safe_markdown import render as markdown
from evals.ab.study import StudyError, add_annotators, admin_ok, get_study, question

TEMPLATES = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))
CHOICE_LABELS = (("left", "Left is better", "1 or ←"), ("tie", "About the same", "2 or ↓"),
                 ("right", "Right is better", "3 or →"), (CANT_TELL, "Can't tell / broken image", "4"))


def _choice_labels(study: Study) -> list[tuple[str, str, str]]:
    return [c for c in CHOICE_LABELS if c[0] in study.choices]


class _ImageCache:
    """Re-encoded image bytes by image id (bounded LRU, thread-safe): a page's images are fetched once."""

    def __init__(self, size: int = 512) -> None:
        self.size, self.items, self.lock = size, OrderedDict(), threading.Lock()

    def get(self, image: Image) -> bytes:
        with self.lock:
            if image.id in self.items:
                self.items.move_to_end(image.id)
                return self.items[image.id]
        data = image_png(image)
        with self.lock:
            self.items[image.id] = data
            if len(self.items) > self.size:
                self.items.popitem(last=False)
        return data


def _auth_query(request: Request) -> str:
    """A page opened with ``?token=`` passes it on to its links (a header does not travel in a link)."""
    return f"?token={quote(request.query_params['token'])}" if "token" in request.query_params else ""


def same_origin(request: Request, allowed: frozenset[str] = frozenset()) -> bool:
    """Whether a POST comes from this server's own pages: its ``Origin`` (else its ``Referer``) names the host and
    port the request was sent to (``Host``), or one of ``allowed`` (``serve --allowed-origin``, for a proxy that
    rewrites ``Host``). The scheme is not compared: behind an HTTPS proxy the page is https and the app sees http.
    A request with neither header passes: browsers send ``Origin`` on every POST, cross-site ones included, so a
    missing one is a script, a test client or a vendor tool, which a forged form cannot be. ``Origin: null`` (a
    sandboxed frame, a privacy-stripped redirect) is refused."""
    origin = request.headers.get("origin") or request.headers.get("referer")
    if origin is None:
        return True
    parts = urlsplit(origin.strip())
    if not parts.scheme or not parts.netloc:
        return False
    netloc = parts.netloc.lower()
    if f"{parts.scheme}://{netloc}" in allowed:
        return True
    return netloc == request.headers.get("host", "").strip().lower()


def _message(request: Request, status: int, text: str) -> HTMLResponse:
    return TEMPLATES.TemplateResponse(request, "message.html", {"text": text}, status_code=status)


def origin_list(origins: Iterable[str]) -> frozenset[str]:
    """``scheme://host[:port]`` of each allowed origin, lower-case, without a path or a trailing slash."""
    out = set()
    for origin in origins:
        parts = urlsplit(origin.strip())
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"an allowed origin must look like https://host[:port], got {origin!r}")
        out.add(f"{parts.scheme}://{parts.netloc.lower()}")
    return frozenset(out)


def create_app(db: str | Engine, allowed_origins: Iterable[str] = ()) -> FastAPI:
    """The app for a database URL (or an engine); every study in the database is served. ``allowed_origins``:
    origins besides the request's own host whose pages may POST (see ``same_origin``)."""
    engine = make_engine(db) if isinstance(db, str) else db
    sessions = make_sessions(engine)
    images = _ImageCache()
    allowed = origin_list(allowed_origins)
    app = FastAPI(title="A/B study", docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def refuse_cross_origin_posts(request: Request, call_next):  # noqa: ANN001, ANN202
        # before any route reads a body: another site's page cannot make an annotator's browser vote or agree
        if request.method == "POST" and not same_origin(request, allowed):
            return _message(request, 403, "This form was sent from another site and was refused.")
        return await call_next(request)

    @app.exception_handler(AnnotatorError)
    async def annotator_error(request: Request, err: AnnotatorError) -> HTMLResponse:
        return _message(request, err.status, err.message)

    @app.get("/", response_class=HTMLResponse)
    def home(request: Request) -> HTMLResponse:
        """What this server is, for someone who opens its address: no study, name or token on it."""
        return TEMPLATES.TemplateResponse(request, "home.html", {})

    @app.get("/a", response_class=HTMLResponse)
    @app.get("/a/", response_class=HTMLResponse)
    def no_token(request: Request) -> HTMLResponse:
        return _message(request, 403, "Please use the personal link you were given.")

    def pair_page(request: Request, token: str, pair: Pair, study: Study, progress: Progress,
                  previous: dict[str, str] | None = None) -> HTMLResponse:
        aspects = [(a, question(a, study.question_map)) for a in study.aspect_list]
        n = progress.done if previous is not None else progress.done + 1
        return TEMPLATES.TemplateResponse(request, "pair.html", {
            "instructions": markdown(study.instructions) if study.instructions else None,
            "token": token, "pair": pair, "aspects": aspects, "choices": _choice_labels(study),
            "progress": progress, "edit": pair.source_image_id is not None, "practice": False,
            "progress_text": f"{n} of {progress.total}", "previous": previous or {},
            "img_base": f"/a/{token}/img/{pair.public_id}", "action": f"/a/{token}/vote",
            "can_go_back": previous is None and progress.done > 0})

    def practice_page(request: Request, token: str, step: PracticeStep, study: Study) -> HTMLResponse:
        """A practice pair: the same page as a real pair, asking only the item's aspect."""
        item = step.item
        return TEMPLATES.TemplateResponse(request, "pair.html", {
            "instructions": markdown(study.instructions) if study.instructions else None,
            "token": token, "pair": item, "aspects": [(item.aspect, question(item.aspect, study.question_map))],
            "choices": _choice_labels(study), "progress": Progress(item.position - 1, step.total),
            "edit": item.source_image_id is not None, "practice": True,
            "progress_text": f"Practice {item.position} of {step.total}", "previous": {},
            "img_base": f"/a/{token}/practice/{item.position}/img", "action": f"/a/{token}/practice",
            "can_go_back": False})

    def consent_page(request: Request, token: str, need: ConsentRequired) -> HTMLResponse:
        return TEMPLATES.TemplateResponse(request, "consent.html", {
            "token": token, "consent": markdown(need.consent),
            "instructions": markdown(need.instructions) if need.instructions else None})

    @app.get("/p/{crowd_token}")
    def crowd_entry(request: Request, crowd_token: str) -> Response:
        """A crowd platform's entry link: the participant's own annotator (made on the first visit)."""
        try:
            token = enter(sessions, crowd_token, request.query_params)
        except BadPlatformIds as err:
            raise AnnotatorError(400, f"This link is not complete: {err}.") from None
        return RedirectResponse(f"/a/{token}", status_code=303)

    @app.get("/a/{token}", response_class=HTMLResponse)
    def page(request: Request, token: str) -> Response:
        try:
            if not bind_ids(sessions, token, request.query_params):
                raise AnnotatorError(403, "This link belongs to another participant.")
        except BadPlatformIds as err:
            raise AnnotatorError(400, f"This link is not complete: {err}.") from None
        try:
            # consent first, then the practice round (if the study file has one), then the real pairs
            step = next_practice(sessions, token)
            if step is not None:
                with sessions() as s:
                    study = s.get(Study, step.item.study_id)
                return practice_page(request, token, step, study)
            pair, study, progress = next_pair(sessions, token)
        except ConsentRequired as need:
            return consent_page(request, token, need)
        if pair is None:
            finished = progress.done > 0  # someone who got nothing to do has not earned a completion code
            if finished and study.completion_url:
                return RedirectResponse(study.completion_url, status_code=303)
            return TEMPLATES.TemplateResponse(request, "done.html", {
                "progress": progress, "token": token, "code": study.completion_code if finished else None,
                "crowd": study.crowd_token is not None})
        return pair_page(request, token, pair, study, progress)

    @app.post("/a/{token}/consent")
    def consent(token: str) -> Response:
        give_consent(sessions, token)
        return RedirectResponse(f"/a/{token}", status_code=303)

    @app.post("/a/{token}/practice")
    async def practice_answer(request: Request, token: str) -> Response:
        """A practice answer: stored apart from the votes, then the feedback page."""
        await run_in_threadpool(check_token, sessions, token)  # before the body is read (and spooled)
        form = await request.form()
        try:
            position = int(str(form.get("practice", "")))
        except ValueError:
            raise AnnotatorError(404, "No such practice pair.") from None
        choice = next((str(v) for k, v in form.items() if k.startswith("choice_")), "")
        await run_in_threadpool(record_practice, sessions, token, position, choice)
        return RedirectResponse(f"/a/{token}/practice/{position}", status_code=303)

    @app.get("/a/{token}/practice/{position}", response_class=HTMLResponse)
    def practice_feedback(request: Request, token: str, position: int) -> Response:
        """Whether the annotator's practice answer matched the expected one, and the item's explanation."""
        step = practice_step(sessions, token, position)
        if step.choice is None:  # not answered yet: the annotator's page shows it
            return RedirectResponse(f"/a/{token}", status_code=303)
        with sessions() as s:
            study = s.get(Study, step.item.study_id)
        labels = {value: label for value, label, _ in CHOICE_LABELS}
        return TEMPLATES.TemplateResponse(request, "practice_feedback.html", {
            "token": token, "step": step, "labels": labels,
            "question": question(step.item.aspect, study.question_map),
            "explanation": markdown(step.item.explanation) if step.item.explanation else None,
            "img_base": f"/a/{token}/practice/{position}/img"})

    @app.get("/a/{token}/practice/{position}/img/{which}")
    def practice_image(token: str, position: int, which: str) -> Response:
        item = practice_step(sessions, token, position).item
        chosen = {"left": item.left_image, "right": item.right_image, "source": item.source_image}.get(which)
        if chosen is None:
            raise AnnotatorError(404, "No such image.")
        return _image_response(chosen)

    @app.get("/a/{token}/back", response_class=HTMLResponse)
    def back(request: Request, token: str) -> Response:
        """The annotator's last answered pair with their answers, to change them (one step back only)."""
        last = last_answer(sessions, token)
        if last is None:
            return RedirectResponse(f"/a/{token}", status_code=303)
        pair, study, stored = last
        _, _, progress = next_pair(sessions, token)
        return pair_page(request, token, pair, study, progress, previous=stored)

    @app.post("/a/{token}/vote")
    async def vote(request: Request, token: str) -> Response:
        await run_in_threadpool(check_token, sessions, token)  # a bad link's upload is never read nor spooled
        form = await request.form()
        choices = {k[len("choice_"):]: str(v) for k, v in form.items() if k.startswith("choice_")}
        await run_in_threadpool(record_vote, sessions, token, str(form.get("pair", "")), choices,
                                replace=form.get("replace") == "1")
        return RedirectResponse(f"/a/{token}", status_code=303)

    @app.get("/a/{token}/img/{public_id}/{which}")
    def image(token: str, public_id: str, which: str) -> Response:
        pair = pair_for(sessions, token, public_id)
        chosen = {"left": pair.left_image, "right": pair.right_image, "source": pair.source_image}.get(which)
        if chosen is None:
            raise AnnotatorError(404, "No such image.")
        return _image_response(chosen)

    def _image_response(chosen: Image) -> Response:
        try:
            data = images.get(chosen)
        except ImageChanged as err:  # the organisers see the file in the server log; the annotator sees no path
            print(f"refused to serve: {err}", flush=True)
            raise AnnotatorError(409, "This image is not available. Please reload the page.") from None
        return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    # ------------------------------------------------------------------------------------------------ admin
    def admin_study(request: Request, name: str):  # noqa: ANN202
        auth = request.headers.get("authorization", "")
        token = auth[len("Bearer "):] if auth.startswith("Bearer ") else request.query_params.get("token")
        with sessions() as s:
            try:
                study = get_study(s, name)
            except StudyError:
                study = None
            if study is None or not admin_ok(study, token):  # same answer: names of studies do not leak
                raise AnnotatorError(403, "Admin token required.")
            return study

    @app.get("/admin/{name}", response_class=HTMLResponse)
    def admin_page(request: Request, name: str) -> HTMLResponse:
        study = admin_study(request, name)
        with sessions() as s:
            done = func.count(Assignment.completed_at)
            rows = s.execute(select(Annotator.label, Annotator.token, Annotator.platform_pid, done)
                             .outerjoin(Assignment, Assignment.annotator_id == Annotator.id)
                             .where(Annotator.study_id == study.id).group_by(Annotator.id)
                             .order_by(Annotator.label)).all()
            per_pair = select(Assignment.pair_id, func.count(Assignment.completed_at).label("n")).join(
                Pair, Pair.id == Assignment.pair_id).where(Pair.study_id == study.id, Pair.gold_answer.is_(None),
                                                            Assignment.slot.is_not(None)).group_by(
                Assignment.pair_id).subquery()
            complete = s.scalar(select(func.count()).select_from(per_pair).where(
                per_pair.c.n >= study.votes_per_pair))
            n_pairs = s.scalar(select(func.count()).select_from(Pair).where(
                Pair.study_id == study.id, Pair.gold_answer.is_(None)))
            n_practice = s.scalar(select(func.count()).select_from(PracticeItem).where(
                PracticeItem.study_id == study.id))
        from evals.ab.report import annotator_flags, load_votes, pair_outcomes

        # the report's own definitions (one place): gold accuracy, speed, flags, and validity per aspect
        votes, pairs = load_votes(sessions, study.name)
        flags = annotator_flags(votes, pairs, study.aspect_list, study.gold_threshold, study.speed_limit)
        flags = {r.annotator: r for r in flags.itertuples()}
        outcomes = pair_outcomes(votes, pairs, study.votes_per_pair) if len(votes) else None
        per_aspect = [(a, 0 if outcomes is None else int((outcomes.valid & (outcomes.aspect == a)).sum()),
                       int(((votes.aspect == a) & (votes.choice == CANT_TELL)).sum())) for a in study.aspect_list]
        from evals.ab.report import practice_table

        practice = {r.annotator: r for r in practice_table(sessions, study.name).itertuples()}
        base = str(request.base_url).rstrip("/")
        return TEMPLATES.TemplateResponse(request, "admin.html", {
            "study": study, "annotators": [(label, f"{base}/a/{tok}", pid, n, flags.get(label), practice.get(label))
                                           for label, tok, pid, n in rows],
            "has_practice": bool(practice) or n_practice > 0,
            "complete": complete, "n_pairs": n_pairs, "crowd_link": crowd_link(study, base),
            "per_aspect": per_aspect,
            "auth": _auth_query(request)})

    @app.post("/admin/{name}/annotators")
    def admin_links(request: Request, name: str, n: int = 1) -> JSONResponse:
        study = admin_study(request, name)
        base = str(request.base_url).rstrip("/")
        try:
            made = add_annotators(sessions, study.name, n)
        except StudyError as err:
            return JSONResponse({"error": str(err)}, status_code=422)
        return JSONResponse({"links": [{"label": label, "url": f"{base}/a/{tok}"} for label, tok in made]})

    @app.get("/admin/{name}/pairs.csv")
    def admin_pairs(request: Request, name: str) -> PlainTextResponse:
        from evals.ab.vendor import pairs_table

        study = admin_study(request, name)
        return PlainTextResponse(pairs_table(sessions, study.name).to_csv(index=False), media_type="text/csv")

    @app.get("/admin/{name}/votes.csv")
    def admin_votes(request: Request, name: str) -> PlainTextResponse:
        from evals.ab.report import load_votes

        study = admin_study(request, name)
        votes, _ = load_votes(sessions, study.name)
        return PlainTextResponse(votes.to_csv(index=False), media_type="text/csv")

    @app.get("/admin/{name}/payments.csv")
    def admin_payments(request: Request, name: str) -> PlainTextResponse:
        from evals.ab.crowd import payments_table

        study = admin_study(request, name)
        return PlainTextResponse(payments_table(sessions, study.name).to_csv(index=False), media_type="text/csv")

    @app.get("/admin/{name}/report", response_class=HTMLResponse)
    def admin_report(request: Request, name: str) -> HTMLResponse:
        """The report as a page: its Markdown rendered with the safe subset (all text escaped) and the figure
        embedded (a data URL: no second request, so no token in an image URL)."""
        import base64

        from evals.ab.report import build_report, figure_png

        study = admin_study(request, name)
        report = build_report(sessions, study.name)
        figure = base64.b64encode(figure_png(report)).decode() if len(report.win_rates) else None
        return TEMPLATES.TemplateResponse(request, "report.html", {
            "study": study, "body": markdown(report.markdown), "figure": figure, "auth": _auth_query(request)})

    @app.get("/admin/{name}/report.md")
    def admin_report_md(request: Request, name: str) -> PlainTextResponse:
        from evals.ab.report import build_report

        study = admin_study(request, name)
        return PlainTextResponse(build_report(sessions, study.name).markdown, media_type="text/markdown")

    @app.get("/admin/{name}/win_rates.png")
    def admin_figure(request: Request, name: str) -> Response:
        from evals.ab.report import build_report, figure_png

        study = admin_study(request, name)
        return Response(figure_png(build_report(sessions, study.name)), media_type="image/png")

    @app.get("/admin/{name}/win_rates.csv")
    def admin_win_rates(request: Request, name: str) -> PlainTextResponse:
        from evals.ab.report import build_report

        study = admin_study(request, name)
        return PlainTextResponse(build_report(sessions, study.name).win_rates_csv(), media_type="text/csv")

    return app


def serve(db: str | Engine, host: str = "127.0.0.1", port: int = 8000, allowed_origins: Iterable[str] = ()) -> None:
    """Run the app with uvicorn until interrupted (access log off: URLs carry annotators' tokens)."""
    import uvicorn

    uvicorn.run(create_app(db, allowed_origins), host=host, port=port, log_level="warning", access_log=False)
