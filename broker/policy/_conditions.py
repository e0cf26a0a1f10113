"""The condition language of policy rules, parsed once at load time.

A condition is a conjunction of typed comparisons over the intent context::

    amount <= 50 && currency == 'EUR' && customer_id == $customer && customer == user.sub

Grammar (whitespace between tokens is free)::

    condition := ""  |  clause ("&&" clause)*
    clause    := key op value
    key       := context key (lower-case identifier, see ``broker.intent.CONTEXT_KEY_RE``) | user term
    op        := "<=" | "<" | ">=" | ">" | "==" | "!=" | "in"
    value     := number | 'string' | true | false | "[" [literal ("," literal)*] "]" | $key | user term
    user term := "user." lower-case identifier   (user.sub, user.iss, mapped claims such as user.tenant)

User terms are the *verified* end user of a delegated exchange (RFC 8693 ``actor_token`` +
``subject_token`` from a configured user issuer, :mod:`broker.attest.users`); the bot cannot set them,
since context keys never contain a dot. A plain exchange has no user terms but ``user.delegated``
(``false``), so a clause naming another one is false: a rule that names ``user.sub`` requires
delegation, and ``user.delegated == true`` says so explicitly.

There is no ``||``, no ``!``, no parentheses, no function call and no attribute access: the text is
tokenised by a fixed grammar and never handed to ``eval`` or to an expression evaluator. To express
"A or B", write two rules.

Evaluation is fail-closed, clause by clause. A clause is false when:

- its key (or the ``$key`` on the right) is missing from the context;
- an ordering operator (``< <= > >=``) does not see two real numbers (``bool`` is not a number);
- ``==`` / ``!=`` compare values of different kinds (number, string, boolean; lists never compare);
- ``in`` does not see a scalar on the left and a list on the right.

The empty condition is true.

Numbers compare exactly, as the decimals that were written. A number literal in a condition must be
exactly what a double carries (at most 15 significant digits; ``50.000000000000001`` is refused), and
the intent parser (``broker.intent``) refuses context numbers that are not; for such values the
order and equality of doubles is the order and equality of the decimals (Python also compares ints
with floats exactly). ``amount`` carries no more decimals than its currency allows (``broker.money``).
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from broker.intent import CONTEXT_KEY_RE

__all__ = ["USER_TERM_RE", "Clause", "Condition", "ConditionError", "compile_condition"]

MAX_CONDITION_LEN = 1024
MAX_CLAUSES = 16
MAX_LIST_ITEMS = 32
MAX_STRING_LEN = 256
_MAX_NUMBER_DIGITS = 18

_TOKEN_RE = re.compile(
    r"""
    (?P<and>&&)
    |(?P<op><=|>=|==|!=|<|>)
    |(?P<number>-?[0-9]+(?:\.[0-9]+)?)
    |(?P<string>'[^'\\\x00-\x1f\x7f]*')
    |(?P<ref>\$[A-Za-z_][A-Za-z0-9_]*)
    |(?P<term>user\.[A-Za-z_][A-Za-z0-9_]*)
    |(?P<word>[A-Za-z_][A-Za-z0-9_]*)
    |(?P<lbracket>\[)
    |(?P<rbracket>\])
    |(?P<comma>,)
    """,
    re.VERBOSE,
)
_SPACE_RE = re.compile(r"[ \t]*")
# A number must not run straight into a word or another number: ``50abc`` and ``1.2.3`` are errors.
_AFTER_NUMBER_RE = re.compile(r"[A-Za-z0-9_.$']")

_MISSING = object()
#: A user term as the engine puts it into the evaluation context (see ``EndUser.policy_terms``).
USER_TERM_RE = re.compile(r"user\.[a-z][a-z0-9_]{0,63}")


class ConditionError(ValueError):
    """A condition does not parse; the message says where and why."""


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str
    text: str
    column: int  # 1-based, for error messages


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    pos = 0
    while True:
        pos = _SPACE_RE.match(text, pos).end()  # type: ignore[union-attr]
        if pos >= len(text):
            return tokens
        m = _TOKEN_RE.match(text, pos)
        if m is None:
            ch = text[pos]
            if ch == "'":
                raise ConditionError(
                    f"unterminated or invalid string at column {pos + 1} "
                    "(strings are single-quoted, without backslashes or control characters)"
                )
            raise ConditionError(f"unexpected character {ch!r} at column {pos + 1}")
        kind = m.lastgroup
        assert kind is not None
        if kind == "number" and _AFTER_NUMBER_RE.match(text, m.end()):
            raise ConditionError(f"malformed number at column {pos + 1}")
        tokens.append(_Token(kind, m.group(), pos + 1))
        pos = m.end()


def _kind(value: Any) -> str | None:
    """The comparison kind of a context value; ``None`` for values that never compare."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "str"
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _typed_equal(left: Any, right: Any) -> bool | None:
    """Equality within one kind; ``None`` when the kinds differ (the clause is then false)."""
    kind = _kind(left)
    if kind is None or kind != _kind(right):
        return None
    return bool(left == right)


