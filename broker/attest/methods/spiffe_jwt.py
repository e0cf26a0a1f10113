"""``spiffe-jwt``: a SPIFFE JWT-SVID (SPIFFE JWT-SVID spec §3: ``sub`` is the SPIFFE ID).

The SVID's trust domain must be the issuer's configured ``trust_domain``.
"""

from __future__ import annotations

from broker.attest.methods.base import TokenMethod, VerifiedJwt, register
from broker.attest.spiffe import SpiffeId, parse_spiffe_id
from broker.errors import AttestationError

__all__ = ["SpiffeJwtMethod", "svid_spiffe_id"]


def svid_spiffe_id(token: VerifiedJwt) -> SpiffeId:
    """``sub`` as a SPIFFE ID, within the issuer's trust domain when it names one."""
    try:
        spiffe_id = parse_spiffe_id(token.subject)
    except ValueError as exc:
        raise AttestationError(f"sub is not a valid SPIFFE ID: {exc}") from None
    trust_domain = token.config.trust_domain
    if trust_domain is not None and spiffe_id.trust_domain != trust_domain:
        raise AttestationError("SPIFFE ID trust domain does not match the issuer's trust domain")
    return spiffe_id


class SpiffeJwtMethod(TokenMethod):
    """JWT-SVIDs of a SPIRE (or other SPIFFE) issuer."""

    name = "spiffe-jwt"

    def spiffe_id(self, token: VerifiedJwt) -> SpiffeId:
        return svid_spiffe_id(token)


register(SpiffeJwtMethod())
