"""The data contracts (DESIGN.md): typed records, each parsed from one JSON object with errors that
name file, line and field.

    prompts      {"id": "p1", "prompt": "my house is too hot"}
    completions  {"prompt_id": "p1", "prompt": "...", "completions": ["...", "..."]}
    rankings     {"prompt": "...", "completions": [...], "ranking": [2, 0, 1], "labeler": "ann",
                  "criterion": "helpfulness", "ties": [[0, 1]], "skipped": false}
    pairs        {"prompt": "...", "chosen": "...", "rejected": "..."}
    sft          {"prompt": "...", "completion": "..."}

A ranking lists completion indices best first. ``ties`` holds groups of indices the labeler judged
equal; each group must sit next to each other in ``ranking``. A skipped item has ``skipped: true``
and an empty ranking. Ties and skips are kept, and never turned into a pair.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from rlhf.errors import DataError, brief


class _Where:
    """File and line of the record being parsed, so every error can name them."""

    def __init__(self, path: str | Path, line: int | None):
        self.path, self.line = path, line

    def fail(self, message: str, field_: str | None = None) -> DataError:
        return DataError(self.path, self.line, message, field_)

    def text(self, obj: dict, key: str, *, allow_empty: bool = False, optional: bool = False) -> str | None:
        if key not in obj or obj[key] is None:
            if optional:
                return None
            raise self.fail(f"missing required field (expected a string); record has: {', '.join(sorted(obj)) or 'nothing'}", key)
        value = obj[key]
        if not isinstance(value, str):
            raise self.fail(f"expected a string, got {type(value).__name__}", key)
        if not allow_empty and not value.strip():
            raise self.fail("is empty", key)
        return value

    def texts(self, obj: dict, key: str) -> list[str]:
        if key not in obj:
            raise self.fail("missing required field (expected a list of strings)", key)
        value = obj[key]
        if not isinstance(value, list) or not value:
            raise self.fail("expected a non-empty list of strings", key)
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise self.fail(f"item {i} is {type(item).__name__}, expected a string", key)
            if not item.strip():
                raise self.fail(f"completion {i} is empty", key)
        return value


def _extras(obj: dict, known: set[str]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k not in known}


@dataclass
class PromptRecord:
    id: str
    prompt: str
    kind: ClassVar[str] = "prompts"

    @classmethod
    def from_json(cls, obj: dict, path: str | Path = "<record>", line: int | None = None) -> "PromptRecord":
        w = _Where(path, line)
        pid = obj.get("id")
        if pid is None:
            pid = f"{Path(str(path)).stem}-{line}" if line is not None else None
            if pid is None:
                raise w.fail("missing required field", "id")
        if not isinstance(pid, (str, int)):
            raise w.fail(f"expected a string, got {type(pid).__name__}", "id")
        return cls(id=str(pid), prompt=w.text(obj, "prompt"))

    def to_json(self) -> dict:
        return {"id": self.id, "prompt": self.prompt}


@dataclass
class CompletionsRecord:
    prompt_id: str
    prompt: str
    completions: list[str]
    kind: ClassVar[str] = "completions"

    @classmethod
    def from_json(cls, obj: dict, path: str | Path = "<record>", line: int | None = None) -> "CompletionsRecord":
        w = _Where(path, line)
        pid = obj.get("prompt_id", obj.get("id", f"line-{line}"))
        return cls(prompt_id=str(pid), prompt=w.text(obj, "prompt"), completions=w.texts(obj, "completions"))

    def to_json(self) -> dict:
        return {"prompt_id": self.prompt_id, "prompt": self.prompt, "completions": self.completions}


@dataclass
class RankingRecord:
    prompt: str
    completions: list[str]
    ranking: list[int]
    labeler: str | None = None
    criterion: str | None = None
    ties: list[list[int]] = field(default_factory=list)
    skipped: bool = False
    skip_reason: str | None = None
    prompt_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    kind: ClassVar[str] = "rankings"
    _known: ClassVar[set[str]] = {"prompt", "completions", "ranking", "labeler", "criterion", "ties",
                                  "skipped", "skip_reason", "prompt_id"}

    @classmethod
    def from_json(cls, obj: dict, path: str | Path = "<record>", line: int | None = None) -> "RankingRecord":
        w = _Where(path, line)
        prompt = w.text(obj, "prompt")
        completions = w.texts(obj, "completions")
        skipped = obj.get("skipped", False)
        if not isinstance(skipped, bool):
            raise w.fail(f"expected true or false, got {brief(skipped)}", "skipped")
        ranking = obj.get("ranking", [] if skipped else None)
        if ranking is None:
            raise w.fail("missing required field (expected a list of completion indices, best first)", "ranking")
        if not isinstance(ranking, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in ranking):
            raise w.fail(f"expected a list of integer indices, got {brief(ranking)}", "ranking")
        k = len(completions)
        if skipped:
            if ranking:
                raise w.fail("a skipped item must have an empty ranking", "ranking")
        else:
            for i in ranking:
                if not 0 <= i < k:
                    raise w.fail(f"index {i} is out of range: there are {k} completions (valid: 0..{k - 1})", "ranking")
            seen = set()
            for i in ranking:
                if i in seen:
                    raise w.fail(f"index {i} appears twice; a ranking must list each completion once", "ranking")
                seen.add(i)
            if len(ranking) != k:
                missing = sorted(set(range(k)) - seen)
                raise w.fail(f"ranks {len(ranking)} of {k} completions; missing indices {missing}", "ranking")
        ties = obj.get("ties") or []
        if (not isinstance(ties, list) or any(not isinstance(g, list) for g in ties)
                or any(isinstance(i, bool) or not isinstance(i, int) for g in ties for i in g)):
            raise w.fail(f"expected a list of groups of integer indices like [[0, 2]], got {brief(ties)}", "ties")
        position = {c: p for p, c in enumerate(ranking)}
        for group in ties:
            if len(group) < 2 or len(set(group)) != len(group):
                raise w.fail(f"tie group {brief(group)} must hold two or more distinct indices", "ties")
            for i in group:
                if i not in position:
                    raise w.fail(f"tie group {brief(group)} names index {i}, which is not in the ranking", "ties")
            spots = sorted(position[i] for i in group)
            if spots[-1] - spots[0] != len(group) - 1:
                raise w.fail(f"tie group {brief(group)} is not contiguous in the ranking {brief(ranking)}", "ties")
        if obj.get("probabilities") is not None:
            _probability_matrix(obj["probabilities"], k, w)
        return cls(prompt=prompt, completions=completions, ranking=ranking,
                   labeler=w.text(obj, "labeler", optional=True, allow_empty=True),
                   criterion=w.text(obj, "criterion", optional=True, allow_empty=True),
                   ties=ties, skipped=skipped, skip_reason=obj.get("skip_reason"),
                   prompt_id=None if obj.get("prompt_id") is None else str(obj["prompt_id"]),
                   extra=_extras(obj, cls._known))

    def to_json(self) -> dict:
        out: dict[str, Any] = {"prompt": self.prompt, "completions": self.completions, "ranking": self.ranking,
                               "labeler": self.labeler, "criterion": self.criterion}
        if self.prompt_id is not None:
            out["prompt_id"] = self.prompt_id
        if self.ties:
            out["ties"] = self.ties
        if self.skipped:
            out["skipped"] = True
            out["skip_reason"] = self.skip_reason
        out.update(self.extra)
        return out


@dataclass
class PairRecord:
    prompt: str
    chosen: str
    rejected: str
    extra: dict[str, Any] = field(default_factory=dict)
    probability: float | None = None  # P(chosen preferred), from a soft labeler (AI feedback); None = a hard label
    kind: ClassVar[str] = "pairs"

    @classmethod
    def from_json(cls, obj: dict, path: str | Path = "<record>", line: int | None = None) -> "PairRecord":
        """Our columns; TRL's (explicit or implicit prompt, plain or conversational); HH dialogues."""
        from rlhf.data.formats import normalise_pair  # local: formats imports this module

        w = _Where(path, line)
        prompt, chosen, rejected = normalise_pair(obj, w)
        if chosen == rejected:
            raise w.fail("chosen and rejected are identical: the pair says nothing about preference", "chosen")
        known = {"prompt", "chosen", "rejected", "probability"}
        return cls(prompt=prompt, chosen=chosen, rejected=rejected, extra=_extras(obj, known),
                   probability=_probability(obj.get("probability"), w, "probability"))

    def to_json(self) -> dict:
        out = {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected, **self.extra}
        if self.probability is not None:
            out["probability"] = self.probability
        return out


