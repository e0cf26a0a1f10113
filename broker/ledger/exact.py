"""A fast exact check of an entry against its schema model, compiled from the model itself.

Validating an entry with its pydantic model (:mod:`broker.ledger.schema`) builds a frozen model
object per nested member; the broker does it once per token exchange and ``audit verify`` once per
entry, and most of that time goes to constructing objects nobody reads. :func:`exact_check` answers
a narrower question with plain type tests and *the model's own validator functions*: is ``data``,
exactly as it is, a valid instance of the model whose JSON form is ``data`` itself?

It is compiled by reading the models (their fields, types and ``AfterValidator`` functions), so a
change to the schema changes it too. It is sound, not complete: it accepts only

* objects of exact type ``dict`` with every required member, no other member, and an optional
  member only when it is present and not ``null`` (an absent-by-default member given as ``null``
  is valid but is dropped by the model's JSON form, so it is left to the model);
* strings, integers and booleans of their exact types (never a subclass, never ``True`` for ``1``),
  each passed through the field's validator functions, which must return the value unchanged;
* ``Literal`` values of the same type, lists of such values, discriminated unions routed exactly
  as pydantic routes them, ``X | None`` where ``null`` is a value the model keeps, and free-form
  objects (``dict[str, Any]``) holding only JSON values;
* models whose ``after`` model validators read only their own scalar members (they are run on a
  plain namespace of those members).

Anything else — a construct this compiler does not know, a model with a ``before`` validator, any
value it is unsure of, any exception — is *refused*, and the caller then asks the pydantic model,
which gives the authoritative answer and the precise error. So the answer "valid" never differs
from the model's; ``tests/unit/test_entries_fast.py`` checks that on mutated entries of every kind.
"""

from __future__ import annotations

import math
import types
import typing
from collections.abc import Callable
from typing import Any

from pydantic import AfterValidator, BaseModel, WithJsonSchema
from pydantic.fields import FieldInfo
from pydantic.types import Discriminator, Strict, Tag

__all__ = ["exact_check"]

Check = Callable[[Any], bool]


class _Unsupported(Exception):
    """The compiler meets a construct it does not translate: the model keeps the pydantic path."""


_KNOWN_SERIALIZERS = frozenset({"_omit_absent"})  # broker.ledger.schema.Member's: drops absent members
_compiled: dict[type[BaseModel], Check | None] = {}


def exact_check(model: type[BaseModel]) -> Check | None:
    """The compiled check for ``model`` (``check(data)`` is true only if the model accepts ``data`` and its
    JSON form is ``data``), or ``None`` when the model uses something the compiler does not translate."""
    if model not in _compiled:
        try:
            inner = _model(model)
        except Exception:  # _Unsupported, or a pydantic internal that moved: the model path only
            _compiled[model] = None
        else:
            def check(data: Any) -> bool:
                try:
                    return inner(data)
                except Exception:  # a validator refusing, or anything unexpected: ask the model
                    return False

            _compiled[model] = check
    return _compiled[model]


def _json_value(value: Any) -> bool:
    """A JSON value whose model JSON form (``Any``) is itself: exact types only, finite numbers."""
    kind = type(value)
    if kind is str or kind is int or kind is bool or value is None:
        return True
    if kind is float:
        return math.isfinite(value)
    if kind is list:
        return all(_json_value(item) for item in value)
    if kind is dict:
        return _json_object(value)
    return False


def _json_object(value: dict[Any, Any]) -> bool:
    for key, item in value.items():  # scalars inline: a context is mostly strings
        if type(key) is not str:
            return False
        kind = type(item)
        if kind is str or kind is int or kind is bool or item is None:
            continue
        if not _json_value(item):
            return False
    return True


def _unwrap(annotation: Any) -> tuple[Any, list[Any]]:
    """The base type and the metadata of (nested) ``Annotated`` types."""
    metadata: list[Any] = []
    while typing.get_origin(annotation) is typing.Annotated:
        metadata = list(annotation.__metadata__) + metadata
        annotation = annotation.__origin__
    return annotation, metadata


def _validators(metadata: list[Any]) -> tuple[list[Callable[[Any], Any]], Any, str | None]:
    """The ``AfterValidator`` functions, a ``Discriminator`` and a field discriminator name in ``metadata``."""
    funcs: list[Callable[[Any], Any]] = []
    discriminator: Any = None
    name: str | None = None
    for item in metadata:
        if isinstance(item, AfterValidator):
            funcs.append(item.func)  # type: ignore[arg-type]
        elif isinstance(item, Strict):
            if not item.strict:
                raise _Unsupported("lax field")
        elif isinstance(item, WithJsonSchema | Tag):
            continue  # documentation of the schema / a union tag (read by the union)
        elif isinstance(item, Discriminator):
            discriminator = item
        elif isinstance(item, FieldInfo):
            if set(item._attributes_set) - {"discriminator", "description"}:
                raise _Unsupported("field constraints")
            if isinstance(item.discriminator, str):
                name = item.discriminator
            elif item.discriminator is not None:
                discriminator = item.discriminator
        else:
            raise _Unsupported(f"metadata {item!r}")
    return funcs, discriminator, name


