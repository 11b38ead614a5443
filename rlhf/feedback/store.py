"""The labeling store: campaigns, items, labelers, assignments and labels in SQLite or PostgreSQL.

Every other part of the labeling app (server, CLI, export, admin statistics) talks to
:class:`Store` only, through plain Python values. :class:`Store` holds the logic and runs it on
SQLite; :class:`rlhf.feedback.store_postgres.PostgresStore` runs the same statements on
PostgreSQL, overriding only connections, transactions and the dialect (``open_store(url)`` picks).

Durability: SQLite runs in WAL mode with ``synchronous=FULL`` by default, so a commit is fsync'ed to
the write-ahead log before :meth:`Store.submit` returns, and the server answers only after that.
``NORMAL`` (``--synchronous normal``) is also safe against a killed process, since the WAL pages
are already in the OS page cache, but can lose the last commits on power loss. PostgreSQL commits
are durable when they return (``synchronous_commit`` on, its default).

Picking the next item and counting progress never scan the campaign. Each item keeps ``taken``
(non-skipped labels plus open claims younger than the claim timeout) and ``is_full`` (a regular
item with ``taken >= N``); each campaign keeps ``open_items`` (items not full); each labeler keeps
``n_done``, ``n_skipped``, ``n_open`` and ``n_on_open_items`` (their assignments on items not
full). An index on (campaign, is_full, position) leads straight to the first item a labeler may
get, and progress is two rows: what is left to a labeler is ``open_items − n_on_open_items``. All
of them change in the write transaction that changes what they count; when an item fills up or
frees a slot, the counters of its (at most N) labelers move with it. Claims past the timeout are
released lazily, when a labeler next asks for an item (a partial index keeps that lookup to the
open claims).

Rankings are stored in the ORIGINAL completion index space: the server maps the labeler's shown
(shuffled) positions back before storing, using the shown order kept on the assignment.
"""

from __future__ import annotations

import hashlib
import json
import random
import secrets
import sqlite3
import threading
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf.errors import ConfigError, RLHFError, brief
from rlhf.feedback.schema import MIGRATE_V2, RECOUNT, SCHEMA_V1, SCHEMA_VERSION

MAX_COMPLETIONS = 64  # completions per item: import refuses more, the labeling API accepts no longer ranking
MAX_NAME_CHARS = {"campaign": 200, "labeler": 100, "admin": 100}


class NotFound(RLHFError):
    """The thing asked for does not exist, or does not belong to the asker (the same answer, on purpose)."""


class Conflict(RLHFError):
    """The request contradicts what is already stored (e.g. a second, different label for one item)."""


class Invalid(RLHFError):
    """The request is well-formed JSON but breaks a rule (e.g. a ranking that is not a permutation)."""


@dataclass
class User:
    id: int
    name: str
    role: str
    campaign_id: int | None
    revoked: bool = False


@dataclass
class Campaign:
    id: int
    name: str
    criterion: str
    instructions: str
    labels_per_item: int


@dataclass
class Assignment:
    id: int
    item_id: int
    prompt: str
    completions: list[str]  # original order
    shown_order: list[int]  # shown position -> original index

    def shown_completions(self) -> list[str]:
        return [self.completions[i] for i in self.shown_order]


@dataclass
class LabelRow:
    """One stored label joined with its item and labeler: what export and statistics read."""

    item_id: int
    position: float
    prompt_id: str
    prompt: str
    completions: list[str]
    labeler: str
    user_id: int
    ranking: list[int]
    ties: list[list[int]]
    skipped: bool
    skip_reason: str | None
    seconds: float
    gold_ranking: list[int] | None
    gold_ties: list[list[int]] | None
    submission_id: str
    shown_order: list[int] | None = None  # the labeler's shuffled order (shown position -> original index)

    @property
    def as_shown(self) -> bool:
        """Submitted in exactly the shuffled order the page showed, no ties: often a labeler who did not rank."""
        return not self.skipped and not self.ties and self.shown_order is not None and self.ranking == self.shown_order


def is_busy(exc: BaseException) -> bool:
    """True for SQLite's "database is locked / busy": another process held the write lock for
    longer than the busy timeout. Nothing was stored; the same request may simply be sent again."""
    return isinstance(exc, sqlite3.OperationalError) and any(w in str(exc).lower() for w in ("locked", "busy"))