_ORDERING: dict[str, Callable[[Any, Any], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}


@dataclass(frozen=True, slots=True)
class Clause:
    """One ``key op value`` comparison.

    ``literal`` holds the right-hand value when ``ref`` is ``None``; otherwise the right-hand side
    is the context value named ``ref``.
    """

    text: str
    key: str
    op: str
    literal: Any = None
    ref: str | None = None

    def _right(self, ctx: Mapping[str, Any]) -> Any:
        if self.ref is not None:
            return ctx.get(self.ref, _MISSING)
        return self.literal

    def evaluate(self, ctx: Mapping[str, Any]) -> bool:
        """True when the clause holds for ``ctx``; false on any missing key or kind mismatch."""
        left = ctx.get(self.key, _MISSING)
        if left is _MISSING:
            return False
        right = self._right(ctx)
        if right is _MISSING:
            return False
        op = self.op
        if op in _ORDERING:
            return _is_number(left) and _is_number(right) and _ORDERING[op](left, right)
        if op == "in":
            if not isinstance(right, list | tuple) or _kind(left) is None:
                return False
            return any(_typed_equal(left, item) for item in right)
        equal = _typed_equal(left, right)
        if equal is None:
            return False
        return equal if op == "==" else not equal

    def describe(self, ctx: Mapping[str, Any]) -> str:
        """The clause with the context values it saw, for ``policy explain``."""
        seen = [f"{self.key} = {_show(ctx.get(self.key, _MISSING))}"]
        if self.ref is not None:
            seen.append(f"{self.ref} = {_show(ctx.get(self.ref, _MISSING))}")
        return f"{self.text}  ({', '.join(seen)})"


def _show(value: Any) -> str:
    if value is _MISSING:
        return "<missing>"
    return repr(value)


@dataclass(frozen=True, slots=True)
class Condition:
    """A compiled condition: all clauses must hold. Built only by :func:`compile_condition`."""

    text: str
    clauses: tuple[Clause, ...]

    def matches(self, ctx: Mapping[str, Any]) -> bool:
        """True when every clause holds. ``ctx`` must be a mapping (anything else raises)."""
        if not isinstance(ctx, Mapping):
            raise TypeError("request context must be a mapping")
        return all(clause.evaluate(ctx) for clause in self.clauses)


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokenize(text)
        self.pos = 0

    def _peek(self) -> _Token | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def _next(self, expected: str) -> _Token:
        tok = self._peek()
        if tok is None:
            raise ConditionError(f"condition ends where {expected} was expected")
        self.pos += 1
        return tok

    def parse(self) -> tuple[Clause, ...]:
        if not self.tokens:
            return ()
        clauses = [self._clause()]
        while (tok := self._peek()) is not None:
            if tok.kind != "and":
                raise ConditionError(f"expected '&&' or the end of the condition at column {tok.column}")
            self.pos += 1
            clauses.append(self._clause())
            if len(clauses) > MAX_CLAUSES:
                raise ConditionError(f"a condition may have at most {MAX_CLAUSES} clauses")
        return tuple(clauses)

    def _key(self, tok: _Token, what: str) -> str:
        name = tok.text[1:] if tok.kind == "ref" else tok.text
        if tok.kind not in ("word", "ref") or name in ("in", "true", "false"):
            raise ConditionError(f"expected {what} at column {tok.column}, found {tok.text!r}")
        if CONTEXT_KEY_RE.fullmatch(name) is None:
            raise ConditionError(
                f"{name!r} at column {tok.column} is not a context key (a lower-case identifier)"
            )
        return name

    @staticmethod
    def _term(tok: _Token) -> str:
        if USER_TERM_RE.fullmatch(tok.text) is None:
            raise ConditionError(
                f"{tok.text!r} at column {tok.column} is not a user term (user. and a lower-case identifier)"
            )
        return tok.text

    def _clause(self) -> Clause:
        start = self.pos
        key_tok = self._next("a context key")
        if key_tok.kind == "term":
            key = self._term(key_tok)
        elif key_tok.kind != "word":
            raise ConditionError(f"expected a context key at column {key_tok.column}, found {key_tok.text!r}")
        else:
            key = self._key(key_tok, "a context key")
        op_tok = self._next("an operator")
        if op_tok.kind == "op" or (op_tok.kind == "word" and op_tok.text == "in"):
            op = op_tok.text
        else:
            raise ConditionError(
                f"expected one of <= < >= > == != in at column {op_tok.column}, found {op_tok.text!r}"
            )
        literal: Any = None
        ref: str | None = None
        value_tok = self._next("a value")
        if value_tok.kind == "term":
            ref = self._term(value_tok)
        elif value_tok.kind == "ref":
            ref = self._key(value_tok, "a $key")
        elif op == "in":
            if value_tok.kind != "lbracket":
                raise ConditionError(f"'in' needs a list or a $key at column {value_tok.column}")
            literal = self._list()
        else:
            literal = self._literal(value_tok)
            if op in _ORDERING and not _is_number(literal):
                raise ConditionError(f"{op!r} needs a number or a $key at column {value_tok.column}")
        end_tok = self.tokens[self.pos - 1]
        first = self.tokens[start]
        text = self.text[first.column - 1 : end_tok.column - 1 + len(end_tok.text)]
        return Clause(text=text, key=key, op=op, literal=literal, ref=ref)

    def _literal(self, tok: _Token) -> Any:
        if tok.kind == "number":
            digits = tok.text.lstrip("-").replace(".", "")
            if len(digits) > _MAX_NUMBER_DIGITS:
                raise ConditionError(f"number at column {tok.column} has too many digits")
            if "." not in tok.text:
                return int(tok.text)
            number = float(tok.text)
            if Decimal(repr(number)) != Decimal(tok.text):
                raise ConditionError(f"number at column {tok.column} is not exact as a double "
                                     "(use at most 15 significant digits)")
            return number
        if tok.kind == "string":
            value = tok.text[1:-1]
            if len(value) > MAX_STRING_LEN:
                raise ConditionError(f"string at column {tok.column} is longer than {MAX_STRING_LEN}")
            return value
        if tok.kind == "word" and tok.text in ("true", "false"):
            return tok.text == "true"
        if tok.kind == "lbracket":
            raise ConditionError(f"a list is only allowed after 'in' (column {tok.column})")
        raise ConditionError(f"expected a value at column {tok.column}, found {tok.text!r}")

    def _list(self) -> tuple[Any, ...]:
        items: list[Any] = []
        tok = self._next("a list item or ']'")
        if tok.kind == "rbracket":
            return ()
        while True:
            items.append(self._literal(tok))
            if len(items) > MAX_LIST_ITEMS:
                raise ConditionError(f"a list may hold at most {MAX_LIST_ITEMS} items")
            sep = self._next("',' or ']'")
            if sep.kind == "rbracket":
                return tuple(items)
            if sep.kind != "comma":
                raise ConditionError(f"expected ',' or ']' at column {sep.column}, found {sep.text!r}")
            tok = self._next("a list item")


def compile_condition(text: str) -> Condition:
    """Parse ``text`` into a :class:`Condition`, or raise :class:`ConditionError`."""
    if not isinstance(text, str):
        raise ConditionError("a condition must be text")
    if len(text) > MAX_CONDITION_LEN:
        raise ConditionError(f"a condition may be at most {MAX_CONDITION_LEN} characters")
    return Condition(text=text, clauses=_Parser(text).parse())
