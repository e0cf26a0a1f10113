"""The checks every JWT the broker accepts from outside goes through, whoever issued it.

Workload identity tokens (:mod:`broker.attest.verifier`) and end-user tokens
(:mod:`broker.attest.users`) share them, so both get the same hardening: a size cap before any
decoding, compact JWS only, strict JSON without duplicate names, an algorithm allow-list (never
``none`` or ``HS*``), no header parameter that lets the token choose its own key, an explicit ``typ``
allow-list, integer NumericDates checked against the injected clock, and a lifetime cap. pyjwt checks
the signature (``jwt.decode``, or :func:`verify_signature` with pyjwt's algorithms — ES256 on P-256
makes pyjwt's own calls to cryptography directly), ``iss``, ``aud`` and required claims
(:func:`verify_claims` where no ``jwt.decode`` runs); everything it does not check is here
(DESIGN "Library notes"). ``label`` names the token in error descriptions (``subject_token``,
``actor_token``); no description ever contains the token.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import jwt
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from broker.attest.issuers import ALLOWED_ALGORITHMS
from broker.errors import AttestationError
from broker.strict_json import StrictJSONError, b64url_decode_canonical, loads_strict

__all__ = [
    "ACCEPTED_JWT_TYP",
    "check_header",
    "check_shape",
    "check_times",
    "numeric_date",
    "peek_unverified",
    "printable",
    "pyjwt_errors",
    "verify_claims",
    "verify_signature",
]

# Compact JWS (RFC 7515 §7.1): three non-empty base64url parts without padding.
_COMPACT_JWS_RE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
# Header parameters that would make the token choose its own key, or change how it is processed.
_REFUSED_HEADER_PARAMS = ("crit", "jku", "x5u", "jwk", "x5c", "b64", "zip", "enc", "cty")
#: RFC 7515 §4.1.9: "JWT" or "JOSE", optionally with the "application/" prefix; compared case-insensitively.
ACCEPTED_JWT_TYP = frozenset({"jwt", "jose", "application/jwt", "application/jose"})
_KID_RE = re.compile(r"[\x20-\x7e]{1,256}")
_SAFE_NAME_RE = re.compile(r"[A-Za-z0-9_.:+-]{1,64}")
_MAX_NUMERIC_DATE = 2**53
_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())


def printable(name: Any) -> str:
    """``name`` for an error description if it is a short plain identifier, else a placeholder.

    Names come from the token (claim names, ``alg``): echo only what cannot smuggle content.
    """
    return name if isinstance(name, str) and _SAFE_NAME_RE.fullmatch(name) else "(unprintable)"


def check_shape(token: Any, max_bytes: int, label: str) -> str:
    """The size cap (before any decoding) and the compact JWS shape; returns the token."""
    if not isinstance(token, str):
        raise AttestationError(f"{label} must be a string")
    # Characters first, so a huge string is never encoded (nor an ASCII one: its length is its size).
    if len(token) > max_bytes or (not token.isascii() and len(token.encode("utf-8", "surrogatepass")) > max_bytes):
        raise AttestationError(f"{label} exceeds {max_bytes} bytes")
    if _COMPACT_JWS_RE.fullmatch(token) is None:
        raise AttestationError(f"{label} is not a compact JWS")
    return token


def _json_object(segment: str, what: str, dup_label: str, label: str) -> dict[str, Any]:
    raw = b64url_decode_canonical(segment)
    if raw is None:
        raise AttestationError(f"{label} {what} is not base64url")
    try:
        value = loads_strict(raw)
    except StrictJSONError as exc:
        if exc.reason == "duplicate":
            raise AttestationError(f"duplicate {dup_label} '{printable(exc.name)}'") from None
        if exc.reason == "not_utf8":
            raise AttestationError(f"{label} {what} is not UTF-8") from None
        if exc.reason == "too_deep":
            raise AttestationError(f"{label} {what} is nested too deeply") from None
        if exc.reason in ("number", "surrogate"):
            raise AttestationError(f"{label} {what} is refused: {exc}") from None
        raise AttestationError(f"{label} {what} is not valid JSON") from None
    if not isinstance(value, dict):
        raise AttestationError(f"{label} {what} is not a JSON object")
    return value


# Header segments parsed before (an issuer's tokens share one header): segment -> parsed header. Pure
# function of the segment; only headers that parsed are kept; the memo is cleared when it is full.
_HEADER_MEMO: dict[str, dict[str, Any]] = {}
_HEADER_MEMO_SIZE = 256
_HEADER_MEMO_MAX_CHARS = 1024


def _header_object(segment: str, label: str) -> dict[str, Any]:
    known = _HEADER_MEMO.get(segment)
    if known is not None:
        return dict(known)  # callers get their own copy, the memo's stays as parsed
    header = _json_object(segment, "header", "header parameter", label)
    if len(segment) <= _HEADER_MEMO_MAX_CHARS and all(
        type(value) in (str, int, bool) or value is None for value in header.values()
    ):  # flat headers only, so the copy above is a full copy
        if len(_HEADER_MEMO) >= _HEADER_MEMO_SIZE:
            _HEADER_MEMO.clear()
        _HEADER_MEMO[segment] = dict(header)
    return header


def peek_unverified(token: str, label: str = "subject_token") -> tuple[dict[str, Any], dict[str, Any]]:
    """The token's header and claims, parsed strictly but NOT verified: use only to pick issuer and key."""
    header_segment, payload_segment, signature_segment = token.split(".")
    _unverified_header = _header_object(header_segment, label)
    _unverified_claims = _json_object(payload_segment, "payload", "claim", label)
    if b64url_decode_canonical(signature_segment) is None:
        raise AttestationError(f"{label} signature is not base64url")
    return _unverified_header, _unverified_claims