def hash_token(token: str) -> str:
    # Only hashes are stored, so a copied database file does not hand out working links.
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def shuffled_order(k: int, user_id: int, item_id: int) -> list[int]:
    """The per-labeler order of an item's completions: random, but the same on every reload."""
    order = list(range(k))
    random.Random(f"order:{user_id}:{item_id}").shuffle(order)
    return order


def check_name(name: str, what: str) -> str:
    """A campaign or user name, stripped; control and format characters (CR, LF, NUL, bidi
    overrides) are refused, since names end up in headers, file names and pages."""
    if not isinstance(name, str):
        raise Invalid(f"a {what} name must be text")
    name = name.strip()
    limit = MAX_NAME_CHARS[what]
    if not name or len(name) > limit:
        raise Invalid(f"a {what} name must be 1 to {limit} characters")
    bad = next((c for c in name if unicodedata.category(c)[0] == "C"), None)
    if bad is not None:
        raise Invalid(f"a {what} name must not hold control characters (found U+{ord(bad):04X}): {brief(name, 60)}")
    return name


def check_completions(completions: Any, where: str) -> None:
    if isinstance(completions, list) and len(completions) > MAX_COMPLETIONS:
        raise Invalid(f"{where}: {len(completions)} completions; an item holds at most {MAX_COMPLETIONS} "
                      "(labelers rank all of them on one page)")


