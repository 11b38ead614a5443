"""Typed configuration: one dataclass per stage, loaded from YAML and overridden from the CLI.

Every field carries its help text in ``metadata["help"]`` (use :func:`opt`). The same dataclass
drives three things, so they cannot drift apart:

* ``load_config(Cls, yaml_path, overrides)`` — defaults < YAML file < command-line flags;
* ``config_command(Cls)`` — a click command whose options are the fields (``--help`` shows
  every option with its default);
* ``config_to_dict(cfg)`` — what a stage writes next to its outputs, for lineage.

A field whose type is itself a config dataclass is a *section* (e.g. ``engine: EngineConfig``, how
a stage runs): its options are flags of the command like any other (``--threads``), YAML takes
them nested (``engine: {threads: 1}``) or at the top level (``threads: 1``), and the saved config
nests them under the section's name.

Precedence matters for reproducibility: a flag typed on the command line always wins, a flag left
at its default never overrides the YAML file.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, TypeVar, get_args, get_origin

import click
from click.core import ParameterSource
import yaml

from rlhf.errors import ConfigError, brief
from rlhf.utils.io import read_utf8

C = TypeVar("C")
MAX_CONFIG_BYTES = 4 * 1024 * 1024  # a config is a few lines; this bounds what a wrong --config path can cost


def opt(default: Any = dataclasses.MISSING, help: str = "", *, factory: Callable[[], Any] | None = None,
        flag: str | None = None, short: str | None = None) -> Any:
    """A dataclass field with help text. ``flag`` renames the CLI option; ``short`` adds e.g. ``-o``."""
    meta = {"help": help}
    if flag:
        meta["flag"] = flag
    if short:
        meta["short"] = short
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _section_type(tp: Any) -> type | None:
    """The dataclass of a section field (a field whose type is a config dataclass), else None."""
    inner, _ = _unwrap_optional(tp)
    return inner if isinstance(inner, type) and dataclasses.is_dataclass(inner) else None


def _sections(cls: type) -> dict[str, type]:
    """Section fields of ``cls`` → their dataclass; a section's option may not share a top-level name."""
    hints = _field_types(cls)
    out = {f.name: _section_type(hints[f.name]) for f in dataclasses.fields(cls)}
    out = {k: v for k, v in out.items() if v is not None}
    top = {f.name for f in dataclasses.fields(cls)}
    for name, sec in out.items():
        clash = top & {f.name for f in dataclasses.fields(sec)}
        if clash:
            raise TypeError(f"{cls.__name__}: option(s) {sorted(clash)} of section {name!r} clash with top-level options")
    return out


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check and convert a YAML/CLI value to the field's declared type, or raise ConfigError."""
    inner, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: null is not allowed (expected {_type_name(tp)})")
    origin = get_origin(inner)
    if origin is Literal:
        choices = get_args(inner)
        if value not in choices:
            raise ConfigError(f"{where}: {brief(value)} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin in (list, tuple):
        (elem,) = get_args(inner)[:1] or (str,)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        return [_coerce(v, elem, f"{where}[{i}]") for i, v in enumerate(value)]
    if inner is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{where}: expected true or false, got {brief(value)}")
    if inner is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{where}: expected an integer, got {brief(value)}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, got {brief(value)}") from None
    if inner is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {brief(value)}")
        try:
            number = float(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{where}: expected a number, got {brief(value)}") from None
        if not math.isfinite(number):  # `lr: .nan` would train on NaNs; an infinite option is never meant
            raise ConfigError(f"{where}: expected a finite number, got {brief(value)}")
        return number
    if inner is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {type(value).__name__}")
        return str(value)
    return value


def _type_name(tp: Any) -> str:
    inner, optional = _unwrap_optional(tp)
    origin = get_origin(inner)
    if origin is Literal:
        name = "|".join(map(str, get_args(inner)))
    elif origin in (list, tuple):
        name = f"list of {_type_name(get_args(inner)[0])}"
    else:
        name = getattr(inner, "__name__", str(inner))
    return name + (" or null" if optional else "")


def load_config(cls: type[C], path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> C:
    """Build ``cls`` from its defaults, then a YAML file, then ``overrides`` (already-typed CLI values)."""
    hints = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    sections = _sections(cls)
    # an option of a section, given by its own name (YAML top level, or a flag) → that section
    owner = {f.name: sec for sec, sec_cls in sections.items() for f in dataclasses.fields(sec_cls)}
    values: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {sec: {} for sec in sections}

    def put(name: str, value: Any, where: str) -> None:
        if name in owner:
            sec_cls = sections[owner[name]]
            nested[owner[name]][name] = _coerce(value, _field_types(sec_cls)[name], where)
        else:
            values[name] = _coerce(value, hints[name], where)

    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        text = read_utf8(path, ConfigError, max_bytes=MAX_CONFIG_BYTES)
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {brief(str(exc), 400)}") from None
        except (RecursionError, ValueError) as exc:  # nested past the stack, or a number Python refuses
            raise ConfigError(f"{path}: not a usable YAML config ({type(exc).__name__}: {brief(str(exc), 200)})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of option names to values at the top level")
        for key, value in raw.items():
            name = str(key).replace("-", "_")
            if name in sections:
                if not isinstance(value, dict):
                    raise ConfigError(f"{path}: option {brief(key)} is a section: expected a mapping of its options")
                for sub, sub_value in value.items():
                    sub_name = str(sub).replace("-", "_")
                    if owner.get(sub_name) != name:
                        allowed = ", ".join(sorted(f.name for f in dataclasses.fields(sections[name])))
                        raise ConfigError(f"{path}: unknown option {brief(sub)} in section {brief(key)}; it takes: {allowed}")
                    put(sub_name, sub_value, f"{path}: option {brief(key)}.{brief(sub)}")
                continue
            if name not in names and name not in owner:
                known = ", ".join(sorted((names - set(sections)) | set(owner)))
                raise ConfigError(f"{path}: unknown option {brief(key)}; {cls.__name__} takes: {known}")
            put(name, value, f"{path}: option {brief(key)}")
    for name, value in (overrides or {}).items():
        if name not in names and name not in owner:
            raise ConfigError(f"unknown option {name!r} for {cls.__name__}")
        put(name, value, f"option --{name.replace('_', '-')}")
    for sec, sec_values in nested.items():
        section = sections[sec](**sec_values)
        check = getattr(section, "validate", None)
        if callable(check):
            check()
        values[sec] = section
    missing = [f.name for f in dataclasses.fields(cls)
               if f.name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        flags = ", ".join("--" + m.replace("_", "-") for m in missing)
        raise ConfigError(f"missing required option(s): {flags} (give them on the command line or in --config)")
    cfg = cls(**values)
    check = getattr(cfg, "validate", None)
    if callable(check):
        check()
    return cfg


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def field_default(f: dataclasses.Field) -> Any:
    """A field's default value (from its default or factory), or None when it has none."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _click_option(f: dataclasses.Field, tp: Any) -> click.Option:
    inner, _ = _unwrap_optional(tp)
    origin = get_origin(inner)
    flag = f.metadata.get("flag") or f.name.replace("_", "-")
    decls = [f"--{flag}"]
    if f.metadata.get("short"):
        decls.append(f.metadata["short"])
    default = field_default(f)
    # The real default is shown in --help; the callback asks click where each value came from, so
    # that an untouched flag never beats the YAML file.
    kwargs: dict[str, Any] = dict(help=f.metadata.get("help", ""), show_default=True, default=default)
    if default is None and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
        kwargs["help"] += "  [required]"
        kwargs["show_default"] = False
    if inner is bool:
        decls = [f"--{flag}/--no-{flag}"]
    elif origin is Literal:
        kwargs["type"] = click.Choice([str(c) for c in get_args(inner)])
    elif origin in (list, tuple):
        kwargs["multiple"] = True
        kwargs["default"] = tuple(default or ())
        kwargs["help"] += " (repeat the option for several)"
    elif inner in (int, float, str):
        kwargs["type"] = inner
    return click.Option(decls, **kwargs)


def config_command(cls: type[C], name: str | None = None, help: str | None = None) -> Callable[[Callable[[C], Any]], click.Command]:
    """Turn ``fn(cfg: cls)`` into a click command with ``--config FILE`` and one option per field."""
    hints = _field_types(cls)

    def decorate(fn: Callable[[C], Any]) -> click.Command:
        @functools.wraps(fn)
        def callback(config: str | None, **kwargs: Any) -> Any:
            ctx = click.get_current_context()
            overrides = {}
            for k, v in kwargs.items():
                if ctx.get_parameter_source(k) in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP, None):
                    continue
                overrides[k] = list(v) if isinstance(v, tuple) else v
            try:
                cfg = load_config(cls, config, overrides)
            except ConfigError as exc:
                raise click.UsageError(str(exc)) from None
            return fn(cfg)

        params: list[click.Parameter] = [click.Option(["--config"], type=click.Path(dir_okay=False), default=None,
                                                      help="YAML file of options; flags given here override it.")]
        sections = _sections(cls)
        for f in dataclasses.fields(cls):
            if f.name in sections:  # a section's options are flags of the command, after the stage's own
                continue
            opt_ = _click_option(f, hints[f.name])
            opt_.name = f.name
            params.append(opt_)
        for sec_cls in sections.values():
            sec_hints = _field_types(sec_cls)
            for f in dataclasses.fields(sec_cls):
                opt_ = _click_option(f, sec_hints[f.name])
                opt_.name = f.name
                params.append(opt_)
        return click.Command(name or fn.__name__.replace("_", "-"), callback=callback, params=params,
                             help=help or (fn.__doc__ or cls.__doc__ or ""),
                             context_settings={"show_default": True, "max_content_width": 110})

    return decorate
