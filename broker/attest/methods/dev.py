"""``dev``: tokens of the trial-only local issuer (:class:`broker.attest.dev.DevIssuer`), shaped like
JWT-SVIDs. A ``dev`` issuer without a trust domain accepts any trust domain."""

from __future__ import annotations

from broker.attest.methods.base import TokenMethod, VerifiedJwt, register
from broker.attest.methods.spiffe_jwt import svid_spiffe_id
from broker.attest.spiffe import SpiffeId

__all__ = ["DevMethod"]


class DevMethod(TokenMethod):
    """The trial issuer: for trials only (the attestor warns when one is configured)."""

    name = "dev"

    def spiffe_id(self, token: VerifiedJwt) -> SpiffeId:
        return svid_spiffe_id(token)


register(DevMethod())
