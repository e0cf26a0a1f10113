"""SPIFFE ID templates for OIDC issuers: a fixed SPIFFE ID with claim values substituted into its path.

Grammar (deliberately tiny; no expressions, no defaults, no nesting)::

    template     = "spiffe://" trust-domain path
    placeholder  = "{sub}" | "{claim:" NAME "}"      NAME = [A-Za-z_][A-Za-z0-9_]{0,63}

Placeholders may appear only in the path, at least one must appear, and a placeholder may be a whole
segment (``/oidc/{sub}``) or part of one (``/user-{claim:uid}``). A substituted value must be a
string that is itself a valid SPIFFE path segment (``a-z A-Z 0-9 . - _``, at most 255 characters):
it can never add a ``/``, a ``..`` segment or a URI delimiter. The rendered ID is parsed again.

Claims such as ``email`` contain ``@`` and are refused at verification time: map such users through
a claim that is already a safe identifier (``sub``, an employee number, a group id).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from broker.attest.spiffe import SpiffeId, parse_spiffe_id

__all__ = ["SpiffeIdTemplate", "TemplateError"]

_PLACEHOLDER_RE = re.compile(r"\{([^{}]*)\}")
_CLAIM_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_VALUE_RE = re.compile(r"[A-Za-z0-9._-]{1,255}")
# Stands in for every placeholder when the template itself is validated.
_PROBE = "x"


class TemplateError(ValueError):
    """A template that cannot be compiled, or claims that cannot fill it."""


@dataclass(frozen=True, slots=True)
class SpiffeIdTemplate:
    """A compiled template: ``literals[0] claims[0] literals[1] ... claims[-1] literals[-1]``.

    Build it with :meth:`compile`; :meth:`render` fills it from verified claims.
    """

    source: str
    literals: tuple[str, ...]
    claims: tuple[str, ...]

    @classmethod
    def compile(cls, source: str) -> SpiffeIdTemplate:
        """Compile ``source``; raise :class:`TemplateError` with the precise reason it is unusable."""
        if not isinstance(source, str) or not source:
            raise TemplateError("template must be a non-empty string")
        literals: list[str] = []
        claims: list[str] = []
        pos = 0
        for match in _PLACEHOLDER_RE.finditer(source):
            literals.append(source[pos : match.start()])
            claims.append(_claim_name(match.group(1)))
            pos = match.end()
        literals.append(source[pos:])
        if any("{" in lit or "}" in lit for lit in literals):
            raise TemplateError("template has an unbalanced '{' or '}'")
        if not claims:
            raise TemplateError(
                "template has no placeholder: every subject of the issuer would share one SPIFFE ID"
            )
        template = cls(source, tuple(literals), tuple(claims))
        try:
            probe = parse_spiffe_id(template._assemble([_PROBE] * len(claims)))
        except ValueError as exc:
            raise TemplateError(f"template is not a valid SPIFFE ID: {exc}") from None
        # A placeholder in the trust domain would let a claim choose the trust domain.
        if len(literals[0]) <= len("spiffe://") + len(probe.trust_domain):
            raise TemplateError("placeholders are allowed only in the path, after the trust domain")
        return template

    @property
    def trust_domain(self) -> str:
        """The fixed trust domain of every ID this template renders."""
        return parse_spiffe_id(self._assemble([_PROBE] * len(self.claims))).trust_domain

    def render(self, claims: Mapping[str, Any]) -> SpiffeId:
        """Fill the template from verified ``claims``; raise :class:`TemplateError` if a value is unusable."""
        values: list[str] = []
        for name in self.claims:
            if name not in claims:
                raise TemplateError(f"claim '{name}' required by the SPIFFE ID template is missing")
            value = claims[name]
            if not isinstance(value, str) or _VALUE_RE.fullmatch(value) is None:
                raise TemplateError(f"claim '{name}' is not usable as a SPIFFE ID path segment")
            values.append(value)
        try:
            return parse_spiffe_id(self._assemble(values))
        except ValueError as exc:
            # E.g. a value of "." or ".." filling a whole segment.
            raise TemplateError(f"claims do not form a valid SPIFFE ID: {exc}") from None

    def _assemble(self, values: list[str]) -> str:
        out = [self.literals[0]]
        for value, literal in zip(values, self.literals[1:], strict=True):
            out.append(value)
            out.append(literal)
        return "".join(out)


def _claim_name(inner: str) -> str:
    if inner == "sub":
        return "sub"
    if inner.startswith("claim:"):
        name = inner[len("claim:") :]
        if _CLAIM_NAME_RE.fullmatch(name) is not None:
            return name
    raise TemplateError("placeholders must be {sub} or {claim:NAME} with NAME = [A-Za-z_][A-Za-z0-9_]*")
