"""Configuration that explains itself: where a bad setting is, the nearest valid key, what it must be.

:func:`explain_validation_error` turns a pydantic ``ValidationError`` over :class:`~broker.config.Settings`
into one line per problem, each naming its source (``broker.toml:7``, ``environment variable
NHI_BROKER_PORT`` or ``command line``), the dotted key (``trust[1].jwks_url``), what is wrong, and
what the value must be; an unknown key gets the nearest valid key ("did you mean"). The same type
descriptions feed ``docs/configuration.md`` (:func:`describe_field`).

:func:`unknown_environment` lists ``NHI_BROKER_*`` variables that name no setting: a typo in a
variable would otherwise be silently ignored.
"""

from __future__ import annotations

import difflib
import re
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import annotated_types
from pydantic import BaseModel, SecretStr, ValidationError
from pydantic.fields import FieldInfo

from broker.errors import ConfigError

__all__ = [
    "ENV_PREFIX",
    "NON_SETTING_ENV",
    "describe_field",
    "env_name",
    "explain_validation_error",
    "format_key",
    "nested_model",
    "read_toml",
    "strip_optional",
    "unknown_environment",
]

ENV_PREFIX = "NHI_BROKER_"
#: ``NHI_BROKER_*`` variables that are not settings: the config file, the settings handed to worker
#: processes, the operators' CLI defaults, and the test suite's screenshot switch.
NON_SETTING_ENV = frozenset({
    "NHI_BROKER_CONFIG", "NHI_BROKER_SETTINGS_JSON", "NHI_BROKER_URL", "NHI_BROKER_TOKEN",
    "NHI_BROKER_UPDATE_SCREENSHOTS",
})
_Loc = tuple[str | int, ...]


# -- types --------------------------------------------------------------------------------------


def strip_optional(annotation: Any) -> tuple[Any, bool]:
    """``(X, True)`` for ``X | None``; ``(annotation, False)`` otherwise."""
    origin = get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return annotation, False


