"""Chat users, their turns (a prompt and the two replies shown) and their choices, in the labeling database.

The tables sit beside the labeling tables in the same SQLite file and are written through the
labeling :class:`~rlhf.feedback.store.Store`'s own transaction helper, so they share its durability
(WAL, ``synchronous=FULL``: a choice is fsync'ed before the server acknowledges it) and its one-writer
lock. Chat users are a namespace of their own: a labeler's or admin's token opens no chat, and a
chat token opens no labeling page.

Idempotency, as for labels: a turn is keyed by the client's ``ask_id`` (a retried ask returns the
stored replies instead of sampling new ones), a choice by the client's ``submission_id``; the same
choice sent again is answered ``stored: false``, a different second choice for a turn is a conflict.
Every lookup is scoped to the asker: someone else's turn gets the same "not found" as no turn.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import time
from dataclasses import dataclass
from typing import Any

from rlhf.feedback.store import Conflict, Invalid, NotFound, Store, hash_token
from rlhf.personal.records import FeedbackRecord

_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS personal_users (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        token_hash TEXT NOT NULL UNIQUE,
        created_at REAL NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS personal_turns (
        id INTEGER PRIMARY KEY,
        user_id INTEGER NOT NULL REFERENCES personal_users(id),
        ask_id TEXT NOT NULL,
        prompt TEXT NOT NULL,
        replies TEXT NOT NULL,
        model_version TEXT NOT NULL,
        asked_at REAL NOT NULL,
        UNIQUE (user_id, ask_id))""",
    """CREATE TABLE IF NOT EXISTS personal_choices (
        turn_id INTEGER PRIMARY KEY REFERENCES personal_turns(id) ON DELETE CASCADE,
        submission_id TEXT NOT NULL,
        choice INTEGER CHECK (choice IS NULL OR choice IN (0, 1)),
        edit TEXT,
        chosen_at REAL NOT NULL)""",
]


@dataclass
class ChatUser:
    id: int
    name: str


@dataclass
class Turn:
    id: int
    prompt: str
    replies: list[str]
    model_version: str
    asked_at: float
    choice: int | None = None
    edit: str | None = None
    chosen_at: float | None = None

    @property
    def answered(self) -> bool:
        return self.chosen_at is not None

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "prompt": self.prompt, "replies": self.replies, "model_version": self.model_version,
                "asked_at": self.asked_at, "answered": self.answered, "choice": self.choice, "edit": self.edit,
                "chosen_at": self.chosen_at}


_TURN_COLUMNS = ("t.id, t.prompt, t.replies, t.model_version, t.asked_at, c.choice, c.edit, c.chosen_at "
                 "FROM personal_turns t LEFT JOIN personal_choices c ON c.turn_id = t.id")


def _turn(row: tuple) -> Turn:
    return Turn(row[0], row[1], json.loads(row[2]), row[3], row[4], row[5], row[6], row[7])


