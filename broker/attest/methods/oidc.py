"""``oidc``: an OIDC ID token (or JWT) of a configured issuer, mapped to a SPIFFE ID through the
issuer's ``spiffe_id_template`` (:mod:`broker.attest.template`)."""

from __future__ import annotations

from broker.attest.methods.base import TokenMethod, VerifiedJwt, register
from broker.attest.spiffe import SpiffeId
from broker.attest.template import TemplateError
from broker.errors import AttestationError

__all__ = ["OidcMethod"]


class OidcMethod(TokenMethod):
    """Workloads whose platform issues OIDC tokens (CI systems, cloud workload identity)."""

    name = "oidc"

    def spiffe_id(self, token: VerifiedJwt) -> SpiffeId:
        if token.template is None:  # IssuerConfig requires a template for this kind
            raise AttestationError("the oidc issuer has no spiffe_id_template")
        try:
            return token.template.render(token.claims)
        except TemplateError as exc:
            raise AttestationError(str(exc)) from None


register(OidcMethod())
