"""Small JOSE helpers shared by the client and the verifier: strict segment parsing, JWK handling,
RFC 7638 thumbprints and RFC 9449 ``htu`` normalisation. Raise ``ValueError``; callers map it."""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import jwt

__all__ = ["b64url", "jwk_thumbprint", "normalize_htu", "public_key_from_jwk", "strict_json_segment"]

COMPACT_JWS_RE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
SECRET_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
# alg -> (kty, crv or None for RSA)
ALG_KEY_TYPES: dict[str, tuple[str, str | None]] = {
    "ES256": ("EC", "P-256"),
    "ES384": ("EC", "P-384"),
    "ES512": ("EC", "P-521"),
    "EdDSA": ("OKP", "Ed25519"),
    "RS256": ("RSA", None),
    "PS256": ("RSA", None),
}
_THUMBPRINT_MEMBERS = {"EC": ("crv", "kty", "x", "y"), "RSA": ("e", "kty", "n"), "OKP": ("crv", "kty", "x")}
_DEFAULT_PORTS = {"http": 80, "https": 443}
_MIN_RSA_BITS, _MAX_RSA_BITS = 2048, 8192
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def b64url(data: bytes) -> str:
    """Base64url without padding."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(segment: str) -> bytes:
    if len(segment) % 4 == 1:
        raise ValueError("not base64url")
    raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    if b64url(raw) != segment:
        raise ValueError("not canonical base64url")
    return raw


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in pairs:
        if name in out:
            raise ValueError("duplicated member")
        out[name] = value
    return out


def _no_constants(name: str) -> Any:
    raise ValueError("non-standard JSON constant")


def strict_json_segment(segment: str) -> dict[str, Any]:
    """One JWS segment as a JSON object: canonical base64url, UTF-8, no duplicate names, no NaN."""
    try:
        value = json.loads(
            _b64url_decode(segment).decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constants
        )
    except (UnicodeDecodeError, RecursionError, json.JSONDecodeError) as exc:
        raise ValueError("not a JSON object") from exc
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


def jwk_thumbprint(jwk: Mapping[str, Any]) -> str:
    """RFC 7638 SHA-256 thumbprint of a public EC, RSA or OKP JWK."""
    members = _THUMBPRINT_MEMBERS.get(jwk.get("kty"))  # type: ignore[arg-type]
    if members is None or not all(isinstance(jwk.get(m), str) for m in members):
        raise ValueError("unsupported or incomplete JWK")
    canonical = json.dumps({m: jwk[m] for m in members}, sort_keys=True, separators=(",", ":"))
    return b64url(hashlib.sha256(canonical.encode("ascii")).digest())


def public_key_from_jwk(jwk: Any, alg: str) -> Any:
    """The public key of ``jwk`` for ``alg``: refuses private or symmetric members and keys that do not fit."""
    if not isinstance(jwk, Mapping):
        raise ValueError("jwk must be a JSON object")
    if SECRET_MEMBERS & set(jwk):
        raise ValueError("jwk contains private or symmetric key material")
    wanted = ALG_KEY_TYPES.get(alg)
    if wanted is None or jwk.get("kty") != wanted[0] or (wanted[1] is not None and jwk.get("crv") != wanted[1]):
        raise ValueError("jwk does not fit alg")
    if jwk.get("alg") not in (None, alg):
        raise ValueError("jwk is pinned to another alg")
    try:
        key = jwt.PyJWK(dict(jwk), algorithm=alg).key
    except (jwt.exceptions.PyJWKError, jwt.exceptions.InvalidKeyError, ValueError, TypeError) as exc:
        raise ValueError("jwk is not a valid key") from exc
    if wanted[0] == "RSA" and not _MIN_RSA_BITS <= key.key_size <= _MAX_RSA_BITS:
        raise ValueError(f"RSA keys must have {_MIN_RSA_BITS} to {_MAX_RSA_BITS} bits")
    return key


def numeric_date(value: Any) -> float:
    """A JSON NumericDate: a finite non-negative number below 2**53, never a string or a boolean."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError("not a NumericDate")
    if not 0 <= value < 2**53:
        raise ValueError("not a NumericDate")
    return float(value)


def _pct(match: re.Match[str]) -> str:
    char = chr(int(match.group(1), 16))
    return char if char in _UNRESERVED else "%" + match.group(1).upper()


def _remove_dot_segments(path: str) -> str:
    out: list[str] = []
    segments = path.split("/")
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        if seg in (".", ".."):
            if seg == ".." and len(out) > 1:
                out.pop()
            if last:
                out.append("")
        else:
            out.append(seg)
    return "/".join(out)


def normalize_htu(uri: str) -> str:
    """The URI without query and fragment, normalised per RFC 9449 §4.3 (RFC 3986 §6.2.2-6.2.3)."""
    if not isinstance(uri, str) or len(uri) > 2048 or not uri.isprintable() or " " in uri:
        raise ValueError("not a URI")
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname or parts.username is not None:
        raise ValueError("not an absolute http(s) URI")
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    port = parts.port
    netloc = host if port is None or port == _DEFAULT_PORTS[scheme] else f"{host}:{port}"
    path = re.sub(r"%([0-9A-Fa-f]{2})", _pct, parts.path or "/")
    return urlunsplit((scheme, netloc, _remove_dot_segments(path), "", ""))
