"""Tools an agent can call: search over an index, a safe calculator, and any Python function.

A tool is a name, a one-line description (shown to the model in the prompt), a JSON schema of its
parameters, and a callable that returns text. :func:`tool_from_function` builds one from a plain
Python function, reading the schema from its signature (``str``, ``int``, ``float``, ``bool``
parameters; those without a default are required) and the description from its docstring, so a
user's own tool is one function:

    def weather(city: str) -> str:
        \"\"\"Today's weather in a city.\"\"\"
        ...

``rlhf agent run --tool mymodule:weather`` imports it (the user's own code, named explicitly).

Calling never raises: bad arguments, an exception inside the tool, or a result that is not text
become an error observation the model reads (``ToolResult.error``), and the episode goes on.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import math
import operator
import typing
from dataclasses import dataclass, field
from typing import Callable

from rlhf.agents.protocol import decode_arguments
from rlhf.errors import ConfigError

JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean"}


@dataclass
class ToolResult:
    text: str
    error: str | None = None  # what went wrong, when the call did not succeed


@dataclass
class Tool:
    name: str
    description: str
    parameters: dict  # JSON schema: {"type": "object", "properties": {...}, "required": [...]}
    fn: Callable[..., object]

    def call(self, tool_input: str) -> ToolResult:
        try:
            kwargs = decode_arguments(tool_input, self.parameters)
        except ValueError as exc:
            return ToolResult("", f"{self.name}: {exc}")
        try:
            out = self.fn(**kwargs)
        except ToolInputError as exc:
            return ToolResult("", f"{self.name}: {exc}")
        except Exception as exc:  # noqa: BLE001 - a user's tool failing must not end the episode
            return ToolResult("", f"{self.name} failed: {type(exc).__name__}: {exc}")
        if not isinstance(out, (str, int, float)):
            return ToolResult("", f"{self.name} returned {type(out).__name__}, not text")
        return ToolResult(str(out))

    def signature(self) -> str:
        """How the prompt shows the tool: ``search[query]``."""
        return f"{self.name}[{', '.join(self.parameters.get('properties', {}))}]"


class ToolInputError(ValueError):
    """Raised by a tool for input it cannot use; the message becomes the model's observation."""


@dataclass
class ToolRegistry:
    tools: dict[str, Tool] = field(default_factory=dict)

    def register(self, tool: Tool) -> Tool:
        if tool.name in self.tools:
            raise ConfigError(f"two tools are named {tool.name!r}")
        if tool.name.lower() == "finish":
            raise ConfigError("'finish' is the protocol's answer action; give the tool another name")
        self.tools[tool.name] = tool
        return tool

    def names(self) -> list[str]:
        return list(self.tools)

    def call(self, name: str, tool_input: str) -> ToolResult:
        if name not in self.tools:
            return ToolResult("", f"unknown tool {name!r}; the tools are: {', '.join(self.tools)}")
        return self.tools[name].call(tool_input)

    def describe(self) -> str:
        """The tools line of the agent's prompt."""
        return "Tools: " + ", ".join(t.signature() for t in self.tools.values())


# --- user functions as tools ----------------------------------------------------------------------

def tool_from_function(fn: Callable[..., object], name: str | None = None, description: str | None = None) -> Tool:
    """A tool from a Python function: schema from its annotated parameters, description from its docstring."""
    sig = inspect.signature(fn)
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # noqa: BLE001 - annotations that do not resolve are read as text parameters
        hints = {}
    props, required = {}, []
    for pname, p in sig.parameters.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise ConfigError(f"tool {fn.__name__}: *args/**kwargs cannot be described to a model; name each parameter")
        tp = hints.get(pname, str)
        if tp not in JSON_TYPES:
            raise ConfigError(f"tool {fn.__name__}: parameter {pname} has type {tp!r}; tools take str, int, float or bool")
        props[pname] = {"type": JSON_TYPES[tp]}
        if p.default is p.empty:
            required.append(pname)
    if not props:
        raise ConfigError(f"tool {fn.__name__}: a tool needs at least one parameter (the text in its brackets)")
    doc_lines = (inspect.getdoc(fn) or "").strip().splitlines()
    return Tool(name or fn.__name__, description or (doc_lines[0] if doc_lines else fn.__name__),
                {"type": "object", "properties": props, "required": required}, fn)