def verify_signature(token: str, key: Any, alg: str, label: str = "subject_token") -> None:
    """The JWS signature of ``token`` (already through :func:`check_shape` and :func:`peek_unverified`)
    under ``key``, with the one allow-listed ``alg``; raises on any failure.

    This is the signature step of ``jwt.decode`` without parsing the token a second time: the claims
    that :func:`peek_unverified` parsed strictly from these very bytes are then the verified claims.
    Every algorithm uses pyjwt's implementation (the same algorithm object, key preparation and
    minimum key length) except ES256 with a P-256 public key, the common case, which makes the very
    calls pyjwt's ``ECAlgorithm.verify`` makes (a 64-byte ``r || s``, as DER, verified by cryptography
    with ECDSA over SHA-256) without rebuilding the algorithm's objects for every token.
    """
    signing_input, _, signature_segment = token.rpartition(".")
    signature = b64url_decode_canonical(signature_segment)
    if signature is None:
        raise AttestationError(f"{label} signature is not base64url")
    if alg not in ALLOWED_ALGORITHMS:
        raise AttestationError("algorithm is not allowed")
    if alg == "ES256" and isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        valid = len(signature) == 64  # RFC 7518 §3.4: r and s, 32 bytes each
        if valid:
            der = encode_dss_signature(int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big"))
            try:
                key.verify(der, signing_input.encode("ascii"), _ECDSA_SHA256)
            except InvalidSignature:
                valid = False
    else:
        with pyjwt_errors(label):
            algorithm = jwt.get_algorithm_by_name(alg)
            prepared = algorithm.prepare_key(key)
            if algorithm.check_key_length(prepared):
                raise jwt.exceptions.InvalidKeyError("key is too short")
            valid = algorithm.verify(signing_input.encode("ascii"), prepared, signature)
    if not valid:
        raise AttestationError("signature verification failed")


def verify_claims(claims: Mapping[str, Any], *, issuer: str, audience: str, required: Collection[str]) -> None:
    """The claim checks ``jwt.decode`` makes with ``verify_iss/aud/sub/jti`` on: ``required`` claims
    present and not null, ``iss`` exactly ``issuer``, ``audience`` among the ``aud`` strings, and
    ``sub`` and ``jti`` strings when present. Time is :func:`check_times`'s, against the injected clock.
    """
    for name in required:
        if claims.get(name) is None:
            raise AttestationError(f"missing required claim '{printable(name)}'")
    iss = claims.get("iss")
    if iss is not None and (not isinstance(iss, str) or iss != issuer):
        raise AttestationError("issuer mismatch")
    aud = claims.get("aud")
    if not aud:
        raise AttestationError("missing required claim 'aud'")
    audiences = [aud] if isinstance(aud, str) else aud
    if not isinstance(audiences, list) or any(not isinstance(a, str) for a in audiences) or audience not in audiences:
        raise AttestationError("audience mismatch")
    if "sub" in claims and not isinstance(claims["sub"], str):
        raise AttestationError("claim 'sub' must be a string")
    if "jti" in claims and not isinstance(claims["jti"], str):
        raise AttestationError("claim 'jti' must be a string")


@contextmanager
def pyjwt_errors(label: str = "subject_token") -> Iterator[None]:
    """The one place pyjwt exceptions become broker errors (most specific first)."""
    try:
        yield
    except jwt.exceptions.InvalidSignatureError:
        raise AttestationError("signature verification failed") from None
    except jwt.exceptions.ExpiredSignatureError:
        raise AttestationError(f"{label} has expired") from None
    except jwt.exceptions.ImmatureSignatureError:
        raise AttestationError(f"{label} is not yet valid") from None
    except jwt.exceptions.InvalidAudienceError:
        raise AttestationError("audience mismatch") from None
    except jwt.exceptions.InvalidIssuerError:
        raise AttestationError("issuer mismatch") from None
    except jwt.exceptions.MissingRequiredClaimError as exc:
        raise AttestationError(f"missing required claim '{printable(exc.claim)}'") from None
    except jwt.exceptions.InvalidAlgorithmError:
        raise AttestationError("algorithm is not allowed") from None
    except jwt.exceptions.InvalidSubjectError:
        raise AttestationError("claim 'sub' must be a string") from None
    except jwt.exceptions.InvalidJTIError:
        raise AttestationError("claim 'jti' must be a string") from None
    except jwt.exceptions.InvalidKeyError:
        raise AttestationError("issuer key is unusable") from None
    except jwt.exceptions.DecodeError:
        raise AttestationError(f"{label} is malformed") from None
    except jwt.exceptions.PyJWTError:
        raise AttestationError(f"{label} is invalid") from None


def numeric_date(claims: Mapping[str, Any], name: str) -> int:
    """The claim ``name`` as a NumericDate: a JSON integer (pyjwt would take "1700000000", 1e20, True)."""
    value = claims[name]
    if type(value) is not int or not 0 <= value <= _MAX_NUMERIC_DATE:
        raise AttestationError(f"claim '{name}' must be an integer NumericDate")
    return value


def check_header(
    _unverified_header: Mapping[str, Any],
    label: str = "subject_token",
    accepted_typ: Collection[str] = ACCEPTED_JWT_TYP,
) -> str:
    """The header's ``alg`` (allow-listed), after refusing self-keying parameters and a foreign ``typ``."""
    alg = _unverified_header.get("alg")
    if not isinstance(alg, str) or not alg:
        raise AttestationError("header parameter 'alg' is missing")
    if alg.lower() == "none":
        raise AttestationError("algorithm none is not allowed")
    if alg not in ALLOWED_ALGORITHMS:
        raise AttestationError(f"algorithm {printable(alg)} is not allowed")
    for name in _REFUSED_HEADER_PARAMS:
        if name in _unverified_header:
            raise AttestationError(f"header parameter '{name}' is not allowed")
    typ = _unverified_header.get("typ")
    if typ is not None and (not isinstance(typ, str) or typ.lower() not in accepted_typ):
        # E.g. "at+jwt" for a workload identity: an access token is not a workload identity.
        raise AttestationError(f"header parameter 'typ' is not accepted for this {label.replace('_', ' ')}")
    kid = _unverified_header.get("kid")
    if kid is not None and (not isinstance(kid, str) or _KID_RE.fullmatch(kid) is None):
        raise AttestationError("header parameter 'kid' must be 1..256 printable characters")
    return alg


def check_times(
    claims: Mapping[str, Any], *, now: float, leeway: int, max_lifetime: int, label: str = "subject_token"
) -> int:
    """Types and time of ``exp``/``iat``/``nbf`` against ``now`` (the injected clock); returns ``exp``."""
    exp = numeric_date(claims, "exp")
    iat = numeric_date(claims, "iat") if "iat" in claims else None
    nbf = numeric_date(claims, "nbf") if "nbf" in claims else None
    if now >= exp + leeway:
        raise AttestationError(f"{label} has expired")
    if nbf is not None and nbf > now + leeway:
        raise AttestationError(f"{label} is not yet valid (nbf)")
    if iat is not None:
        if iat > now + leeway:
            raise AttestationError(f"{label} was issued in the future (iat)")
        if iat > exp:
            raise AttestationError("claim 'iat' is after 'exp'")
        if exp - iat > max_lifetime:
            raise AttestationError(f"token lifetime exceeds {max_lifetime} s")
    if exp - now > max_lifetime + leeway:
        raise AttestationError(f"token lifetime exceeds {max_lifetime} s")
    return exp
