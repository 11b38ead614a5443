"""The chat page and its JSON API, as a router mounted into the labeling app.

    GET    /chat/<token>, /chat          the page (an empty shell; everything on it comes from the API)
    GET    /api/chat/me                  who you are, how many choices you made, how replies are made for you
    POST   /api/chat/ask                 {prompt, ask_id} → a turn with two replies (a retried ask_id: the same turn)
    POST   /api/chat/choose              {turn, submission_id, choice: 0 | 1 | null, edit?} → {stored}
    GET    /api/chat/history             your turns, newest first
    DELETE /api/chat/history/<turn>      delete one turn and its choice; DELETE /api/chat/history: all of them
    POST   /api/admin/chat/users         (admin) {name} → a new chat user's token and link
    GET    /api/admin/chat/export        (admin) every choice as personal feedback records (JSON Lines)

Security as in the labeling app (rlhf/feedback/server.py): tokens travel as ``Authorization: Bearer``,
no cookies; the page takes the token out of its address (``/chat/<token>`` or ``#token=``) into
``sessionStorage`` and shows ``/chat``. The page route answers the same shell for any token, so it
reveals nothing. Every turn id is checked against the asker, and someone else's turn gets the
same 404 as one that does not exist. ``redact_chat_tokens`` keeps ``/chat/<token>`` out of access logs.
"""

# No `from __future__ import annotations`: FastAPI reads the Depends() annotations at runtime.

import json
import logging
import re
from importlib import resources
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from rlhf.feedback.server import ApiError, _bearer
from rlhf.feedback.store import Store, User
from rlhf.personal.policy import ChatPolicy, seed_for
from rlhf.personal.store import ChatUser, PersonalStore

PAGES = {"chat.html": "text/html; charset=utf-8", "chat.js": "text/javascript; charset=utf-8",
         "chat.css": "text/css; charset=utf-8"}
_ID = r"^[A-Za-z0-9_-]+$"


def page_asset(name: str) -> bytes:
    return resources.files("rlhf").joinpath("assets", "personal", name).read_bytes()