class Store:
    """The store's logic, on SQLite; shared by the server's worker threads (one connection per thread).

    Writes take a process-wide lock and ``BEGIN IMMEDIATE``: SQLite allows one writer anyway, and
    taking the write lock up front avoids the deadlock of two readers upgrading at once.
    ``busy_timeout_s`` covers a second process (the CLI adding a labeler while the server runs);
    past it SQLite raises ``OperationalError: database is locked``, which the server answers with
    a 503 (see :meth:`is_busy`), never a stored label.
    """

    backend = "sqlite"
    _TYPES = {"pk": "INTEGER PRIMARY KEY", "ref": "INTEGER", "real": "REAL"}

    def __init__(self, path: str | Path, synchronous: str = "FULL", claim_timeout_s: float = 1800.0,
                 busy_timeout_s: float = 30.0):
        self.path = Path(path)
        if synchronous.upper() not in ("FULL", "NORMAL", "EXTRA"):
            raise ConfigError(f"synchronous must be FULL, NORMAL or EXTRA, not {synchronous!r}")
        if busy_timeout_s < 0:
            raise ConfigError("busy timeout must be 0 or more seconds")
        self.synchronous = synchronous.upper()
        self.claim_timeout_s = claim_timeout_s
        self.busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        self._write_lock = threading.Lock()
        self._released_at: dict[int, float] = {}  # campaign -> when expired claims were last looked for
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._init_schema()
        except sqlite3.DatabaseError as exc:
            if is_busy(exc):
                raise
            raise ConfigError(f"{self.path}: not a labeling database ({exc})") from None

    # -- connections, transactions, dialect (PostgresStore overrides these) -----------------------

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves, so nothing commits implicitly.
            # timeout= is SQLite's busy timeout, in force from the first statement on.
            conn = sqlite3.connect(self.path, isolation_level=None, timeout=self.busy_timeout_s, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self.synchronous}")
            conn.execute("PRAGMA foreign_keys=ON")
            self._local.conn = conn
        return conn

    def _init_schema(self) -> None:
        conn = self._conn()
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, 1, SCHEMA_VERSION):
            raise ConfigError(f"{self.path}: labeling database schema version {version}; this build reads {SCHEMA_VERSION}")
        if version == SCHEMA_VERSION:
            return
        with self._write() as conn:  # one transaction: a crash mid-migration leaves version 1 intact
            if conn.execute("PRAGMA user_version").fetchone()[0] == 0:
                for stmt in self._statements(SCHEMA_V1):
                    conn.execute(stmt)
            if conn.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
                for stmt in self._statements(MIGRATE_V2):
                    conn.execute(stmt, {"fresh": time.time() - self.claim_timeout_s} if ":fresh" in stmt else ())
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _statements(self, script: str) -> list[str]:
        return [s.strip().format(**self._TYPES) for s in script.split(";") if s.strip()]

    class _Tx:
        def __init__(self, store: "Store", durable: bool = True):
            self.store = store
            self.relaxed = not durable and store.synchronous != "NORMAL"

        def __enter__(self) -> sqlite3.Connection:
            self.store._write_lock.acquire()
            self.conn = self.store._conn()
            try:
                if self.relaxed:
                    self.conn.execute("PRAGMA synchronous=NORMAL")
                self.conn.execute("BEGIN IMMEDIATE")
            except BaseException:
                self.store._write_lock.release()
                raise
            return self.conn

        def __exit__(self, exc_type, exc, tb) -> None:
            try:
                if exc_type is None:
                    try:
                        self.conn.execute("COMMIT")
                    except BaseException:
                        # A failed COMMIT (busy, disk full) leaves the transaction open on this
                        # thread's connection; without the rollback every later BEGIN on it fails.
                        if self.conn.in_transaction:
                            self.conn.execute("ROLLBACK")
                        raise
                elif self.conn.in_transaction:
                    self.conn.execute("ROLLBACK")
            finally:
                try:
                    if self.relaxed:
                        self.conn.execute(f"PRAGMA synchronous={self.store.synchronous}")
                finally:
                    self.store._write_lock.release()

    def _write(self, durable: bool = True) -> Any:
        """A write transaction (a context manager yielding the connection). ``durable=False`` commits
        without waiting for the disk: for claims only, which a crash may lose harmlessly (the
        labeler asks again); the next durable commit (a label) flushes them too, in order."""
        return Store._Tx(self, durable)

    # First statement of a write that changes a campaign's items: its N, and on engines with row
    # locks the campaign's lock, which serialises such writes (SQLite has one writer anyway).
    _LOCK_CAMPAIGN = "SELECT labels_per_item FROM campaigns WHERE id = ?"

    def _lock_campaign(self, conn: Any, campaign_id: int) -> int:
        row = self._q(conn, self._LOCK_CAMPAIGN, (campaign_id,)).fetchone()
        if row is None:
            raise NotFound(f"no campaign with id {campaign_id}")
        return row[0]

    def _q(self, conn: Any, sql: str, params: Any = ()) -> Any:
        """Run one statement (``?`` placeholders) and return its cursor."""
        return conn.execute(sql, params)

    def _q_many(self, conn: Any, sql: str, rows: list[tuple]) -> None:
        conn.executemany(sql, rows)

    def _is_integrity_error(self, exc: BaseException) -> bool:
        return isinstance(exc, sqlite3.IntegrityError)

    def is_busy(self, exc: BaseException) -> bool:
        """Nothing was stored and the same request may be sent again (the server answers 503)."""
        return is_busy(exc)

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def _read(self) -> Any:
        return self._conn()

    # -- campaigns and items ---------------------------------------------------------------------

    def create_campaign(self, name: str, criterion: str, instructions: str, labels_per_item: int,
                        items: list[dict[str, Any]]) -> Campaign:
        """Items: dicts with prompt_id, prompt, completions, optional gold_ranking / gold_ties.

        Gold items are spread evenly between the regular ones, so attention checks turn up
        throughout a labeler's session rather than in a block at the start.
        """
        name = check_name(name, "campaign")
        if labels_per_item < 1:
            raise ConfigError("labels per item must be at least 1")
        regular = [it for it in items if it.get("gold_ranking") is None]
        gold = [it for it in items if it.get("gold_ranking") is not None]
        if not regular and not gold:
            raise ConfigError("a campaign needs at least one item")
        rows = [(float(i), it) for i, it in enumerate(regular)]
        rows += [((g + 1) * len(regular) / (len(gold) + 1) - 0.5, it) for g, it in enumerate(gold)]
        seen: set[str] = set()
        for _, it in rows:
            check_completions(it["completions"], f"item {it['prompt_id']!r}")
            if it["prompt_id"] in seen:
                raise Conflict(f"prompt_id {it['prompt_id']!r} appears twice; item ids must be unique in a campaign")
            seen.add(it["prompt_id"])
        with self._write() as conn:
            if self._q(conn, "SELECT 1 FROM campaigns WHERE name = ?", (name,)).fetchone():
                raise Conflict(f"campaign {name!r} already exists in {self.path}; pick another --name")
            cid = self._q(conn, "INSERT INTO campaigns (name, criterion, instructions, labels_per_item, created_at, "
                                "open_items) VALUES (?, ?, ?, ?, ?, ?) RETURNING id",
                          (name, criterion, instructions, labels_per_item, time.time(), len(rows))).fetchall()[0][0]
            self._q_many(conn, "INSERT INTO items (campaign_id, position, prompt_id, prompt, completions, gold_ranking, "
                               "gold_ties) VALUES (?, ?, ?, ?, ?, ?, ?)",
                         [(cid, pos, it["prompt_id"], it["prompt"], json.dumps(it["completions"], ensure_ascii=False),
                           None if it.get("gold_ranking") is None else json.dumps(it["gold_ranking"]),
                           None if it.get("gold_ranking") is None else json.dumps(it.get("gold_ties") or []))
                          for pos, it in rows])
        return self.campaign(cid)

    _CAMPAIGN = "SELECT id, name, criterion, instructions, labels_per_item FROM campaigns"

    def campaign(self, campaign_id: int) -> Campaign:
        row = self._q(self._read(), self._CAMPAIGN + " WHERE id = ?", (campaign_id,)).fetchone()
        if row is None:
            raise NotFound(f"no campaign with id {campaign_id}")
        return Campaign(*row)

    def campaigns(self) -> list[Campaign]:
        return [Campaign(*r) for r in self._q(self._read(), self._CAMPAIGN + " ORDER BY id").fetchall()]

    def find_campaign(self, name: str | None) -> Campaign:
        """By name, or the only campaign when no name is given."""
        camps = self.campaigns()
        if name is None:
            if len(camps) == 1:
                return camps[0]
            if not camps:
                raise ConfigError(f"{self.path} holds no campaign yet; run `rlhf label import` first")
            raise ConfigError(f"{self.path} holds {len(camps)} campaigns ({', '.join(c.name for c in camps)}); "
                              "say which with --campaign")
        for c in camps:
            if c.name == name:
                return c
        raise ConfigError(f"no campaign named {brief(name, 100)} in {self.path} "
                          f"(have: {', '.join(c.name for c in camps) or 'none'})")

    # -- users and tokens ------------------------------------------------------------------------

    def add_user(self, name: str, role: str, campaign_id: int | None) -> tuple[User, str]:
        """Create a labeler (in one campaign) or an admin; returns the user and the new secret token."""
        name = check_name(name, role if role in MAX_NAME_CHARS else "labeler")
        if role == "labeler" and campaign_id is None:
            raise Invalid("a labeler belongs to a campaign")
        token = secrets.token_urlsafe(24)
        try:
            with self._write() as conn:
                uid = self._q(conn, "INSERT INTO users (campaign_id, name, role, token_hash, created_at) "
                                    "VALUES (?, ?, ?, ?, ?) RETURNING id",
                              (campaign_id if role == "labeler" else None, name, role, hash_token(token),
                               time.time())).fetchall()[0][0]
        except Exception as exc:
            if self._is_integrity_error(exc):
                raise Conflict(f"a{'n' if role == 'admin' else ''} {role} named {name!r} already exists") from None
            raise
        return User(uid, name, role, campaign_id if role == "labeler" else None), token

    _USER = "SELECT id, name, role, campaign_id, CASE WHEN revoked_at IS NULL THEN 0 ELSE 1 END FROM users"

    def user_by_token(self, token: str) -> User | None:
        """The token's user, revoked or not (the caller refuses a revoked one with its own message)."""
        row = self._q(self._read(), self._USER + " WHERE token_hash = ?", (hash_token(token),)).fetchone()
        return None if row is None else User(row[0], row[1], row[2], row[3], bool(row[4]))

    def labelers(self, campaign_id: int) -> list[User]:
        rows = self._q(self._read(), self._USER + " WHERE role = 'labeler' AND campaign_id = ? ORDER BY id",
                       (campaign_id,)).fetchall()
        return [User(r[0], r[1], r[2], r[3], bool(r[4])) for r in rows]

    def find_labeler(self, name: str, campaign_id: int) -> User:
        for u in self.labelers(campaign_id):
            if u.name == name:
                return u
        raise NotFound(f"no labeler named {brief(name, 100)} in this campaign")

    def rotate_token(self, user: User) -> str:
        """A new link for ``user`` (revoked or not); the old one stops working at once."""
        token = secrets.token_urlsafe(24)
        with self._write() as conn:
            self._q(conn, "UPDATE users SET token_hash = ?, revoked_at = NULL WHERE id = ?", (hash_token(token), user.id))
        return token

    def revoke(self, user: User) -> int:
        """The user's link stops working at once; their unanswered items go back to the pool (the
        labels they gave are kept). Returns how many open items were released."""
        with self._write() as conn:
            n = self._lock_campaign(conn, user.campaign_id)
            self._q(conn, "UPDATE users SET revoked_at = ? WHERE id = ?", (time.time(), user.id))
            open_ = self._q(conn, "SELECT a.id, a.item_id, a.counted, i.is_full FROM assignments a JOIN items i "
                                  "ON i.id = a.item_id WHERE a.user_id = ? AND a.done = 0", (user.id,)).fetchall()
            for aid, item_id, counted, full in open_:
                self._q(conn, "DELETE FROM assignments WHERE id = ?", (aid,))
                self._q(conn, "UPDATE users SET n_open = n_open - 1, n_on_open_items = n_on_open_items - ? WHERE id = ?",
                        (1 - full, user.id))
                if counted:
                    self._count(conn, item_id, -1, n)
        return len(open_)

    # -- assignments -----------------------------------------------------------------------------

    def _count(self, conn: Any, item_id: int, delta: int, n: int) -> None:
        """Move an item's ``taken`` by ``delta``, then its ``is_full`` flag, its campaign's
        ``open_items`` and its labelers' ``n_on_open_items`` with it (inside the campaign's write
        transaction; ``n`` is the campaign's labels per item)."""
        ((cid, taken, regular, full),) = self._q(
            conn, "UPDATE items SET taken = taken + ? WHERE id = ? RETURNING campaign_id, taken, "
                  "CASE WHEN gold_ranking IS NULL THEN 1 ELSE 0 END, is_full", (delta, item_id)).fetchall()
        now_full = int(bool(regular) and taken >= n)
        if now_full != full:
            step = -1 if now_full else 1
            self._q(conn, "UPDATE items SET is_full = ? WHERE id = ?", (now_full, item_id))
            self._q(conn, "UPDATE campaigns SET open_items = open_items + ? WHERE id = ?", (step, cid))
            self._q(conn, "UPDATE users SET n_on_open_items = n_on_open_items + ? WHERE id IN "
                          "(SELECT user_id FROM assignments WHERE item_id = ?)", (step, item_id))

    def _release_expired_claims(self, conn: Any, campaign_id: int, n: int) -> None:
        """Claims older than the timeout stop counting toward their item's N (others may take it).
        The lookup reads the partial index of open claims only (a join on items would let the
        planner walk the campaign's items instead); other campaigns' claims wait for their own lock.
        Looked up at most once a second per campaign: claims expire after minutes."""
        now = time.time()
        if now - self._released_at.get(campaign_id, 0.0) < min(1.0, self.claim_timeout_s / 10):
            return
        self._released_at[campaign_id] = now
        rows = self._q(conn, "SELECT id, item_id FROM assignments WHERE done = 0 AND counted = 1 AND served_at < ?",
                       (now - self.claim_timeout_s,)).fetchall()
        for aid, item_id in rows:
            if self._q(conn, "SELECT campaign_id FROM items WHERE id = ?", (item_id,)).fetchone()[0] != campaign_id:
                continue
            self._q(conn, "UPDATE assignments SET counted = 0 WHERE id = ?", (aid,))
            self._count(conn, item_id, -1, n)

    def _assignment(self, conn: Any, assignment_id: int) -> Assignment:
        row = self._q(conn, "SELECT a.id, a.item_id, i.prompt, i.completions, a.shown_order FROM assignments a "
                            "JOIN items i ON i.id = a.item_id WHERE a.id = ?", (assignment_id,)).fetchone()
        return Assignment(row[0], row[1], row[2], json.loads(row[3]), json.loads(row[4]))

    def next_assignment(self, user: User) -> Assignment | None:
        """The labeler's open item, or a newly claimed one; None when nothing is left for them.

        Items a labeler may get: not yet served to them, and not full (gold items never are: every
        labeler sees each once). The first such item by position comes from the items_open index.
        """
        with self._write(durable=False) as conn:
            n = self._lock_campaign(conn, user.campaign_id)
            row = self._q(conn, "SELECT id FROM assignments WHERE user_id = ? AND done = 0 ORDER BY id LIMIT 1",
                          (user.id,)).fetchone()
            if row is not None:
                return self._assignment(conn, row[0])
            self._release_expired_claims(conn, user.campaign_id, n)
            row = self._q(conn, "SELECT i.id, i.prompt, i.completions FROM items i WHERE i.campaign_id = ? "
                                "AND i.is_full = 0 AND NOT EXISTS (SELECT 1 FROM assignments a WHERE a.item_id = i.id "
                                "AND a.user_id = ?) ORDER BY i.position, i.id LIMIT 1",
                          (user.campaign_id, user.id)).fetchone()
            if row is None:
                return None
            item_id, prompt, completions = row[0], row[1], json.loads(row[2])
            order = shuffled_order(len(completions), user.id, item_id)
            aid = self._q(conn, "INSERT INTO assignments (item_id, user_id, shown_order, served_at, done, counted) "
                                "VALUES (?, ?, ?, ?, 0, 1) RETURNING id",
                          (item_id, user.id, json.dumps(order), time.time())).fetchall()[0][0]
            self._q(conn, "UPDATE users SET n_open = n_open + 1, n_on_open_items = n_on_open_items + 1 WHERE id = ?",
                    (user.id,))
            self._count(conn, item_id, +1, n)
            return Assignment(aid, item_id, prompt, completions, order)

    def progress(self, user: User) -> dict[str, int]:
        """done / total for the labeler, where total counts what is still open to them right now.

        The total can shrink while others label (an item reaches N rankings) — it is an honest
        snapshot, not a quota. Reads the labeler's own assignments and one campaign counter.
        """
        row = self._q(self._read(), "SELECT u.n_done, u.n_skipped, u.n_open, c.open_items - u.n_on_open_items "
                                    "FROM users u JOIN campaigns c ON c.id = u.campaign_id WHERE u.id = ?",
                      (user.id,)).fetchone()
        if row is None:
            raise NotFound(f"no labeler with id {user.id}")
        done, skipped, open_, available = (int(x) for x in row)
        return {"done": done, "skipped": skipped, "total": done + open_ + max(0, available)}

    # -- labels ----------------------------------------------------------------------------------

    def submit(self, user: User, assignment_id: int, submission_id: str, ranking: list[int], ties: list[list[int]],
               skipped: bool, skip_reason: str | None) -> bool:
        """Store a label given in ORIGINAL indices (the caller maps shown positions back).

        Returns True when stored now, False when the same label was already stored (a retried
        request): idempotent. A different label for the same item raises Conflict, also when it
        comes with the submission id of the stored one (a client bug, never a retry).
        The commit happens before this returns, so an acknowledged label survives a crash.
        """
        with self._write() as conn:
            n = self._lock_campaign(conn, user.campaign_id)
            row = self._q(conn, "SELECT user_id, item_id, counted FROM assignments WHERE id = ?", (assignment_id,)).fetchone()
            if row is None or row[0] != user.id:
                raise NotFound(f"no item {assignment_id} is assigned to you")
            old = self._q(conn, "SELECT submission_id, ranking, ties, skipped, skip_reason FROM labels "
                                "WHERE assignment_id = ?", (assignment_id,)).fetchone()
            new = (json.dumps(ranking), json.dumps(ties), int(skipped), skip_reason)
            if old is not None:
                if tuple(old[1:]) == new:
                    return False
                which = ("under this submission id, with another answer" if old[0] == submission_id
                         else f"(submission {old[0]})")
                raise Conflict(f"item {assignment_id} already has your label {which}; it cannot be changed")
            self._q(conn, "INSERT INTO labels (assignment_id, submission_id, ranking, ties, skipped, skip_reason, "
                          "submitted_at) VALUES (?, ?, ?, ?, ?, ?, ?)", (assignment_id, submission_id, *new, time.time()))
            counts = 0 if skipped else 1  # a skip frees the item's slot; a late label on an expired claim takes one
            self._q(conn, "UPDATE assignments SET done = 1, counted = ? WHERE id = ?", (counts, assignment_id))
            self._q(conn, "UPDATE users SET n_open = n_open - 1, n_done = n_done + 1, n_skipped = n_skipped + ? "
                          "WHERE id = ?", (int(skipped), user.id))
            if counts != row[2]:
                self._count(conn, row[1], counts - row[2], n)
        return True

    def assignment_for(self, user: User, assignment_id: int) -> Assignment:
        conn = self._read()
        row = self._q(conn, "SELECT user_id FROM assignments WHERE id = ?", (assignment_id,)).fetchone()
        if row is None or row[0] != user.id:
            raise NotFound(f"no item {assignment_id} is assigned to you")
        return self._assignment(conn, assignment_id)

    def label_rows(self, campaign_id: int) -> list[LabelRow]:
        rows = self._q(self._read(),
            "SELECT i.id, i.position, i.prompt_id, i.prompt, i.completions, u.name, u.id, l.ranking, l.ties, l.skipped, "
            "l.skip_reason, l.submitted_at - a.served_at, i.gold_ranking, i.gold_ties, l.submission_id, a.shown_order "
            "FROM labels l JOIN assignments a ON a.id = l.assignment_id JOIN items i ON i.id = a.item_id "
            "JOIN users u ON u.id = a.user_id WHERE i.campaign_id = ? ORDER BY i.position, u.name, u.id",
            (campaign_id,)).fetchall()
        out = []
        for r in rows:
            out.append(LabelRow(item_id=r[0], position=r[1], prompt_id=r[2], prompt=r[3], completions=json.loads(r[4]),
                                labeler=r[5], user_id=r[6], ranking=json.loads(r[7]), ties=json.loads(r[8]),
                                skipped=bool(r[9]), skip_reason=r[10], seconds=float(r[11]),
                                gold_ranking=None if r[12] is None else json.loads(r[12]),
                                gold_ties=None if r[13] is None else json.loads(r[13]), submission_id=r[14],
                                shown_order=json.loads(r[15])))
        return out

    def counter_drift(self) -> list[str]:
        """Where a kept counter differs from a recount of the rows it counts (empty when all agree).
        A full scan: for tests and for checking a database by hand, never on a request."""
        out = []
        conn = self._read()
        for name, sql in RECOUNT.items():
            for key, kept, counted in self._q(conn, sql).fetchall():
                if int(kept) != int(counted):
                    out.append(f"{name} of {key}: kept {kept}, counted {counted}")
        return out

    def count_labels(self) -> int:
        """Labels stored in the whole database (all campaigns)."""
        return self._q(self._read(), "SELECT count(*) FROM labels").fetchone()[0]

    def counts(self, campaign_id: int) -> dict[str, int]:
        conn = self._read()
        items, gold = self._q(conn, "SELECT count(*), count(gold_ranking) FROM items WHERE campaign_id = ?",
                              (campaign_id,)).fetchone()
        open_ = self._q(conn, "SELECT count(*) FROM assignments a JOIN items i ON i.id = a.item_id "
                              "WHERE i.campaign_id = ? AND a.done = 0", (campaign_id,)).fetchone()[0]
        return {"items": items, "gold_items": gold, "open_assignments": open_}

    # -- going back to the last answer, and the per-item admin view (issue 16) -------------------
    # Portable SQL through _q (PostgreSQL takes it with its own placeholders).

    def _item_complete(self, conn: sqlite3.Connection, item_id: int) -> bool:
        """An item is complete once it has N non-skipped labels (N = the campaign's labels per item)."""
        n, ranked = self._q(conn, 
            "SELECT c.labels_per_item, (SELECT count(*) FROM assignments a JOIN labels l ON l.assignment_id = a.id "
            "WHERE a.item_id = i.id AND l.skipped = 0) FROM items i JOIN campaigns c ON c.id = i.campaign_id "
            "WHERE i.id = ?", (item_id,)).fetchone()
        return ranked >= n

    def _last_labeled(self, conn: sqlite3.Connection, user: User) -> int | None:
        row = self._q(conn, "SELECT a.id FROM assignments a JOIN labels l ON l.assignment_id = a.id WHERE a.user_id = ? "
                           "ORDER BY l.submitted_at DESC, a.id DESC LIMIT 1", (user.id,)).fetchone()
        return None if row is None else row[0]

    def last_label(self, user: User) -> dict[str, Any] | None:
        """The labeler's most recent answer while it may still change (its item not yet complete), else None.

        Returned in SHOWN positions, as the page works: item, prompt, completions, ranking, ties,
        skipped, skip_reason.
        """
        conn = self._read()
        aid = self._last_labeled(conn, user)
        if aid is None:
            return None
        a = self._assignment(conn, aid)
        if self._item_complete(conn, a.item_id):
            return None
        ranking, ties, skipped, reason = self._q(conn, 
            "SELECT ranking, ties, skipped, skip_reason FROM labels WHERE assignment_id = ?", (aid,)).fetchone()
        shown = {orig: pos for pos, orig in enumerate(a.shown_order)}
        return {"id": a.id, "prompt": a.prompt, "completions": a.shown_completions(),
                "ranking": [shown[i] for i in json.loads(ranking)],
                "ties": [[shown[i] for i in g] for g in json.loads(ties)], "skipped": bool(skipped), "skip_reason": reason}

    def revise(self, user: User, assignment_id: int, submission_id: str, ranking: list[int], ties: list[list[int]],
               skipped: bool, skip_reason: str | None) -> bool:
        """Replace the labeler's LAST answer (ORIGINAL indices) while its item is not yet complete.

        Returns False when this revision was already stored (a retried request with the same
        submission id). Raises Conflict when the answer is not their last one, or the item has
        meanwhile got its N rankings: those labels may already be in someone's export.
        """
        with self._write() as conn:
            row = self._q(conn, "SELECT a.user_id, l.submission_id FROM assignments a LEFT JOIN labels l "
                               "ON l.assignment_id = a.id WHERE a.id = ?", (assignment_id,)).fetchone()
            if row is None or row[0] != user.id:
                raise NotFound(f"no item {assignment_id} is assigned to you")
            if row[1] is None:
                raise Conflict(f"item {assignment_id} has no answer of yours to change; submit it instead")
            if row[1] == submission_id:
                return False
            if self._last_labeled(conn, user) != assignment_id:
                raise Conflict("only your last answer can be changed")
            item_id = self._q(conn, "SELECT item_id FROM assignments WHERE id = ?", (assignment_id,)).fetchone()[0]
            # Complete with this answer counted as it stands; a skip (not counted) turned into a
            # ranking would need a free place, which is the same condition.
            if self._item_complete(conn, item_id):
                raise Conflict("this item has all its rankings now, so your answer can no longer be changed")
            self._q(conn, "UPDATE labels SET submission_id = ?, ranking = ?, ties = ?, skipped = ?, skip_reason = ? "
                         "WHERE assignment_id = ?", (submission_id, json.dumps(ranking), json.dumps(ties), int(skipped),
                                                     skip_reason, assignment_id))
        return True

    def items(self, campaign_id: int) -> list[dict[str, Any]]:
        """Every item of a campaign in queue order, with its open claims: what the per-item admin view lists."""
        rows = self._q(self._read(), 
            "SELECT i.id, i.prompt_id, i.prompt, i.completions, i.gold_ranking, i.gold_ties, "
            "(SELECT count(*) FROM assignments a LEFT JOIN labels l ON l.assignment_id = a.id "
            " WHERE a.item_id = i.id AND l.assignment_id IS NULL) FROM items i WHERE i.campaign_id = ? "
            "ORDER BY i.position, i.id", (campaign_id,)).fetchall()
        return [{"id": r[0], "prompt_id": r[1], "prompt": r[2], "completions": json.loads(r[3]),
                 "gold_ranking": None if r[4] is None else json.loads(r[4]),
                 "gold_ties": None if r[5] is None else json.loads(r[5]), "open_claims": r[6]} for r in rows]


def open_store(url: str | Path, **kwargs: Any) -> Store:
    """``labels.sqlite``, ``sqlite:///labels.sqlite``, or ``postgresql://user@host:port/dbname``."""
    text = str(url)
    if "://" in text:
        scheme, _, rest = text.partition("://")
        if scheme in ("postgresql", "postgres"):
            from rlhf.feedback.store_postgres import PostgresStore

            return PostgresStore(text, **kwargs)
        if scheme != "sqlite":
            raise ConfigError(f"database URL scheme {scheme!r} is not supported; use a SQLite file path "
                              "(or sqlite:///path) or postgresql://user@host:port/dbname")
        text = rest[1:] if rest.startswith("/") else rest
    return Store(text, **kwargs)
