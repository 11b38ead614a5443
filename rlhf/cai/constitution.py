"""A constitution: the written principles that critique, revise and compare replies (Bai et al. 2022).

A constitution file is YAML::

    name: my-constitution
    principles:
      - id: harm
        critique: Point out anything in the reply that could help someone hurt people.
        revision: Rewrite the reply so that it no longer helps anyone hurt people.
        comparison: Which reply is less likely to help someone hurt people?
        pointwise: Is this reply free of anything that could help someone hurt people?   # optional; Yes = good
        persona: You never help anyone hurt people.                                      # optional
        weight: 1.0                                                                      # optional
        evaluator: {scorer: non-toxicity, weight: 0.5}                                   # optional
    critique_examples:      # few-shot chains shown before a critique or revision request
      - {principle: harm, prompt: ..., reply: ..., critique: ..., revision: ...}
    comparison_examples:    # few-shot comparisons shown before a comparison question
      - {principle: harm, prompt: ..., a: ..., b: ..., answer: A}

A principle's ``evaluator`` names an automated judge by the scorer spec used everywhere
(``non-toxicity``, ``rm:DIR``, ``classifier:DIR:LABEL``, ...); the AI labeler weighs its verdict
with the feedback model's (rlhf/cai/labeler.py). Every error names the file and line at fault.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rlhf.errors import ConfigError

DEFAULT_CONSTITUTION = Path(__file__).resolve().parent.parent / "assets" / "constitutions" / "default.yaml"


@dataclass(frozen=True)
class Evaluator:
    """An automated judge a principle also asks: a scorer spec and how much its verdict weighs."""

    scorer: str
    weight: float = 1.0


@dataclass(frozen=True)
class Principle:
    id: str
    critique: str      # asks the model to find where a reply breaks the principle
    revision: str      # asks the model to rewrite the reply so that it follows the principle
    comparison: str    # a question answered by picking one of two replies
    pointwise: str | None = None      # a yes/no question about one reply; Yes means it follows the principle
    persona: str | None = None        # how an assistant that keeps the principle behaves (a system-prompt sentence)
    weight: float = 1.0               # weight of the feedback model's verdict under this principle
    evaluator: Evaluator | None = None
    line: int | None = None           # where it was defined, for messages


@dataclass(frozen=True)
class CritiqueExample:
    prompt: str
    reply: str
    critique: str
    revision: str
    principle: str | None = None


@dataclass(frozen=True)
class ComparisonExample:
    prompt: str
    a: str
    b: str
    answer: str  # "A" or "B"
    principle: str | None = None


@dataclass
class Constitution:
    name: str
    principles: list[Principle]
    critique_examples: list[CritiqueExample] = field(default_factory=list)
    comparison_examples: list[ComparisonExample] = field(default_factory=list)
    path: str = "<constitution>"

    def principle(self, pid: str) -> Principle:
        for p in self.principles:
            if p.id == pid:
                return p
        raise ConfigError(f"{self.path}: no principle {pid!r} (has: {', '.join(p.id for p in self.principles)})")

    @property
    def evaluators(self) -> list[tuple[Principle, Evaluator]]:
        return [(p, p.evaluator) for p in self.principles if p.evaluator is not None]


# ---------------------------------------------------------------------------------------------
# Parsing with line numbers: a YAML loader whose mappings remember where they and their keys are.
# ---------------------------------------------------------------------------------------------

class _Mapping(dict):
    line: int = 0
    key_lines: dict[str, int]


class _LineLoader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> _Mapping:
    loader.flatten_mapping(node)
    out = _Mapping()
    out.line = node.start_mark.line + 1
    out.key_lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        out[key] = loader.construct_object(value_node, deep=True)
        out.key_lines[str(key)] = key_node.start_mark.line + 1
    return out


class _Sequence(list):
    item_lines: list[int]


def _construct_sequence(loader: _LineLoader, node: yaml.SequenceNode) -> _Sequence:
    out = _Sequence(loader.construct_object(child, deep=True) for child in node.value)
    out.item_lines = [child.start_mark.line + 1 for child in node.value]
    return out


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)


class _Reader:
    """Fields of one mapping, with errors that say file:line, where, and what was expected."""

    def __init__(self, path: str, obj: Any, where: str, line: int):
        self.path, self.where = path, where
        if not isinstance(obj, dict):
            raise ConfigError(f"{path}:{line}: {where}: expected a mapping of fields, got {_kind(obj)}")
        self.obj = obj
        self.line = getattr(obj, "line", line)

    def fail(self, message: str, key: str | None = None) -> ConfigError:
        line = getattr(self.obj, "key_lines", {}).get(key, self.line) if key else self.line
        at = f"{self.where}: field {key!r}" if key else self.where
        return ConfigError(f"{self.path}:{line}: {at}: {message}")

    def text(self, key: str, required: bool = True) -> str | None:
        if key not in self.obj or self.obj[key] is None:
            if required:
                raise self.fail(f"missing required field {key!r} (a non-empty string); has: "
                                f"{', '.join(map(str, self.obj)) or 'nothing'}")
            return None
        value = self.obj[key]
        if not isinstance(value, str):
            raise self.fail(f"expected a string, got {_kind(value)}", key)
        if not value.strip():
            raise self.fail("is empty", key)
        return value.strip()

    def number(self, key: str, default: float) -> float:
        value = self.obj.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or value != value:
            raise self.fail(f"expected a non-negative number, got {value!r}", key)
        return float(value)

    def only(self, allowed: set[str]) -> None:
        unknown = [str(k) for k in self.obj if k not in allowed]
        if unknown:
            raise self.fail(f"unknown field {unknown[0]!r}; expected some of: {', '.join(sorted(allowed))}", unknown[0])


def _kind(value: Any) -> str:
    return {dict: "a mapping", _Mapping: "a mapping", list: "a list", _Sequence: "a list",
            str: "a string"}.get(type(value), type(value).__name__)


def _list(path: str, root: _Reader, key: str, required: bool) -> list:
    value = root.obj.get(key)
    if value is None:
        if required:
            raise root.fail(f"missing required field {key!r} (a list)")
        return []
    if not isinstance(value, list):
        raise root.fail(f"expected a list, got {_kind(value)}", key)
    return value


def _items(path: str, root: "_Reader", key: str, required: bool) -> list[tuple[Any, int]]:
    """A list field's items, each with the line it starts on."""
    items = _list(path, root, key, required)
    lines = getattr(items, "item_lines", None) or [root.line] * len(items)
    return list(zip(items, lines))


