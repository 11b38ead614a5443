"""The labeling web app: a FastAPI app over a :class:`Store`, and ways to run it.

Access is by personal token, sent as ``Authorization: Bearer <token>``. Links carry the token in
the URL fragment (``/label#token=...``), which browsers never send to a server nor put in a
Referer header; the page moves it to ``sessionStorage`` and drops it from the address bar. No
cookies are used, so other sites cannot make a labeler's browser submit for them (no CSRF).

Labelers see only their own assignments: every item id is checked against the asker, and an item
that is someone else's gets the same 404 as one that does not exist. Admin endpoints (summary,
export, new labelers) need an admin token. Every bad request is a 4xx with ``{"error": message}``,
kept short (a message never echoes a long input back).

Before a request reaches the app, :class:`Guard` checks, in this order and without reading the
body: the Host header (a server on loopback answers only to loopback names, so a web page
elsewhere cannot reach it through DNS rebinding), the access token of every /api/ route (a
request without a valid one is refused before its body is read or parsed), and the body's size
(``max_body_bytes``; 413 past it, counted as it arrives when no Content-Length is sent).
A labeler's link can be revoked or rotated at any time; the next request with the old token is
refused.
"""

# No `from __future__ import annotations`: FastAPI reads the Depends() annotations at runtime,
# and they name dependencies local to create_app().

import json
import logging
import socket
import threading
import time
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Iterable, Mapping
from urllib.parse import quote

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from rlhf.errors import ConfigError, DataError, brief
from rlhf.feedback.export import campaign_summary, consensus_records, item_summaries, label_records
from rlhf.feedback.pages import ASSETS, asset, markdown_blocks
from rlhf.feedback.store import MAX_COMPLETIONS, Conflict, Invalid, NotFound, Store, User

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


MAX_BODY_BYTES = 1 << 20  # a submission is a few hundred bytes; nothing the API takes comes near 1 MiB
MAX_ERROR_CHARS = 500
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def short(message: str, limit: int = MAX_ERROR_CHARS) -> str:
    """An error message bounded in length: answers never grow with the request."""
    return message if len(message) <= limit else message[:limit - 3] + "..."


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": short(message)}, status_code=status, headers={**_SECURITY_HEADERS, **(headers or {})})


def host_name(header: str | None) -> str:
    """The name in a Host header, without the port: ``[::1]:8000`` → ``::1``, ``Localhost:80`` → ``localhost``."""
    host = (header or "").strip().lower().rstrip(".")
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def content_disposition(filename: str) -> str:
    """``attachment`` with an ASCII fallback name and the exact name in RFC 5987 encoding (RFC 6266),
    so that any campaign name makes a valid header (no 500 for non-Latin-1, no header injection)."""
    fallback = "".join(c if 32 <= ord(c) < 127 and c not in '"\\;' else "_" for c in filename)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"