class PersonalStore:
    """Chat users, turns and choices, over a labeling :class:`Store` (its connection per thread and its write lock)."""

    def __init__(self, store: Store):
        self.store = store
        with store._write() as conn:
            for statement in _SCHEMA:
                conn.execute(statement)

    # -- users -----------------------------------------------------------------------------------

    def add_user(self, name: str) -> tuple[ChatUser, str]:
        """Create a chat user; returns the user and their new secret token (only its hash is stored)."""
        name = name.strip()
        if not name or len(name) > 100:
            raise Invalid("a name must be 1 to 100 characters")
        token = secrets.token_urlsafe(24)
        with self.store._write() as conn:
            try:
                cur = conn.execute("INSERT INTO personal_users (name, token_hash, created_at) VALUES (?, ?, ?)",
                                   (name, hash_token(token), time.time()))
            except sqlite3.IntegrityError:
                raise Conflict(f"a chat user named {name!r} already exists") from None
        return ChatUser(cur.lastrowid, name), token

    def user_by_token(self, token: str) -> ChatUser | None:
        row = self.store._conn().execute("SELECT id, name FROM personal_users WHERE token_hash = ?",
                                         (hash_token(token),)).fetchone()
        return None if row is None else ChatUser(*row)

    def users(self) -> list[ChatUser]:
        return [ChatUser(*r) for r in self.store._conn().execute("SELECT id, name FROM personal_users ORDER BY id")]

    # -- turns and choices -----------------------------------------------------------------------

    def turn_for_ask(self, user: ChatUser, ask_id: str) -> Turn | None:
        row = self.store._conn().execute(f"SELECT {_TURN_COLUMNS} WHERE t.user_id = ? AND t.ask_id = ?",
                                         (user.id, ask_id)).fetchone()
        return None if row is None else _turn(row)

    def add_turn(self, user: ChatUser, ask_id: str, prompt: str, replies: list[str], model_version: str) -> tuple[Turn, bool]:
        """Store what was shown; returns (turn, created). A turn already stored under ``ask_id`` wins
        (two copies of one retried request may both have sampled; the first one stored is the answer)."""
        if len(replies) != 2:
            raise Invalid(f"a turn shows exactly 2 replies, got {len(replies)}")
        with self.store._write() as conn:
            row = conn.execute(f"SELECT {_TURN_COLUMNS} WHERE t.user_id = ? AND t.ask_id = ?", (user.id, ask_id)).fetchone()
            if row is not None:
                return _turn(row), False
            cur = conn.execute("INSERT INTO personal_turns (user_id, ask_id, prompt, replies, model_version, asked_at) "
                               "VALUES (?, ?, ?, ?, ?, ?)",
                               (user.id, ask_id, prompt, json.dumps(replies, ensure_ascii=False), model_version, time.time()))
            return _turn(conn.execute(f"SELECT {_TURN_COLUMNS} WHERE t.id = ?", (cur.lastrowid,)).fetchone()), True

    def turn(self, user: ChatUser, turn_id: int) -> Turn:
        row = self.store._conn().execute(f"SELECT {_TURN_COLUMNS} WHERE t.id = ? AND t.user_id = ?",
                                         (turn_id, user.id)).fetchone()
        if row is None:
            raise NotFound(f"no turn {turn_id} in your history")
        return _turn(row)

    def choose(self, user: ChatUser, turn_id: int, submission_id: str, choice: int | None, edit: str | None) -> bool:
        """Store the user's choice (0, 1, or None for "both bad") and optional edit; True when stored
        now, False when this choice was already stored (a retry). Committed before it returns."""
        if choice not in (0, 1, None):
            raise Invalid("choice must be 0, 1 or null (both bad)")
        edit = edit.strip() if edit is not None and edit.strip() else None
        with self.store._write() as conn:
            row = conn.execute("SELECT t.replies FROM personal_turns t WHERE t.id = ? AND t.user_id = ?",
                               (turn_id, user.id)).fetchone()
            if row is None:
                raise NotFound(f"no turn {turn_id} in your history")
            if edit is not None and choice is not None and edit == json.loads(row[0])[choice].strip():
                edit = None  # "edited" to the same text: no edit
            old = conn.execute("SELECT submission_id, choice, edit FROM personal_choices WHERE turn_id = ?",
                               (turn_id,)).fetchone()
            if old is not None:
                if old[0] == submission_id or (old[1], old[2]) == (choice, edit):
                    return False
                raise Conflict(f"turn {turn_id} already has your choice (submission {old[0]}); it cannot be changed")
            conn.execute("INSERT INTO personal_choices (turn_id, submission_id, choice, edit, chosen_at) VALUES (?, ?, ?, ?, ?)",
                         (turn_id, submission_id, choice, edit, time.time()))
        return True

    def history(self, user: ChatUser, limit: int = 200) -> list[Turn]:
        """The user's turns, newest first."""
        rows = self.store._conn().execute(f"SELECT {_TURN_COLUMNS} WHERE t.user_id = ? ORDER BY t.id DESC LIMIT ?",
                                          (user.id, limit)).fetchall()
        return [_turn(r) for r in rows]

    def delete(self, user: ChatUser, turn_id: int | None = None) -> int:
        """Delete one turn of the user's (or all of them, with its choice); returns how many turns went."""
        with self.store._write() as conn:
            where, args = ("user_id = ?", (user.id,)) if turn_id is None else ("user_id = ? AND id = ?", (user.id, turn_id))
            conn.execute(f"DELETE FROM personal_choices WHERE turn_id IN (SELECT id FROM personal_turns WHERE {where})", args)
            gone = conn.execute(f"DELETE FROM personal_turns WHERE {where}", args).rowcount
        if turn_id is not None and gone == 0:
            raise NotFound(f"no turn {turn_id} in your history")
        return gone

    def counts(self, user: ChatUser) -> dict[str, int]:
        turns, answered = self.store._conn().execute(
            "SELECT count(*), count(c.turn_id) FROM personal_turns t LEFT JOIN personal_choices c ON c.turn_id = t.id "
            "WHERE t.user_id = ?", (user.id,)).fetchone()
        return {"turns": turns, "answered": answered}

    # -- export ----------------------------------------------------------------------------------

    def feedback(self, user: str | None = None) -> list[FeedbackRecord]:
        """Every answered turn as a feedback record (all users, or one by name), oldest choice first."""
        sql = ("SELECT t.id, u.name, t.prompt, t.replies, c.choice, c.edit, t.model_version, c.chosen_at "
               "FROM personal_choices c JOIN personal_turns t ON t.id = c.turn_id JOIN personal_users u ON u.id = t.user_id")
        args: tuple = ()
        if user is not None:
            sql, args = sql + " WHERE u.name = ?", (user,)
        rows = self.store._conn().execute(sql + " ORDER BY c.chosen_at, t.id", args).fetchall()
        return [FeedbackRecord(user=r[1], prompt=r[2], replies=json.loads(r[3]), choice=r[4], edit=r[5],
                               model_version=r[6], time=r[7], id=f"t{r[0]}") for r in rows]