class Ask(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(min_length=1, max_length=2000)
    ask_id: str = Field(min_length=8, max_length=100, pattern=_ID,
                        description="Chosen by the client once per question; a retry sends the same one.")


class Choice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    turn: StrictInt = Field(ge=1, le=2 ** 62)
    submission_id: str = Field(min_length=8, max_length=100, pattern=_ID)
    choice: Literal[0, 1] | None = Field(description="0 or 1: the reply preferred; null: both are bad.")
    edit: str | None = Field(None, max_length=4000, description="The user's better version of the chosen reply.")


class NewChatUser(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=100)


def chat_link(base_url: str, token: str) -> str:
    return f"{base_url.rstrip('/')}/chat/{token}"


def personal_router(store: Store, chat: ChatPolicy | None) -> APIRouter:
    """The routes above over ``store``; ``chat`` makes the replies (None: asking answers 503)."""
    pstore = PersonalStore(store)
    router = APIRouter()

    def chat_user(request: Request) -> ChatUser:
        user = request.scope.get("state", {}).get("user")  # the Guard looked the chat token up (other_tokens)
        if not isinstance(user, ChatUser):
            user = pstore.user_by_token(_bearer(request.headers.get("authorization", "")))
        if user is None:
            raise ApiError(401, "unknown chat token: ask the admin for a new chat link")
        return user

    def admin(request: Request) -> User:
        user = store.user_by_token(_bearer(request.headers.get("authorization", "")))
        if user is None or user.role != "admin":
            raise ApiError(403, "admin only: creating chat users and exporting feedback need an admin token")
        return user

    def page(name: str) -> Response:
        return Response(page_asset(name), media_type=PAGES[name])

    @router.get("/chat", include_in_schema=False)
    def chat_page() -> Response:
        return page("chat.html")

    @router.get("/chat/{token}", include_in_schema=False)
    def chat_page_with_token(token: str) -> Response:
        del token  # read by the page's script, never here: the same shell for every token
        return page("chat.html")

    @router.get("/personal/static/{name}", include_in_schema=False)
    def static(name: str) -> Response:
        if name not in PAGES or name.endswith(".html"):
            raise ApiError(404, f"no static file {name!r}")
        return page(name)

    @router.get("/api/chat/me")
    def me(user: Annotated[ChatUser, Depends(chat_user)]) -> dict[str, Any]:
        info: dict[str, Any] = {"user": user.name, **pstore.counts(user), "mode": None}
        if chat is not None:
            info["mode"] = chat.mode(user.name)
            info["policy"] = chat.policy_name
        return info

    @router.post("/api/chat/ask")
    def ask(body: Ask, user: Annotated[ChatUser, Depends(chat_user)]) -> dict[str, Any]:
        prompt = body.prompt.strip()
        if not prompt:
            raise ApiError(422, "the question is empty")
        old = pstore.turn_for_ask(user, body.ask_id)
        if old is None:
            if chat is None:
                raise ApiError(503, "this server has no policy to chat with (start it with `rlhf personal serve`)")
            replies, version = chat.replies(user.name, prompt, seed_for(user.name, body.ask_id))
            old, _ = pstore.add_turn(user, body.ask_id, prompt, replies, version)
        if old.prompt != prompt:
            raise ApiError(409, f"ask_id {body.ask_id} was already used for another question")
        return {"turn": old.to_json()}

    @router.post("/api/chat/choose")
    def choose(body: Choice, user: Annotated[ChatUser, Depends(chat_user)]) -> dict[str, Any]:
        stored = pstore.choose(user, body.turn, body.submission_id, body.choice, body.edit)
        return {"ok": True, "stored": stored, **pstore.counts(user)}

    @router.get("/api/chat/history")
    def history(user: Annotated[ChatUser, Depends(chat_user)], limit: int = 200) -> dict[str, Any]:
        if not 1 <= limit <= 1000:
            raise ApiError(422, "limit must be between 1 and 1000")
        return {"turns": [t.to_json() for t in pstore.history(user, limit)]}

    @router.delete("/api/chat/history/{turn_id}")
    def delete_one(turn_id: int, user: Annotated[ChatUser, Depends(chat_user)]) -> dict[str, Any]:
        return {"deleted": pstore.delete(user, turn_id), **pstore.counts(user)}

    @router.delete("/api/chat/history")
    def delete_all(user: Annotated[ChatUser, Depends(chat_user)]) -> dict[str, Any]:
        return {"deleted": pstore.delete(user), **pstore.counts(user)}

    @router.post("/api/admin/chat/users")
    def new_user(body: NewChatUser, request: Request, _: Annotated[User, Depends(admin)]) -> dict[str, Any]:
        user, token = pstore.add_user(body.name)
        return {"user": user.name, "token": token, "link": chat_link(str(request.base_url), token)}

    @router.get("/api/admin/chat/export")
    def export(_: Annotated[User, Depends(admin)], user: str | None = None) -> Response:
        body = "".join(json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in pstore.feedback(user))
        return Response(body, media_type="application/x-ndjson",
                        headers={"Content-Disposition": 'attachment; filename="personal-feedback.jsonl"'})

    return router


def create_chat_app(store: Store, chat: ChatPolicy | None, allowed_hosts=None) -> FastAPI:
    """The labeling app with the chat routes mounted (its error handlers, security headers and Host
    allow-list apply to them; ``allowed_hosts`` as in ``rlhf.feedback.server.create_app``)."""
    from rlhf.feedback.server import create_app

    pstore = PersonalStore(store)
    app = create_app(store, allowed_hosts, other_tokens={"/api/chat/": pstore.user_by_token})
    app.include_router(personal_router(store, chat))
    return app


class _RedactChatTokens(logging.Filter):
    """Replaces the token in ``/chat/<token>`` with ``<token>`` in uvicorn's access-log records."""

    pattern = re.compile(r"(/chat/)[^/?\s\"]+")

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(self.pattern.sub(r"\1<token>", a) if isinstance(a, str) else a for a in record.args)
        return True


def redact_chat_tokens() -> None:
    """Keep chat tokens out of the access log (the serve command calls this; changes process logging state)."""
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, _RedactChatTokens) for f in access.filters):
        access.addFilter(_RedactChatTokens())
