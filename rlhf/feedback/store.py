"""The labeling store: campaigns, items, labelers, assignments and labels in SQLite.

Every other part of the labeling app (server, CLI, export, admin statistics) talks to
:class:`Store` only, through plain Python values, so a PostgreSQL backend could replace it behind
``open_store(url)``: the SQL below sticks to what both engines accept apart from the PRAGMAs.

Durability: the database runs in WAL mode with ``synchronous=FULL`` by default, so a commit is
fsync'ed to the write-ahead log before :meth:`Store.submit` returns, and the server answers only
after that. ``NORMAL`` (``--synchronous normal``) is also safe against a killed process, since
the WAL pages are already in the OS page cache, but can lose the last commits on power loss.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf.errors import ConfigError, RLHFError

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS campaigns (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    criterion TEXT NOT NULL,
    instructions TEXT NOT NULL,
    labels_per_item INTEGER NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY,
    campaign_id INTEGER NOT NULL REFERENCES campaigns(id),
    position REAL NOT NULL,
    prompt_id TEXT NOT NULL,
    prompt TEXT NOT NULL,
    completions TEXT NOT NULL,
    gold_ranking TEXT,
    gold_ties TEXT,
    UNIQUE (campaign_id, prompt_id)
);
CREATE TABLE IF NOT EXISTS users (
    id INTEGER PRIMARY KEY,
    campaign_id INTEGER REFERENCES campaigns(id),
    name TEXT NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('labeler', 'admin')),
    token_hash TEXT NOT NULL UNIQUE,
    created_at REAL NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS users_unique_name ON users (role, coalesce(campaign_id, 0), name);
CREATE TABLE IF NOT EXISTS assignments (
    id INTEGER PRIMARY KEY,
    item_id INTEGER NOT NULL REFERENCES items(id),
    user_id INTEGER NOT NULL REFERENCES users(id),
    shown_order TEXT NOT NULL,
    served_at REAL NOT NULL,
    UNIQUE (user_id, item_id)
);
CREATE INDEX IF NOT EXISTS assignments_item ON assignments (item_id);
CREATE TABLE IF NOT EXISTS labels (
    assignment_id INTEGER PRIMARY KEY REFERENCES assignments(id),
    submission_id TEXT NOT NULL,
    ranking TEXT NOT NULL,
    ties TEXT NOT NULL,
    skipped INTEGER NOT NULL,
    skip_reason TEXT,
    submitted_at REAL NOT NULL
);
"""


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
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def shuffled_order(k: int, user_id: int, item_id: int) -> list[int]:
    """The per-labeler order of an item's completions: random, but the same on every reload."""
    order = list(range(k))
    random.Random(f"order:{user_id}:{item_id}").shuffle(order)
    return order


