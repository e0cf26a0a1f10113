"""``audit prove``: attribute a credential to its ledger entry, with an inclusion proof.

:func:`prove_attribution` returns an :class:`Attribution` only after (1) the checkpoint verified
with the auditor's key, (2) the entry was located (by leaf hash, by ``jti``, or by a task token's
``txn`` claim), (3) its leaf hash is proven included in the signed tree, (4) the entry passed the
schema, and (5) for a token, the entry is the issuance of exactly that token (same ``jti``, and the
SHA-256 of its canonical claims without ``txn`` equals ``credential.claims_sha256``), and (6) the
token's signature verifies with the task-token key the ledger itself recorded (the ``key_rotation``
entry whose ``kid`` the token and the issuance entry name). Nothing but the ledger and the
auditor's verifier key is trusted: a JWT assembled from copied claims is refused, and so is a token
signed by a key the ledger never announced. Expiry is not checked: old tokens are still attributable.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

import jwt
import rfc8785

from broker.audit._canonical import decode_leaf
from broker.audit.causes import denial_cause
from broker.audit.errors import AuditFailure, EntrySchemaError
from broker.audit.schema import ValidatedEntry, validate_entry
from broker.audit.source import LedgerSource
from broker.audit.verify import VerifierKeys, verify_signed_checkpoint
from broker.errors import VerificationError
from broker.ledger.checkpoint import Checkpoint
from broker.ledger.merkle import leaf_hash, verify_inclusion

__all__ = ["Attribution", "peek_unverified_token_claims", "prove_attribution"]

_HEX64 = re.compile(r"[0-9a-f]{64}")
_MAX_TOKEN = 16384


@dataclass(frozen=True)
class Attribution:
    """A ledger entry proven included in a verified checkpoint. Built only by :func:`prove_attribution`."""

    index: int
    leaf_hash: str
    checkpoint: Checkpoint
    entry: ValidatedEntry
    token_matched: bool
    signed_by: str = ""

    def lines(self) -> list[str]:
        """The human attribution printout."""
        e = self.entry.entry
        workload = e.get("workload", {})
        decision = e.get("decision", {})
        intent = e.get("intent", {})
        credential = e.get("credential", {})
        approval = e.get("approval")
        out = [
            f"entry            {self.index} ({self.entry.kind}) at {self.entry.time}",
            f"leaf hash        {self.leaf_hash}",
            f"included in      {self.checkpoint.origin} tree of {self.checkpoint.size} "
            f"(root {base64.b64encode(self.checkpoint.root).decode()})",
        ]
        if workload:
            out += [
                f"workload         {workload.get('name', '(unregistered)')} {workload.get('spiffe_id')}",
                f"owner            {workload.get('owner', '(none)')}",
                f"attestation      {workload.get('attestation')} by {workload.get('issuer')}",
                f"evidence digest  {workload.get('evidence_digest')}",
            ]
        if intent:
            context = json.dumps(intent.get("context", {}), sort_keys=True)
            out.append(f"intent           {intent.get('action')} on {intent.get('resource')} context {context}")
        cause = denial_cause(e)
        if decision and self.entry.kind == "denial" and cause is not None:
            # The rule of a denial entry may be the one that allowed it (a Vault outage): say what refused.
            out.append(f"decision         deny: {cause['label']} ({decision.get('error')}: {decision.get('reason')}; "
                       f"policy {decision.get('policy_version')})")
        elif decision:
            out.append(f"decision         {decision.get('effect')} by rule {decision.get('rule')} "
                       f"(policy {decision.get('policy_version')})")
        out.append(f"approval         {_approval_line(self.entry.kind, approval)}")
        if credential:
            out += [
                f"credential       {credential.get('kind')} jti {credential.get('jti')} key {credential.get('kid')}",
                f"issued / expires {_utc(credential.get('iat'))} / {_utc(credential.get('exp'))}",
            ]
            if credential.get("cnf_jkt"):
                out.append(f"bound to         DPoP key {credential['cnf_jkt']} (RFC 7638 thumbprint)")
            if credential.get("cnf_x5t_s256"):
                out.append(f"bound to         certificate {credential['cnf_x5t_s256']} (RFC 8705 x5t#S256)")
        if self.token_matched:
            out.append("token            matches this entry (jti and claims digest), and its signature verifies\n"
                       "                 with the task-token key the ledger recorded")
        return out


def _approval_line(kind: str, approval: Any) -> str:
    if not isinstance(approval, dict):
        return "none required"
    approvers = ", ".join(str(a) for a in approval.get("approvers", [])) or "nobody"
    if kind == "approval":
        actor = approval.get("approver") or {}
        who = actor.get("name", "(expiry)") if isinstance(actor, dict) else "?"
        return (f"{approval.get('outcome')} by {who} for request {approval.get('auth_req_id')} "
                f"(approved so far: {approvers}; {approval.get('needed')} needed); reason: {approval.get('reason')}")
    return f"approved by {approvers} (approval entry {approval.get('index')}, leaf {approval.get('leaf_hash')})"


def _utc(t: Any) -> str:
    from broker.entries import rfc3339

    return rfc3339(t) if isinstance(t, int) else "?"


def peek_unverified_token_claims(token: str) -> dict[str, Any]:
    """The claims of a JWT *without* checking its signature; :class:`AuditFailure` if it is not a JWT."""
    if not isinstance(token, str) or len(token) > _MAX_TOKEN:
        raise AuditFailure("the token is not a compact JWT (or is too large)")
    parts = token.strip().split(".")
    if len(parts) != 3:
        raise AuditFailure("the token is not a compact JWT (three base64url parts)")
    try:
        payload = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4))
        claims = json.loads(payload)
    except (binascii.Error, ValueError):
        raise AuditFailure("the token's payload is not base64url JSON") from None
    if not isinstance(claims, dict):
        raise AuditFailure("the token's payload is not a JSON object")
    return claims


def _recorded_task_key(source: LedgerSource, kid: str, size: int) -> dict[str, Any]:
    """The public JWK of task-token key ``kid`` as a ``key_rotation`` entry in the tree records it."""
    for raw in source.entries(0, size):
        try:
            entry = decode_leaf(raw.leaf)
        except VerificationError:
            continue  # `audit verify` reports bad leaves; here we only look for the key
        key = entry.get("key")
        if entry.get("kind") == "key_rotation" and isinstance(key, dict) and key.get("purpose") == "task-token" \
                and key.get("kid") == kid:
            validate_entry(entry)  # the key's JWK is public, and its kid is its thumbprint
            return dict(key["public_jwk"])
    raise AuditFailure(f"the ledger records no task-token key {kid!r}: the token was not signed by this broker")


def _verify_token_signature(token: str, jwk: dict[str, Any], alg: str) -> None:
    try:
        key = jwt.PyJWK(jwk, algorithm=alg).key
        # Only the signature and the token type: an expired token is still attributable.
        jwt.decode(token, key, algorithms=[alg], options={
            "verify_signature": True, "verify_exp": False, "verify_nbf": False, "verify_iat": False,
            "verify_aud": False, "verify_iss": False,
        })
        if jwt.get_unverified_header(token).get("typ") != "at+jwt":
            raise AuditFailure("the token is not a task token (typ is not at+jwt)")
    except jwt.PyJWTError:
        raise AuditFailure("the token's signature does not verify with the key the ledger recorded") from None


def _token_header(token: str) -> dict[str, Any]:
    try:
        header = jwt.get_unverified_header(token)  # only to pick the key; the signature is checked next
    except jwt.PyJWTError:
        raise AuditFailure("the token's header is not base64url JSON") from None
    return header


def _token_kid(token: str) -> Any:
    return _token_header(token).get("kid")


def _token_alg(token: str) -> str:
    alg = _token_header(token).get("alg")
    if alg not in ("ES256", "EdDSA"):  # the broker signs task tokens with these only
        raise AuditFailure(f"the token's algorithm {alg!r} is not one the broker signs with")
    return str(alg)


def _find_by_jti(source: LedgerSource, jti: str, size: int) -> int:
    for raw in source.entries(0, size):
        try:
            entry = decode_leaf(raw.leaf)
        except VerificationError:
            continue  # `audit verify` reports bad leaves; here we only look for the jti
        credential = entry.get("credential")
        if entry.get("kind") == "issuance" and isinstance(credential, dict) and credential.get("jti") == jti:
            return raw.index
    raise AuditFailure(f"no issuance entry in the verified tree of {size} has jti {jti!r}")


def prove_attribution(
    source: LedgerSource,
    verifier_key: VerifierKeys,
    *,
    token: str | None = None,
    jti: str | None = None,
    leaf_hash_hex: str | None = None,
    origin: str | None = None,
) -> Attribution:
    """Locate one entry and prove it; see the module docstring. Give exactly one of the three queries."""
    if sum(q is not None for q in (token, jti, leaf_hash_hex)) != 1:
        raise ValueError("give exactly one of a token, a jti or a leaf hash")
    # (1) the signed tree head (through the ledger's key endorsements, as `audit verify` follows them).
    signed = verify_signed_checkpoint(source, verifier_key, origin)
    checkpoint = signed.checkpoint
    size = checkpoint.size
    # (2) locate the entry.
    _unverified_claims: dict[str, Any] | None = None
    if token is not None:
        _unverified_claims = peek_unverified_token_claims(token)
        txn = _unverified_claims.get("txn")
        if not isinstance(txn, str) or not _HEX64.fullmatch(txn):
            raise AuditFailure("the token has no txn claim (64 hex digits) naming its ledger entry")
        leaf_hash_hex = txn
    wanted: bytes | None = None
    if leaf_hash_hex is not None:
        if not _HEX64.fullmatch(leaf_hash_hex):
            raise AuditFailure("a leaf hash is 64 lower-case hex digits")
        wanted = bytes.fromhex(leaf_hash_hex)
        found = source.find(wanted, size)
        if found is None:
            raise AuditFailure(f"no entry with leaf hash {leaf_hash_hex} in the verified tree of {size}")
        index = found
    else:
        assert jti is not None
        index = _find_by_jti(source, jti, size)
    # (3) the entry's bytes, its leaf hash and its audit path to the signed root.
    raw = next(iter(source.entries(index, index + 1)))
    digest = leaf_hash(raw.leaf)
    if wanted is not None and digest != wanted:
        raise AuditFailure("the source returned an entry whose leaf hash is not the one asked for", index=index)
    try:
        verify_inclusion(digest, index, size, source.inclusion_proof(index, size), checkpoint.root)
    except VerificationError as exc:
        raise AuditFailure(f"inclusion proof does not verify: {exc}", index=index) from None
    # (4) the entry itself.
    try:
        entry = validate_entry(decode_leaf(raw.leaf))
    except EntrySchemaError as exc:
        raise AuditFailure(f"entry breaks the version 1 schema: {exc}", index=index) from None
    except VerificationError as exc:
        raise AuditFailure(f"leaf is not canonical JSON: {exc}", index=index) from None
    # (5) a token must be the very credential this entry records.
    if _unverified_claims is not None:
        credential = entry.entry.get("credential") or {}
        if entry.kind != "issuance" or credential.get("jti") != _unverified_claims.get("jti"):
            raise AuditFailure("the entry named by the token's txn does not record this token's jti", index=index)
        claims = {k: v for k, v in _unverified_claims.items() if k != "txn"}
        try:
            claims_digest = "sha256:" + hashlib.sha256(rfc8785.dumps(claims)).hexdigest()
        except rfc8785.CanonicalizationError:
            raise AuditFailure("the token's claims cannot be canonicalised", index=index) from None
        if claims_digest != credential.get("claims_sha256"):
            raise AuditFailure("the token's claims differ from those the entry committed to", index=index)
        # (6) signed by the key the ledger recorded for the kid the entry names.
        assert token is not None
        kid = credential.get("kid")
        alg = _token_alg(token)
        if not isinstance(kid, str) or _token_kid(token) != kid:
            raise AuditFailure("the token names another signing key than its issuance entry", index=index)
        _verify_token_signature(token, _recorded_task_key(source, kid, size), alg)
    return Attribution(index=index, leaf_hash=digest.hex(), checkpoint=checkpoint, entry=entry,
                       token_matched=_unverified_claims is not None, signed_by=signed.signed_by)