def _with_validators(base: Check, funcs: list[Callable[[Any], Any]]) -> Check:
    # A validator that returns another value would change the JSON form: refuse (func(v) is v).
    if not funcs:
        return base
    if len(funcs) == 1:
        func = funcs[0]
        return lambda value: base(value) and func(value) is value
    return lambda value: base(value) and all(func(value) is value for func in funcs)


def _scalar(kind: type, funcs: list[Callable[[Any], Any]]) -> Check:
    # The commonest members (one validated string): one closure, no nested calls.
    if not funcs:
        return lambda value: type(value) is kind
    if len(funcs) == 1:
        func = funcs[0]
        return lambda value: type(value) is kind and func(value) is value
    return lambda value: type(value) is kind and all(func(value) is value for func in funcs)


def _type(annotation: Any, metadata: list[Any] | None = None, *, discriminator_name: str | None = None) -> Check:
    """The check of one member's type (``annotation`` with field ``metadata``)."""
    base, inner = _unwrap(annotation)
    funcs, discriminator, name = _validators(list(metadata or []) + inner)
    name = name or discriminator_name
    origin = typing.get_origin(base)
    if origin is typing.Union or origin is types.UnionType:
        options = typing.get_args(base)
        if funcs:
            raise _Unsupported("validators on a union")
        if type(None) in options:
            rest = [option for option in options if option is not type(None)]
            if len(rest) != 1:
                raise _Unsupported("optional union")
            check = _type(rest[0], discriminator_name=name) if discriminator is None else _type(
                typing.Annotated[rest[0], discriminator])
            return lambda value: value is None or check(value)
        return _union(options, discriminator, name)
    if origin is typing.Literal:
        allowed = {(type(option), option) for option in typing.get_args(base)}
        if any(kind not in (str, int) for kind, _ in allowed):
            raise _Unsupported("literal type")
        return _with_validators(lambda value: (type(value), value) in allowed, funcs)
    if discriminator is not None or name is not None:
        raise _Unsupported("discriminator outside a union")
    if base is str or base is int or base is bool:
        return _scalar(base, funcs)
    if origin is list:
        (item_type,) = typing.get_args(base)
        item = _type(item_type)
        return _with_validators(lambda value: type(value) is list and all(item(x) for x in value), funcs)
    if origin is dict:
        key_type, value_type = typing.get_args(base)
        if key_type is not str or value_type is not Any:
            raise _Unsupported("dict type")
        return _with_validators(lambda value: type(value) is dict and _json_object(value), funcs)
    if isinstance(base, type) and issubclass(base, BaseModel):
        return _with_validators(_model(base), funcs)
    raise _Unsupported(f"type {base!r}")


def _union(options: tuple[Any, ...], discriminator: Any, name: str | None) -> Check:
    """A discriminated union of models, routed as pydantic routes it (by tag, never by trying each)."""
    if discriminator is not None:
        tags: dict[str, Check] = {}
        for option in options:
            base, metadata = _unwrap(option)
            tag = next((item.tag for item in metadata if isinstance(item, Tag)), None)
            if tag is None or not (isinstance(base, type) and issubclass(base, BaseModel)):
                raise _Unsupported("untagged union member")
            tags[tag] = _model(base)
        choose = discriminator.discriminator
        if not callable(choose):
            raise _Unsupported("discriminator")

        def by_callable(value: Any) -> bool:
            check = tags.get(choose(value))
            return check is not None and check(value)

        return by_callable
    if name is None:
        raise _Unsupported("union without a discriminator")
    routes: dict[str, Check] = {}
    for option in options:
        base, _ = _unwrap(option)
        if not (isinstance(base, type) and issubclass(base, BaseModel)) or name not in base.model_fields:
            raise _Unsupported("union member")
        literal, _ = _unwrap(base.model_fields[name].annotation)
        if typing.get_origin(literal) is not typing.Literal:
            raise _Unsupported("discriminator field")
        for tag in typing.get_args(literal):
            if type(tag) is not str or tag in routes:
                raise _Unsupported("discriminator value")
            routes[tag] = _model(base)

    def by_member(value: Any) -> bool:
        if type(value) is not dict:
            return False
        tag = value.get(name)
        if type(tag) is not str:
            return False
        check = routes.get(tag)
        return check is not None and check(value)

    return by_member


