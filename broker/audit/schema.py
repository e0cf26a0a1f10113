"""Validating ledger entries for auditors, against the one schema the broker builds them with.

The models are in :mod:`broker.ledger.schema` (``nhi-broker ledger schema`` prints their JSON
Schema). :func:`validate_entry` is the only way to get a :class:`ValidatedEntry`: it checks the
envelope (``v``, ``kind``, ``time``), then the model of the kind, and raises
:class:`~broker.audit.errors.EntrySchemaError` naming the first bad member by its dotted path
(``workload.evidence_digest``, ``policy.files.model.conf``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from broker.audit.errors import EntrySchemaError
from broker.ledger.exact import exact_check
from broker.ledger.schema import ENTRY_KINDS, ENTRY_MODELS, ENTRY_VERSION, Member, MemberProblem
from broker.ledger.schema import _time_problem as time_problem

__all__ = [
    "ENTRY_KINDS",
    "ENTRY_VERSION",
    "RESERVED_KINDS",
    "ValidatedEntry",
    "validate_entry",
]

RESERVED_KINDS: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class ValidatedEntry:
    """A ledger entry that passed :func:`validate_entry`; build it no other way.

    ``time`` is the entry's RFC 3339 UTC time (fixed width, so string order is time order);
    ``spiffe_id``, ``workload`` and ``owner`` are set for entries about a workload; ``jti`` for
    issuances. ``entry`` is the whole decoded entry and :attr:`model` the same entry as its frozen
    model (built on first use: the entry was checked exactly, see :mod:`broker.ledger.exact`).
    """

    kind: str
    time: str
    entry: dict[str, Any]
    spiffe_id: str | None = None
    workload: str | None = None
    owner: str | None = None
    jti: str | None = None
    _model: Member | None = None

    @property
    def model(self) -> Member:
        """The entry as the frozen model of its kind."""
        if self._model is None:
            object.__setattr__(self, "_model", ENTRY_MODELS[self.kind].model_validate(self.entry))
        assert self._model is not None
        return self._model


_EXACT = {kind: exact_check(model) for kind, model in ENTRY_MODELS.items()}


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


_EXPECTED = {
    "string_type": "a string", "int_type": "an integer", "bool_type": "a boolean", "dict_type": "an object",
    "model_type": "an object", "model_attributes_type": "an object", "list_type": "an array",
    "literal_error": None,
}


def _schema_error(exc: ValidationError, entry: dict[str, Any]) -> EntrySchemaError:
    """The first problem pydantic found, as the member path in the entry and a plain sentence."""
    error = exc.errors(include_url=False)[0]
    loc, kind, ctx = error["loc"], error["type"], error.get("ctx") or {}
    # The location also names union variants (``jwt``, ``OKP``, ``lease``); keep only the parts that
    # are members of the entry as written, plus a missing or unknown member's own name at the end.
    parts: list[str] = []
    node: Any = entry
    for i, part in enumerate(loc):
        if isinstance(node, dict) and part in node:
            parts.append(str(part))
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            parts.append(str(part))
            node = node[part]
        elif kind == "missing" and i == len(loc) - 1:
            parts.append(str(part))
    problem: str
    cause = ctx.get("error")
    if isinstance(cause, MemberProblem):
        if cause.member:
            parts.append(cause.member)
        problem = cause.problem
    elif kind == "missing":
        problem = "is required"
    elif kind == "extra_forbidden":
        problem = "is not a member of this object in entry version 1"
    elif kind == "literal_error":
        problem = f"must be {ctx.get('expected')}"
    elif kind == "union_tag_invalid":
        parts.append(str(ctx.get("discriminator", "")).strip("'"))
        problem = f"must be one of {ctx.get('expected_tags')}"
    elif kind == "union_tag_not_found":
        parts.append(str(ctx.get("discriminator", "")).strip("'"))
        problem = "is required"
    elif kind in _EXPECTED:
        problem = f"must be {_EXPECTED[kind]}, not {_type_name(error.get('input'))}"
    else:
        problem = str(error.get("msg", "is not valid"))
    return EntrySchemaError(".".join(parts), problem)


def _validated_model(entry: Any) -> Member:
    # (1) the envelope every kind shares, so a wrong version or kind is named as such.
    if not isinstance(entry, dict):
        raise EntrySchemaError("", f"an entry must be an object, not {_type_name(entry)}")
    for name in ("v", "kind", "time"):
        if name not in entry:
            raise EntrySchemaError(name, "is required")
    version = entry["v"]
    if not isinstance(version, int) or isinstance(version, bool) or version != ENTRY_VERSION:
        raise EntrySchemaError("v", f"unsupported entry version (this verifier reads {ENTRY_VERSION})")
    kind = entry["kind"]
    if not isinstance(kind, str) or kind not in ENTRY_KINDS:
        raise EntrySchemaError("kind", f"must be one of {', '.join(sorted(ENTRY_KINDS))}")
    problem = time_problem(entry["time"]) if isinstance(entry["time"], str) else "is not an RFC 3339 UTC time"
    if problem is not None:
        raise EntrySchemaError("time", problem)
    # (2) the model of the kind: every member, its type and grammar, and the cross-member rules.
    try:
        return ENTRY_MODELS[kind].model_validate(entry)
    except ValidationError as exc:
        raise _schema_error(exc, entry) from None


def validate_entry(entry: Any) -> ValidatedEntry:
    """Check ``entry`` against the version 1 model of its kind and return it validated.

    Raises :class:`~broker.audit.errors.EntrySchemaError` naming the first bad member.
    """
    # The exact check compiled from the model of the kind (broker.ledger.exact) answers "valid"
    # for the entries it can read, with no model object built; it checks the envelope as the
    # envelope steps do (v is the integer 1, the kind's literal, the same time rule). Everything
    # else, and every invalid entry, takes those steps and the model, which name the first bad member.
    model: Member | None = None
    check = None
    if type(entry) is dict:
        kind = entry.get("kind")
        if type(kind) is str:
            check = _EXACT.get(kind)
    if check is None or not check(entry):
        model = _validated_model(entry)
    workload = entry.get("workload")
    if workload is None:
        return ValidatedEntry(entry["kind"], entry["time"], entry, _model=model)
    credential = entry.get("credential")
    return ValidatedEntry(entry["kind"], entry["time"], entry, workload["spiffe_id"], workload.get("name"),
                          workload.get("owner"), credential["jti"] if credential else None, model)