def nested_model(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside ``annotation`` (``X``, ``X | None``, ``list[X]``, ``tuple[X, ...]``)."""
    inner, _ = strip_optional(annotation)
    if get_origin(inner) in (list, tuple):
        args = [a for a in get_args(inner) if a is not Ellipsis]
        inner = args[0] if args else None
    if isinstance(inner, type) and issubclass(inner, BaseModel):
        return inner
    return None


def _describe_type(annotation: Any) -> str:
    inner, optional = strip_optional(annotation)
    origin = get_origin(inner)
    if origin is typing.Annotated:
        return _describe_type(get_args(inner)[0])
    if origin is Literal:
        text = " | ".join(f'"{a}"' if isinstance(a, str) else str(a) for a in get_args(inner))
    elif origin in (list, tuple):
        args = [a for a in get_args(inner) if a is not Ellipsis]
        if nested_model(inner) is not None:
            text = "array of tables"
        else:
            text = f"list of {_describe_type(args[0]) if args else 'values'}"
    elif inner is bool:
        text = "boolean"
    elif inner is int:
        text = "integer"
    elif inner is float:
        text = "number"
    elif inner is str:
        text = "string"
    elif inner is SecretStr:
        text = "secret string"
    elif inner is Path:
        text = "path"
    elif isinstance(inner, type) and issubclass(inner, BaseModel):
        text = "table"
    else:
        text = getattr(inner, "__name__", str(inner))
    return f"{text} (optional)" if optional else text


def _constraints(field: FieldInfo) -> list[str]:
    parts: list[str] = []
    for meta in field.metadata:
        if isinstance(meta, annotated_types.Ge):
            parts.append(f">= {meta.ge}")
        elif isinstance(meta, annotated_types.Gt):
            parts.append(f"> {meta.gt}")
        elif isinstance(meta, annotated_types.Le):
            parts.append(f"<= {meta.le}")
        elif isinstance(meta, annotated_types.Lt):
            parts.append(f"< {meta.lt}")
        elif isinstance(meta, annotated_types.MinLen):
            parts.append(f"at least {meta.min_length} item(s)")
        else:
            pattern = getattr(meta, "pattern", None)
            if pattern:
                parts.append(f"matching {pattern}")
    return parts


def describe_field(field: FieldInfo) -> str:
    """What a value of ``field`` must be, e.g. ``integer (>= 1, <= 65535)``."""
    text = _describe_type(field.annotation)
    constraints = _constraints(field)
    return f"{text} ({', '.join(constraints)})" if constraints else text


def _field_at(model: type[BaseModel], loc: _Loc) -> tuple[type[BaseModel], FieldInfo | None]:
    """The model that holds the last key of ``loc`` and that key's field (``None`` if unknown)."""
    current = model
    field: FieldInfo | None = None
    keys = [k for k in loc if isinstance(k, str)]
    for i, key in enumerate(keys):
        field = current.model_fields.get(key)
        if field is None:
            return current, None
        if i < len(keys) - 1:
            sub = nested_model(field.annotation)
            if sub is None:
                return current, field
            current = sub
    return current, field


def _model_at(model: type[BaseModel], loc: _Loc) -> type[BaseModel]:
    """The model of the table at ``loc`` (``model`` itself for the top level)."""
    current = model
    for key in loc:
        if isinstance(key, int):
            continue
        field = current.model_fields.get(key)
        sub = nested_model(field.annotation) if field is not None else None
        if sub is None:
            return current
        current = sub
    return current


# -- where a key is -----------------------------------------------------------------------------


def format_key(loc: _Loc) -> str:
    """``('trust', 1, 'jwks_url')`` → ``trust[1].jwks_url``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out or "(top level)"


def env_name(loc: _Loc) -> str:
    """The environment variable of a settings key: ``NHI_BROKER_VAULT__ADDR``."""
    return ENV_PREFIX + "__".join(str(k).upper() for k in loc if isinstance(k, str))


_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r"^\s*((?:[A-Za-z0-9_-]+|\"[^\"]*\")(?:\s*\.\s*(?:[A-Za-z0-9_-]+|\"[^\"]*\"))*)\s*=")


def _split_key(text: str) -> tuple[str, ...]:
    return tuple(p.strip().strip('"') for p in text.split("."))


def _toml_lines(text: str) -> list[tuple[int, _Loc]]:
    """Every header and key line of a TOML document with the full path it defines."""
    found: list[tuple[int, _Loc]] = []
    table: _Loc = ()
    arrays: dict[tuple[str, ...], int] = {}
    in_multiline = False
    for number, line in enumerate(text.splitlines(), start=1):
        if in_multiline:
            if line.count('"""') % 2 == 1 or line.count("'''") % 2 == 1:
                in_multiline = False
            continue
        header = _HEADER.match(line)
        if header:
            path = _split_key(header.group(2))
            if header.group(1) == "[[":
                index = arrays.get(path, -1) + 1
                arrays[path] = index
                table = (*path, index)
            else:
                table = path
            found.append((number, table))
            continue
        key = _KEY.match(line)
        if key:
            found.append((number, (*table, *_split_key(key.group(1)))))
            if line.count('"""') % 2 == 1 or line.count("'''") % 2 == 1:
                in_multiline = True
    return found


def toml_line(text: str, loc: _Loc) -> int | None:
    """The line of ``text`` that best matches ``loc``: the first with the longest common prefix."""
    best: tuple[int, int] | None = None
    for number, path in _toml_lines(text):
        common = 0
        for a, b in zip(path, loc, strict=False):
            if a != b:
                break
            common += 1
        if common and common == len(path) and (best is None or common > best[1]):
            best = (number, common)
    return best[0] if best else None


def read_toml(path: Path) -> tuple[str, dict[str, Any]]:
    """The text and the parsed content of a TOML file; syntax errors name the file and line."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: is not UTF-8 text") from None
    try:
        return text, tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        match = re.search(r"\(at line (\d+), column (\d+)\)", str(exc))
        message = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(exc)) or "invalid TOML"
        if match:
            raise ConfigError(
                f"{path}:{match.group(1)}: TOML syntax error at column {match.group(2)}: {message}"
            ) from None
        raise ConfigError(f"{path}: TOML syntax error: {message}") from None


# -- explaining -----------------------------------------------------------------------------------


def _did_you_mean(word: str, candidates: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    if not close:
        lowered = {c.lower(): c for c in candidates}
        close = difflib.get_close_matches(word.lower(), list(lowered), n=1, cutoff=0.6)
        close = [lowered[c] for c in close]
    return f"; did you mean {close[0]!r}?" if close else ""


_SENSITIVE = re.compile(r"secret|token|password|key", re.IGNORECASE)


def _shown(value: Any, key: str) -> str:
    if _SENSITIVE.search(key) and not key.endswith("_file") and not key.endswith("_sha256"):
        return ""
    if isinstance(value, dict | list) or value is None:
        return ""
    text = repr(value)
    return f" (got {text[:80]}{'…' if len(text) > 80 else ''})"


def _source(
    loc: _Loc, toml_path: Path | None, toml_text: str | None, environ: Mapping[str, str], overrides: Mapping[str, Any]
) -> str:
    top = loc[0] if loc else None
    if isinstance(top, str) and top in overrides:
        return "command line"
    upper = {k.upper(): k for k in environ}
    keys = [k for k in loc if isinstance(k, str)]
    for depth in range(len(keys), 0, -1):
        name = env_name(tuple(keys[:depth]))
        if name in upper:
            return f"environment variable {upper[name]}"
    if toml_path is not None and toml_text is not None:
        line = toml_line(toml_text, loc)
        return f"{toml_path}:{line}" if line else str(toml_path)
    return "settings"


def explain_validation_error(
    exc: ValidationError,
    model: type[BaseModel],
    *,
    toml_path: Path | None = None,
    toml_text: str | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    unknown_env: Sequence[str] = (),
) -> list[str]:
    """One line per problem: source, key, what is wrong, and what the value must be.

    Problems inside a table that an unknown variable of ``unknown_env`` (``NHI_BROKER_VAULT__ADR``)
    put there are left out: they follow from the typo, which is reported on its own.
    """
    environ = environ if environ is not None else {}
    overrides = overrides or {}
    typo_tables = {n.upper()[len(ENV_PREFIX):].split("__")[0].lower() for n in unknown_env if "__" in n}
    lines: list[str] = []
    for error in exc.errors(include_url=False):
        loc: _Loc = tuple(error.get("loc", ()))
        if loc and loc[0] in typo_tables:
            continue
        where = _source(loc, toml_path, toml_text, environ, overrides)
        key = format_key(loc)
        kind = error.get("type", "")
        if kind == "extra_forbidden":
            holder, _ = _field_at(model, loc[:-1]) if len(loc) > 1 else (model, None)
            parent_loc = loc[:-1]
            if parent_loc:
                _, parent_field = _field_at(model, parent_loc)
                sub = nested_model(parent_field.annotation) if parent_field is not None else None
                holder = sub or holder
            valid = sorted(holder.model_fields)
            name = str(loc[-1]) if loc else ""
            lines.append(
                f"{where}: unknown key {key!r}{_did_you_mean(name, valid)} "
                f"(valid keys{' in ' + format_key(parent_loc) if parent_loc else ''}: {', '.join(valid)})"
            )
            continue
        message = str(error.get("msg", "invalid value"))
        message = re.sub(r"^(Value|Assertion) error, ", "", message)
        _, field = _field_at(model, loc)
        if not loc or isinstance(loc[-1], int) or (field is not None and nested_model(field.annotation)):
            # A rule over a whole table: point at the first of its keys the message names.
            holder = _model_at(model, loc)
            named = sorted((m.start(), n) for n in holder.model_fields
                           if (m := re.search(rf"\b{re.escape(n)}\b", message)) is not None)
            if named:
                where = _source((*loc, named[0][1]), toml_path, toml_text, environ, overrides)
            lines.append(f"{where}: {format_key(loc) + ': ' if loc else ''}{message}")
            continue
        must = ""
        if field is not None and loc and isinstance(loc[-1], str):
            must = f"; must be {describe_field(field)}"
        if kind == "missing":
            message = "is required but missing"
        shown = _shown(error.get("input"), key) if kind != "missing" else ""
        lines.append(f"{where}: {key}: {message}{shown}{must}")
    return lines


def _valid_env_names(model: type[BaseModel]) -> list[str]:
    names: list[str] = []
    for name, field in model.model_fields.items():
        names.append(env_name((name,)))
        sub = nested_model(field.annotation)
        inner, _ = strip_optional(field.annotation)
        if sub is not None and get_origin(inner) not in (list, tuple):
            names.extend(env_name((name, s)) for s in sub.model_fields)
    return names


def unknown_environment(model: type[BaseModel], environ: Mapping[str, str]) -> dict[str, str]:
    """``{variable: problem}`` for each ``NHI_BROKER_*`` variable that names no setting (nearest valid name)."""
    valid = _valid_env_names(model)
    known = {v.upper() for v in valid} | NON_SETTING_ENV
    problems = {}
    for name in sorted(environ):
        upper = name.upper()
        if upper.startswith(ENV_PREFIX) and upper not in known:
            problems[name] = (
                f"environment variable {name}: names no setting{_did_you_mean(upper, valid)} "
                "(see docs/configuration.md; unset it or fix its name)"
            )
    return problems