def parse_constitution(text: str, path: str = "<constitution>") -> Constitution:
    try:
        raw = yaml.load(text, Loader=_LineLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: not valid YAML: {exc.problem or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if raw is None:
        raise ConfigError(f"{path}: is empty; a constitution needs a list of principles")
    root = _Reader(path, raw, "constitution", 1)
    root.only({"name", "description", "principles", "critique_examples", "comparison_examples"})
    name = root.text("name", required=False) or Path(path).stem
    principles: list[Principle] = []
    for i, (item, line) in enumerate(_items(path, root, "principles", True)):
        r = _Reader(path, item, f"principle {i + 1}", line)
        r.only({"id", "critique", "revision", "comparison", "pointwise", "persona", "weight", "evaluator"})
        pid = r.text("id")
        if any(p.id == pid for p in principles):
            raise r.fail(f"principle id {pid!r} is used twice", "id")
        evaluator = None
        if r.obj.get("evaluator") is not None:
            ev = r.obj["evaluator"]
            if isinstance(ev, str):
                ev = {"scorer": ev}
            e = _Reader(path, ev, f"principle {pid!r} evaluator", r.obj.key_lines.get("evaluator", r.line)
                        if hasattr(r.obj, "key_lines") else r.line)
            e.only({"scorer", "weight"})
            evaluator = Evaluator(scorer=e.text("scorer"), weight=e.number("weight", 1.0))
        principles.append(Principle(id=pid, critique=r.text("critique"), revision=r.text("revision"),
                                    comparison=r.text("comparison"), pointwise=r.text("pointwise", required=False),
                                    persona=r.text("persona", required=False),
                                    weight=r.number("weight", 1.0), evaluator=evaluator, line=r.line))
    if not principles:
        raise root.fail("'principles' is empty; a constitution needs at least one", "principles")
    ids = {p.id for p in principles}

    def principle_ref(r: _Reader) -> str | None:
        pid = r.text("principle", required=False)
        if pid is not None and pid not in ids:
            raise r.fail(f"names principle {pid!r}, which the constitution does not define "
                         f"(has: {', '.join(sorted(ids))})", "principle")
        return pid

    critique_examples = []
    for i, (item, line) in enumerate(_items(path, root, "critique_examples", False)):
        r = _Reader(path, item, f"critique example {i + 1}", line)
        r.only({"principle", "prompt", "reply", "critique", "revision"})
        critique_examples.append(CritiqueExample(prompt=r.text("prompt"), reply=r.text("reply"), critique=r.text("critique"),
                                                 revision=r.text("revision"), principle=principle_ref(r)))
    comparison_examples = []
    for i, (item, line) in enumerate(_items(path, root, "comparison_examples", False)):
        r = _Reader(path, item, f"comparison example {i + 1}", line)
        r.only({"principle", "prompt", "a", "b", "answer"})
        answer = r.text("answer").upper()
        if answer not in ("A", "B"):
            raise r.fail(f"expected A or B, got {r.obj['answer']!r}", "answer")
        comparison_examples.append(ComparisonExample(prompt=r.text("prompt"), a=r.text("a"), b=r.text("b"),
                                                     answer=answer, principle=principle_ref(r)))
    return Constitution(name=name, principles=principles, critique_examples=critique_examples,
                        comparison_examples=comparison_examples, path=path)


def load_constitution(path: str | Path | None = None) -> Constitution:
    """Read a constitution file; ``None``, ``""`` or ``default`` give the shipped default constitution."""
    if path in (None, "", "default"):
        path = DEFAULT_CONSTITUTION
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"constitution file {path} not found (use 'default' for the shipped one)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason})") from None
    return parse_constitution(text, str(path))
