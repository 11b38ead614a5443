"""The ReAct text protocol (Yao et al. 2023): what a model writes in a turn, and how it is read.

A turn the model writes is one of

    Thought: <why>                      Thought: <why>
    Action: <tool>[<input>]             Answer: <the final answer>

The thought is optional. ``<input>`` is the tool's one argument as plain text (``search[Zorvik]``,
``calc[3 * (4 + 5)]``), or a JSON object for a tool that takes several (``convert[{"value": 3,
"unit": "km"}]``). ``Action: finish[<answer>]`` is read as ``Answer: <answer>``, as in the ReAct
paper. The environment replies with one line,

    Observation: <the tool's result, or what was wrong>

and the model writes its next turn, until it answers or runs out of turns. One action per turn:
whatever follows the action's closing bracket is ignored (and counted as trailing text).

A turn that breaks the protocol never stops an episode: :func:`parse_turn` returns a
:class:`ParsedTurn` whose ``error`` says what was wrong (no action, no brackets, an unknown tool,
an empty input, arguments that do not fit the tool's schema), and that message is the observation
the model reads next, so it can correct itself; the episode record counts it as an invalid call.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

OBSERVATION_PREFIX = "Observation: "
ACTION_RE = re.compile(r"^\s*Action\s*:\s*(?P<body>.*)$", re.IGNORECASE)
ANSWER_RE = re.compile(r"^\s*(?:Final\s+)?Answer\s*:\s*(?P<body>.*)$", re.IGNORECASE)
TOOL_CALL_RE = re.compile(r"^(?P<name>[A-Za-z_][\w\-]*)\s*\[(?P<input>.*)\]\s*$", re.DOTALL)
FINISH_NAMES = ("finish",)


@dataclass
class ParsedTurn:
    """What a model turn asked for: an action (tool + raw input), a final answer, or an error."""

    thought: str | None = None
    tool: str | None = None
    tool_input: str | None = None
    answer: str | None = None
    error: str | None = None
    trailing: str = ""  # text after the action line, which the protocol ignores

    @property
    def is_action(self) -> bool:
        return self.tool is not None and self.error is None

    @property
    def is_answer(self) -> bool:
        return self.answer is not None and self.error is None


def _thought(lines: list[str]) -> str | None:
    for line in lines:
        m = re.match(r"^\s*Thought\s*:\s*(.*)$", line, re.IGNORECASE)
        if m:
            return m.group(1).strip()
    return None


def parse_turn(text: str, tool_names: list[str]) -> ParsedTurn:
    """Read one model turn. ``tool_names`` are the registered tools (for the unknown-tool message)."""
    lines = text.strip().splitlines()
    thought = _thought(lines)
    for i, line in enumerate(lines):
        answer = ANSWER_RE.match(line)
        if answer:
            body = answer.group("body").strip()  # one line: what follows it is not part of the answer
            if not body:
                return ParsedTurn(thought, error="the answer is empty; write 'Answer: <your answer>'")
            return ParsedTurn(thought, answer=body)
        action = ACTION_RE.match(line)
        if action:
            parsed = _parse_action(action.group("body").strip(), tool_names)
            parsed.thought = thought
            parsed.trailing = "\n".join(lines[i + 1:]).strip()
            return parsed
    tools = ", ".join(tool_names)
    return ParsedTurn(thought, error=f"no action found; write 'Action: <tool>[<input>]' (tools: {tools}) or 'Answer: <your answer>'")


def _parse_action(body: str, tool_names: list[str]) -> ParsedTurn:
    tools = ", ".join(tool_names)
    if not body:
        return ParsedTurn(error=f"the action is empty; write 'Action: <tool>[<input>]' (tools: {tools})")
    if "[" not in body:
        name = body.split()[0]
        return ParsedTurn(error=f"malformed action {body!r}: put the input in brackets, like {name}[<input>]")
    if not body.rstrip().endswith("]"):
        return ParsedTurn(error=f"malformed action {body!r}: the input must end with ']'")
    m = TOOL_CALL_RE.match(body)
    if m is None:
        return ParsedTurn(error=f"malformed action {body!r}: write it as <tool>[<input>], a tool name of letters, digits, _ or -")
    name, tool_input = m.group("name"), m.group("input").strip()
    if name.lower() in FINISH_NAMES:
        if not tool_input:
            return ParsedTurn(error="finish[] is empty; put the answer inside the brackets")
        return ParsedTurn(answer=tool_input)
    known = {t.lower(): t for t in tool_names}
    if name.lower() not in known:
        return ParsedTurn(error=f"unknown tool {name!r}; the tools are: {tools}")
    if not tool_input:
        return ParsedTurn(error=f"{known[name.lower()]}[] is empty; put the input inside the brackets")
    return ParsedTurn(tool=known[name.lower()], tool_input=tool_input)


def decode_arguments(tool_input: str, parameters: dict) -> dict:
    """The keyword arguments for a tool from its bracket text, by its JSON schema ``parameters``.

    A tool with one parameter (or one required parameter) takes plain text as that parameter,
    converted to its type; otherwise the text must be a JSON object of arguments. Raises ValueError with a message the model can act on.
    """
    props: dict = parameters.get("properties", {})
    required = list(parameters.get("required", list(props)))
    if len(props) == 1:
        (name, spec), = props.items()
        text = tool_input
        if text.startswith("{") and text.endswith("}"):
            try:
                obj = json.loads(text)
            except json.JSONDecodeError:
                obj = None
            if isinstance(obj, dict) and set(obj) == {name}:
                return {name: _convert(obj[name], spec, name)}
        return {name: _convert(text, spec, name)}
    if len(required) == 1 and not tool_input.startswith("{"):  # plain text fills the one required parameter
        return {required[0]: _convert(tool_input, props[required[0]], required[0])}
    try:
        obj = json.loads(tool_input)
    except json.JSONDecodeError as exc:
        raise ValueError(f"expected a JSON object with {', '.join(props)} ({exc.msg})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object with {', '.join(props)}")
    unknown = sorted(set(obj) - set(props))
    if unknown:
        raise ValueError(f"unknown argument(s) {', '.join(unknown)}; the arguments are {', '.join(props)}")
    missing = [r for r in required if r not in obj]
    if missing:
        raise ValueError(f"missing argument(s) {', '.join(missing)}")
    return {k: _convert(v, props[k], k) for k, v in obj.items()}


def _convert(value, spec: dict, name: str):
    kind = spec.get("type", "string")
    if kind == "string":
        if isinstance(value, (dict, list)):
            raise ValueError(f"argument {name} must be text")
        return str(value)
    if kind in ("number", "integer"):
        if isinstance(value, bool):
            raise ValueError(f"argument {name} must be a {kind}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"argument {name} must be a {kind}, got {value!r}") from None
        if kind == "integer":
            if number != int(number):
                raise ValueError(f"argument {name} must be an integer, got {value!r}")
            return int(number)
        return number
    if kind == "boolean":
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "false"):
            return str(value).lower() == "true"
        raise ValueError(f"argument {name} must be true or false, got {value!r}")
    return value


def observation(text: str, max_chars: int = 600) -> str:
    """The observation line the environment writes (long results are cut, with a marker)."""
    text = " ".join(text.split())
    if len(text) > max_chars:
        text = text[:max_chars].rstrip() + " …"
    return OBSERVATION_PREFIX + text


def error_observation(message: str) -> str:
    return observation(f"Error: {message}")