class Store:
    """SQLite store shared by the server's worker threads (one connection per thread).

    Writes take a process-wide lock and ``BEGIN IMMEDIATE``: SQLite allows one writer anyway, and
    taking the write lock up front avoids the deadlock of two readers upgrading at once.
    ``busy_timeout_s`` covers a second process (the CLI adding a labeler while the server runs);
    past it SQLite raises ``OperationalError: database is locked``, which the server answers with
    a 503 (see :func:`is_busy`), never a stored label.
    """

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
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = self._conn()
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, SCHEMA_VERSION):
            raise ConfigError(f"{self.path}: labeling database schema version {version}; this build reads {SCHEMA_VERSION}")
        with self._write_lock:  # executescript manages its own transaction: one BEGIN..COMMIT here
            conn.executescript(f"BEGIN IMMEDIATE; {_SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")

    # -- connections and transactions ------------------------------------------------------------

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

    class _Tx:
        def __init__(self, store: "Store"):
            self.store = store

        def __enter__(self) -> sqlite3.Connection:
            self.store._write_lock.acquire()
            self.conn = self.store._conn()
            try:
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
                self.store._write_lock.release()

    def _write(self) -> "Store._Tx":
        return Store._Tx(self)

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # -- campaigns and items ---------------------------------------------------------------------

    def create_campaign(self, name: str, criterion: str, instructions: str, labels_per_item: int,
                        items: list[dict[str, Any]]) -> Campaign:
        """Items: dicts with prompt_id, prompt, completions, optional gold_ranking / gold_ties.

        Gold items are spread evenly between the regular ones, so attention checks turn up
        throughout a labeler's session rather than in a block at the start.
        """
        if labels_per_item < 1:
            raise ConfigError("labels per item must be at least 1")
        regular = [it for it in items if it.get("gold_ranking") is None]
        gold = [it for it in items if it.get("gold_ranking") is not None]
        if not regular and not gold:
            raise ConfigError("a campaign needs at least one item")
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM campaigns WHERE name = ?", (name,)).fetchone():
                raise Conflict(f"campaign {name!r} already exists in {self.path}; pick another --name")
            cur = conn.execute("INSERT INTO campaigns (name, criterion, instructions, labels_per_item, created_at) "
                               "VALUES (?, ?, ?, ?, ?)", (name, criterion, instructions, labels_per_item, time.time()))
            cid = cur.lastrowid
            rows = [(float(i), it) for i, it in enumerate(regular)]
            rows += [((g + 1) * len(regular) / (len(gold) + 1) - 0.5, it) for g, it in enumerate(gold)]
            seen: set[str] = set()
            for pos, it in rows:
                if it["prompt_id"] in seen:
                    raise Conflict(f"prompt_id {it['prompt_id']!r} appears twice; item ids must be unique in a campaign")
                seen.add(it["prompt_id"])
                conn.execute("INSERT INTO items (campaign_id, position, prompt_id, prompt, completions, gold_ranking, "
                             "gold_ties) VALUES (?, ?, ?, ?, ?, ?, ?)",
                             (cid, pos, it["prompt_id"], it["prompt"], json.dumps(it["completions"], ensure_ascii=False),
                              None if it.get("gold_ranking") is None else json.dumps(it["gold_ranking"]),
                              None if it.get("gold_ranking") is None else json.dumps(it.get("gold_ties") or [])))
        return self.campaign(cid)

    def campaign(self, campaign_id: int) -> Campaign:
        row = self._conn().execute("SELECT id, name, criterion, instructions, labels_per_item FROM campaigns "
                                   "WHERE id = ?", (campaign_id,)).fetchone()
        if row is None:
            raise NotFound(f"no campaign with id {campaign_id}")
        return Campaign(*row)

    def campaigns(self) -> list[Campaign]:
        rows = self._conn().execute("SELECT id, name, criterion, instructions, labels_per_item FROM campaigns "
                                    "ORDER BY id").fetchall()
        return [Campaign(*r) for r in rows]

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
        raise ConfigError(f"no campaign named {name!r} in {self.path} (have: {', '.join(c.name for c in camps) or 'none'})")

    # -- users and tokens ------------------------------------------------------------------------

    def add_user(self, name: str, role: str, campaign_id: int | None) -> tuple[User, str]:
        """Create a labeler (in one campaign) or an admin; returns the user and the new secret token."""
        name = name.strip()
        if not name or len(name) > 100:
            raise Invalid("a name must be 1 to 100 characters")
        if role == "labeler" and campaign_id is None:
            raise Invalid("a labeler belongs to a campaign")
        token = secrets.token_urlsafe(24)
        with self._write() as conn:
            try:
                cur = conn.execute("INSERT INTO users (campaign_id, name, role, token_hash, created_at) VALUES (?, ?, ?, ?, ?)",
                                   (campaign_id if role == "labeler" else None, name, role, hash_token(token), time.time()))
            except sqlite3.IntegrityError:
                raise Conflict(f"a{'n' if role == 'admin' else ''} {role} named {name!r} already exists") from None
        return User(cur.lastrowid, name, role, campaign_id if role == "labeler" else None), token

    def user_by_token(self, token: str) -> User | None:
        row = self._conn().execute("SELECT id, name, role, campaign_id FROM users WHERE token_hash = ?",
                                   (hash_token(token),)).fetchone()
        return None if row is None else User(*row)

    def labelers(self, campaign_id: int) -> list[User]:
        rows = self._conn().execute("SELECT id, name, role, campaign_id FROM users WHERE role = 'labeler' AND "
                                    "campaign_id = ? ORDER BY id", (campaign_id,)).fetchall()
        return [User(*r) for r in rows]

    # -- assignments -----------------------------------------------------------------------------

    # Items this labeler may still get: not yet served to them, and either gold (everyone sees
    # those) or short of N rankings, counting non-skipped labels and claims younger than the timeout.
    _AVAILABLE = """
        FROM items i WHERE i.campaign_id = :cid
        AND NOT EXISTS (SELECT 1 FROM assignments a WHERE a.item_id = i.id AND a.user_id = :uid)
        AND (i.gold_ranking IS NOT NULL OR (
            SELECT count(*) FROM assignments a LEFT JOIN labels l ON l.assignment_id = a.id
            WHERE a.item_id = i.id AND ((l.assignment_id IS NOT NULL AND l.skipped = 0)
                                        OR (l.assignment_id IS NULL AND a.served_at > :fresh))) < :n)
    """

    def _assignment(self, conn: sqlite3.Connection, assignment_id: int) -> Assignment:
        row = conn.execute("SELECT a.id, a.item_id, i.prompt, i.completions, a.shown_order FROM assignments a "
                           "JOIN items i ON i.id = a.item_id WHERE a.id = ?", (assignment_id,)).fetchone()
        return Assignment(row[0], row[1], row[2], json.loads(row[3]), json.loads(row[4]))

    def next_assignment(self, user: User) -> Assignment | None:
        """The labeler's open item, or a newly claimed one; None when nothing is left for them."""
        camp = self.campaign(user.campaign_id)
        with self._write() as conn:
            row = conn.execute("SELECT a.id FROM assignments a LEFT JOIN labels l ON l.assignment_id = a.id "
                               "WHERE a.user_id = ? AND l.assignment_id IS NULL ORDER BY a.id LIMIT 1", (user.id,)).fetchone()
            if row is not None:
                return self._assignment(conn, row[0])
            params = {"cid": camp.id, "uid": user.id, "fresh": time.time() - self.claim_timeout_s, "n": camp.labels_per_item}
            row = conn.execute("SELECT i.id, i.completions " + self._AVAILABLE + " ORDER BY i.position, i.id LIMIT 1", params).fetchone()
            if row is None:
                return None
            order = shuffled_order(len(json.loads(row[1])), user.id, row[0])
            cur = conn.execute("INSERT INTO assignments (item_id, user_id, shown_order, served_at) VALUES (?, ?, ?, ?)",
                               (row[0], user.id, json.dumps(order), time.time()))
            return self._assignment(conn, cur.lastrowid)

    def progress(self, user: User) -> dict[str, int]:
        """done / total for the labeler, where total counts what is still open to them right now.

        The total can shrink while others label (an item reaches N rankings) — it is an honest
        snapshot, not a quota.
        """
        camp = self.campaign(user.campaign_id)
        conn = self._conn()
        done, skipped, open_ = conn.execute(
            "SELECT count(l.assignment_id), coalesce(sum(l.skipped), 0), count(*) - count(l.assignment_id) "
            "FROM assignments a LEFT JOIN labels l ON l.assignment_id = a.id WHERE a.user_id = ?", (user.id,)).fetchone()
        params = {"cid": camp.id, "uid": user.id, "fresh": time.time() - self.claim_timeout_s, "n": camp.labels_per_item}
        available = conn.execute("SELECT count(*) " + self._AVAILABLE, params).fetchone()[0]
        return {"done": done, "skipped": skipped, "total": done + open_ + available}

    # -- labels ----------------------------------------------------------------------------------

    def submit(self, user: User, assignment_id: int, submission_id: str, ranking: list[int], ties: list[list[int]],
               skipped: bool, skip_reason: str | None) -> bool:
        """Store a label given in ORIGINAL indices (the caller maps shown positions back).

        Returns True when stored now, False when the same label was already stored (a retried
        request): idempotent. A different second label for the same item raises Conflict.
        The commit happens before this returns, so an acknowledged label survives a crash.
        """
        with self._write() as conn:
            row = conn.execute("SELECT user_id FROM assignments WHERE id = ?", (assignment_id,)).fetchone()
            if row is None or row[0] != user.id:
                raise NotFound(f"no item {assignment_id} is assigned to you")
            old = conn.execute("SELECT submission_id, ranking, ties, skipped, skip_reason FROM labels WHERE assignment_id = ?",
                               (assignment_id,)).fetchone()
            new = (json.dumps(ranking), json.dumps(ties), int(skipped), skip_reason)
            if old is not None:
                if old[0] == submission_id or tuple(old[1:]) == new:
                    return False
                raise Conflict(f"item {assignment_id} already has your label (submission {old[0]}); it cannot be changed")
            conn.execute("INSERT INTO labels (assignment_id, submission_id, ranking, ties, skipped, skip_reason, submitted_at) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?)", (assignment_id, submission_id, *new, time.time()))
        return True

    def assignment_for(self, user: User, assignment_id: int) -> Assignment:
        conn = self._conn()
        row = conn.execute("SELECT user_id FROM assignments WHERE id = ?", (assignment_id,)).fetchone()
        if row is None or row[0] != user.id:
            raise NotFound(f"no item {assignment_id} is assigned to you")
        return self._assignment(conn, assignment_id)

    def label_rows(self, campaign_id: int) -> list[LabelRow]:
        rows = self._conn().execute(
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

    def counts(self, campaign_id: int) -> dict[str, int]:
        conn = self._conn()
        items, gold = conn.execute("SELECT count(*), count(gold_ranking) FROM items WHERE campaign_id = ?",
                                   (campaign_id,)).fetchone()
        open_ = conn.execute("SELECT count(*) FROM assignments a JOIN items i ON i.id = a.item_id LEFT JOIN labels l "
                             "ON l.assignment_id = a.id WHERE i.campaign_id = ? AND l.assignment_id IS NULL",
                             (campaign_id,)).fetchone()[0]
        return {"items": items, "gold_items": gold, "open_assignments": open_}

    # -- going back to the last answer, and the per-item admin view (issue 16) -------------------
    # Kept together so a second backend adds them in one place. Portable SQL only.

    def _item_complete(self, conn: sqlite3.Connection, item_id: int) -> bool:
        """An item is complete once it has N non-skipped labels (N = the campaign's labels per item)."""
        n, ranked = conn.execute(
            "SELECT c.labels_per_item, (SELECT count(*) FROM assignments a JOIN labels l ON l.assignment_id = a.id "
            "WHERE a.item_id = i.id AND l.skipped = 0) FROM items i JOIN campaigns c ON c.id = i.campaign_id "
            "WHERE i.id = ?", (item_id,)).fetchone()
        return ranked >= n

    def _last_labeled(self, conn: sqlite3.Connection, user: User) -> int | None:
        row = conn.execute("SELECT a.id FROM assignments a JOIN labels l ON l.assignment_id = a.id WHERE a.user_id = ? "
                           "ORDER BY l.submitted_at DESC, a.id DESC LIMIT 1", (user.id,)).fetchone()
        return None if row is None else row[0]

    def last_label(self, user: User) -> dict[str, Any] | None:
        """The labeler's most recent answer while it may still change (its item not yet complete), else None.

        Returned in SHOWN positions, as the page works: item, prompt, completions, ranking, ties,
        skipped, skip_reason.
        """
        conn = self._conn()
        aid = self._last_labeled(conn, user)
        if aid is None:
            return None
        a = self._assignment(conn, aid)
        if self._item_complete(conn, a.item_id):
            return None
        ranking, ties, skipped, reason = conn.execute(
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
            row = conn.execute("SELECT a.user_id, l.submission_id FROM assignments a LEFT JOIN labels l "
                               "ON l.assignment_id = a.id WHERE a.id = ?", (assignment_id,)).fetchone()
            if row is None or row[0] != user.id:
                raise NotFound(f"no item {assignment_id} is assigned to you")
            if row[1] is None:
                raise Conflict(f"item {assignment_id} has no answer of yours to change; submit it instead")
            if row[1] == submission_id:
                return False
            if self._last_labeled(conn, user) != assignment_id:
                raise Conflict("only your last answer can be changed")
            item_id = conn.execute("SELECT item_id FROM assignments WHERE id = ?", (assignment_id,)).fetchone()[0]
            # Complete with this answer counted as it stands; a skip (not counted) turned into a
            # ranking would need a free place, which is the same condition.
            if self._item_complete(conn, item_id):
                raise Conflict("this item has all its rankings now, so your answer can no longer be changed")
            conn.execute("UPDATE labels SET submission_id = ?, ranking = ?, ties = ?, skipped = ?, skip_reason = ? "
                         "WHERE assignment_id = ?", (submission_id, json.dumps(ranking), json.dumps(ties), int(skipped),
                                                     skip_reason, assignment_id))
        return True

    def items(self, campaign_id: int) -> list[dict[str, Any]]:
        """Every item of a campaign in queue order, with its open claims: what the per-item admin view lists."""
        rows = self._conn().execute(
            "SELECT i.id, i.prompt_id, i.prompt, i.completions, i.gold_ranking, i.gold_ties, "
            "(SELECT count(*) FROM assignments a LEFT JOIN labels l ON l.assignment_id = a.id "
            " WHERE a.item_id = i.id AND l.assignment_id IS NULL) FROM items i WHERE i.campaign_id = ? "
            "ORDER BY i.position, i.id", (campaign_id,)).fetchall()
        return [{"id": r[0], "prompt_id": r[1], "prompt": r[2], "completions": json.loads(r[3]),
                 "gold_ranking": None if r[4] is None else json.loads(r[4]),
                 "gold_ties": None if r[5] is None else json.loads(r[5]), "open_claims": r[6]} for r in rows]


def open_store(url: str | Path, **kwargs: Any) -> Store:
    """``labels.sqlite``, ``sqlite:///labels.sqlite``; other schemes are refused with a clear message."""
    text = str(url)
    if "://" in text:
        scheme, _, rest = text.partition("://")
        if scheme != "sqlite":
            raise ConfigError(f"database URL scheme {scheme!r} is not supported by this build; use a SQLite file path "
                              "(a PostgreSQL backend would implement the Store methods in rlhf/feedback/store.py)")
        text = rest[1:] if rest.startswith("/") else rest
    return Store(text, **kwargs)
