"""The labeling web app: a FastAPI app over a :class:`Store`, and ways to run it.

Access is by personal token, sent as ``Authorization: Bearer <token>``. Links carry the token in
the URL fragment (``/label#token=...``), which browsers never send to a server nor put in a
Referer header; the page moves it to ``sessionStorage`` and drops it from the address bar. No
cookies are used, so other sites cannot make a labeler's browser submit for them (no CSRF).

Labelers see only their own assignments: every item id is checked against the asker, and an item
that is someone else's gets the same 404 as one that does not exist. Admin endpoints (summary,
export, new labelers) need an admin token. Every bad request is a 4xx with ``{"error": message}``.
"""

# No `from __future__ import annotations`: FastAPI reads the Depends() annotations at runtime,
# and they name dependencies local to create_app().

import logging
import socket
import sqlite3
import threading
import time
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt
from starlette.exceptions import HTTPException

from rlhf.errors import ConfigError, DataError
from rlhf.feedback.export import campaign_summary, consensus_records, label_records
from rlhf.feedback.pages import ASSETS, asset, markdown_blocks
from rlhf.feedback.store import Conflict, Invalid, NotFound, Store, User, is_busy

log = logging.getLogger("rlhf.feedback")

# Scripts and styles only from this server; nothing inline, no plugins, no framing. If escaping
# ever failed somewhere, injected markup still could not run script.
_SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class Submission(BaseModel):
    """A labeler's answer for one item, in SHOWN positions (0 = first completion on their screen)."""

    model_config = ConfigDict(extra="forbid")
    item: StrictInt = Field(ge=1, le=2 ** 62, description="The item id from /api/next (SQLite ids fit in 63 bits).")
    submission_id: str = Field(min_length=8, max_length=100, pattern=r"^[A-Za-z0-9_-]+$",
                               description="Chosen by the client once per item; a retry sends the same one.")
    ranking: list[StrictInt] = Field(default_factory=list, max_length=64, description="Shown positions, best first.")
    ties: list[list[StrictInt]] = Field(default_factory=list, max_length=64, description="Groups of tied positions.")
    skipped: StrictBool = False
    skip_reason: str | None = Field(None, max_length=2000)


class NewLabeler(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=100)
    campaign: str | None = Field(None, max_length=200)


def _bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "missing access token: open your personal link (it ends in #token=...)")
    return token.strip()


def labeler_link(base_url: str, token: str) -> str:
    return f"{base_url.rstrip('/')}/label#token={token}"


def admin_link(base_url: str, token: str) -> str:
    return f"{base_url.rstrip('/')}/admin#token={token}"


