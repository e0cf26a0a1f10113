"""WIMSE workload credentials: the Workload Identity Token and its Workload Proof Token.

Implements draft-ietf-wimse-workload-creds-03 §3.1 (the WIT, ``typ: wit+jwt``) and
draft-ietf-wimse-wpt-02 §2 (the WPT, ``typ: wpt+jwt``). A WIT binds a workload identifier to a
public key (``cnf.jwk``, whose ``alg`` the proof must use) and is never a bearer token: it counts
only with a WPT signed by that key, made for this request (``aud``), for this WIT (``wth``) and for
every other token the request carries (``ath``, ``tth``, ``oth``).

:func:`verify_wit` returns a :class:`VerifiedWit` or raises; :func:`verify_wpt` takes only a
:class:`VerifiedWit` and returns a :class:`VerifiedWorkloadProof` or raises. The WPT's ``jti``
is returned for the caller to consume once in the shared state (it is single-use for as long as
the proof is valid); nothing here touches state, the network or the clock.

Checks, in order, each failure an :class:`~broker.errors.AttestationError` naming what is wrong:

WIT: (1) size and compact shape; (2) header: ``typ`` is ``wit+jwt``, ``alg`` asymmetric and
allow-listed, no self-keying parameters; (3) ``sub`` is one workload identifier (``spiffe://`` or
``wimse://``) whose trust domain has configured keys; (4) signature by one of that trust domain's
keys (by ``kid`` where given), ``exp`` required, times and lifetime cap; (5) ``cnf.jwk`` is a
public asymmetric key with an allow-listed ``alg``.
WPT: (1) exactly one proof, size and shape; (2) header ``typ`` is ``wpt+jwt`` and ``alg`` equals
``cnf.jwk.alg``; (3) signature by ``cnf.jwk``; (4) ``aud`` is the request's target URI; ``exp``
present, not passed, at most ``max_lifetime`` ahead; ``jti`` present; (5) ``wth`` = base64url
SHA-256 of the WIT; (6) ``ath``/``tth``/``oth`` present exactly for the tokens the request carries,
each matching its token.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import jwt

from broker.attest.issuers import ALLOWED_ALGORITHMS
from broker.attest.jwt_checks import check_header, check_shape, check_times, numeric_date, peek_unverified, pyjwt_errors
from broker.attest.spiffe import validate_path_segment, validate_trust_domain
from broker.errors import AttestationError

__all__ = [
    "DRAFTS",
    "VerifiedWit",
    "VerifiedWorkloadProof",
    "token_hash",
    "verify_wit",
    "verify_wpt",
]

#: The revisions this module implements.
DRAFTS = ("draft-ietf-wimse-workload-creds-03", "draft-ietf-wimse-wpt-02")
WIT_TYP = frozenset({"wit+jwt", "application/wit+jwt"})
WPT_TYP = frozenset({"wpt+jwt", "application/wpt+jwt"})
_MAX_BYTES = 8192
_IDENTIFIER_SCHEMES = ("spiffe", "wimse")
_OTH_NAME_RE = re.compile(r"[a-z0-9!#$%&'*+.^_`|~-]{1,64}")  # a lower-case HTTP field name


def token_hash(token: str) -> str:
    """base64url (no padding) SHA-256 of a token's ASCII value: ``wth``, ``ath``, ``tth``, ``oth`` values."""
    digest = hashlib.sha256(token.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


@dataclass(frozen=True, slots=True)
class VerifiedWit:
    """A WIT whose signature, times and key binding verified. Built only by :func:`verify_wit`."""

    workload_id: str
    trust_domain: str
    issuer: str | None
    jti: str | None
    expires_at: int
    #: ``sha256:<hex>`` of the WIT, for the ledger (never the token).
    evidence_digest: str
    #: ``wth``: what a WPT made for this WIT must carry.
    wth: str
    proof_alg: str
    proof_key: jwt.PyJWK = field(repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class VerifiedWorkloadProof:
    """A WPT that proved possession of a WIT's key for one request. Built only by :func:`verify_wpt`."""

    wit: VerifiedWit
    jti: str
    expires_at: int


def _workload_identifier(sub: Any) -> tuple[str, str]:
    """``(identifier, trust domain)`` of a ``spiffe://`` or ``wimse://`` Workload Identifier."""
    if not isinstance(sub, str) or len(sub) > 2048:
        raise AttestationError("claim 'sub' must be a workload identifier of at most 2048 characters")
    scheme, sep, rest = sub.partition("://")
    if not sep or scheme not in _IDENTIFIER_SCHEMES:
        raise AttestationError("claim 'sub' must be a spiffe:// or wimse:// workload identifier")
    trust_domain, slash, path = rest.partition("/")
    try:
        validate_trust_domain(trust_domain)
        if not slash:
            raise ValueError("names a trust domain, not a workload")
        for segment in path.split("/"):
            validate_path_segment(segment)
    except ValueError as exc:
        raise AttestationError(f"claim 'sub' is not a workload identifier: {exc}") from None
    return sub, trust_domain


def _proof_key(claims: Mapping[str, Any]) -> tuple[jwt.PyJWK, str]:
    cnf = claims.get("cnf")
    jwk = cnf.get("jwk") if isinstance(cnf, dict) else None
    if not isinstance(jwk, dict):
        raise AttestationError("the WIT has no cnf.jwk (a WIT is bound to the workload's key)")
    alg = jwk.get("alg")
    if not isinstance(alg, str) or alg not in ALLOWED_ALGORITHMS:
        raise AttestationError("cnf.jwk must name an allowed asymmetric 'alg'")
    if jwk.get("kty") not in ("EC", "RSA", "OKP") or any(p in jwk for p in ("d", "p", "q", "dp", "dq", "qi", "k")):
        raise AttestationError("cnf.jwk must be a public asymmetric key")
    try:
        return jwt.PyJWK(jwk, algorithm=alg), alg
    except jwt.exceptions.PyJWKError:
        raise AttestationError("cnf.jwk is not a usable key for its 'alg'") from None


def verify_wit(
    token: str,
    trust_anchors: Mapping[str, Sequence[jwt.PyJWK]],
    *,
    now: float,
    leeway: int = 30,
    max_lifetime: int = 86_400,
    max_bytes: int = _MAX_BYTES,
) -> VerifiedWit:
    """Verify a Workload Identity Token; ``trust_anchors`` maps a trust domain to its issuers' keys."""
    label = "workload identity token"
    # (1) shape and size before anything is decoded.
    check_shape(token, max_bytes, label)
    _unverified_header, _unverified_claims = peek_unverified(token, label)
    # (2) explicit typing: an ID token, access token or WPT is not a WIT.
    if not isinstance(_unverified_header.get("typ"), str) or _unverified_header["typ"].lower() not in WIT_TYP:
        raise AttestationError("header parameter 'typ' must be wit+jwt")
    alg = check_header(_unverified_header, label, WIT_TYP)
    # (3) the trust domain named by the identifier chooses the keys.
    workload_id, trust_domain = _workload_identifier(_unverified_claims.get("sub"))
    keys = trust_anchors.get(trust_domain)
    if not keys:
        raise AttestationError(f"trust domain {trust_domain!r} has no WIMSE trust anchor")
    kid = _unverified_header.get("kid")
    candidates = [k for k in keys if kid is None or k.key_id == kid]
    if not candidates:
        raise AttestationError("no trust anchor key matches the WIT's 'kid'")
    # (4) signature (any candidate), then the claims pyjwt does not check.
    claims: dict[str, Any] | None = None
    for key in candidates:
        try:
            with pyjwt_errors(label):
                claims = jwt.decode(token, key=key, algorithms=[alg], options={
                    "require": ["sub", "exp"], "verify_aud": False, "verify_exp": False,
                    "verify_iat": False, "verify_nbf": False,
                })
            break
        except AttestationError as exc:
            if str(exc) != "signature verification failed" or key is candidates[-1]:
                raise
    assert claims is not None
    expires_at = check_times(claims, now=now, leeway=leeway, max_lifetime=max_lifetime, label=label)
    issuer = claims.get("iss")
    if issuer is not None and not isinstance(issuer, str):
        raise AttestationError("claim 'iss' must be a string")
    jti = claims.get("jti")
    if jti is not None and (not isinstance(jti, str) or not jti):
        raise AttestationError("claim 'jti' must be a non-empty string")
    # (5) the key the proof must use.
    proof_key, proof_alg = _proof_key(claims)
    return VerifiedWit(
        workload_id=workload_id, trust_domain=trust_domain, issuer=issuer, jti=jti, expires_at=expires_at,
        evidence_digest="sha256:" + hashlib.sha256(token.encode("ascii")).hexdigest(), wth=token_hash(token),
        proof_alg=proof_alg, proof_key=proof_key,
    )


def _bound(claims: Mapping[str, Any], name: str, token: str | None, what: str) -> None:
    value = claims.get(name)
    if token is None:
        if value is not None:
            raise AttestationError(f"the proof's '{name}' names {what} the request does not carry")
        return
    if not isinstance(value, str):
        raise AttestationError(f"the request carries {what}; the proof must bind it with '{name}'")
    if not hmac.compare_digest(value, token_hash(token)):
        raise AttestationError(f"the proof's '{name}' does not match the {what} of the request")


def verify_wpt(
    proofs: Sequence[str],
    wit: VerifiedWit,
    *,
    audience: str,
    now: float,
    leeway: int = 5,
    max_lifetime: int = 300,
    access_token: str | None = None,
    txn_token: str | None = None,
    other_tokens: Mapping[str, str] | None = None,
    max_bytes: int = _MAX_BYTES,
) -> VerifiedWorkloadProof:
    """Verify the request's ``Workload-Proof-Token`` field values against ``wit`` (see module docstring).

    ``audience`` is the target URI the broker serves at (from its configuration, never from the
    request's Host). ``other_tokens`` maps lower-case header names to the other tokens the request
    carries that the proof must cover (``oth``).
    """
    label = "workload proof token"
    # (1) exactly one proof.
    if len(proofs) != 1:
        raise AttestationError(f"the request must carry exactly one Workload-Proof-Token, not {len(proofs)}")
    proof = check_shape(proofs[0], max_bytes, label)
    _unverified_header, _ = peek_unverified(proof, label)
    # (2) typed, and signed with exactly the algorithm the WIT demands.
    if not isinstance(_unverified_header.get("typ"), str) or _unverified_header["typ"].lower() not in WPT_TYP:
        raise AttestationError("header parameter 'typ' must be wpt+jwt")
    alg = check_header(_unverified_header, label, WPT_TYP)
    if alg != wit.proof_alg:
        raise AttestationError(f"the proof's alg must be the WIT's cnf.jwk alg {wit.proof_alg}")
    # (3) signature by the WIT's key, (4) audience and required claims.
    with pyjwt_errors(label):
        claims: dict[str, Any] = jwt.decode(proof, key=wit.proof_key, algorithms=[alg], audience=audience, options={
            "require": ["aud", "exp", "jti", "wth"], "verify_exp": False, "verify_iat": False, "verify_nbf": False,
        })
    expires_at = numeric_date(claims, "exp")
    if now >= expires_at + leeway:
        raise AttestationError(f"{label} has expired")
    if expires_at - now > max_lifetime + leeway:
        raise AttestationError(f"{label} expires more than {max_lifetime} s ahead")
    jti = claims["jti"]
    if not isinstance(jti, str) or not 16 <= len(jti) <= 256:
        raise AttestationError("claim 'jti' must be a string of 16 to 256 characters")
    # (5) made for this WIT.
    wth = claims["wth"]
    if not isinstance(wth, str) or not hmac.compare_digest(wth, wit.wth):
        raise AttestationError("the proof's 'wth' does not match the workload identity token")
    # (6) and for every other token of the request, no more, no fewer.
    _bound(claims, "ath", access_token, "an access token")
    _bound(claims, "tth", txn_token, "a transaction token")
    others = dict(other_tokens or {})
    oth = claims.get("oth")
    if oth is None:
        oth = {}
    if not isinstance(oth, dict) or any(not isinstance(k, str) or _OTH_NAME_RE.fullmatch(k) is None for k in oth):
        raise AttestationError("claim 'oth' must map lower-case header names to hashes")
    unknown = sorted(set(oth) - set(others))
    if unknown:
        raise AttestationError(f"the proof's 'oth' names {unknown[0]!r}, which this request does not carry")
    for name, value in others.items():
        _bound(oth, name, value.strip(), f"{name!r} token")
    return VerifiedWorkloadProof(wit=wit, jti=jti, expires_at=expires_at)