class Guard:
    """ASGI middleware in front of the app: Host allow-list, token before body, body size (see the
    module docstring). Its refusals carry the same JSON error shape and security headers."""

    def __init__(self, app, store: Store, allowed_hosts: Iterable[str] | None, max_body_bytes: int,
                 other_tokens: Mapping[str, Callable[[str], Any]] | None = None):
        self.app, self.store, self.max_body_bytes = app, store, max_body_bytes
        self.allowed_hosts = None if allowed_hosts is None else {host_name(h) for h in allowed_hosts}
        self.other_tokens = dict(other_tokens or {})

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        if self.allowed_hosts is not None and host_name(headers.get("host")) not in self.allowed_hosts:
            return await error_response(421, "this server does not answer to that host name (Host header); "
                                             "open it through the address it was started with")(scope, receive, send)
        try:
            if scope["path"].startswith("/api/"):
                scope.setdefault("state", {})["user"] = await self._user(scope["path"], headers)
            size = headers.get("content-length")
            if size is not None and (not size.isdigit() or int(size) > self.max_body_bytes):
                raise ApiError(413, f"request body over {self.max_body_bytes:,} bytes")
        except ApiError as exc:
            return await error_response(exc.status, exc.message)(scope, receive, send)
        except Exception as exc:
            if self.store.is_busy(exc):
                return await _busy_response(scope, exc)(scope, receive, send)
            raise
        if scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        # Read the body here, counting as it arrives (chunked uploads name no length up front).
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_body_bytes:
                return await error_response(413, f"request body over {self.max_body_bytes:,} bytes")(scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, sent = b"".join(chunks), False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _user(self, path: str, headers: Headers) -> Any:
        token = _bearer(headers.get("authorization", ""))
        for prefix, lookup in self.other_tokens.items():  # routes whose users live elsewhere (chat users)
            if path.startswith(prefix):
                user = await run_in_threadpool(lookup, token)
                if user is None:
                    raise ApiError(401, "unknown access token: ask the admin for a new link")
                return user
        user = await run_in_threadpool(self.store.user_by_token, token)
        if user is None:
            raise ApiError(401, "unknown access token: ask the campaign admin for a new link")
        if user.revoked:
            raise ApiError(401, "this link has been revoked: ask the campaign admin for a new one")
        if path.startswith("/api/admin/"):
            if user.role != "admin":
                raise ApiError(403, "admin only: a labeler token cannot open the admin page or exports")
        elif user.role != "labeler":
            raise ApiError(403, "this is an admin token; labeling needs a labeler link")
        return user


def _busy_response(request_or_scope, exc: BaseException) -> JSONResponse:
    # The database was locked past the busy timeout, or unreachable for a moment. Nothing was
    # stored, and every request here is safe to resend: say so.
    scope = getattr(request_or_scope, "scope", request_or_scope)
    log.warning("database busy on %s %s: %s", scope.get("method"), scope.get("path"), exc)
    return error_response(503, "the labeling database is busy; nothing was saved, try again in a moment",
                          {"Retry-After": "1"})


class Submission(BaseModel):
    """A labeler's answer for one item, in SHOWN positions (0 = first completion on their screen)."""

    model_config = ConfigDict(extra="forbid")
    item: StrictInt = Field(ge=1, le=2 ** 62, description="The item id from /api/next (SQLite ids fit in 63 bits).")
    submission_id: str = Field(min_length=8, max_length=100, pattern=r"^[A-Za-z0-9_-]+$",
                               description="Chosen by the client once per item; a retry sends the same one.")
    ranking: list[StrictInt] = Field(default_factory=list, max_length=MAX_COMPLETIONS, description="Shown positions, best first.")
    ties: list[list[StrictInt]] = Field(default_factory=list, max_length=MAX_COMPLETIONS, description="Groups of tied positions.")
    skipped: StrictBool = False
    skip_reason: str | None = Field(None, max_length=2000)
    revise: StrictBool = Field(False, description="Replace the labeler's last answer to this item (GET /api/previous).")


class NewLabeler(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=100)
    campaign: str | None = Field(None, max_length=200)


def _bearer(header: str) -> str:
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "missing access token: open your personal link (it ends in #token=...)")
    return token.strip()


def labeler_link(base_url: str, token: str) -> str:
    return f"{base_url.rstrip('/')}/label#token={token}"


def admin_link(base_url: str, token: str) -> str:
    return f"{base_url.rstrip('/')}/admin#token={token}"