def load_tool(spec: str) -> Tool:
    """``module:function`` (a module importable from the current environment) → a tool."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"--tool {spec!r}: expected module:function, e.g. mytools:weather")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"--tool {spec!r}: cannot import {module_name} ({exc})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"--tool {spec!r}: {module_name} has no function {attr}")
    return tool_from_function(fn)


# --- built-in tools -------------------------------------------------------------------------------

def search_tool(index, k: int = 2, mode: str = "hybrid") -> Tool:
    """``search[query]``: the ``k`` best passages of ``index`` with their ids."""

    def search(query: str) -> str:
        hits = index.search(query, k, mode)
        if not hits:
            return f"no passage matches {query!r}"
        return " ".join(f"[{h.chunk_id}] {h.text}" for h in hits)

    return Tool("search", "find passages about a name or topic", {"type": "object", "properties": {"query": {"type": "string"}},
                                                                  "required": ["query"]}, search)


_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCS = {"sqrt": math.sqrt, "abs": abs, "round": round, "min": min, "max": max, "log": math.log, "exp": math.exp}
_CONSTS = {"pi": math.pi, "e": math.e}
MAX_EXPRESSION_CHARS = 200
MAX_MAGNITUDE = 1e15


def calculate(expression: str) -> str:
    """Arithmetic on numbers: + − × ÷ (//, %, **), parentheses, sqrt, abs, round, min, max, log, exp.

    The expression is parsed with :mod:`ast` and walked node by node; only the operations above are
    evaluated (no names, attributes, calls to anything else: nothing like ``eval``). Exponents and
    results are bounded so a model cannot ask for a number that takes minutes to compute."""
    expression = expression.strip().replace("×", "*").replace("÷", "/").replace("−", "-")
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ToolInputError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError:
        raise ToolInputError(f"cannot read {expression!r} as arithmetic") from None
    value = _eval(tree.body)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            raise ToolInputError("the result is not a finite number")
        if value == int(value) and abs(value) < MAX_MAGNITUDE:
            return str(int(value))
        return f"{value:.10g}"
    return str(value)


def _eval(node: ast.AST):
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow) and (abs(right) > 100 or abs(left) > MAX_MAGNITUDE):
            raise ToolInputError("exponent too large (the calculator allows powers up to 100)")
        try:
            value = _BINARY[type(node.op)](left, right)
        except ZeroDivisionError:
            raise ToolInputError("division by zero") from None
        if isinstance(value, complex):
            raise ToolInputError("the result is not a real number")
        if abs(value) > MAX_MAGNITUDE:
            raise ToolInputError(f"the result is larger than {MAX_MAGNITUDE:.0e}")
        return value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand))
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCS and not node.keywords:
        args = [_eval(a) for a in node.args]
        try:
            return _FUNCS[node.func.id](*args)
        except (TypeError, ValueError) as exc:
            raise ToolInputError(f"{node.func.id}: {exc}") from None
    if isinstance(node, ast.Name) and node.id in _CONSTS:
        return _CONSTS[node.id]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitXor):
        raise ToolInputError("'^' is not a power here; write ** (2**3)")
    raise ToolInputError(f"only numbers and + - * / // % ** ( ) sqrt abs round min max log exp are allowed, not {ast.unparse(node)!r}")


def calculator_tool() -> Tool:
    return Tool("calc", "arithmetic, e.g. calc[3 * (4 + 5)]", {"type": "object", "properties": {"expression": {"type": "string"}},
                                                                "required": ["expression"]}, calculate)


BUILTIN_TOOLS = ("search", "calc")


def make_registry(builtins: list[str] | tuple[str, ...] = BUILTIN_TOOLS, index=None, k: int = 3, mode: str = "hybrid",
                  user_tools: list[str] | None = None) -> ToolRegistry:
    """The built-in tools named (``search`` needs an index), then the user's tools in the order given."""
    reg = ToolRegistry()
    for name in builtins:
        if name == "search":
            if index is None:
                raise ConfigError("the search tool needs an index (--index)")
            reg.register(search_tool(index, k, mode))
        elif name == "calc":
            reg.register(calculator_tool())
        else:
            raise ConfigError(f"unknown built-in tool {name!r}; built-ins are {', '.join(BUILTIN_TOOLS)} (own tools: --tool module:function)")
    for spec in user_tools or []:
        reg.register(load_tool(spec))
    if not reg.tools:
        raise ConfigError("an agent needs at least one tool")
    return reg