def _model(model: type[BaseModel]) -> Check:
    config = model.model_config
    if config.get("extra") != "forbid" or config.get("strict") is not True:
        raise _Unsupported("open or lax model")
    decorators = model.__pydantic_decorators__
    if decorators.field_validators or decorators.field_serializers or decorators.validators:
        raise _Unsupported("field validators or serializers")
    if set(decorators.model_serializers) - _KNOWN_SERIALIZERS:
        raise _Unsupported("model serializer")
    if "__get_pydantic_core_schema__" in vars(model) or model.__pydantic_post_init__ is not None:
        raise _Unsupported("custom core schema or post-init")
    names: list[str] = []
    required: set[str] = set()
    lines = ["def check(value):",
             "    if type(value) is not dict or not (NEEDED <= value.keys() <= NAMES):",
             "        return False"]
    constants: dict[str, Any] = {"ABSENT": _ABSENT}
    nested = False
    for name, field in model.model_fields.items():
        if field.alias is not None or field.validation_alias is not None:
            raise _Unsupported("alias")
        names.append(name)
        if field.is_required():
            required.add(name)
        elif field.default is not None or field.default_factory is not None:
            raise _Unsupported("a default other than absent")
        annotation, metadata = field.annotation, list(field.metadata)
        options = typing.get_args(annotation)
        nullable = False
        if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in options:
            # X | None: null is tested here, X by its check. An absent-by-default member given as
            # null is valid but dropped from the JSON form: that case is left to the model.
            rest = [option for option in options if option is not type(None)]
            if len(rest) != 1 or _validators(metadata)[0]:
                raise _Unsupported("optional union, or validators of the optional value")
            annotation = rest[0]
            nullable = field.is_required()
        elif not field.is_required():
            raise _Unsupported("an optional member that is not X | None")
        test = _test(annotation, metadata, field.discriminator if isinstance(field.discriminator, str) else None,
                     constants)
        nested = nested or _mentions_model(field.annotation)
        if field.is_required():
            lines.append(f"    item = value[{name!r}]")
            indent = "    "
            if nullable:
                lines.append("    if item is not None:")
                indent = "        "
        else:
            lines.append(f"    item = value.get({name!r}, ABSENT)")
            lines.append("    if item is not ABSENT:")
            indent = "        "
            test = f"item is None or {test}"
        lines.append(f"{indent}if {test}:")
        lines.append(f"{indent}    return False")
    after: list[Callable[[Any], Any]] = []
    for decorator in decorators.model_validators.values():
        if decorator.info.mode != "after" or nested:
            raise _Unsupported("model validator")
        after.append(decorator.func)
    defaults = dict.fromkeys(set(names) - required)

    def run_after(value: dict[str, Any]) -> bool:
        view = types.SimpleNamespace(**{**defaults, **value})
        return all(func(view) is view for func in after)

    lines.append("    return AFTER(value)" if after else "    return True")
    constants.update(NEEDED=frozenset(required), NAMES=frozenset(names), AFTER=run_after)
    namespace: dict[str, Any] = dict(constants)
    exec(compile("\n".join(lines), f"<exact check of {model.__name__}>", "exec"), namespace)  # noqa: S102
    check: Check = namespace["check"]
    return check


_ABSENT = object()


def _test(annotation: Any, metadata: list[Any], discriminator_name: str | None, constants: dict[str, Any]) -> str:
    """A Python expression, true when ``item`` is *not* valid (``annotation`` with field ``metadata``).

    Strings, integers, booleans and one-type literals are tested inline (the commonest members);
    anything else calls the check :func:`_type` compiles.
    """
    base, inner = _unwrap(annotation)
    funcs, discriminator, name = _validators(metadata + inner)
    origin = typing.get_origin(base)
    simple = discriminator is None and name is None and discriminator_name is None
    tests: list[str] = []
    if simple and (base is str or base is int or base is bool):
        tests.append(f"type(item) is not {base.__name__}")
    elif simple and origin is typing.Literal and len({type(option) for option in typing.get_args(base)}) == 1:
        kind = type(typing.get_args(base)[0])
        if kind not in (str, int):
            raise _Unsupported("literal type")
        key = f"L{len(constants)}"
        constants[key] = frozenset(typing.get_args(base))
        tests.append(f"type(item) is not {kind.__name__} or item not in {key}")
    else:
        key = f"C{len(constants)}"
        constants[key] = _type(annotation, metadata, discriminator_name=discriminator_name)
        return f"not {key}(item)"
    for func in funcs:
        # A validator that returns another value would change the JSON form: refuse (func(v) is v).
        key = f"F{len(constants)}"
        constants[key] = func
        tests.append(f"{key}(item) is not item")
    return " or ".join(tests)


def _mentions_model(annotation: Any) -> bool:
    base, _ = _unwrap(annotation)
    if isinstance(base, type) and issubclass(base, BaseModel):
        return True
    return any(_mentions_model(arg) for arg in typing.get_args(base))
