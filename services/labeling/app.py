"""The labelling app: server-rendered pages (FastAPI + Jinja2, no front-end build) where annotators compare
responses, and where an admin uploads tasks, watches agreement and downloads the labels.

Pages: ``/login``, ``/`` (the next task), ``/tasks/{id}`` (an assigned task), ``/stats``, ``/admin/upload``.
API (session cookie, or ``Authorization: Bearer <token>`` of an account): ``GET /api/stats``,
``GET /export/preferences.jsonl``, ``GET /export/rankings.jsonl``, ``GET /healthz``.
Errors: an unknown task 404, a task not assigned to you 403, a second label (or a late one, for a task that went
to others when your assignment timed out) 409, a bad choice or upload 422, the store unreachable 503, not signed
in: a redirect to the sign-in page (pages) or 401 (API).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import signal
from pathlib import Path

from fastapi import Depends, FastAPI, Form, HTTPException, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from starlette.middleware.sessions import SessionMiddleware

from services.labeling.accounts import Account, Accounts, Role
from services.labeling.config import LabelingConfig
from services.labeling.export import Aggregate, preference_rows, ranking_rows
from services.labeling.stats import labelling_stats
from services.labeling.store import (
    PAIR,
    AlreadyLabelled,
    AssignmentExpired,
    LabelStore,
    NotAssigned,
    UnknownTask,
    check_item,
    open_label_store,
)
from shared.auth import MIN_TOKEN_CHARS, PLACEHOLDER_MARK, ServerAuth, is_loopback
from shared.config import ConfigError
from shared.errors import InvalidInput
from shared.store import StoreUnavailable

log = logging.getLogger(__name__)

TEMPLATES = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))


class SignInRequired(Exception):
    pass


def session_secret(config: LabelingConfig) -> str:
    if not config.session_secret_file:
        if not is_loopback(config.host):
            raise ConfigError(f"session_secret_file: required for an app bound to {config.host}")
        return secrets.token_hex(32)
    try:
        secret = Path(config.session_secret_file).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"session_secret_file {config.session_secret_file}: {exc}") from exc
    if len(secret) < 32 or PLACEHOLDER_MARK.lower() in secret.lower():
        raise ConfigError(
            f"session_secret_file {config.session_secret_file}: needs a random key of at least 32 characters "
            "(e.g. `openssl rand -hex 32`)"
        )
    return secret


def create_app(config: LabelingConfig, store: LabelStore, accounts: Accounts) -> FastAPI:
    app = FastAPI(title="rlhf labelling", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(
        SessionMiddleware,
        secret_key=session_secret(config),
        session_cookie="rlhf_labeling",
        same_site="strict",
        https_only=config.secure_cookies or bool(config.auth.tls.cert_file),  # Secure whenever served over HTTPS
        max_age=12 * 3600,
    )

    def current(request: Request) -> Account | None:
        name = request.session.get("annotator")
        if name and name in accounts.by_name:
            return accounts.by_name[name]
        scheme, _, token = (request.headers.get("authorization") or "").partition(" ")
        if scheme.lower() == "bearer" and len(token) >= MIN_TOKEN_CHARS:
            return accounts.sign_in_with_token(token.strip())
        return None

    def annotator(request: Request) -> Account:
        account = current(request)
        if account is None:
            raise SignInRequired()
        return account

    def admin(account: Account = Depends(annotator)) -> Account:
        if account.role is not Role.ADMIN:
            raise HTTPException(403, "this page is for admins")
        return account

    def page(request: Request, name: str, status_code: int = 200, **context) -> HTMLResponse:
        context.setdefault("account", current(request))
        return TEMPLATES.TemplateResponse(request, name, context, status_code=status_code)

    async def error_page(request: Request, status: int, message: str) -> Response:
        if request.url.path.startswith(("/api/", "/export/")):
            return JSONResponse({"error": message}, status_code=status)
        return page(request, "error.html", status, status=status, message=message)

    @app.exception_handler(SignInRequired)
    async def _sign_in(request: Request, exc: SignInRequired) -> Response:
        if request.url.path.startswith(("/api/", "/export/")):
            return JSONResponse({"error": "sign in first"}, status_code=401, headers={"WWW-Authenticate": "Bearer"})
        return RedirectResponse("/login", status_code=303)

    errors = (
        (UnknownTask, 404),
        (NotAssigned, 403),
        (AlreadyLabelled, 409),
        (AssignmentExpired, 409),
        (InvalidInput, 422),
        (StoreUnavailable, 503),
    )
    for kind, status in errors:

        async def handle(request: Request, exc: Exception, status: int = status) -> Response:
            return await error_page(request, status, str(exc))

        app.add_exception_handler(kind, handle)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> Response:
        return await error_page(request, exc.status_code, str(exc.detail))

    @app.get("/healthz", response_class=PlainTextResponse)
    async def healthz() -> str:
        return "ok"

    @app.get("/login", response_class=HTMLResponse)
    async def login_page(request: Request):
        return page(request, "login.html")

    @app.post("/login")
    async def login(request: Request, name: str = Form(""), password: str = Form(""), token: str = Form("")):
        if token:
            account = await asyncio.to_thread(accounts.sign_in_with_token, token.strip())
        else:
            account = await asyncio.to_thread(accounts.sign_in, name.strip(), password)
        if account is None:
            return page(request, "login.html", 401, error="Wrong name, password or token.")
        request.session.clear()
        request.session["annotator"] = account.name
        # An admin lands on the stats: opening "/" assigns a task, which would hold an annotator's place.
        return RedirectResponse("/stats" if account.role is Role.ADMIN else "/", status_code=303)

    @app.post("/logout")
    async def logout(request: Request):
        request.session.clear()
        return RedirectResponse("/login", status_code=303)

    def task_page(request: Request, account: Account, task, assignment, status: int = 200) -> HTMLResponse:
        shown = [task.responses[i] for i in assignment.order]
        template = "pair.html" if task.kind == PAIR else "ranking.html"
        progress = store.progress(account.name)
        return page(request, template, status, task=task, shown=shown, progress=progress)

    @app.get("/", response_class=HTMLResponse)
    async def next_task(request: Request, account: Account = Depends(annotator)):
        found = await asyncio.to_thread(store.next_task, account.name)
        if found is None:
            return page(request, "done.html", progress=store.progress(account.name))
        return task_page(request, account, *found)

    @app.get("/tasks/{tid}", response_class=HTMLResponse)
    async def show_task(request: Request, tid: str, account: Account = Depends(annotator)):
        assignment = await asyncio.to_thread(store.assignment, account.name, tid)
        return task_page(request, account, store.task(tid), assignment)

    @app.post("/tasks/{tid}/label")
    async def label(
        tid: str,
        choice: str = Form(""),
        ranking: str = Form(""),
        comment: str = Form(""),
        account: Account = Depends(annotator),
    ):
        positions = []
        if ranking:
            try:
                positions = [int(x) for x in ranking.split(",")]
            except ValueError as exc:
                raise InvalidInput("ranking", f"comma-separated positions, got {ranking!r}") from exc
        await asyncio.to_thread(store.submit, account.name, tid, choice, positions, comment)
        return RedirectResponse("/", status_code=303)

    def stats() -> dict:
        return labelling_stats(store.labels(), store.queue_size(), len(store.tasks()))

    @app.get("/api/stats")
    async def api_stats(_: Account = Depends(admin)) -> dict:
        return await asyncio.to_thread(stats)

    @app.get("/stats", response_class=HTMLResponse)
    async def stats_page(request: Request, _: Account = Depends(admin)):
        return page(request, "stats.html", stats=await asyncio.to_thread(stats))

    def jsonl(rows: list[dict], name: str) -> Response:
        body = "".join(json.dumps(row) + "\n" for row in rows)
        headers = {"Content-Disposition": f'attachment; filename="{name}"'}
        return Response(body, media_type="application/x-ndjson", headers=headers)

    @app.get("/export/preferences.jsonl")
    async def export_preferences(
        aggregate: Aggregate = Aggregate.EACH, batch: str | None = None, _: Account = Depends(admin)
    ):
        rows = preference_rows(store.tasks(batch), store.labels(batch), aggregate)
        return jsonl(rows, "preferences.jsonl")

    @app.get("/export/rankings.jsonl")
    async def export_rankings(
        aggregate: Aggregate = Aggregate.EACH, batch: str | None = None, _: Account = Depends(admin)
    ):
        return jsonl(ranking_rows(store.tasks(batch), store.labels(batch), aggregate), "rankings.jsonl")

    @app.get("/admin/upload", response_class=HTMLResponse)
    async def upload_page(request: Request, _: Account = Depends(admin)):
        return page(request, "upload.html")

    @app.post("/admin/upload", response_class=HTMLResponse)
    async def upload(
        request: Request,
        file: UploadFile,
        batch: str = Form("upload"),
        split_pairs: bool = Form(False),
        _: Account = Depends(admin),
    ):
        data = await file.read(config.max_upload_bytes + 1)
        if len(data) > config.max_upload_bytes:
            raise InvalidInput("file", f"larger than {config.max_upload_bytes} bytes")
        items = parse_upload(data, split_pairs)
        ids = await asyncio.to_thread(store.add_tasks, batch.strip() or "upload", items)
        return page(request, "upload.html", added=len(ids), batch=batch)

    return app


def parse_upload(data: bytes, split_pairs: bool) -> list[dict]:
    """JSONL rows ``{"prompt", "responses"}`` -> task items; a bad line is refused with its number, and then nothing
    is added."""
    try:
        text = data.decode()
    except UnicodeDecodeError as exc:
        raise InvalidInput("file", "not UTF-8 text") from exc
    items = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidInput(f"line {number}", f"not JSON ({exc.msg})") from exc
        if not isinstance(row, dict) or not isinstance(row.get("responses"), list):
            raise InvalidInput(f"line {number}", 'expected {"prompt": ..., "responses": [...]}')
        responses = row["responses"]
        if split_pairs and len(responses) > 2:
            items += [
                {"prompt": row.get("prompt"), "responses": [responses[i], responses[j]], "_line": number}
                for i in range(len(responses))
                for j in range(i + 1, len(responses))
            ]
        else:
            items.append({"prompt": row.get("prompt"), "responses": responses, "_line": number})
    if not items:
        raise InvalidInput("file", "no rows")
    for item in items:
        try:
            check_item(item["_line"] - 1, item)
        except InvalidInput as exc:
            raise InvalidInput(f"line {item['_line']}", str(exc).split(": ", 1)[1]) from exc
    return [{"prompt": item["prompt"], "responses": item["responses"]} for item in items]


async def serve_labeling(config: LabelingConfig, on_ready=None) -> None:
    """Serves the app until SIGTERM or SIGINT (then closes the store)."""
    from shared.http import HttpServer

    accounts = Accounts.load(config.accounts_file)
    store = open_label_store(config.store, config.runs_dir, config.annotators_per_task, config.assignment_timeout_s)
    app = create_app(config, store, accounts)
    server = HttpServer(app, config.host, config.port, ServerAuth(None, config.auth.tls))
    port = await server.start()
    if on_ready is not None:
        on_ready(port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await server.stop()
        store.close()