def create_app(store: Store, allowed_hosts: Iterable[str] | None = None, max_body_bytes: int = MAX_BODY_BYTES,
               other_tokens: Mapping[str, Callable[[str], Any]] | None = None) -> FastAPI:
    """The app over ``store``. ``allowed_hosts``: the only Host names answered (None: any; a server
    bound to loopback passes :data:`LOOPBACK_HOSTS`, see :func:`default_allowed_hosts`).
    ``other_tokens``: API path prefix → token lookup (None: unknown) for routes mounted later whose
    users are not labelers or admins (the chat routes); :class:`Guard` checks those tokens too."""
    app = FastAPI(title="rlhf labeling", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, store=store, allowed_hosts=allowed_hosts, max_body_bytes=max_body_bytes,
                       other_tokens=other_tokens)

    def current_user(request: Request) -> User:
        user = request.scope.get("state", {}).get("user")  # Guard checked it before the body was read
        if user is None:
            user = store.user_by_token(_bearer(request.headers.get("authorization", "")))
        if user is None or user.revoked:
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
        return error_response(exc.status, exc.message)

    @app.exception_handler(NotFound)
    async def not_found(request: Request, exc: NotFound):
        return error_response(404, str(exc))

    @app.exception_handler(Conflict)
    async def conflict(request: Request, exc: Conflict):
        return error_response(409, str(exc))

    @app.exception_handler(Invalid)
    async def invalid(request: Request, exc: Invalid):
        return error_response(422, str(exc))

    @app.exception_handler(ConfigError)
    async def config_error(request: Request, exc: ConfigError):
        return error_response(400, str(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        # Field names and messages only, each bounded: never the offending input itself.
        msgs = []
        for e in exc.errors()[:5]:
            where = ".".join(brief(p, 40) if not isinstance(p, (str, int)) else str(p)[:40]
                             for p in e.get("loc", ()) if p != "body") or "body"
            msgs.append(f"{where}: {str(e.get('msg', 'invalid'))[:120]}")
        return error_response(422, "bad request: " + "; ".join(msgs))

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
            raise ApiError(404, f"no static file {brief(name, 60)}")
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
        last = store.last_label(user)  # issue 16: the page offers to change it while its item is open
        return {"item": item, "progress": store.progress(user),
                "previous": None if last is None else {"id": last["id"], "prompt": last["prompt"]}}

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
        write = store.revise if body.revise else store.submit
        stored = write(user, a.id, body.submission_id, ranking, ties, body.skipped,
                       (body.skip_reason or "").strip() or None if body.skipped else None)
        return {"ok": True, "stored": stored, "progress": store.progress(user)}

    # -- going back and the per-item admin view (issue 16) ------------------------------------------

    @app.get("/api/previous")
    def previous(user: Annotated[User, Depends(labeler)]) -> dict[str, Any]:
        """The labeler's last answer in shown positions, while its item is not complete; else null."""
        return {"item": store.last_label(user)}

    @app.get("/api/admin/items")
    def items(user: Annotated[User, Depends(admin)], campaign: str | None = None) -> dict[str, Any]:
        return {"items": item_summaries(store, store.find_campaign(campaign))}

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

    @app.post("/api/admin/labelers/{name}/revoke")
    def revoke_labeler(name: str, user: Annotated[User, Depends(admin)], campaign: str | None = None) -> dict[str, Any]:
        camp = store.find_campaign(campaign)
        released = store.revoke(store.find_labeler(name, camp.id))
        return {"labeler": name, "campaign": camp.name, "revoked": True, "items_released": released}

    @app.post("/api/admin/labelers/{name}/rotate")
    def rotate_labeler(name: str, request: Request, user: Annotated[User, Depends(admin)],
                       campaign: str | None = None) -> dict[str, Any]:
        camp = store.find_campaign(campaign)
        token = store.rotate_token(store.find_labeler(name, camp.id))
        return {"labeler": name, "campaign": camp.name, "token": token, "link": labeler_link(str(request.base_url), token)}

    @app.get("/api/admin/export")
    def export(user: Annotated[User, Depends(admin)], campaign: str | None = None, consensus: bool = False) -> Response:
        camp = store.find_campaign(campaign)
        records = consensus_records(store, camp) if consensus else label_records(store, camp)
        body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        name = f"{camp.name}-{'consensus' if consensus else 'rankings'}.jsonl"
        return Response(body, media_type="application/x-ndjson", headers={"Content-Disposition": content_disposition(name)})

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        if store.is_busy(exc):  # e.g. an import into the same SQLite file held the write lock too long
            return _busy_response(request, exc)
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(500, "internal error; the server log has the details")

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


def default_allowed_hosts(host: str, extra: Iterable[str] = ()) -> set[str] | None:
    """Loopback servers answer only to loopback names (plus ``extra``); others to any name unless
    ``extra`` lists some (then to those and the bound address)."""
    extra = {host_name(h) for h in extra}
    if host_name(host) in LOOPBACK_HOSTS:
        return set(LOOPBACK_HOSTS) | extra
    return ({host_name(host)} | extra) if extra else None


def start_in_thread(store: Store, host: str = "127.0.0.1", port: int = 0, app: FastAPI | None = None) -> RunningServer:
    """Serve ``store`` from a background thread; ``port=0`` picks a free port. Returns once it answers.
    ``app``: serve this app instead of ``create_app(store)`` (e.g. with the chat routes mounted; build it
    with ``create_app(store, default_allowed_hosts(host))`` to keep the Host allow-list)."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound = sock.getsockname()[1]
    config = uvicorn.Config(app or create_app(store, default_allowed_hosts(host)), log_level="warning", access_log=False,
                            lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="rlhf-label-server")
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise ConfigError(f"the labeling server did not start on {host}:{bound}")
        time.sleep(0.02)
    return RunningServer(f"http://{host}:{bound}", server, thread)


def serve(store: Store, host: str = "127.0.0.1", port: int = 8000, access_log: bool = True,
          allow_hosts: Iterable[str] = (), app: FastAPI | None = None) -> None:
    """Run until interrupted (Ctrl-C). The store commits every label before it is acknowledged."""
    import uvicorn

    app = app or create_app(store, default_allowed_hosts(host, allow_hosts))
    uvicorn.run(app, host=host, port=port, log_level="info", access_log=access_log, lifespan="off")