def _probability(value: Any, w: _Where, field_: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise w.fail(f"expected a probability between 0 and 1, got {value!r}", field_)
    return float(value)


def _probability_matrix(value: Any, k: int, w: _Where) -> None:
    """``probabilities`` of a rankings record: K×K, P[i][j] = P(completion i is better than j)."""
    if not isinstance(value, list) or len(value) != k or any(not isinstance(row, list) or len(row) != k for row in value):
        raise w.fail(f"expected a {k}×{k} list of lists (one row and column per completion)", "probabilities")
    for i, row in enumerate(value):
        for j, p in enumerate(row):
            _probability(p, w, f"probabilities[{i}][{j}]")


@dataclass
class SFTRecord:
    prompt: str
    completion: str
    kind: ClassVar[str] = "sft"

    @classmethod
    def from_json(cls, obj: dict, path: str | Path = "<record>", line: int | None = None) -> "SFTRecord":
        w = _Where(path, line)
        key = next((k for k in ("completion", "reply", "response") if k in obj), "completion")
        return cls(prompt=w.text(obj, "prompt", allow_empty=True), completion=w.text(obj, key))

    def to_json(self) -> dict:
        return {"prompt": self.prompt, "completion": self.completion}


RECORD_TYPES = {cls.kind: cls for cls in (PromptRecord, CompletionsRecord, RankingRecord, PairRecord, SFTRecord)}


def as_dict(record: Any) -> dict:
    return record.to_json() if hasattr(record, "to_json") else dataclasses.asdict(record)
