"""Key binding of a workload identity token (RFC 7800 ``cnf``): which key the workload proved it holds."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from broker.attest.jwks import JwksError, jwk_thumbprint, parse_jwks

__all__ = ["identity_key_thumbprint"]

_JKT_RE = re.compile(r"[A-Za-z0-9_-]{43}")


def identity_key_thumbprint(cnf: Any) -> str:
    """The RFC 7638 thumbprint named by a ``cnf`` claim: ``{"jkt": ...}`` (RFC 9449 §6.1) or a public
    ``{"jwk": ...}`` (RFC 7800 §3.2). Raises ``ValueError`` with the reason."""
    if not isinstance(cnf, Mapping):
        raise ValueError("claim 'cnf' must be an object")
    if set(cnf) == {"jkt"}:
        if isinstance(cnf["jkt"], str) and _JKT_RE.fullmatch(cnf["jkt"]):
            return cnf["jkt"]
        raise ValueError("cnf.jkt must be a base64url SHA-256 thumbprint")
    if set(cnf) == {"jwk"} and isinstance(cnf["jwk"], Mapping):
        try:
            usable = parse_jwks({"keys": [cnf["jwk"]]})
        except JwksError as exc:
            raise ValueError(f"cnf.jwk is refused: {exc}") from None
        if not usable:
            raise ValueError("cnf.jwk is not a usable public signature key")
        return jwk_thumbprint(cnf["jwk"])
    raise ValueError("claim 'cnf' must hold exactly one of jkt or jwk")
