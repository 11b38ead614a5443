"""The personal feedback contract, and the preference pairs one record implies.

    {"id": "t17", "user": "ann", "prompt": "my house is too hot",
     "replies": ["Open the windows at night.", "Good question! Open the windows at night ..."],
     "choice": 1, "edit": null, "model_version": "bundled+rerank:personal-rm@v0003", "time": 1712345678.25}

``choice`` is the index of the reply the user picked, or null when they marked both bad. ``edit`` is
the user's own better version of the chosen reply (or, after "both bad", a reply of their own), or
null. Pairs, preferred first:

* choice c: replies[c] ≻ replies[1 − c];
* an edit e: e ≻ every reply it differs from (the user rewrote it because they wanted e instead);
* both bad without an edit: no pair (nothing says which was less bad).

A pair whose two texts are equal says nothing and is dropped (two samples can coincide).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from rlhf.data.io import read_records
from rlhf.data.records import PairRecord, _Where
from rlhf.errors import DataError


@dataclass
class FeedbackRecord:
    user: str
    prompt: str
    replies: list[str]
    choice: int | None
    edit: str | None
    model_version: str
    time: float
    id: str | None = None
    kind: ClassVar[str] = "personal feedback"

    @classmethod
    def from_json(cls, obj: dict, path: str | Path = "<record>", line: int | None = None) -> "FeedbackRecord":
        w = _Where(path, line)
        replies = w.texts(obj, "replies")
        if len(replies) != 2:
            raise w.fail(f"expected exactly 2 replies, got {len(replies)}", "replies")
        choice = obj.get("choice")
        if choice is not None and (isinstance(choice, bool) or choice not in (0, 1)):
            raise w.fail(f"expected 0, 1 or null (both bad), got {choice!r}", "choice")
        edit = w.text(obj, "edit", optional=True)
        if edit is not None and not edit.strip():
            edit = None
        when = obj.get("time")
        if isinstance(when, bool) or not isinstance(when, (int, float)) or not math.isfinite(when):
            raise w.fail(f"expected a number (seconds since 1970), got {when!r}", "time")
        rid = obj.get("id")
        if rid is not None and not isinstance(rid, (str, int)):
            raise w.fail(f"expected a string, got {type(rid).__name__}", "id")
        return cls(user=w.text(obj, "user"), prompt=w.text(obj, "prompt", allow_empty=True), replies=replies,
                   choice=choice, edit=edit, model_version=w.text(obj, "model_version", allow_empty=True) or "",
                   time=float(when), id=None if rid is None else str(rid))

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "user": self.user, "prompt": self.prompt, "replies": self.replies, "choice": self.choice,
                "edit": self.edit, "model_version": self.model_version, "time": self.time}

    def pairs(self) -> list[PairRecord]:
        """The comparisons this record implies, preferred first, each tagged with user and record id."""
        tag = {"user": self.user, "feedback_id": self.id}
        out: list[tuple[str, str]] = []
        if self.choice is not None:
            out.append((self.replies[self.choice], self.replies[1 - self.choice]))
        if self.edit is not None:
            out += [(self.edit, r) for r in self.replies]
        return [PairRecord(self.prompt, c, r, dict(tag)) for c, r in out if c.strip() != r.strip()]


def read_feedback(source: str | Path) -> list[FeedbackRecord]:
    """Feedback from a labeling database (``.sqlite`` / ``sqlite:///``) or a JSON Lines file, oldest first."""
    text = str(source)
    if text.startswith("sqlite://") or Path(text).suffix in (".sqlite", ".sqlite3", ".db"):
        from rlhf.feedback.store import open_store
        from rlhf.personal.store import PersonalStore

        if "://" not in text and not Path(text).is_file():
            raise DataError(text, None, "feedback database not found")
        return PersonalStore(open_store(text)).feedback()
    records = read_records(source, FeedbackRecord)
    return sorted(records, key=lambda r: r.time)


def feedback_pairs(records: list[FeedbackRecord]) -> dict[str, list[PairRecord]]:
    """user → their pairs, in the order the feedback came (oldest first)."""
    out: dict[str, list[PairRecord]] = {}
    for rec in records:
        out.setdefault(rec.user, []).extend(rec.pairs())
    return out