def create_app(store: Store) -> FastAPI:
    app = FastAPI(title="rlhf labeling", docs_url=None, redoc_url=None, openapi_url=None)

    def current_user(request: Request) -> User:
        user = store.user_by_token(_bearer(request))
        if user is None:
            raise ApiError(401, "unknown access token: ask the campaign admin for a new link")
        return user

    def labeler(user: Annotated[User, Depends(current_user)]) -> User:
        if user.role != "labeler":
            raise ApiError(403, "this is an admin token; labeling needs a labeler link")
        return user

    def admin(user: Annotated[User, Depends(current_user)]) -> User:
        if user.role != "admin":
            raise ApiError(403, "admin only: a labeler token cannot open the admin page or exports")
        return user

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        for k, v in _SECURITY_HEADERS.items():
            response.headers.setdefault(k, v)
        return response

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.exception_handler(NotFound)
    async def not_found(request: Request, exc: NotFound):
        return JSONResponse({"error": str(exc)}, status_code=404)

    @app.exception_handler(Conflict)
    async def conflict(request: Request, exc: Conflict):
        return JSONResponse({"error": str(exc)}, status_code=409)

    @app.exception_handler(Invalid)
    async def invalid(request: Request, exc: Invalid):
        return JSONResponse({"error": str(exc)}, status_code=422)

    @app.exception_handler(ConfigError)
    async def config_error(request: Request, exc: ConfigError):
        return JSONResponse({"error": str(exc)}, status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        msgs = []
        for e in exc.errors()[:5]:
            where = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
            msgs.append(f"{where}: {e.get('msg', 'invalid')}")
        return JSONResponse({"error": "bad request: " + "; ".join(msgs)}, status_code=422)

    # -- pages -----------------------------------------------------------------------------------

    def page(name: str) -> Response:
        return Response(asset(name), media_type=ASSETS[name])

    @app.get("/", include_in_schema=False)
    def index() -> Response:
        return page("index.html")

    @app.get("/label", include_in_schema=False)
    def label_page() -> Response:
        return page("label.html")

    @app.get("/admin", include_in_schema=False)
    def admin_page() -> Response:
        # The page is an empty shell; every figure on it comes from /api/admin/*, which checks the token.
        return page("admin.html")

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str) -> Response:
        if name not in ASSETS or name.endswith(".html"):
            raise ApiError(404, f"no static file {name!r}")
        return page(name)

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> Response:
        return Response(status_code=204)  # browsers ask for it; an empty answer keeps their console clean

    @app.get("/healthz")
    def healthz() -> dict[str, bool]:
        return {"ok": True}

    # -- labeler API -----------------------------------------------------------------------------

    @app.get("/api/me")
    def me(user: Annotated[User, Depends(labeler)]) -> dict[str, Any]:
        camp = store.campaign(user.campaign_id)
        return {"labeler": user.name, "progress": store.progress(user),
                "campaign": {"name": camp.name, "criterion": camp.criterion,
                             "instructions": markdown_blocks(camp.instructions)}}

    @app.get("/api/next")
    def next_item(user: Annotated[User, Depends(labeler)]) -> dict[str, Any]:
        a = store.next_assignment(user)
        item = None if a is None else {"id": a.id, "prompt": a.prompt, "completions": a.shown_completions()}
        return {"item": item, "progress": store.progress(user)}

    @app.post("/api/submit")
    def submit(body: Submission, user: Annotated[User, Depends(labeler)]) -> dict[str, Any]:
        a = store.assignment_for(user, body.item)
        shown = a.shown_completions()
        if body.skipped:
            if body.ranking or body.ties:
                raise Invalid("a skipped item takes no ranking and no ties")
            if not (body.skip_reason or "").strip():
                raise Invalid("say why you skip (skip_reason)")
            ranking: list[int] = []
            ties: list[list[int]] = []
        else:
            try:  # the rankings contract's own checks: a permutation of the shown items, ties contiguous
                from rlhf.data.records import RankingRecord

                RankingRecord.from_json({"prompt": a.prompt or " ", "completions": shown, "ranking": body.ranking,
                                         "ties": body.ties}, "submission")
            except DataError as exc:
                raise Invalid(str(exc)) from None
            ranking = [a.shown_order[s] for s in body.ranking]
            ties = [[a.shown_order[s] for s in group] for group in body.ties]
        stored = store.submit(user, a.id, body.submission_id, ranking, ties, body.skipped,
                              (body.skip_reason or "").strip() or None if body.skipped else None)
        return {"ok": True, "stored": stored, "progress": store.progress(user)}

    # -- admin API -------------------------------------------------------------------------------

    @app.get("/api/admin/campaigns")
    def campaigns(user: Annotated[User, Depends(admin)]) -> dict[str, Any]:
        return {"campaigns": [{"name": c.name, "criterion": c.criterion, "labels_per_item": c.labels_per_item}
                              for c in store.campaigns()]}

    @app.get("/api/admin/summary")
    def summary(user: Annotated[User, Depends(admin)], campaign: str | None = None) -> dict[str, Any]:
        return campaign_summary(store, store.find_campaign(campaign))

    @app.post("/api/admin/labelers")
    def new_labeler(body: NewLabeler, request: Request, user: Annotated[User, Depends(admin)]) -> dict[str, Any]:
        camp = store.find_campaign(body.campaign)
        new, token = store.add_user(body.name, "labeler", camp.id)
        return {"labeler": new.name, "campaign": camp.name, "token": token,
                "link": labeler_link(str(request.base_url), token)}

    @app.get("/api/admin/export")
    def export(user: Annotated[User, Depends(admin)], campaign: str | None = None, consensus: bool = False) -> Response:
        import json

        camp = store.find_campaign(campaign)
        records = consensus_records(store, camp) if consensus else label_records(store, camp)
        body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        name = f"{camp.name}-{'consensus' if consensus else 'rankings'}.jsonl"
        return Response(body, media_type="application/x-ndjson",
                        headers={"Content-Disposition": f'attachment; filename="{name}"'})

    @app.exception_handler(sqlite3.OperationalError)
    async def database_error(request: Request, exc: sqlite3.OperationalError):
        if is_busy(exc):
            # Another process (e.g. an import into the same file) held the write lock past the busy
            # timeout. Nothing was stored, and every request here is safe to resend: say so.
            log.warning("database busy on %s %s: %s", request.method, request.url.path, exc)
            return JSONResponse({"error": "the labeling database is busy; nothing was saved, try again in a moment"},
                                status_code=503, headers={"Retry-After": "1"})
        return await unexpected(request, exc)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse({"error": "internal error; the server log has the details"}, status_code=500)

    return app


@dataclass
class RunningServer:
    """A server started in this process on a free port (tests, simulate, the demo)."""

    url: str
    _server: Any
    _thread: threading.Thread

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)

    def __enter__(self) -> "RunningServer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def start_in_thread(store: Store, host: str = "127.0.0.1", port: int = 0, app: FastAPI | None = None) -> RunningServer:
    """Serve ``store`` from a background thread; ``port=0`` picks a free port. Returns once it answers.
    ``app``: serve this app instead of ``create_app(store)`` (e.g. with the chat routes mounted)."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound = sock.getsockname()[1]
    config = uvicorn.Config(app or create_app(store), log_level="warning", access_log=False, lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="rlhf-label-server")
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise ConfigError(f"the labeling server did not start on {host}:{bound}")
        time.sleep(0.02)
    return RunningServer(f"http://{host}:{bound}", server, thread)


def serve(store: Store, host: str = "127.0.0.1", port: int = 8000, access_log: bool = True, app: FastAPI | None = None) -> None:
    """Run until interrupted (Ctrl-C). The store commits every label before it is acknowledged."""
    import uvicorn

    uvicorn.run(app or create_app(store), host=host, port=port, log_level="info", access_log=access_log, lifespan="off")
